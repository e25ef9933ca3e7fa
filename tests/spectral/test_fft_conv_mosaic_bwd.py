"""Fused Mosaic GPU backward of the FFT convolution (kernels_pallas.fftconv.mosaic_gpu_bwd).

Interpret mode on CPU against float64 direct sums (no FFT) of both outputs,
``dw[b, c, t] = sum_j k[c, j] d[b, c, t + j]`` and ``dk[c, j] = sum_b sum_t a d[t + j]``:
both schedules (warpgroups over signals at n = 2048 / 4096, over row blocks at n = 8192),
odd batch and batch 1, short filters, circular, launch options; the interpreter's race
detector; lowering for an abstract H100; bad inputs; the op's gradients with
``MOSAIC_FUSED_BACKWARD`` on against ``jax.vjp`` of the jnp.fft reference; real sizes
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
from kernels_pallas.fftconv import mosaic_gpu_bwd as B
from tests.helpers import assert_grads_match, fft_conv_vjp, rel_err

TOL = 1e-2  # bf16 operands, float32 accumulation (measured 3e-3 .. 4.3e-3)
F = importlib.import_module("jaxeff.ops.fft_conv")  # the module (jaxeff.ops exports the op)


def _inputs(key, b, c, seq, flen):
  ka, kd, kk = jax.random.split(key, 3)
  a = jax.random.normal(ka, (b, c, seq), jnp.float32).astype(jnp.bfloat16)
  d = jax.random.normal(kd, (b, c, seq), jnp.float32).astype(jnp.bfloat16)
  k = jax.random.normal(kk, (c, flen), jnp.float32) / np.sqrt(flen)
  return a, d, k


def _np_backward(a, d, k, causal):
  """float64 ``dw[b, c, t] = sum_j k[c, j] d[b, c, t + j]`` and
  ``dk[c, j] = sum_b sum_t a[b, c, t] d[b, c, t + j]`` by direct sums (``d`` zero from
  ``seq`` on, or periodic when circular)."""
  f64 = lambda x: np.asarray(jnp.asarray(x, jnp.float32), np.float64)
  a, d, k = f64(a), f64(d), f64(k)
  seq, flen = a.shape[-1], k.shape[-1]
  dw, dk = np.zeros_like(d), np.empty((a.shape[1], flen))
  for j in range(flen):
    if causal:
      dw[..., :seq - j] += k[None, :, j:j + 1] * d[..., j:]
      dk[:, j] = np.einsum("bct,bct->c", a[..., :seq - j], d[..., j:])
    else:
      shifted = np.roll(d, -j, axis=-1)
      dw += k[None, :, j:j + 1] * shifted
      dk[:, j] = np.einsum("bct,bct->c", a, shifted)
  return dw, dk


CASES = {
    # name: (batch, channels, seq, filter_len, causal, config)
    "n2048_odd_batch": (3, 2, 1000, 1000, True, None),  # 64 x 32, rows 32: own e1 planes
    "n4096_short_filter": (2, 1, 2048, 300, True, None),  # 64 x 64: two column blocks
    "n8192_batch1": (1, 1, 4096, 4096, True, None),  # 128 x 64: row blocks, half-empty pair
    "circular_2048": (4, 1, 2048, 300, False, None),  # n = seq, rows 64: transposed inverse
    "ctas_per_channel_one_wg_f32_half": (8, 1, 1024, 700, True, B.MosaicBwdConfig(
        compute_wgs=1, stages=2, pairs_per_cta=2, half_twiddles=True)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bwd_interpret(case, key):
  b, c, seq, flen, causal, cfg = CASES[case]
  a, d, k = _inputs(key, b, c, seq, flen)
  dw, dk = B.fft_conv_backward_mosaic(a, d, k, causal=causal, config=cfg, interpret=True)
  assert dw.shape == (b, c, seq) and dw.dtype == jnp.bfloat16
  assert dk.shape == (c, flen) and dk.dtype == jnp.float32
  dw_ref, dk_ref = _np_backward(a, d, k, causal)
  assert rel_err(dw, dw_ref) < TOL, (case, rel_err(dw, dw_ref))
  assert rel_err(dk, dk_ref) < TOL, (case, rel_err(dk, dk_ref))


@pytest.mark.parametrize("seq,flen", [(1024, 1024), (4096, 1500)])
def test_bwd_no_races(seq, flen, key):
  # The happen-before race detector over the TMA rings, the operand planes (Q, R and the
  # dw staging tile written while the previous output copy may still read it) and, at
  # n = 8192, the ring slot and R planes shared by the two warpgroups; default
  # configurations, 4 packed signals (ring slots reused); the values too.
  from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
  a, d, k = _inputs(key, 8, 1, seq, flen)
  dw, dk = B.fft_conv_backward_mosaic(a, d, k,
                                      interpret=plgpu.InterpretGPUParams(detect_races=True))
  jax.block_until_ready((dw, dk))
  assert not gpu_callbacks.get_races().races_found
  dw_ref, dk_ref = _np_backward(a, d, k, True)
  assert rel_err(dw, dw_ref) < TOL and rel_err(dk, dk_ref) < TOL


@pytest.mark.parametrize("seq,causal", [(1024, True), (2048, True), (4096, True),
                                        (2048, False)])
def test_bwd_lowers_for_cuda(seq, causal):
  # Interpret mode never builds the Mosaic GPU module; lowering for an abstract H100 does
  # (wgmma operands incl. the transposed F1 row blocks at n = 8192, TMA boxes, barriers).
  sds = jax.ShapeDtypeStruct
  fn = lambda a, d, k: B.fft_conv_backward_mosaic(a, d, k, causal=causal)
  args = (sds((64, 16, seq), jnp.bfloat16), sds((64, 16, seq), jnp.bfloat16),
          sds((16, seq), jnp.float32))
  device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132,
                                       platform="cuda")
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",),
                                                                abstract_device=device)):
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text and f"fft_conv_bwd_mosaic_{M.fft_size(seq, seq, causal=causal)}" in text


def test_bwd_configs_and_smem():
  for n, seq in ((2048, 1024), (4096, 2048), (8192, 4096), (2048, 2048), (4096, 4096)):
    cfg = B.default_config(n, seq)
    assert B.smem_bytes(M.geometry(n, seq), cfg) <= M.SMEM_BUDGET_BYTES, (n, seq)
    assert B.unsupported(n, seq, jnp.bfloat16) is None
  assert B.default_config(2048, 1024) == B.MosaicBwdConfig()  # two warpgroups, 2-deep rings
  assert B.default_config(4096, 2048) == B.MosaicBwdConfig(const_dtype="bfloat16")
  assert B.default_config(8192, 4096) == B.MosaicBwdConfig(stages=1, const_dtype="bfloat16",
                                                           half_twiddles=True)
  assert "bytes of shared memory" in B.unsupported(8192, 8192, jnp.bfloat16)  # circular 8K
  kf = jnp.arange(2 * 2 * 64 * 64, dtype=jnp.float32).reshape(2, 2, 64, 64)
  blocked = B.blocked_spectrum(kf)
  np.testing.assert_array_equal(blocked[:, :, 1], kf[:, :, :, 32:])


def test_bwd_bad_inputs(key):
  a, d, k = _inputs(key, 2, 1, 1024, 1024)
  with pytest.raises(NotImplementedError, match="dtype float16 is not bfloat16"):
    B.fft_conv_backward_mosaic(a.astype(jnp.float16), d.astype(jnp.float16), k,
                               interpret=True)
  with pytest.raises(TypeError, match="d.dtype must equal a.dtype bfloat16, got float32"):
    B.fft_conv_backward_mosaic(a, d.astype(jnp.float32), k, interpret=True)
  with pytest.raises(ValueError, match=r"a and d must be \[batch, channels, seq\] of one"):
    B.fft_conv_backward_mosaic(a, d[..., :512], k, interpret=True)
  with pytest.raises(ValueError, match=r"k must be \[channels=1, filter_len in \[1, 1024\]\]"):
    B.fft_conv_backward_mosaic(a, d, jnp.zeros((1, 2000)), interpret=True)
  with pytest.raises(ValueError, match=r"kf must be \[channels=1, 2, 64, 32\]"):
    B.fft_conv_backward_mosaic(a, d, k, kf=jnp.zeros((1, 2, 64, 64)), interpret=True)
  with pytest.raises(NotImplementedError, match=r"transform size 1024 is not one of \(2048"):
    B.fft_conv_backward_mosaic(a[..., :512], d[..., :512], k[:, :300], interpret=True)
  with pytest.raises(NotImplementedError, match="needs compute_wgs=2"):
    B.fft_conv_backward_mosaic(*_inputs(key, 2, 1, 4096, 4096),
                               config=B.MosaicBwdConfig(compute_wgs=1), interpret=True)
  with pytest.raises(NotImplementedError, match="bytes of shared memory"):
    B.fft_conv_backward_mosaic(*_inputs(key, 2, 1, 4096, 4096),
                               config=B.MosaicBwdConfig(stages=2), interpret=True)
  with pytest.raises(ValueError, match="compute_wgs must be 1 or 2, got 3"):
    B.MosaicBwdConfig(compute_wgs=3)
  with pytest.raises(ValueError, match="stages must be 1 or 2, got 0"):
    B.MosaicBwdConfig(stages=0)
  with pytest.raises(ValueError, match="const_dtype must be float32 or bfloat16"):
    B.MosaicBwdConfig(const_dtype="float16")
  with pytest.raises(ValueError, match="pairs_per_cta must be an int >= 0, got -1"):
    B.MosaicBwdConfig(pairs_per_cta=-1)
  geo = M.geometry(2048, 1024)
  z = jnp.zeros((3, 2, 1, 32, 32), jnp.bfloat16)
  kf = jnp.zeros((1, 2, 64, 32), jnp.float32)
  with pytest.raises(ValueError, match="pairs=3 must be a multiple of compute_wgs=2"):
    B.conv_backward_fused_mosaic(z, z, kf, geo, interpret=True)
  with pytest.raises(ValueError, match="za must match zd"):
    B.conv_backward_fused_mosaic(z[:2, :, :, :16], z[:2], kf, geo, interpret=True)
  with pytest.raises(ValueError, match=r"kf must be \[channels=1, 2, 64, 32\]"):
    B.conv_backward_fused_mosaic(z[:2], z[:2], kf[:, :, :32], geo, interpret=True)


_OP_CASES = {
    # name: (batch, channels, seq, filter_len, causal, gated)
    "gated_causal_odd": (3, 2, 1024, 1024, True, True),
    "plain_circular": (2, 1, 2048, 300, False, False),
}


@pytest.mark.parametrize("case", list(_OP_CASES))
def test_op_fused_backward(case, key, monkeypatch, request):
  # jaxeff.ops.fft_conv's "mosaic_gpu" entry with MOSAIC_FUSED_BACKWARD on (and the
  # separate-kernel flags off: it takes precedence regardless): du, dk, dx, dv from the
  # fused kernel (a spy asserts it ran) vs jax.vjp of the jnp.fft reference.
  b, c, seq, flen, causal, gated = _OP_CASES[case]
  monkeypatch.setattr(F, "MOSAIC_FUSED_BACKWARD", True)
  _registry._jitted.cache_clear()  # the flags are read when the op is traced
  request.addfinalizer(_registry._jitted.cache_clear)
  calls = []
  fused = F._mosaic_bwd.fft_conv_backward_mosaic

  def spy(*args, **kw):
    calls.append(kw.get("kf") is not None)
    return fused(*args, **kw)

  monkeypatch.setattr(F._mosaic_bwd, "fft_conv_backward_mosaic", spy)
  ks = jax.random.split(key, 3)
  u, x, k = _inputs(ks[0], b, c, seq, flen)
  v, dy, _ = _inputs(ks[1], b, c, seq, flen)
  if not gated:
    x = v = None

  y, grads = fft_conv_vjp("mosaic_gpu:interpret", u, k, x, v, dy, causal=causal)
  assert calls == [True]  # the forward's filter spectrum was reused
  y_ref, grads_ref = fft_conv_vjp("xla", u, k, x, v, dy, causal=causal)
  assert rel_err(y, y_ref) < TOL
  assert_grads_match(grads, grads_ref, TOL, case)


def test_op_fused_flag_and_choice(key):
  # Off by default; precedence and fallbacks of the flag; the explicit choice validated.
  assert F.MOSAIC_FUSED_BACKWARD is False
  u, d, k = _inputs(key, 2, 2, 1024, 1024)
  assert F._mosaic_fused_unsupported(u, k, causal=True) is None
  assert "float16" in F._mosaic_fused_unsupported(u.astype(jnp.float16), k, causal=True)
  u8, k8 = jnp.zeros((2, 1, 8192), jnp.bfloat16), jnp.zeros((1, 8192))  # n = 16384
  assert "16384" in F._mosaic_fused_unsupported(u8, k8, causal=True)
  with pytest.raises(ValueError, match=r"backward must be None, 'mosaic', 'mosaic_fused' or "
                                       r"'triton', got 'fused'"):
    F.fft_conv_mosaic_gpu(u, k, backward="fused", interpret=True)
  with pytest.raises(NotImplementedError,
                     match="backward='mosaic_fused': dtype float16 is not bfloat16"):
    F.fft_conv_mosaic_gpu(u.astype(jnp.float16), k, backward="mosaic_fused", interpret=True)
  # The explicit choice runs the fused kernel (forward value unchanged).
  y = F.fft_conv_mosaic_gpu(u, k, backward="mosaic_fused", interpret=True)
  y_ref = F.fft_conv(u, k, implementation="xla")
  assert rel_err(y, y_ref) < TOL


@pytest.mark.gpu
@pytest.mark.parametrize("seq", [1024, 2048, 4096])
def test_bwd_gpu(seq, key):
  a, d, k = _inputs(key, 64, 16, seq, seq)
  dw, dk = jax.jit(lambda a, d, k: B.fft_conv_backward_mosaic(a, d, k))(a, d, k)
  # float64 reference by NumPy's FFT (the direct sums are too slow at this size)
  f64 = lambda x: np.asarray(jnp.asarray(x, jnp.float32), np.float64)
  n = 2 * seq
  dspec = np.fft.rfft(f64(d), n)
  ref_dk = np.fft.irfft(np.conj(np.fft.rfft(f64(a), n)) * dspec, n).sum(0)[:, :seq]
  ref_dw = np.fft.irfft(np.conj(np.fft.rfft(f64(k), n)) * dspec, n)[..., :seq]
  assert rel_err(dw, ref_dw) < TOL, rel_err(dw, ref_dw)
  assert rel_err(dk, ref_dk) < TOL, rel_err(dk, ref_dk)


@pytest.mark.gpu
@pytest.mark.parametrize("seq", [1024, 4096])
def test_op_fused_backward_gpu(seq, key):
  # fwd + bwd, gated, the fused backward, vs the jnp.fft reference.
  ks = jax.random.split(key, 2)
  u, x, k = _inputs(ks[0], 8, 96, seq, seq)
  v, dy, _ = _inputs(ks[1], 8, 96, seq, seq)

  def grads(f):
    return jax.jit(lambda *a: jax.vjp(f, *a)[1](dy))(u, k, x, v)

  got = grads(lambda u, k, x, v: F.fft_conv_mosaic_gpu(u, k, gate=(x, v),
                                                       backward="mosaic_fused"))
  ref = grads(lambda u, k, x, v: F.fft_conv(u, k, gate=(x, v), implementation="xla"))
  for name, g, r in zip(("du", "dk", "dx", "dv"), got, ref):
    assert rel_err(g, r) < TOL, (name, rel_err(g, r))
