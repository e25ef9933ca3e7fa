"""Mosaic GPU filter gradient of the FFT convolution (kernels_pallas.fftconv.mosaic_gpu_dk).

Interpret mode on CPU against float64 direct sums ``dk[c, j] = sum_b sum_t w d[t + j]`` (no
FFT): both schedules (warpgroups over signals at n = 2048 / 4096, over row blocks at
n = 8192), odd batch and batch 1 (a half-empty packed pair), short filters, circular, the
launch options; the interpreter's race detector; lowering for an abstract H100; the
blocked constants; bad inputs; the op's filter gradient with ``MOSAIC_FILTER_GRAD`` on
(with either ``MOSAIC_BACKWARD``) against ``jax.vjp`` of the jnp.fft reference; real sizes
under the ``gpu`` marker.
"""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

from jaxeff.ops import _registry
from kernels_pallas.fftconv import mosaic_gpu as M
from kernels_pallas.fftconv import mosaic_gpu_dk as D
from tests.helpers import assert_grads_match, fft_conv_vjp, rel_err

TOL = 1e-2  # bf16 operands, float32 accumulation (measured 3e-3 .. 4e-3)
F = importlib.import_module("jaxeff.ops.fft_conv")  # the module (jaxeff.ops exports the op)


def _signals(key, b, c, seq):
  kw, kd = jax.random.split(key)
  w = jax.random.normal(kw, (b, c, seq), jnp.float32).astype(jnp.bfloat16)
  d = jax.random.normal(kd, (b, c, seq), jnp.float32).astype(jnp.bfloat16)
  return w, d


def _np_filter_grad(w, d, flen, causal):
  """float64 ``dk[c, j] = sum_b sum_t w[t] d[t + j]`` by direct sums (``d`` zero from
  ``seq`` on, or periodic when circular)."""
  w = np.asarray(jnp.asarray(w, jnp.float32), np.float64)
  d = np.asarray(jnp.asarray(d, jnp.float32), np.float64)
  seq = w.shape[-1]
  out = np.empty((w.shape[1], flen))
  for j in range(flen):
    if causal:
      out[:, j] = np.einsum("bct,bct->c", w[..., :seq - j], d[..., j:])
    else:
      out[:, j] = np.einsum("bct,bct->c", w, np.roll(d, -j, axis=-1))
  return out


CASES = {
    # name: (batch, channels, seq, filter_len, causal, config)
    "n2048_odd_batch": (3, 2, 1000, 1000, True, None),  # 64 x 32, signals per warpgroup
    "n4096_short_filter": (2, 1, 2048, 300, True, None),  # 64 x 64: two column blocks
    # 128 x 64: row blocks, a half-empty pair (the default config: test_dk_no_races[4096])
    "n8192_batch1_f32_half_twiddles": (1, 1, 4096, 4096, True,
                                       D.MosaicDkConfig(stages=1, half_twiddles=True)),
    "circular_2048": (4, 1, 2048, 300, False, None),  # n = seq, all rows, wraps
    "ctas_per_channel_one_wg": (8, 1, 1024, 700, True,
                                D.MosaicDkConfig(compute_wgs=1, stages=2, pairs_per_cta=2)),
    "n4096_whole_tiles": (2, 1, 2048, 2048, True,
                          D.MosaicDkConfig(stages=1, col_width=64, const_dtype="bfloat16")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_dk_interpret(case, key):
  b, c, seq, flen, causal, cfg = CASES[case]
  w, d = _signals(key, b, c, seq)
  dk = D.filter_grad_mosaic(w, d, flen, causal=causal, config=cfg, interpret=True)
  assert dk.shape == (c, flen) and dk.dtype == jnp.float32
  err = rel_err(dk, _np_filter_grad(w, d, flen, causal))
  assert err < TOL, (case, err)


@pytest.mark.parametrize("seq,flen", [(1024, 1024), (4096, 1500)])
def test_dk_no_races(seq, flen, key):
  # The happen-before race detector over the TMA ring, the operand planes and (n = 8192)
  # the ring slot shared by the two warpgroups (refilled after both arrived on its
  # barrier), default configurations, 4 packed signals (both ring slots reused); the
  # values too.
  from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
  w, d = _signals(key, 8, 1, seq)
  dk = D.filter_grad_mosaic(w, d, flen,
                            interpret=plgpu.InterpretGPUParams(detect_races=True))
  jax.block_until_ready(dk)
  assert not gpu_callbacks.get_races().races_found
  assert rel_err(dk, _np_filter_grad(w, d, flen, True)) < TOL


@pytest.mark.parametrize("seq,causal,cfg", [
    (1024, True, None),  # n = 2048, two warpgroups over the signals, 2-deep rings
    (2048, True, None),  # n = 4096, two column blocks
    (4096, True, None),  # n = 8192, row blocks, shared ring, bf16 half twiddle table
    (4096, True, D.MosaicDkConfig(stages=1, col_width=64, const_dtype="bfloat16",
                                  half_twiddles=True)),
    (2048, False, None),  # circular n = 2048, rows 64
])
def test_dk_lowers_for_cuda(seq, causal, cfg):
  # Interpret mode never builds the Mosaic GPU module; lowering for an abstract H100 does
  # (wgmma operands and swizzles, TMA boxes of the column blocks, the fori_loop carry).
  sds = jax.ShapeDtypeStruct
  fn = lambda w, d: D.filter_grad_mosaic(w, d, seq, causal=causal, config=cfg)
  args = (sds((64, 16, seq), jnp.bfloat16), sds((64, 16, seq), jnp.bfloat16))
  device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132,
                                       platform="cuda")
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",),
                                                                abstract_device=device)):
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text and "fft_conv_filter_grad_mosaic" in text


def test_dk_configs_and_smem():
  for n, seq, causal in ((2048, 1024, True), (4096, 2048, True), (8192, 4096, True),
                         (2048, 2048, False), (4096, 4096, False)):
    cfg = D.default_config(n, seq)
    assert D.smem_bytes(M.geometry(n, seq), cfg) <= M.SMEM_BUDGET_BYTES, (n, seq)
    assert D.unsupported(n, seq, jnp.bfloat16) is None
  assert D.default_config(2048, 1024) == D.MosaicDkConfig()  # two warpgroups, 2-deep rings
  cfg = D.default_config(8192, 4096)
  assert (cfg.stages, cfg.const_dtype, cfg.half_twiddles) == (2, "bfloat16", True)
  # circular n = 8192 (128 input rows) does not fit: the Triton kernel serves it
  assert "bytes of shared memory" in D.unsupported(8192, 8192, jnp.bfloat16)


def test_dk_blocked_constants():
  geo = M.geometry(8192, 4096)
  cfg = D.MosaicDkConfig(half_twiddles=True)
  c = D._blocked_constants(geo, cfg, np.float64)
  full = M.dft_constants(geo, np.float64)
  for cb in range(2):  # column block cb of F2 and of the twiddle table's first 64 rows
    np.testing.assert_array_equal(c["f2"][:, cb], full["f2"][:, :, 32 * cb:32 * cb + 32])
    np.testing.assert_array_equal(c["tw"][:, cb], full["tw"][:, :64, 32 * cb:32 * cb + 32])
    np.testing.assert_array_equal(c["twc"][:, :, cb], full["twc"][:, :, 32 * cb:32 * cb + 32])
  np.testing.assert_array_equal(c["w1"], full["w1"])


def test_dk_bad_inputs(key):
  w, d = _signals(key, 2, 1, 1024)
  with pytest.raises(NotImplementedError, match="dtype float16 is not bfloat16"):
    D.filter_grad_mosaic(w.astype(jnp.float16), d.astype(jnp.float16), 1024, interpret=True)
  with pytest.raises(TypeError, match="d.dtype must equal w.dtype bfloat16, got float32"):
    D.filter_grad_mosaic(w, d.astype(jnp.float32), 1024, interpret=True)
  with pytest.raises(ValueError, match=r"w and d must be \[batch, channels, seq\] of one"):
    D.filter_grad_mosaic(w, d[..., :512], 512, interpret=True)
  with pytest.raises(ValueError, match=r"filter_len must be an int in \[1, seq=1024\], got 0"):
    D.filter_grad_mosaic(w, d, 0, interpret=True)
  with pytest.raises(ValueError, match=r"filter_len must be an int in \[1, seq=1024\], got 2000"):
    D.filter_grad_mosaic(w, d, 2000, interpret=True)
  with pytest.raises(NotImplementedError, match=r"transform size 1024 is not one of \(2048"):
    D.filter_grad_mosaic(w[..., :512], d[..., :512], 300, interpret=True)
  with pytest.raises(NotImplementedError, match="needs compute_wgs=2"):
    D.filter_grad_mosaic(*_signals(key, 2, 1, 4096), 4096,
                         config=D.MosaicDkConfig(compute_wgs=1), interpret=True)
  with pytest.raises(NotImplementedError, match="bytes of shared memory"):
    D.filter_grad_mosaic(*_signals(key, 2, 1, 4096), 4096,
                         config=D.MosaicDkConfig(stages=2), interpret=True)
  with pytest.raises(ValueError, match="col_width must be one of"):
    D.MosaicDkConfig(col_width=16)
  with pytest.raises(ValueError, match="compute_wgs must be 1 or 2, got 4"):
    D.MosaicDkConfig(compute_wgs=4)
  with pytest.raises(ValueError, match="const_dtype must be float32 or bfloat16"):
    D.MosaicDkConfig(const_dtype="float16")
  geo = M.geometry(2048, 1024)
  z = jnp.zeros((3, 2, 1, 32, 32), jnp.bfloat16)
  with pytest.raises(ValueError, match="pairs=3 must be a multiple of compute_wgs=2"):
    D.filter_grad_fused_mosaic(z, z, geo, interpret=True)
  with pytest.raises(ValueError, match="zd must match zw"):
    D.filter_grad_fused_mosaic(z[:2], z[:2, :, :, :16], geo, interpret=True)


_OP_CASES = {
    # name: (MOSAIC_BACKWARD, batch, channels, seq, filter_len, causal, gated)
    "mosaic_bwd_gated_causal_odd": (True, 3, 2, 1024, 1024, True, True),
    "triton_bwd_plain_circular": (False, 2, 1, 2048, 300, False, False),
}


@pytest.mark.parametrize("case", list(_OP_CASES))
def test_op_mosaic_filter_grad(case, key, monkeypatch, request):
  # jaxeff.ops.fft_conv's "mosaic_gpu" entry with MOSAIC_FILTER_GRAD on: dk from the Mosaic
  # kernel (a spy asserts it ran) with either backward for du, dx, dv; every gradient vs
  # jax.vjp of the jnp.fft reference.
  bwd, b, c, seq, flen, causal, gated = _OP_CASES[case]
  monkeypatch.setattr(F, "MOSAIC_FILTER_GRAD", True)
  monkeypatch.setattr(F, "MOSAIC_BACKWARD", bwd)
  _registry._jitted.cache_clear()  # the flags are read when the op is traced
  request.addfinalizer(_registry._jitted.cache_clear)
  calls = []
  dk_kernel = F._mosaic_dk.filter_grad_mosaic

  def spy(*args, **kw):
    calls.append(args[2])
    return dk_kernel(*args, **kw)

  monkeypatch.setattr(F._mosaic_dk, "filter_grad_mosaic", spy)
  ks = jax.random.split(key, 4)
  u, x = _signals(ks[0], b, c, seq)
  v, dy = _signals(ks[1], b, c, seq)
  k = jax.random.normal(ks[2], (c, flen), jnp.float32) / np.sqrt(flen)
  if not gated:
    x = v = None

  y, grads = fft_conv_vjp("mosaic_gpu:interpret", u, k, x, v, dy, causal=causal)
  assert calls == [flen]
  y_ref, grads_ref = fft_conv_vjp("xla", u, k, x, v, dy, causal=causal)
  assert rel_err(y, y_ref) < TOL
  assert_grads_match(grads, grads_ref, TOL, case)


def test_op_filter_grad_flag_and_choice(key):
  # Off by default; the explicit choice is validated; the flag falls back to the Triton
  # kernel where the Mosaic one cannot serve (float16, transform sizes past 8192).
  assert F.MOSAIC_FILTER_GRAD is False
  u, d = _signals(key, 2, 2, 1024)
  k = jax.random.normal(key, (2, 1024), jnp.float32)
  call = F._MosaicCall(True, F._triton_call(u, k, causal=True, interpret=True))
  assert call.filter_grad == "triton" and call.filter_grad_fn() is None
  mosaic = F._MosaicCall(True, call.triton, filter_grad="mosaic")
  assert mosaic.filter_grad_fn() is not None and F._mosaic_dk_serves(mosaic, u)
  assert not F._mosaic_dk_serves(mosaic, u.astype(jnp.float16))
  u8, k8 = jnp.zeros((2, 1, 8192), jnp.bfloat16), jnp.zeros((1, 8192))  # n = 16384
  long = F._MosaicCall(True, F._triton_call(u8, k8, causal=True, interpret=True),
                       filter_grad="mosaic")
  assert not F._mosaic_dk_serves(long, u8)
  with pytest.raises(ValueError, match="filter_grad must be None, 'mosaic' or 'triton', got 'x'"):
    F.fft_conv_mosaic_gpu(u, k, filter_grad="x", interpret=True)
  with pytest.raises(NotImplementedError,
                     match="filter_grad='mosaic': dtype float16 is not bfloat16"):
    F.fft_conv_mosaic_gpu(u.astype(jnp.float16), k, filter_grad="mosaic", interpret=True)


@pytest.mark.gpu
@pytest.mark.parametrize("seq", [1024, 2048, 4096])
def test_dk_gpu(seq, key):
  w, d = _signals(key, 64, 16, seq)
  dk = jax.jit(lambda w, d: D.filter_grad_mosaic(w, d, seq))(w, d)
  # float64 reference by NumPy's FFT (the direct sums are too slow at this size)
  f64 = lambda a: np.asarray(jnp.asarray(a, jnp.float32), np.float64)
  n = 2 * seq
  ref = np.fft.irfft(np.conj(np.fft.rfft(f64(w), n)) * np.fft.rfft(f64(d), n), n)
  err = rel_err(dk, ref.sum(0)[:, :seq])
  assert err < TOL, err


@pytest.mark.gpu
@pytest.mark.parametrize("seq", [1024, 4096])
def test_op_mosaic_filter_grad_gpu(seq, key):
  # fwd + bwd, gated, the Mosaic backward and the Mosaic dk, vs the jnp.fft reference.
  ks = jax.random.split(key, 3)
  u, x = _signals(ks[0], 8, 96, seq)
  v, dy = _signals(ks[1], 8, 96, seq)
  k = jax.random.normal(ks[2], (96, seq), jnp.float32) / np.sqrt(seq)

  def grads(f):
    return jax.jit(lambda *a: jax.vjp(f, *a)[1](dy))(u, k, x, v)

  got = grads(lambda u, k, x, v: F.fft_conv_mosaic_gpu(u, k, gate=(x, v), backward="mosaic",
                                                       filter_grad="mosaic"))
  ref = grads(lambda u, k, x, v: F.fft_conv(u, k, gate=(x, v), implementation="xla"))
  for name, g, r in zip(("du", "dk", "dx", "dv"), got, ref):
    assert rel_err(g, r) < TOL, (name, rel_err(g, r))
