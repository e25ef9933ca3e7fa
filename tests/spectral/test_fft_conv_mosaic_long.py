"""Long-sequence Mosaic GPU FFT convolution (kernels_pallas.fftconv.mosaic_gpu_long).

Transform sizes 16384 (causal seq up to 8192, circular 16384: the ``128 x 128`` kernel)
and 32768 (causal seq up to 16384: the radix-2 outer level in XLA around it), in Pallas
interpret mode on CPU against float64 NumPy (odd batch, filter as long as the input and
shorter, gates, input longer than half the transform, the correlation), the interpreter's
race detector, lowering for an abstract H100 (builds the Mosaic GPU module: wgmma
operands, TMA boxes with column windows, shared memory), the constants against the DFT
definition, bad inputs, the op's ``MOSAIC_LONG`` flag, and real sizes under ``gpu``.
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
from kernels_pallas.fftconv import mosaic_gpu_long as L
from tests.helpers import rel_err

TOL = 1e-2  # bf16 operands, float32 accumulation (measured 3.8e-3 .. 5.4e-3)
F = importlib.import_module("jaxeff.ops.fft_conv")  # the module (jaxeff.ops exports the op)


def _inputs(key, b, c, seq, flen, gated=False):
  ks = jax.random.split(key, 4)
  u = jax.random.normal(ks[0], (b, c, seq), jnp.float32).astype(jnp.bfloat16)
  k = jax.random.normal(ks[1], (c, flen), jnp.float32) / np.sqrt(flen)
  if not gated:
    return u, k, None, None
  x = jax.random.normal(ks[2], (b, c, seq), jnp.float32).astype(jnp.bfloat16)
  v = jax.random.normal(ks[3], (b, c, seq), jnp.float32).astype(jnp.bfloat16)
  return u, k, x, v


def _reference(u, k, x=None, v=None, causal=True, conjugate=False):
  """float64 ``v * conv(k, u x)`` (or the correlation: ``conj(FFT(k))``) by NumPy's FFT."""
  f64 = lambda a: None if a is None else np.asarray(jnp.asarray(a, jnp.float32), np.float64)
  u, k, x, v = f64(u), f64(k), f64(x), f64(v)
  seq = u.shape[-1]
  n = M.fft_size(seq, k.shape[-1], causal=causal)
  w = u if x is None else u * x
  kf = np.fft.fft(k, n)
  y = np.real(np.fft.ifft(np.fft.fft(w, n) * (np.conj(kf) if conjugate else kf), n))
  y = y[..., :seq]
  return y if v is None else y * v


OVERLAP = L.LongFFTConvConfig(overlap=True)
CASES = {
    # name: (batch, channels, seq, filter_len, causal, gated, conjugate[, config])
    "n16384_odd_batch_gated": (3, 1, 8192, 8192, True, True, False),
    "n16384_short_filter_overlap": (2, 2, 8000, 300, True, False, False, OVERLAP),  # rows 64
    "circular_16384": (2, 1, 16384, 1000, False, False, False),  # all 128 rows
    "n32768_radix2_correlation": (2, 1, 16384, 16384, True, False, True),
    "n32768_input_past_half": (2, 1, 20000, 100, True, False, False),
    # (the correlation at n = 16384: test_op_long_mosaic_backward's du)
}


@pytest.mark.parametrize("case", list(CASES))
def test_long_interpret(case, key):
  b, c, seq, flen, causal, gated, conjugate, *cfg = CASES[case]
  u, k, x, v = _inputs(key, b, c, seq, flen, gated)
  y = L.fft_conv_mosaic_long(u, k, x, v, causal=causal, conjugate=conjugate,
                             config=cfg[0] if cfg else None, interpret=True)
  assert y.shape == u.shape and y.dtype == u.dtype
  want = _reference(u, k, x, v, causal, conjugate)
  err = rel_err(np.asarray(y.astype(jnp.float32), np.float64), want)
  assert err < TOL, (case, err)


@pytest.mark.parametrize("cfg", [None, OVERLAP])
def test_long_no_races(cfg, key):
  # The happen-before race detector at rows = 128 (every row of P is input and output):
  # it reports races when the output copy's wait or the barrier before refilling P with
  # the next signal is removed (checked while writing the kernel; it does not see the
  # cross-warpgroup barrier after the row DFTs: wgmma reads are not tracked there).
  from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
  u, k, _, _ = _inputs(key, 4, 1, 16384, 500)
  y = L.fft_conv_mosaic_long(u, k, causal=False, config=cfg,
                             interpret=plgpu.InterpretGPUParams(detect_races=True))
  jax.block_until_ready(y)
  assert not gpu_callbacks.get_races().races_found


@pytest.mark.parametrize("seq,flen,causal,conjugate,cfg", [
    (8192, 8192, True, False, None),  # the seq-8K default: rows 64
    (8192, 8192, True, False, OVERLAP),  # wgmma_accumulator_load(wait_n > 0)
    (16384, 16384, True, True, None),  # n = 32768 (radix 2, rows 128), correlation
    (16384, 300, False, False, L.LongFFTConvConfig(twiddle_dtype="float32", pairs_per_cta=8)),
])
def test_long_lowers_for_cuda(seq, flen, causal, conjugate, cfg):
  sds = jax.ShapeDtypeStruct
  fn = lambda u, k: L.fft_conv_mosaic_long(u, k, causal=causal, config=cfg,
                                           conjugate=conjugate)
  args = (sds((64, 16, seq), jnp.bfloat16), sds((16, flen), jnp.float32))
  device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132,
                                       platform="cuda")
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",),
                                                                abstract_device=device)):
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text
  assert ("fft_corr_mosaic_long" if conjugate else "fft_conv_mosaic_long") in text


def test_long_constants_match_dft():
  c = L.dft_constants(np.float64, np.float64)
  f = np.fft.fft(np.eye(128))  # F[k, t] = w_128^(k t)
  blocks = c["f"][0] + 1j * c["f"][1]  # [2, 128, 64]
  np.testing.assert_allclose(np.concatenate(list(blocks), axis=1), f, atol=1e-12)
  np.testing.assert_allclose(c["f"][2], -c["f"][1])
  # twiddle block (h, cb) = T00 * row factor (cb = 1) * column factor (h = 1)
  w = lambda e: np.exp(-2j * np.pi * e / 16384)
  t00 = c["t00"][0] + 1j * c["t00"][1]
  tf = c["tf"][:, 0] + 1j * c["tf"][:, 1]
  r = np.arange(64)
  for h in range(2):
    for cb in range(2):
      m = t00 * (tf[0][:, None] if cb else 1) * (tf[1 + cb][None, :] if h else 1)
      np.testing.assert_allclose(m, w(np.outer(64 * h + r, 64 * cb + r)), atol=1e-6)
  # filter spectrum chunks: [branch * channels + c, h, cb, part, r, col]
  k = jax.random.normal(jax.random.key(1), (3, 100), jnp.float32)
  for n in (16384, 32768):
    geo = L.geometry(n, n // 2)
    kf = np.asarray(L.filter_spectrum(k, geo, jnp.float32), np.float64)
    full = np.fft.fft(np.asarray(k, np.float64), n) / n
    for ka in range(geo.radix):
      for h, cb, r1, r2 in ((0, 0, 3, 5), (1, 0, 7, 60), (1, 1, 63, 2)):
        k1, k2 = 64 * h + r1, 64 * cb + r2
        got = kf[ka * 3 + 2, h, cb, 0, r1, r2] + 1j * kf[ka * 3 + 2, h, cb, 1, r1, r2]
        np.testing.assert_allclose(got, full[2, ka + geo.radix * (k1 + 128 * k2)],
                                   rtol=1e-4, atol=1e-7)


def test_long_geometry_and_smem():
  assert L.geometry(16384, 8192).rows == 64
  assert L.geometry(16384, 8000).rows == 64  # ceil(8000 / 128) = 63 rows, a multiple of 64
  assert L.geometry(16384, 16384).rows == 128
  assert L.geometry(32768, 16384) == L.LongGeometry(32768, 128)
  for cfg in (L.LongFFTConvConfig(), L.LongFFTConvConfig(twiddle_dtype="float32")):
    assert L.smem_bytes(L.geometry(16384, 8192), cfg) <= M.SMEM_BUDGET_BYTES
  assert L.unsupported(16384, 8192, jnp.bfloat16) is None
  assert L.unsupported(32768, 16384, jnp.float16) is None


def test_long_bad_inputs(key):
  u, k, _, _ = _inputs(key, 2, 1, 8192, 8192)
  with pytest.raises(NotImplementedError, match="dtype float32 is not bfloat16"):
    L.fft_conv_mosaic_long(u.astype(jnp.float32), k, interpret=True)
  with pytest.raises(NotImplementedError, match=r"transform size 8192 is not one of \(16384"):
    L.fft_conv_mosaic_long(u[..., :4096], k[:, :4096], interpret=True)
  with pytest.raises(ValueError, match=r"u must be \[batch, channels, seq\]"):
    L.fft_conv_mosaic_long(u[0], k, interpret=True)
  with pytest.raises(TypeError, match="conjugate must be a bool, got 1"):
    L.fft_conv_mosaic_long(u, k, conjugate=1, interpret=True)
  with pytest.raises(ValueError, match=r"kf must be \[1, 2, 2, 2, 64, 64\]"):
    L.fft_conv_mosaic_long(u, k, kf=jnp.zeros((1, 2, 128, 128)), interpret=True)
  with pytest.raises(ValueError, match="twiddle_dtype must be float32, bfloat16 or float16"):
    L.LongFFTConvConfig(twiddle_dtype="int8")
  with pytest.raises(ValueError, match="pairs_per_cta must be an int >= 0, got -1"):
    L.LongFFTConvConfig(pairs_per_cta=-1)
  with pytest.raises(TypeError, match="overlap must be a bool, got 1"):
    L.LongFFTConvConfig(overlap=1)
  geo = L.geometry(16384, 8192)
  with pytest.raises(ValueError, match=r"z must be \[pairs, 2, channels, rows=64, 128\]"):
    L.fft_conv_fused_long(jnp.zeros((1, 2, 1, 128, 128), jnp.bfloat16),
                          jnp.zeros((1, 2, 2, 2, 64, 64)), geo, interpret=True)
  with pytest.raises(ValueError, match=r"kf must be \[channels=1, 2, 2, 2, 64, 64\]"):
    L.fft_conv_fused_long(jnp.zeros((1, 2, 1, 64, 128), jnp.bfloat16),
                          jnp.zeros((2, 2, 2, 2, 64, 64)), geo, interpret=True)


def test_op_long_flag(key, monkeypatch, request):
  # "mosaic_gpu" declines transform sizes 16384 / 32768 while MOSAIC_LONG is False (the
  # registry then picks "triton"); with the flag, or long=True, the long kernel serves
  # them, under the custom_vjp whose backward is the Triton path's.
  request.addfinalizer(_registry._jitted.cache_clear)
  u, k, _, _ = _inputs(key, 2, 1, 8192, 8192)
  monkeypatch.setattr(F, "MOSAIC_LONG", False)
  reason = F._mosaic_supports(u, k, causal=True, gate=None, frequency_keep=None)
  assert reason is not None and "MOSAIC_LONG" in reason
  with pytest.raises(NotImplementedError, match="fft_conv_mosaic_gpu: .*MOSAIC_LONG is False"):
    F.fft_conv_mosaic_gpu(u, k, interpret=True)
  with pytest.raises(NotImplementedError, match=r"kernel is off \(long=False\)"):
    F.fft_conv_mosaic_gpu(u, k, long=False, interpret=True)
  with pytest.raises(TypeError, match="long must be None or a bool, got 'yes'"):
    F.fft_conv_mosaic_gpu(u, k, long="yes", interpret=True)
  with pytest.raises(TypeError, match="needs config of type LongFFTConvConfig or None, got "
                     "MosaicFFTConvConfig"):
    F.fft_conv_mosaic_gpu(u, k, long=True, config=M.MosaicFFTConvConfig(), interpret=True)
  monkeypatch.setattr(F, "MOSAIC_LONG", True)
  assert F._mosaic_supports(u, k, causal=True, gate=None, frequency_keep=None) is None
  _registry._jitted.cache_clear()
  seen = []
  long_conv = F._mosaic_long.fft_conv_mosaic_long

  def spy(*args, **kw):
    seen.append(kw.get("conjugate", False))
    return long_conv(*args, **kw)

  monkeypatch.setattr(F._mosaic_long, "fft_conv_mosaic_long", spy)
  y = F.fft_conv(u, k, implementation="mosaic_gpu:interpret")
  assert seen == [False]
  err = rel_err(np.asarray(y.astype(jnp.float32), np.float64), _reference(u, k))
  assert err < TOL, err


def test_op_long_mosaic_backward(key):
  # fft_conv_mosaic_gpu(long=True, backward="mosaic"): the forward and the input gradient
  # (the correlation, conjugate=True) on the long kernel, dk on the Triton kernel; gated,
  # against the jnp.fft reference's autodiff.
  u, k, x, v = _inputs(key, 2, 1, 8192, 8192, gated=True)
  dy = jax.random.normal(jax.random.fold_in(key, 1), u.shape, jnp.float32).astype(u.dtype)

  def run(f):
    y, vjp = jax.vjp(lambda u, k, x, v: f(u, k, gate=(x, v)), u, k, x, v)
    return (y,) + tuple(vjp(dy))

  got = run(lambda u, k, gate: F.fft_conv_mosaic_gpu(u, k, gate=gate, long=True,
                                                     backward="mosaic", interpret=True))
  ref = run(lambda u, k, gate: F.fft_conv(u, k, gate=gate, implementation="xla"))
  for name, g, w in zip(("y", "du", "dk", "dx", "dv"), got, ref):
    assert g.shape == w.shape and g.dtype == w.dtype, name
    err = rel_err(np.asarray(g, np.float64), np.asarray(w, np.float64))
    assert err < TOL, (name, err)


@pytest.mark.gpu
@pytest.mark.parametrize("seq", [8192, 16384])
def test_long_gpu(seq, key):
  u, k, x, v = _inputs(key, 64, 768, seq, seq, gated=True)
  y = jax.jit(L.fft_conv_mosaic_long)(u, k, x, v)
  sub = (slice(0, 4), slice(0, 64))
  err = rel_err(np.asarray(y[sub].astype(jnp.float32), np.float64),
                _reference(u[sub], k[:64], x[sub], v[sub]))
  assert err < TOL, err


@pytest.mark.gpu
@pytest.mark.parametrize("seq", [8192, 16384])
def test_long_backward_gpu(seq, key):
  # fwd + bwd through fft_conv_mosaic_gpu(long=True): the Mosaic correlation for du / dx,
  # Triton for dk, gated, vs the jnp.fft reference's autodiff.
  u, k, x, v = _inputs(key, 8, 96, seq, seq, gated=True)
  dy = jax.random.normal(jax.random.fold_in(key, 1), u.shape, jnp.float32).astype(u.dtype)

  def grads(f):
    return jax.jit(lambda *a: jax.vjp(f, *a)[1](dy))(u, k, x, v)

  got = grads(lambda u, k, x, v: F.fft_conv_mosaic_gpu(u, k, gate=(x, v), long=True,
                                                       backward="mosaic"))
  ref = grads(lambda u, k, x, v: F.fft_conv(u, k, gate=(x, v), implementation="xla"))
  for name, g, w in zip(("du", "dk", "dx", "dv"), got, ref):
    err = rel_err(np.asarray(g, np.float64), np.asarray(w, np.float64))
    assert err < TOL, (name, err)
