"""Mosaic GPU FFT convolution (kernels_pallas.fftconv.mosaic_gpu) vs float64 NumPy.

Interpret mode on CPU (every supported factorisation: 64 x 32, 64 x 64 with its own
inverse planes, 128 x 64 with two warpgroups and half the twiddle table or one warpgroup;
odd batch and lengths, short filters, gates, circular convolution, several CTAs per
channel, float16), the interpreter's race detector, lowering for an abstract H100 (builds the
Mosaic GPU module: wgmma operands, swizzles, TMA boxes), the constants and filter
spectrum against the DFT definition, bad inputs, and real sizes under the ``gpu`` marker.
The correlation (``conjugate=True``, the backward's input gradient) against direct float64
sums, causal and circular, and the op's custom_vjp with ``MOSAIC_BACKWARD`` on and off
(forward and all four gradients vs the jnp.fft reference).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

from jaxeff.ops import _registry
from kernels_pallas.fftconv import mosaic_gpu as M
from tests.helpers import rel_err

TOL = 1e-2  # bf16 operands, float32 accumulation (measured 4e-3 .. 5e-3)


def _inputs(key, b, c, seq, flen, gated=False):
  ks = jax.random.split(key, 4)
  u = jax.random.normal(ks[0], (b, c, seq), jnp.float32).astype(jnp.bfloat16)
  k = jax.random.normal(ks[1], (c, flen), jnp.float32) / np.sqrt(flen)
  if not gated:
    return u, k, None, None
  x = jax.random.normal(ks[2], (b, c, seq), jnp.float32).astype(jnp.bfloat16)
  v = jax.random.normal(ks[3], (b, c, seq), jnp.float32).astype(jnp.bfloat16)
  return u, k, x, v


def _reference(u, k, x=None, v=None, causal=True):
  """float64 ``v * conv(k, u x)`` by NumPy's FFT (bf16 inputs taken exactly)."""
  f64 = lambda a: None if a is None else np.asarray(jnp.asarray(a, jnp.float32), np.float64)
  u, k, x, v = f64(u), f64(k), f64(x), f64(v)
  seq = u.shape[-1]
  n = M.fft_size(seq, k.shape[-1], causal=causal)
  w = u if x is None else u * x
  y = np.fft.irfft(np.fft.rfft(w, n) * np.fft.rfft(k, n), n)[..., :seq]
  return y if v is None else y * v


CASES = {
    # name: (batch, channels, seq, filter_len, causal, gated, config)
    "n2048_64x32": (4, 2, 1024, 1024, True, False, None),
    "n2048_odd_gated": (3, 3, 1000, 37, True, True, None),
    "n4096_own_inverse": (2, 1, 2048, 2048, True, False, None),
    "n8192_128x64": (2, 1, 4096, 4096, True, False, None),
    "circular_2048": (4, 1, 2048, 300, False, False, None),
    "one_wg_bf16_consts": (4, 2, 1024, 512, True, False,
                           M.MosaicFFTConvConfig(compute_wgs=1, stages=1,
                                                 const_dtype="bfloat16")),
    "ctas_per_channel": (8, 1, 1024, 1024, True, False,
                         M.MosaicFFTConvConfig(compute_wgs=2, stages=2, pairs_per_cta=2)),
    "staging_tile": (4, 1, 1024, 1024, True, False,
                     M.MosaicFFTConvConfig(compute_wgs=2, stages=1, o_in_p=False)),
    "n8192_one_wg_full_twiddles": (2, 1, 4096, 4096, True, False,
                                   M.MosaicFFTConvConfig(compute_wgs=1, stages=2,
                                                         const_dtype="bfloat16",
                                                         half_twiddles=False)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_mosaic_fft_conv_interpret(case, key):
  b, c, seq, flen, causal, gated, cfg = CASES[case]
  u, k, x, v = _inputs(key, b, c, seq, flen, gated)
  y = M.fft_conv_mosaic(u, k, x, v, causal=causal, config=cfg, interpret=True)
  assert y.shape == u.shape and y.dtype == u.dtype
  err = rel_err(np.asarray(y.astype(jnp.float32), np.float64), _reference(u, k, x, v, causal))
  assert err < TOL, (case, err)


@pytest.mark.parametrize("seq,cfg", [
    (1024, None),  # the seq-1024 default: one warpgroup, 2-deep ring
    # two warpgroups, 2-deep ring, output staged in the operand planes
    (1024, M.MosaicFFTConvConfig(compute_wgs=2, stages=2)),
    (1024, M.MosaicFFTConvConfig(compute_wgs=2, stages=1, o_in_p=False)),
    (4096, None),  # two warpgroups at n = 8192, half twiddle table
])
def test_mosaic_no_races(seq, cfg, key):
  # The interpreter's happen-before race detector: every shared-memory write, wgmma read
  # and TMA copy of the kernel is ordered by a barrier, a wgmma wait or a TMA wait (it
  # reports a race when the wait before reusing the operand planes is removed).
  from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
  u, k, _, _ = _inputs(key, 8, 1, seq, seq)
  y = M.fft_conv_mosaic(u, k, config=cfg,
                        interpret=plgpu.InterpretGPUParams(detect_races=True))
  jax.block_until_ready(y)
  assert not gpu_callbacks.get_races().races_found


def test_mosaic_fft_conv_float16(key):
  u, k, _, _ = _inputs(key, 2, 1, 1024, 700)
  u = u.astype(jnp.float16)
  y = M.fft_conv_mosaic(u, k, interpret=True)
  assert y.dtype == jnp.float16
  err = rel_err(np.asarray(y.astype(jnp.float32), np.float64), _reference(u, k))
  assert err < 2e-3, err  # float16 operands: 10 mantissa bits (measured 5e-4)


def test_mosaic_geometry_and_config():
  g = M.geometry(2048, 1024)
  assert (g.n_1, g.n_2, g.rows, g.out_m, g.transposed_inverse) == (64, 32, 32, 64, False)
  g = M.geometry(8192, 4096)
  assert (g.n_1, g.n_2, g.rows, g.transposed_inverse) == (128, 64, 64, True)
  assert M.geometry(2048, 1000).rows == 32  # ceil(1000 / 32) rows, a multiple of 16
  for n, seq in ((2048, 1024), (4096, 2048), (8192, 4096)):
    cfg = M.default_config(n, seq)
    assert M.smem_bytes(M.geometry(n, seq, cfg), cfg) <= M.SMEM_BUDGET_BYTES
    assert M.unsupported(n, seq, jnp.bfloat16) is None
  assert M.default_config(2048, 1024).compute_wgs == 1  # measured faster at seq 1024
  cfg = M.default_config(8192, 4096)
  assert (cfg.compute_wgs, cfg.const_dtype, cfg.half_twiddles) == (2, "bfloat16", True)


def test_mosaic_constants_match_dft():
  geo = M.geometry(2048, 1024)
  c = M.dft_constants(geo, np.float64)
  f1 = np.fft.fft(np.eye(64))  # F1[k, t] = w^(k t)
  np.testing.assert_allclose(c["w1"][0] + 1j * c["w1"][1], f1[:, :32], atol=1e-12)
  np.testing.assert_allclose(c["w1"][2], -c["w1"][1])
  np.testing.assert_allclose(c["e1"][0, :32] + 1j * c["e1"][1, :32], f1[:32], atol=1e-12)
  assert not c["e1"][:, 32:].any()  # padded rows of the inverse are zero
  k = jax.random.normal(jax.random.key(1), (3, 100), jnp.float32)
  kf = np.asarray(M.filter_spectrum(k, geo), np.float64)
  full = np.fft.fft(np.asarray(k, np.float64), 2048) / 2048
  k1, k2 = 5, 17
  np.testing.assert_allclose(kf[:, 0, k1, k2] + 1j * kf[:, 1, k1, k2], full[:, k1 + 64 * k2],
                             rtol=1e-4, atol=1e-6)
  # half_twiddles: row block h of the table = the first block times w_n^(64 h t_2)
  c8 = M.dft_constants(M.geometry(8192, 4096), np.float64)
  tw = c8["tw"][0] + 1j * c8["tw"][1]
  twc = c8["twc"][:, 0] + 1j * c8["twc"][:, 1]
  np.testing.assert_allclose(tw[64:], tw[:64] * twc[1][None, :], atol=1e-6)


def test_mosaic_bad_inputs(key):
  u, k, _, _ = _inputs(key, 2, 1, 1024, 1024)
  with pytest.raises(NotImplementedError, match="dtype float32 is not bfloat16"):
    M.fft_conv_mosaic(u.astype(jnp.float32), k, interpret=True)
  with pytest.raises(NotImplementedError, match="transform size 128 is not n_1"):
    M.fft_conv_mosaic(u[..., :64], k[:, :64], interpret=True)
  with pytest.raises(ValueError, match=r"u must be \[batch, channels, seq\]"):
    M.fft_conv_mosaic(u[0], k, interpret=True)
  with pytest.raises(NotImplementedError, match="bytes of shared memory"):
    M.fft_conv_mosaic(jnp.zeros((2, 1, 4096), jnp.bfloat16) + 1, jnp.ones((1, 4096)),
                      config=M.MosaicFFTConvConfig(compute_wgs=2), interpret=True)
  with pytest.raises(ValueError, match="compute_wgs must be 1 or 2, got 3"):
    M.MosaicFFTConvConfig(compute_wgs=3)
  with pytest.raises(ValueError, match="n_1 must be 0, 64 or 128, got 32"):
    M.MosaicFFTConvConfig(n_1=32)
  geo = M.geometry(2048, 1024)
  z = jnp.zeros((2, 2, 1, 32, 32), jnp.bfloat16)
  with pytest.raises(ValueError, match=r"kf must be \[channels=1, 2, 64, 32\]"):
    M.fft_conv_fused_mosaic(z, jnp.zeros((1, 2, 32, 64)), geo, interpret=True)
  with pytest.raises(ValueError, match="pairs=3 must be a multiple of compute_wgs=2"):
    M.fft_conv_fused_mosaic(jnp.zeros((3, 2, 1, 32, 32), jnp.bfloat16),
                            jnp.zeros((1, 2, 64, 32)), geo,
                            config=M.MosaicFFTConvConfig(compute_wgs=2, stages=2),
                            interpret=True)


@pytest.mark.parametrize("seq,causal,cfg,conjugate", [
    (1024, True, None, False),
    (2048, True, None, False),
    (4096, True, None, False),
    (2048, False, None, False),
    (1024, True, M.MosaicFFTConvConfig(compute_wgs=1, stages=1, const_dtype="bfloat16"), False),
    (1024, True, M.MosaicFFTConvConfig(compute_wgs=2, stages=1, o_in_p=False), False),
    (4096, True, M.MosaicFFTConvConfig(compute_wgs=1, stages=2, const_dtype="bfloat16"), False),
    # the backward's correlation (conjugated filter spectrum) at the two timed sizes
    (1024, True, None, True),
    (4096, True, None, True),
    (2048, False, None, True),
])
def test_mosaic_lowers_for_cuda(seq, causal, cfg, conjugate):
  # Interpret mode never builds the Mosaic GPU module; lowering for an abstract H100 does
  # (wgmma swizzles and transposed operands, TMA boxes, register layouts).
  sds = jax.ShapeDtypeStruct
  fn = lambda u, k: M.fft_conv_mosaic(u, k, causal=causal, config=cfg, conjugate=conjugate)
  args = (sds((64, 16, seq), jnp.bfloat16), sds((16, seq), jnp.float32))
  device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132,
                                       platform="cuda")
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",),
                                                                abstract_device=device)):
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text
  assert ("fft_corr_mosaic" if conjugate else "fft_conv_mosaic") in text


def _np_correlation(w, k, causal):
  """float64 ``y[t] = sum_j k[j] w[t + j]`` by direct sums (``w`` zero from ``seq`` on, or
  periodic when circular): the adjoint of the convolution, no FFT."""
  w = np.asarray(jnp.asarray(w, jnp.float32), np.float64)
  k = np.asarray(jnp.asarray(k, jnp.float32), np.float64)
  b, c, seq = w.shape
  flen = k.shape[-1]
  tail = w[..., :flen - 1] if not causal else np.zeros((b, c, flen - 1))
  wp = np.concatenate([w, tail], axis=-1)
  out = np.empty((b, c, seq))
  for i in range(b):
    for j in range(c):
      out[i, j] = np.correlate(wp[i, j], k[j], mode="valid")
  return out


@pytest.mark.parametrize("b,c,seq,flen,causal", [
    (3, 2, 1000, 1000, True),  # n = 2048, odd batch, the sums reach t + 999 (padded rows)
    (2, 1, 2048, 300, False),  # circular: wraps around the period
])
def test_mosaic_correlation_interpret(b, c, seq, flen, causal, key):
  # conjugate=True: the kernel multiplies by conj(FFT(k)); checked against direct sums.
  u, k, _, _ = _inputs(key, b, c, seq, flen)
  y = M.fft_conv_mosaic(u, k, causal=causal, conjugate=True, interpret=True)
  assert y.shape == u.shape and y.dtype == u.dtype
  err = rel_err(np.asarray(y.astype(jnp.float32), np.float64), _np_correlation(u, k, causal))
  assert err < TOL, err
  # a precomputed spectrum gives the same kernel result
  geo, _ = M.conv_geometry(seq, flen, u.dtype, causal=causal)
  y2 = M.fft_conv_mosaic(u, k, causal=causal, conjugate=True, kf=M.filter_spectrum(k, geo),
                         interpret=True)
  np.testing.assert_array_equal(np.asarray(y2, np.float32), np.asarray(y, np.float32))


def test_mosaic_correlation_bad_inputs(key):
  u, k, _, _ = _inputs(key, 2, 1, 1024, 1024)
  with pytest.raises(TypeError, match="conjugate must be a bool, got 'yes'"):
    M.fft_conv_mosaic(u, k, conjugate="yes", interpret=True)
  with pytest.raises(ValueError, match=r"kf must be \[channels=1, 2, 64, 32\]"):
    M.fft_conv_mosaic(u, k, kf=jnp.zeros((1, 2, 64, 64)), interpret=True)


_GRAD_CASES = {
    # name: (MOSAIC_BACKWARD, batch, channels, seq, filter_len, causal, gated)
    "triton_bwd_gated_causal": (False, 2, 2, 1024, 300, True, True),
    "mosaic_bwd_gated_causal": (True, 3, 2, 1024, 1024, True, True),
    "mosaic_bwd_plain_circular": (True, 2, 1, 2048, 300, False, False),
    "triton_bwd_plain_circular": (False, 2, 1, 2048, 300, False, False),
}


@pytest.mark.parametrize("case", list(_GRAD_CASES))
def test_op_mosaic_forward_and_backward(case, key, monkeypatch, request):
  # jaxeff.ops.fft_conv's "mosaic_gpu" entry: the Mosaic forward under a custom_vjp whose
  # backward convolutions run on the Mosaic kernel (MOSAIC_BACKWARD, the correlation with
  # conjugate=True) or on the Triton path, against the jnp.fft reference: forward and every
  # gradient (du, dk, dx, dv).
  import importlib
  F = importlib.import_module("jaxeff.ops.fft_conv")  # the module (jaxeff.ops exports the op)
  flag, b, c, seq, flen, causal, gated = _GRAD_CASES[case]
  monkeypatch.setattr(F, "MOSAIC_BACKWARD", flag)
  # the flag is read when the op is traced: drop the registry's traces of earlier cases
  _registry._jitted.cache_clear()
  request.addfinalizer(_registry._jitted.cache_clear)  # and leave none for later tests
  seen = {"conjugate": [], "triton": 0}
  mosaic_conv, triton_apply = F._mosaic.fft_conv_mosaic, F._triton_apply

  def spy_mosaic(*args, **kw):
    seen["conjugate"].append(kw.get("conjugate", False))
    return mosaic_conv(*args, **kw)

  def spy_triton(*args, **kw):
    seen["triton"] += 1
    return triton_apply(*args, **kw)

  monkeypatch.setattr(F._mosaic, "fft_conv_mosaic", spy_mosaic)
  monkeypatch.setattr(F, "_triton_apply", spy_triton)
  u, k, x, v = _inputs(key, b, c, seq, flen, gated=gated)
  dy = jax.random.normal(jax.random.fold_in(key, 1), u.shape, jnp.float32).astype(u.dtype)

  def run(impl):
    f = lambda u, k, x, v: F.fft_conv(u, k, causal=causal, gate=(x, v), implementation=impl)
    y, vjp = jax.vjp(f, u, k, x, v)
    return y, vjp(dy)

  y, grads = run("mosaic_gpu:interpret")
  # the flag picks the backward: the correlation on the Mosaic kernel, or Triton's
  assert False in seen["conjugate"] and (True in seen["conjugate"]) == flag
  assert (seen["triton"] > 0) != flag
  y_ref, grads_ref = run("xla")
  assert rel_err(np.asarray(y, np.float64), np.asarray(y_ref, np.float64)) < TOL
  for name, g, w in zip(("du", "dk", "dx", "dv"), grads, grads_ref):
    if not gated and name in ("dx", "dv"):
      assert g is None and w is None
      continue
    assert g.shape == w.shape and g.dtype == w.dtype, name
    err = rel_err(np.asarray(g, np.float64), np.asarray(w, np.float64))
    assert err < TOL, (case, name, err)


def test_op_mosaic_supports(key):
  import importlib
  F = importlib.import_module("jaxeff.ops.fft_conv")
  u, k, _, _ = _inputs(key, 2, 2, 1024, 300)
  reason = F._mosaic_supports(u, k, causal=True, gate=None, frequency_keep=None)
  assert reason is None
  with pytest.raises(ValueError, match="backward must be None, 'mosaic', 'mosaic_fused' or 'triton', got 'xla'"):
    F.fft_conv_mosaic_gpu(u, k, backward="xla", interpret=True)
  with pytest.raises(NotImplementedError, match="fft_conv_mosaic_gpu: .*transform size 512"):
    F.fft_conv_mosaic_gpu(u[..., :256], k[:, :64], interpret=True)
  short = F._mosaic_supports(u[..., :256], k[:, :64], causal=True, gate=None,
                             frequency_keep=None)
  assert short is not None  # transform size 512: below the kernel's 2048


@pytest.mark.gpu
@pytest.mark.parametrize("seq", [1024, 4096])
def test_mosaic_fft_conv_gpu(seq, key):
  u, k, x, v = _inputs(key, 64, 96, seq, seq, gated=True)
  y = jax.jit(M.fft_conv_mosaic)(u, k, x, v)
  err = rel_err(np.asarray(y.astype(jnp.float32), np.float64), _reference(u, k, x, v))
  assert err < TOL, err


@pytest.mark.gpu
@pytest.mark.parametrize("seq", [1024, 4096])
def test_mosaic_backward_gpu(seq, key):
  # fwd + bwd with the backward's correlation on the Mosaic kernel, gated, vs jnp.fft.
  import importlib
  F = importlib.import_module("jaxeff.ops.fft_conv")
  u, k, x, v = _inputs(key, 8, 96, seq, seq, gated=True)
  dy = jax.random.normal(jax.random.fold_in(key, 1), u.shape, jnp.float32).astype(u.dtype)

  def grads(f):
    return jax.jit(lambda *a: jax.vjp(f, *a)[1](dy))(u, k, x, v)

  got = grads(lambda u, k, x, v: F.fft_conv_mosaic_gpu(u, k, gate=(x, v), backward="mosaic"))
  ref = grads(lambda u, k, x, v: F.fft_conv(u, k, gate=(x, v), implementation="xla"))
  for name, g, w in zip(("du", "dk", "dx", "dv"), got, ref):
    err = rel_err(np.asarray(g, np.float64), np.asarray(w, np.float64))
    assert err < TOL, (name, err)
