"""fft_conv (every implementation) vs a float64 NumPy FFT reference; gradients; errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.ops.fft_conv import fft_conv, fft_conv_triton, fft_size, frequency_band
from jaxeff.spectral import monarch
from kernels_pallas.fftconv import triton as T
from tests.helpers import assert_close, lower_for_cuda, rel_err

BF16_BOUND = 1e-2  # bf16 operands, fp32 accumulation: measured 3e-3 .. 5e-3 here


def numpy_conv(u, k, x=None, v=None, *, causal=True, band=None, n=None):
  """float64 direct-from-definition FFT convolution (independent of jnp.fft)."""
  u = np.asarray(u, np.float64)
  k = np.asarray(k, np.float64)
  if x is not None:
    u = u * np.asarray(x, np.float64)
  seq, filter_len = u.shape[-1], k.shape[-1]
  if n is None:
    n = seq + filter_len - 1 if causal else seq
  spec = np.fft.rfft(u, n) * np.fft.rfft(k, n)
  if band is not None:
    spec[..., band:] = 0
  y = np.fft.irfft(spec, n)[..., :seq]
  if v is not None:
    y = y * np.asarray(v, np.float64)
  return y


def inputs(key, batch, channels, seq, filter_len, dtype=jnp.float32, gated=False):
  ks = jax.random.split(key, 4)
  u = jax.random.normal(ks[0], (batch, channels, seq), jnp.float32).astype(dtype)
  k = jax.random.normal(ks[1], (channels, filter_len), jnp.float32) / np.sqrt(filter_len)
  gate = None
  if gated:
    gate = tuple(jax.random.normal(kk, u.shape, jnp.float32).astype(dtype) for kk in ks[2:])
  return u, k, gate


CASES = [  # batch, channels, seq, filter_len, causal, gated
    (3, 5, 37, 37, True, True),  # odd everything, odd batch (packing pads a row), gated
    (2, 3, 100, 20, False, False),  # circular, non-power-of-two period, short filter
    (1, 2, 300, 300, True, False),  # batch 1, transform 1024 = 32 x 32
    (2, 4, 96, 41, False, True),  # circular 96 = 12 x 8, gated
    (2, 1, 1, 1, True, False),  # length 1
]


def conv_fn(impl, causal=True, frequency_keep=None):
  """Jitted ``(u, k, x, v) -> fft_conv`` (x / v None: no gate)."""
  return jax.jit(lambda u, k, x=None, v=None: fft_conv(
      u, k, causal=causal, gate=(x, v), frequency_keep=frequency_keep, implementation=impl))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_monarch_matches_float64(case, key):
  batch, channels, seq, filter_len, causal, gated = case
  u, k, gate = inputs(key, batch, channels, seq, filter_len, gated=gated)
  y = conv_fn("monarch_xla", causal)(u, k, *(gate or ()))
  x, v = gate or (None, None)
  assert y.shape == u.shape and y.dtype == u.dtype
  assert rel_err(y, numpy_conv(u, k, x, v, causal=causal)) < 2e-6


@pytest.mark.parametrize("case", CASES[:2], ids=str)
def test_reference_matches_float64(case, key):
  batch, channels, seq, filter_len, causal, gated = case
  u, k, gate = inputs(key, batch, channels, seq, filter_len, gated=gated)
  y = fft_conv(u, k, causal=causal, gate=gate, implementation="xla")
  assert rel_err(y, numpy_conv(u, k, *(gate or (None, None)), causal=causal)) < 2e-6


def test_bfloat16_within_bound(key):
  u, k, gate = inputs(key, 3, 4, 200, 150, jnp.bfloat16, gated=True)
  y = conv_fn("monarch_xla")(u, k, *gate)
  assert y.dtype == jnp.bfloat16
  err = rel_err(y, numpy_conv(u, k, *gate))
  assert err < BF16_BOUND, err


def test_plans_for_long_lengths():
  """Two levels up to 128 x 128, then three (4M causal -> n = 2**23 = 256 x 256 x 128)."""
  assert monarch.make_plan(fft_size(4096, 4096, causal=True)).factors == (128, 64)
  assert monarch.make_plan(fft_size(9000, 8000, causal=True)).factors == (32, 32, 32)
  assert monarch.make_plan(fft_size(2 ** 22, 2 ** 22, causal=True)).factors == (256, 256, 128)


@pytest.mark.parametrize("causal,gated", [(True, True), (False, False)])
def test_gradients_match_reference(causal, gated, key):
  u, k, gate = inputs(key, 3, 2, 40, 13, gated=gated)
  dy = jax.random.normal(jax.random.fold_in(key, 9), u.shape)
  args = (u, k, *(gate or ()))

  def grads(impl):
    return jax.jit(lambda dy, *a: jax.vjp(conv_fn(impl, causal), *a)[1](dy))(dy, *args)

  for g, r, name in zip(grads("monarch_xla"), grads("xla"), ("u", "k", "x", "v")):
    assert_close(g, r, rtol=2e-6, name=f"d{name}")


@pytest.mark.parametrize("causal", [True, False])
def test_frequency_sparse(causal, key):
  seq = 128
  u, k, _ = inputs(key, 2, 3, seq, seq)
  band = frequency_band(seq, seq, causal=causal, frequency_keep=0.25)
  n = fft_size(seq, seq, causal=causal)
  assert band is not None and band < n // 2
  y = conv_fn("monarch_xla", causal, 0.25)(u, k)
  ref = numpy_conv(u, k, causal=causal, band=band, n=n)
  assert rel_err(y, ref) < 2e-6
  assert rel_err(y, numpy_conv(u, k, causal=causal)) > 0.1  # the band really cut something
  if causal:
    dy = jax.random.normal(key, u.shape)
    f = lambda impl: jax.jit(lambda dy, u, k: jax.vjp(conv_fn(impl, causal, 0.25), u, k)[1](dy))
    for g, r in zip(f("monarch_xla")(dy, u, k), f("xla")(dy, u, k)):
      assert_close(g, r, rtol=2e-6)


def _triton_grads_vs_reference(key, u, k, gate, causal, **kw):
  """Forward and every gradient of fft_conv_triton (interpret) vs the float32 reference."""
  f = lambda u, k, *g: fft_conv_triton(u, k, causal=causal, gate=g or None, interpret=True,
                                       **kw)
  y, vjp = jax.vjp(f, u, k, *(gate or ()))
  assert y.dtype == u.dtype and y.shape == u.shape
  assert rel_err(y, numpy_conv(u, k, *(gate or (None, None)), causal=causal)) < BF16_BOUND
  dy = jax.random.normal(jax.random.fold_in(key, 3), u.shape, jnp.float32)
  up = lambda a: a.astype(jnp.float32)
  ref = jax.vjp(conv_fn("xla", causal), up(u), k, *map(up, gate or ()))[1](dy)
  grads = vjp(dy.astype(u.dtype))
  assert len(grads) == len(ref)
  for g, r, name in zip(grads, ref, "ukxv"):
    assert rel_err(g, r) < BF16_BOUND, f"d{name}"


def test_triton_interpret_forward_and_grad(key):
  """Default dispatch to the fused kernel: n = 256 = 16 x 16, gated, bf16, a padded pair."""
  u, k, gate = inputs(key, 1, 2, 128, 100, jnp.bfloat16, gated=True)
  y = conv_fn("triton:interpret")(u, k, *gate)
  assert rel_err(y, numpy_conv(u, k, *gate)) < BF16_BOUND
  _triton_grads_vs_reference(key, u, k, gate, True)


@pytest.mark.parametrize("mode", ["chain", "split", "gauss"])
def test_triton_complex_product_modes(mode, key):
  """The kernels' complex matrix products (outside a kernel, float32 operands) vs complex128:
  ``M @ X``, ``acc + M @ X`` (the chained forms put the sign in a plane / the input) and
  ``X @ M`` on a non-square, odd-sized M."""
  ks = jax.random.split(key, 6)
  cplx = lambda k1, k2, shape: (np.asarray(jax.random.normal(k1, shape), np.float64)
                                + 1j * np.asarray(jax.random.normal(k2, shape), np.float64))
  m, x, a = cplx(ks[0], ks[1], (5, 7)), cplx(ks[2], ks[3], (7, 3)), cplx(ks[4], ks[5], (5, 3))
  planes = list(T._planes(m, mode, jnp.float32))
  split = lambda z: (jnp.asarray(z.real, jnp.float32), jnp.asarray(z.imag, jnp.float32))
  join = lambda p: np.asarray(p[0], np.float64) + 1j * np.asarray(p[1], np.float64)
  f32 = jnp.float32
  assert np.abs(join(T._lmul(planes, *split(x), f32, mode)) - m @ x).max() < 1e-4
  assert np.abs(join(T._lmul(planes, *split(x), f32, mode, split(a))) - (a + m @ x)).max() < 1e-4
  xt = x.T.copy()  # [3, 7] @ M^T-shaped [7, 5]
  mt = list(T._planes(m.T.copy(), mode, jnp.float32))
  assert np.abs(join(T._rmul(*split(xt), mt, f32, mode)) - xt @ m.T).max() < 1e-4


def test_triton_chunks_pairs_three_dot(key):
  """Two (unrolled) chunks of k_1 rows, two pairs per program, three-dot complex products."""
  u, k, _ = inputs(key, 4, 2, 256, 256, jnp.bfloat16)  # n = 512 = 32 x 16
  cfg = T.FFTConvConfig(num_warps=4, chunk=16, pairs=2, gauss=True, unroll=True)
  _triton_grads_vs_reference(key, u, k, None, True, config=cfg,
                             dk_config=T.DkConfig(chunk=16, groups=2, gauss=True))


def test_triton_default_4k_whole_tile(key):
  """The seq-4K default (n = 8192 = 128 x 64, whole tile in one step, chained products)."""
  cfg = T.config_for(8192)
  assert (cfg.chunk, cfg.pairs, cfg.chain) == (128, 1, True)
  u, k, _ = inputs(key, 2, 1, 4096, 4096, jnp.bfloat16)
  _triton_grads_vs_reference(key, u, k, None, True, config=cfg)


def test_triton_three_levels(key):
  """n = 2048 = 4 x (32 x 16): two outer input rows (one padded), chunks, pairs, gates."""
  u, k, gate = inputs(key, 4, 1, 600, 600, jnp.bfloat16, gated=True)
  geo = T.geometry(fft_size(600, 600, causal=True), 600, inner=512)
  assert (geo.n_a, geo.n_1, geo.n_2, geo.in_a, geo.out_a) == (4, 32, 16, 2, 2)
  cfg = T.FFTConvConfig(num_warps=4, chunk=16, pairs=2, inner=512, stack=2)
  _triton_grads_vs_reference(key, u, k, gate, True, config=cfg,
                             dk_config=T.DkConfig(chunk=16, stack=2, inner=512))


def test_triton_circular_float16(key):
  """Circular, float16, three levels (inner 256), the four-dot split products."""
  u, k, gate = inputs(key, 3, 1, 512, 77, jnp.float16, gated=True)
  _triton_grads_vs_reference(key, u, k, gate, False,
                             config=T.FFTConvConfig(chunk=16, pairs=2, inner=256, chain=False),
                             dk_config=T.DkConfig(chunk=16, chain=False))


def test_triton_geometry_and_reasons():
  assert T.split_two(2048) == (64, 32) and T.split_two(8192) == (128, 64)
  g = T.geometry(2048, 1024)
  assert (g.n_a, g.n_1, g.n_2, g.in_rows, g.out_rows, g.in_len) == (1, 64, 32, 32, 32, 1024)
  g = T.geometry(32768, 16384, inner=4096)
  assert (g.n_a, g.n_1, g.n_2, g.in_a, g.in_rows, g.factors) == (8, 64, 64, 4, 64, (8, 64, 64))
  assert T.geometry(256, 100).in_rows == 16  # at least one 16-row dot block
  assert T.unsupported(2048, jnp.bfloat16) is None
  assert "bfloat16/float16" in T.unsupported(2048, jnp.float32)
  assert "power-of-two" in T.unsupported(3000, jnp.bfloat16)
  assert "monarch_xla" in T.unsupported(2 ** 23, jnp.bfloat16)
  assert "frequency-sparse" in T.unsupported(2048, jnp.bfloat16, frequency_sparse=True)
  with pytest.raises(ValueError, match="FFTConvConfig.chunk must be a power of two, got 24"):
    T.FFTConvConfig(chunk=24)
  with pytest.raises(ValueError, match="FFTConvConfig.chunk must be >= 16, got 8"):
    T.FFTConvConfig(chunk=8)
  with pytest.raises(ValueError, match="DkConfig.groups must be a power of two, got 3"):
    T.DkConfig(groups=3)
  u = jnp.ones((2, 2, 64), jnp.float32)
  with pytest.raises(NotImplementedError, match="fft_conv_triton: the fused Triton kernel takes"):
    fft_conv_triton(u, jnp.ones((2, 8)))


def test_triton_kernels_lower_for_cuda():
  """The Triton modules (pair/chunk loops, scalar loads, three levels) pass the verifier."""
  sds = jax.ShapeDtypeStruct
  cases = [(1024, T.config_for(2048), T.dk_config_for(2048), True),
           (1024, T.FFTConvConfig(4, 32, 4, stack=2, unroll=True), T.DkConfig(4, 32, 2, stack=2),
            False),
           (1024, T.FFTConvConfig(4, 16, 2, gauss=True), T.DkConfig(4, 64, 1, gauss=True), False),
           (4096, T.FFTConvConfig(8, 64, 1), T.DkConfig(8, 32), False),
           (4096, T.FFTConvConfig(8, 32, 2, num_stages=3), T.DkConfig(8, 32, chain=False), True),
           (16384, T.config_for(32768), T.dk_config_for(32768), True)]
  for seq, cfg, dk, gated in cases:
    u = sds((4, 8, seq), jnp.bfloat16)
    g = (u, u) if gated else ()

    def f(u, k, dy, *g, cfg=cfg, dk=dk):
      y, vjp = jax.vjp(lambda u, k, *g: fft_conv_triton(u, k, gate=g or None, config=cfg,
                                                        dk_config=dk), u, k, *g)
      return y, vjp(dy)

    text = lower_for_cuda(f, u, sds((8, seq), jnp.float32), u, *g)
    assert text.count("xla.gpu.triton") >= 3, seq


def test_dispatch_reasons(key):
  u, k, _ = inputs(key, 2, 2, 64, 64)
  with pytest.raises(NotImplementedError, match="bfloat16/float16 inputs"):
    fft_conv(u, k, implementation="triton:interpret")
  u, k, _ = inputs(key, 1, 1, 1031, 5)
  with pytest.raises(NotImplementedError, match="prime factor"):
    fft_conv(u, k, causal=False, implementation="monarch_xla")
  # default dispatch on CPU takes monarch_xla; a prime period falls back to the reference
  y = jax.jit(lambda u, k: fft_conv(u, k, causal=False))(u, k)
  assert rel_err(y, numpy_conv(u, k, causal=False)) < 2e-6


def test_bad_inputs(key):
  u, k, _ = inputs(key, 2, 3, 16, 8)
  with pytest.raises(ValueError, match=r"filter_len = k.shape\[1\] = 17 must be in \[1, seq=16\]"):
    fft_conv(u, jnp.ones((3, 17)))
  with pytest.raises(ValueError, match=r"k must have shape \[channels=3, filter_len\]"):
    fft_conv(u, jnp.ones((4, 8)))
  with pytest.raises(TypeError, match="u.dtype must be float32, bfloat16 or float16, got int32"):
    fft_conv(u.astype(jnp.int32), k)
  with pytest.raises(TypeError, match="k.dtype must be"):
    fft_conv(u, k.astype(jnp.complex64))
  with pytest.raises(ValueError, match=r"u must be \[batch, channels, seq\]"):
    fft_conv(u[0], k)
  with pytest.raises(ValueError, match=r"gate\[1\] \(v\) must have u's shape"):
    fft_conv(u, k, gate=(None, u[:, :, :5]))
  with pytest.raises(TypeError, match="gate must be None or a pair"):
    fft_conv(u, k, gate=u)
  with pytest.raises(ValueError, match="frequency_keep must be None or a number in"):
    fft_conv(u, k, frequency_keep=1.5)
  with pytest.raises(ValueError, match="unknown implementation"):
    fft_conv(u, k, implementation="cufft")


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["triton", "monarch_xla"])
@pytest.mark.parametrize("seq", [1024, 4096])
def test_gpu_real_sizes(impl, seq, key):
  u, k, gate = inputs(key, 8, 256, seq, seq, jnp.bfloat16, gated=True)
  y = jax.jit(lambda *a: fft_conv(a[0], a[1], gate=a[2:], implementation=impl))(u, k, *gate)
  assert rel_err(y, numpy_conv(u, k, *gate)) < BF16_BOUND
  dy = jax.random.normal(key, u.shape, jnp.float32).astype(jnp.bfloat16)
  def f(impl):
    def grads(*a):  # the cotangent in the output's dtype (bf16 here, float32 for the reference)
      out, vjp = jax.vjp(lambda u, k, x, v: fft_conv(u, k, gate=(x, v), implementation=impl), *a)
      return vjp(dy.astype(out.dtype))
    return jax.jit(grads)
  up = lambda a: a.astype(jnp.float32)
  for g, r in zip(f(impl)(u, k, *gate), f("xla")(up(u), k, up(gate[0]), up(gate[1]))):
    assert rel_err(g, r) < BF16_BOUND


@pytest.mark.gpu
@pytest.mark.parametrize("seq", [16384, 65536])
def test_gpu_triton_three_levels(seq, key):
  """The three-level fused path (outer DFT in the kernel, outer inverse in XLA), grads too."""
  u, k, gate = inputs(key, 4, 16, seq, seq, jnp.bfloat16, gated=True)
  dy = jax.random.normal(jax.random.fold_in(key, 1), u.shape, jnp.float32)

  def f(impl):
    def run(*a):
      out, vjp = jax.vjp(lambda u, k, x, v: fft_conv(u, k, gate=(x, v), implementation=impl), *a)
      return (out, *vjp(dy.astype(out.dtype)))
    return jax.jit(run)

  up = lambda a: a.astype(jnp.float32)
  got = f("triton")(u, k, *gate)
  ref = f("xla")(up(u), k, up(gate[0]), up(gate[1]))
  for g, r, name in zip(got, ref, ("y", "du", "dk", "dx", "dv")):
    assert rel_err(g, r) < BF16_BOUND, name


@pytest.mark.gpu
@pytest.mark.parametrize("seq,causal", [(65536, True), (2 ** 20, True), (3000, False)])
def test_gpu_long_monarch(seq, causal, key):
  u, k, _ = inputs(key, 1, 16, seq, seq, jnp.bfloat16)
  y = jax.jit(lambda u, k: fft_conv(u, k, causal=causal, implementation="monarch_xla"))(u, k)
  assert rel_err(y, numpy_conv(u, k, causal=causal)) < BF16_BOUND
  u32 = u.astype(jnp.float32)
  y32 = jax.jit(lambda u, k: fft_conv(u, k, causal=causal, implementation="monarch_xla"))(u32, k)
  assert rel_err(y32, numpy_conv(u32, k, causal=causal)) < 1e-5
