"""Long convolution by FFT (FlashFFTConv; Fu et al., 2023), with Hyena gating.

``fft_conv(u, k)`` convolves every channel of ``u [batch, channels, seq]`` with its own
filter ``k [channels, filter_len]``:

* ``causal=True`` (linear convolution): ``y[b, c, t] = sum_{j < filter_len} k[c, j] u[b, c, t - j]``
  (``u`` is zero before ``t = 0``); computed as a circular convolution of size
  ``n = next_pow2(seq + filter_len - 1)`` on zero-padded signals.
* ``causal=False`` (circular convolution of period ``seq``):
  ``y[b, c, t] = sum_j k[c, j] u[b, c, (t - j) mod seq]``; ``n = seq``.

Gating (Hyena; Poli et al., 2023): ``gate=(x, v)`` computes ``y = v * conv(k, u * x)``
with ``x, v [batch, channels, seq]`` (either may be None: no pre- or post-multiplier).

Frequency sparsity (FlashFFTConv, section 3.3): ``frequency_keep`` in (0, 1] keeps only the
filter's frequencies ``|f| < L`` of the size-``n`` transform, with ``L`` a whole number of
the decomposition's coarsest blocks (:func:`frequency_band`); the skipped blocks are never
computed. The reference applies the same band mask to ``jnp.fft.rfft``.

Implementations (``implementation=``), fastest first:

* ``"mosaic_gpu"``: the forward as one Hopper kernel per packed signal batch
  (:mod:`kernels_pallas.fftconv.mosaic_gpu`: every DFT a ``wgmma``, the DFT matrices,
  twiddles and the channel's filter spectrum resident in shared memory across the batch)
  for transform sizes 2048..8192 (causal seq 1024..4096); its backward is the
  ``"triton"`` path's. Measured on H100 (batch 64, 768 channels, forward): 6.0x jnp.fft
  at seq 1024 and 6.4x at 4096, vs 4.4x / 3.7x for ``"triton"`` (notes/spectral.md).
  Transform sizes 16384 and 32768 (causal seq 8K-16K) have their own kernel
  (:mod:`kernels_pallas.fftconv.mosaic_gpu_long`), served only when ``MOSAIC_LONG`` is
  True (off until measured on the device) or through ``fft_conv_mosaic_gpu(long=True)``.
  The filter gradient has a Mosaic kernel too (:mod:`kernels_pallas.fftconv.mosaic_gpu_dk`,
  transform sizes 2048..8192, bfloat16), used when ``MOSAIC_FILTER_GRAD`` is True (off
  until measured) or through ``fft_conv_mosaic_gpu(filter_grad="mosaic")``; a fused
  backward kernel (:mod:`kernels_pallas.fftconv.mosaic_gpu_bwd`: input and filter
  gradients from one pass, the cotangent transformed once) when ``MOSAIC_FUSED_BACKWARD``
  is True (off until measured) or through ``fft_conv_mosaic_gpu(backward="mosaic_fused")``.
* ``"triton"``: fused Pallas kernels (:mod:`kernels_pallas.fftconv.triton`) reading
  ``u`` and the gates in place and writing ``y`` in ``u.dtype`` (no transposes, no float32
  intermediates): FFT -> filter -> iFFT -> gates per packed signal for ``n`` up to 8192
  (two levels), and for ``n`` up to ``4096 * 64`` a three-level plan whose outer DFT runs
  in the kernel and whose outer inverse (``n / 4096``-term sums) and gates run in XLA.
  The filter gradient has its own kernel (the batch-summed product of the two spectra);
  ``fft_conv_triton`` takes explicit launch parameters. bfloat16/float16, power-of-two
  ``n >= 256``, no frequency sparsity; GPU (interpretable on CPU).
* ``"monarch_xla"``: the same Monarch decomposition (:mod:`jaxeff.spectral.monarch`) as
  ``dot_general`` calls that XLA runs on tensor cores: bf16/fp16 inputs give bf16 operands
  with float32 accumulation, float32 inputs use ``Precision.HIGHEST``; one-, two- and
  three-level plans up to ``n = 2**23``; every platform.
* ``"xla"``: the reference, ``jnp.fft.rfft`` / ``irfft`` in float32, differentiated by JAX.

All Monarch implementations pack two batch rows of one channel as the real and imaginary
parts of one complex signal (the filter is real, so the two convolutions stay separate
in the real and imaginary parts), skip the zero-padded half of the input in the first
DFT level and the discarded half of the output in the last, and run under a
``jax.custom_vjp``: the input gradient is the correlation with the filter (the same
convolution with the conjugated spectrum) and the filter gradient is
``Re(iFFT(sum_batch conj(FFT(u x)) FFT(v dy)))[:filter_len] / n``.
Outputs are in ``u.dtype``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxeff.ops import _registry
from jaxeff.spectral import monarch
from kernels_pallas.fftconv import mosaic_gpu as _mosaic
from kernels_pallas.fftconv import mosaic_gpu_bwd as _mosaic_bwd
from kernels_pallas.fftconv import mosaic_gpu_dk as _mosaic_dk
from kernels_pallas.fftconv import mosaic_gpu_long as _mosaic_long
from kernels_pallas.fftconv import triton as _triton

_FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
MAX_FFT_SIZE = 2 ** 23  # causal seq up to 4M


def fft_size(seq: int, filter_len: int, *, causal: bool) -> int:
  """Transform size: ``next_pow2(seq + filter_len - 1)`` (causal) or ``seq`` (circular)."""
  if not causal:
    return seq
  return 1 << max(0, (seq + filter_len - 2).bit_length())


def _plan(n: int, frequency_keep: float | None) -> monarch.MonarchPlan | None:
  return monarch.make_plan(n, frequency_keep=frequency_keep)


def frequency_band(seq: int, filter_len: int, *, causal: bool = True,
                   frequency_keep: float | None = None) -> int | None:
  """``L`` such that the convolution keeps the frequencies ``|f| < L`` (None: all).

  ``L = c * n / n_L`` with ``c = ceil(frequency_keep * n_L / 2)``, where ``n_L`` is the
  innermost factor of the transform's Monarch plan (a single level ``n_L = n`` when ``n``
  does not factor).
  """
  if frequency_keep is None:
    return None
  n = fft_size(seq, filter_len, causal=causal)
  plan = _plan(n, frequency_keep) or monarch.MonarchPlan(n, (n,))
  if plan.keep is None and plan.factors == (n,) and frequency_keep < 1:
    c = math.ceil(frequency_keep * n / 2)
    return c if 2 * c < n else None
  return monarch.band_limit(plan)


def _validate(u, k, causal, gate, frequency_keep):
  if not hasattr(u, "shape") or u.ndim != 3:
    raise ValueError(f"fft_conv: u must be [batch, channels, seq], got shape "
                     f"{getattr(u, 'shape', type(u))}")
  if u.dtype not in _FLOAT_DTYPES:
    raise TypeError(f"fft_conv: u.dtype must be float32, bfloat16 or float16, got {u.dtype}")
  batch, channels, seq = u.shape
  if min(u.shape) < 1:
    raise ValueError(f"fft_conv: u must have non-empty axes, got shape {u.shape}")
  if not hasattr(k, "shape") or k.ndim != 2:
    raise ValueError(f"fft_conv: k must be [channels, filter_len], got shape "
                     f"{getattr(k, 'shape', type(k))}")
  if k.dtype not in _FLOAT_DTYPES:
    raise TypeError(f"fft_conv: k.dtype must be float32, bfloat16 or float16, got {k.dtype}")
  if k.shape[0] != channels:
    raise ValueError(f"fft_conv: k must have shape [channels={channels}, filter_len] to match "
                     f"u.shape {u.shape}, got {k.shape}")
  if not 1 <= k.shape[1] <= seq:
    raise ValueError(f"fft_conv: filter_len = k.shape[1] = {k.shape[1]} must be in "
                     f"[1, seq={seq}] (a filter longer than the input)")
  if not isinstance(causal, bool):
    raise TypeError(f"fft_conv: causal must be a bool, got {causal!r}")
  if gate is not None:
    if not isinstance(gate, (tuple, list)) or len(gate) != 2:
      raise TypeError(f"fft_conv: gate must be None or a pair (x, v) of arrays or None, got "
                      f"{type(gate).__name__}")
    for name, g in zip(("gate[0] (x)", "gate[1] (v)"), gate):
      if g is None:
        continue
      if not hasattr(g, "shape") or g.shape != u.shape:
        raise ValueError(f"fft_conv: {name} must have u's shape {u.shape}, got "
                         f"{getattr(g, 'shape', type(g))}")
      if g.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"fft_conv: {name}.dtype must be float32, bfloat16 or float16, got "
                        f"{g.dtype}")
  if frequency_keep is not None:
    if isinstance(frequency_keep, bool) or not isinstance(frequency_keep, (int, float)) or (
        not 0 < frequency_keep <= 1):
      raise ValueError(f"fft_conv: frequency_keep must be None or a number in (0, 1], got "
                       f"{frequency_keep!r}")
  n = fft_size(seq, k.shape[1], causal=causal)
  if n > MAX_FFT_SIZE:
    raise ValueError(f"fft_conv: transform size {n} (seq={seq}, filter_len={k.shape[1]}, "
                     f"causal={causal}) exceeds {MAX_FFT_SIZE}")


# --------------------------------------------------------------------------- reference


def fft_conv_reference(u: jax.Array, k: jax.Array, x: jax.Array | None = None,
                       v: jax.Array | None = None, *, causal: bool = True,
                       frequency_keep: float | None = None) -> jax.Array:
  """Pure-jnp ``v * conv(k, u * x)`` with ``jnp.fft`` in float32 (module docstring).

  u, x, v: ``[batch, channels, seq]``; k: ``[channels, filter_len]``. Returns u.dtype.
  """
  seq, filter_len = u.shape[-1], k.shape[-1]
  n = fft_size(seq, filter_len, causal=causal)
  w = u.astype(jnp.float32)
  if x is not None:
    w = w * x.astype(jnp.float32)
  spectrum = jnp.fft.rfft(w, n=n) * jnp.fft.rfft(k.astype(jnp.float32), n=n)
  band = frequency_band(seq, filter_len, causal=causal, frequency_keep=frequency_keep)
  if band is not None:
    spectrum = jnp.where(jnp.arange(spectrum.shape[-1]) < band, spectrum, 0)
  y = jnp.fft.irfft(spectrum, n=n)[..., :seq]
  if v is not None:
    y = y * v.astype(jnp.float32)
  return y.astype(u.dtype)


# --------------------------------------------------------------------------- Monarch


@dataclasses.dataclass(frozen=True)
class _ConvCall:
  """Static description of one Monarch convolution (the custom_vjp's static argument)."""

  backend: str  # "monarch_xla"
  plan: monarch.MonarchPlan
  seq: int
  filter_len: int
  compute_dtype: str
  interpret: bool = False

  @property
  def block(self) -> int:
    """Time steps per row of the outermost digit axis."""
    return self.plan.n // self.plan.factors[0]

  def rows_for(self, length: int) -> int:
    """Outermost-axis rows that hold the first ``length`` time steps."""
    return -(-length // self.block)


def _pack(a: jax.Array, length: int) -> jax.Array:
  """``[batch, channels, seq]`` -> ``[2, ceil(batch/2) * channels, length]`` float32.

  Batch rows ``2p`` and ``2p + 1`` become the real and imaginary parts of packed row ``p``
  (zero-padded to an even batch and to ``length`` time steps).
  """
  batch, channels, seq = a.shape
  pairs = -(-batch // 2)
  a = jnp.pad(a.astype(jnp.float32), ((0, 2 * pairs - batch), (0, 0), (0, length - seq)))
  a = a.reshape(pairs, 2, channels, length).transpose(1, 0, 2, 3)
  return a.reshape(2, pairs * channels, length)


def _unpack(z: jax.Array, batch: int, channels: int, seq: int) -> jax.Array:
  """Inverse of :func:`_pack`: ``[2, pairs * channels, length]`` -> ``[batch, channels, seq]``."""
  length = z.shape[-1]
  z = z.reshape(2, -1, channels, length).transpose(1, 0, 2, 3)
  return z.reshape(-1, channels, length)[:batch, :, :seq]


def _band_mask(plan: monarch.MonarchPlan) -> np.ndarray | None:
  """0/1 mask over the compressed spectrum that makes the kept band exactly ``|f| < L``.

  The kept innermost columns hold ``f in [0, L) U [n - L, n)``; the one bin ``f = n - L``
  (its mirror ``L`` is not kept) is zeroed so the band is symmetric and real signals stay
  real.
  """
  if plan.keep is None:
    return None
  mask = np.ones(plan.spectrum_shape, np.float32)
  mask[(0,) * (len(plan.factors) - 1) + (len(plan.keep) // 2,)] = 0.0
  return mask


def _filter_spectrum(k: jax.Array, call: _ConvCall) -> jax.Array:
  """``[2, channels, *spectrum_shape]`` float32: the Monarch-order DFT of ``k`` over ``n``."""
  return _plan_filter_spectrum(k, call.plan)


def _plan_filter_spectrum(k: jax.Array, plan: monarch.MonarchPlan) -> jax.Array:
  channels, filter_len = k.shape
  block = plan.n // plan.factors[0]
  rows = -(-filter_len // block)
  kz = jnp.pad(k.astype(jnp.float32), ((0, 0), (0, rows * block - filter_len)))
  kz = jnp.stack([kz, jnp.zeros_like(kz)]).reshape(2, channels, rows, *plan.factors[1:])
  kf = monarch.forward(kz, plan, compute_dtype=jnp.float32) / plan.n
  mask = _band_mask(plan)
  return kf if mask is None else kf * mask


def _conj(z: jax.Array) -> jax.Array:
  return jnp.stack([z[0], -z[1]])


def _cmul(a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.stack([a[0] * b[0] - a[1] * b[1], a[0] * b[1] + a[1] * b[0]])


def _spectra(a: jax.Array, call: _ConvCall, pre: jax.Array | None = None) -> jax.Array:
  """Packed Monarch spectra ``[2, pairs, channels, *spectrum_shape]`` of ``a * pre``."""
  batch, channels, _ = a.shape
  plan = call.plan
  rows = call.rows_for(call.seq)
  z = _pack(a, rows * call.block)
  if pre is not None:
    z = z * _pack(pre, rows * call.block)
  z = monarch.forward(z.reshape(2, -1, rows, *plan.factors[1:]), plan,
                      compute_dtype=call.compute_dtype)
  return z.reshape(2, -1, channels, *plan.spectrum_shape)


def _apply_monarch(u, kf, pre, post, call: _ConvCall) -> jax.Array:
  batch, channels, seq = u.shape
  plan = call.plan
  y = _cmul(_spectra(u, call, pre), kf[:, None])
  out_rows = call.rows_for(seq)
  y = monarch.inverse(y.reshape(2, -1, *plan.spectrum_shape), plan,
                      compute_dtype=call.compute_dtype, out_rows=out_rows)
  y = _unpack(y.reshape(2, -1, out_rows * call.block), batch, channels, seq)
  return y if post is None else y * post.astype(jnp.float32)


_APPLY = {"monarch_xla": _apply_monarch}


def _filter_grad(w: jax.Array, dc: jax.Array, call: _ConvCall) -> jax.Array:
  """``dk [channels, filter_len]`` float32 = ``Re(iFFT(sum_b conj(W_b) DC_b))[:filter_len] / n``.

  With packed rows ``W = W_0 + i W_1`` the real part of ``conj(W) DC`` summed over pairs is
  exactly ``sum_b conj(W_b) DC_b`` back in time (the cross terms land in the imaginary part).
  """
  channels = w.shape[1]
  g = jnp.sum(_cmul(_conj(_spectra(w, call)), _spectra(dc, call)), axis=1)
  mask = _band_mask(call.plan)
  if mask is not None:
    g = g * mask
  rows = -(-call.filter_len // call.block)
  dk = monarch.inverse(g, call.plan, compute_dtype=call.compute_dtype, out_rows=rows)
  return dk[0].reshape(channels, -1)[:, :call.filter_len] / call.plan.n


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _monarch_conv(u, k, x, v, call: _ConvCall):
  """``v * conv(k, u * x)`` in float32 ``[batch, channels, seq]`` (x, v may be None)."""
  return _monarch_conv_fwd(u, k, x, v, call)[0]


def _monarch_conv_fwd(u, k, x, v, call: _ConvCall):
  kf = _filter_spectrum(k, call)
  y = _APPLY[call.backend](u, kf, x, v, call)
  return y, (u, k, x, v, kf)


def _monarch_conv_bwd(call: _ConvCall, residuals, dy):
  u, k, x, v, kf = residuals
  apply = _APPLY[call.backend]
  dy = dy.astype(jnp.float32)
  dc = dy if v is None else dy * v.astype(jnp.float32)
  # Correlation with the filter = convolution with the conjugated spectrum.
  dw = apply(dc, _conj(kf), None, None, call)
  w = u.astype(jnp.float32) if x is None else u.astype(jnp.float32) * x.astype(jnp.float32)
  du = dw if x is None else dw * x.astype(jnp.float32)
  dx = None if x is None else (dw * u.astype(jnp.float32)).astype(x.dtype)
  dv = None if v is None else (dy * apply(u, kf, x, None, call)).astype(v.dtype)
  dk = _filter_grad(w, dc, call)
  return du.astype(u.dtype), dk.astype(k.dtype), dx, dv


_monarch_conv.defvjp(_monarch_conv_fwd, _monarch_conv_bwd)


# --------------------------------------------------------------------------- Triton


@dataclasses.dataclass(frozen=True)
class _TritonCall:
  """Static description of one fused-kernel convolution (the custom_vjp's static argument)."""

  geo: _triton.Geometry
  seq: int
  filter_len: int
  compute_dtype: str
  config: _triton.FFTConvConfig
  dk_config: _triton.DkConfig
  interpret: bool = False

  @property
  def plan(self) -> monarch.MonarchPlan:
    return monarch.MonarchPlan(self.geo.n, self.geo.factors)


def _to_pairs(a: jax.Array, length: int, inner: tuple[int, ...], dtype=None) -> jax.Array:
  """``[batch, channels, seq]`` -> ``[pairs, 2, channels, *inner]`` (``prod(inner) = length``).

  Batch rows ``2p`` and ``2p + 1`` become the real and imaginary planes of pair ``p``; a
  reshape (no copy) when the batch is even and ``seq == length``, else one padding pass.
  """
  batch, channels, seq = a.shape
  if dtype is not None:
    a = a.astype(dtype)
  pairs = -(-batch // 2)
  if 2 * pairs != batch or length != seq:
    a = jnp.pad(a, ((0, 2 * pairs - batch), (0, 0), (0, length - seq)))
  return a.reshape(pairs, 2, channels, *inner)


def _from_pairs(y: jax.Array, batch: int, seq: int) -> jax.Array:
  """``[pairs, 2, channels, ...]`` -> ``[batch, channels, seq]`` (a reshape when exact)."""
  pairs, _, channels = y.shape[:3]
  y = y.reshape(2 * pairs, channels, -1)
  if y.shape[0] != batch or y.shape[-1] != seq:
    y = y[:batch, :, :seq]
  return y


def _triton_apply(u, kf, pre, posts, call: _TritonCall, out_dtype) -> tuple[jax.Array, ...]:
  """``conv(kf, u * pre) * post`` for each post (or one plain output), ``[batch, channels, seq]``."""
  batch, channels, seq = u.shape
  geo = call.geo
  inner = (geo.in_a, geo.in_rows, geo.n_2)
  z = _to_pairs(u, geo.in_len, inner, call.compute_dtype)
  pre_p = None if pre is None else _to_pairs(pre, geo.in_len, inner)
  kf = kf.reshape(2, channels, geo.n_a, geo.n_1, geo.n_2)
  kw = dict(config=call.config, interpret=call.interpret)
  if geo.n_a == 1:
    out_inner = (geo.out_rows, geo.n_2)
    posts_p = tuple(_to_pairs(p, geo.out_len, out_inner) for p in posts)
    outs = _triton.fft_conv_fused(z, kf, geo, pre=pre_p, posts=posts_p, out_dtype=out_dtype, **kw)
    return tuple(_from_pairs(o, batch, seq) for o in outs)
  (b,) = _triton.fft_conv_fused(z, kf, geo, pre=pre_p, out_dtype=z.dtype, **kw)
  y = _from_pairs(_triton.outer_inverse(b, geo), batch, seq)
  if not posts:
    return (y.astype(out_dtype),)
  return tuple((y * p.astype(jnp.float32)).astype(out_dtype) for p in posts)


def _triton_filter_grad(u, x, dy, v, call: _TritonCall) -> jax.Array:
  """``dk [channels, filter_len]`` float32 from the fused filter-gradient spectrum kernel."""
  channels = u.shape[1]
  geo = _triton.geometry(call.geo.n, call.seq, inner=call.dk_config.inner)
  inner = (geo.in_a, geo.in_rows, geo.n_2)
  pairs = lambda a, dt=None: None if a is None else _to_pairs(a, geo.in_len, inner, dt)
  g = _triton.filter_grad_spectrum(
      pairs(u, call.compute_dtype), pairs(dy, call.compute_dtype), geo, pre_w=pairs(x),
      pre_d=pairs(v), config=call.dk_config, interpret=call.interpret)
  plan = monarch.MonarchPlan(geo.n, geo.factors)
  block = plan.n // plan.factors[0]
  rows = -(-call.filter_len // block)
  dk = monarch.inverse(g.reshape(2, channels, *plan.factors), plan, compute_dtype=jnp.float32,
                       out_rows=rows)
  return dk[0].reshape(channels, -1)[:, :call.filter_len] / plan.n


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _triton_conv(u, k, x, v, call: _TritonCall):
  """``v * conv(k, u * x)`` ``[batch, channels, seq]`` in ``u.dtype`` (x, v may be None)."""
  return _triton_conv_fwd(u, k, x, v, call)[0]


def _triton_conv_fwd(u, k, x, v, call: _TritonCall):
  kf = _plan_filter_spectrum(k, call.plan)
  (y,) = _triton_apply(u, kf, x, () if v is None else (v,), call, u.dtype)
  return y, (u, k, x, v, kf)


def _triton_conv_bwd(call: _TritonCall, residuals, dy, filter_grad=None):
  """The Triton backward; ``filter_grad(u, x, dy, v)`` replaces its filter gradient."""
  u, k, x, v, kf = residuals
  dy = dy.astype(u.dtype)
  # dw = corr(k, dy * v) (the convolution with conj(K)); du = dw * x, dx = dw * u.
  if x is None:
    (du,), dx = _triton_apply(dy, _conj(kf), v, (), call, u.dtype), None
  else:
    du, dx = _triton_apply(dy, _conj(kf), v, (x, u), call, u.dtype)
    dx = dx.astype(x.dtype)
  dv = None if v is None else _triton_apply(u, kf, x, (dy,), call, u.dtype)[0].astype(v.dtype)
  if filter_grad is None:
    dk = _triton_filter_grad(u, x, dy, v, call)
  else:
    dk = filter_grad(u, x, dy, v)
  return du, dk.astype(k.dtype), dx, dv


_triton_conv.defvjp(_triton_conv_fwd, _triton_conv_bwd)


def fft_conv_triton(u: jax.Array, k: jax.Array, *, causal: bool = True,
                    gate: tuple[jax.Array | None, jax.Array | None] | None = None,
                    config: _triton.FFTConvConfig | None = None,
                    dk_config: _triton.DkConfig | None = None,
                    interpret: bool = False) -> jax.Array:
  """The ``"triton"`` implementation with explicit launch parameters (benchmarks, tuning).

  Shapes and semantics as :func:`fft_conv` (bfloat16/float16 ``u``, no frequency
  sparsity); ``config`` / ``dk_config`` default to the tuned per-size choice.
  """
  _validate(u, k, causal, gate, None)
  seq, filter_len = u.shape[-1], k.shape[-1]
  n = fft_size(seq, filter_len, causal=causal)
  cfg = config or _triton.config_for(n)
  reason = _triton.unsupported(n, u.dtype, config=cfg)
  if reason is not None:
    raise NotImplementedError(f"fft_conv_triton: {reason}")
  geo = _triton.geometry(n, seq, inner=cfg.inner)
  call = _TritonCall(geo, seq, filter_len, jnp.dtype(u.dtype).name, cfg,
                     dk_config or _triton.dk_config_for(n), bool(interpret))
  x, v = gate if gate is not None else (None, None)
  return _triton_conv(u, k, x, v, call)


def _triton_impl(u, k, *, causal, gate, frequency_keep, interpret=False):
  del frequency_keep  # supports() sends frequency-sparse calls elsewhere
  return fft_conv_triton(u, k, causal=causal, gate=gate, interpret=interpret)


def _compute_dtype(u, gate) -> str:
  """Matmul operand dtype: ``u.dtype`` (bf16/fp16 -> tensor cores; float32 -> HIGHEST)."""
  del gate
  return jnp.dtype(u.dtype).name


def _monarch_impl(backend: str):
  def fn(u, k, *, causal, gate, frequency_keep, interpret=False):
    x, v = gate if gate is not None else (None, None)
    seq, filter_len = u.shape[-1], k.shape[-1]
    plan = _plan(fft_size(seq, filter_len, causal=causal), frequency_keep)
    call = _ConvCall(backend, plan, seq, filter_len, _compute_dtype(u, gate), bool(interpret))
    return _monarch_conv(u, k, x, v, call).astype(u.dtype)
  return fn


def _monarch_supports(u, k, *, causal, gate, frequency_keep):
  del gate
  n = fft_size(u.shape[-1], k.shape[-1], causal=causal)
  if _plan(n, frequency_keep) is None:
    return (f"transform size {n} has a prime factor > {monarch.MAX_PRIME_FACTOR} "
            f"(no Monarch decomposition)")
  return None


def _triton_supports(u, k, *, causal, gate, frequency_keep):
  n = fft_size(u.shape[-1], k.shape[-1], causal=causal)
  sparse = frequency_keep is not None and frequency_band(
      u.shape[-1], k.shape[-1], causal=causal, frequency_keep=frequency_keep) is not None
  return _triton.unsupported(n, u.dtype, frequency_sparse=sparse, config=_triton.config_for(n))


def _reference_impl(u, k, *, causal, gate, frequency_keep):
  x, v = gate if gate is not None else (None, None)
  return fft_conv_reference(u, k, x, v, causal=causal, frequency_keep=frequency_keep)


# --------------------------------------------------------------------------- Mosaic GPU

# The "mosaic_gpu" backward: True runs its convolutions on the Mosaic GPU kernel too (the
# input gradient as the correlation, ``conjugate=True``; the gate products in XLA; the
# filter gradient on the Triton kernel); False runs the "triton" path's backward. Read when
# the op is traced: set it before the first call (the registry keeps one trace per call
# signature; after a change, `_registry._jitted.cache_clear()`), or pass `backward=` to
# `fft_conv_mosaic_gpu`.
MOSAIC_BACKWARD = False

# Transform sizes 16384 and 32768 (causal seq 8K-16K) on the long-sequence Mosaic GPU kernel
# (kernels_pallas/fftconv/mosaic_gpu_long.py): off until measured on the device (the
# "mosaic_gpu" entry then declines these sizes and "triton" serves them). Read at trace
# time like MOSAIC_BACKWARD; `fft_conv_mosaic_gpu(long=True)` uses the kernel regardless.
MOSAIC_LONG = False

# The "mosaic_gpu" backward's filter gradient on the Mosaic GPU kernel
# (kernels_pallas/fftconv/mosaic_gpu_dk.py: the batch-summed cross spectrum of the two
# forward transforms, one CTA a channel; an XLA inverse per channel) instead of the Triton
# kernel, with either `MOSAIC_BACKWARD` setting, where it serves the call (transform sizes
# 2048..8192, bfloat16; else the Triton kernel). Off until measured on the device. Read at
# trace time like MOSAIC_BACKWARD; `fft_conv_mosaic_gpu(filter_grad=)` chooses explicitly.
MOSAIC_FILTER_GRAD = False

# The "mosaic_gpu" backward as ONE Mosaic GPU kernel (kernels_pallas/fftconv/mosaic_gpu_bwd.py:
# the forward transforms of ``u x`` and ``dy v`` once per packed signal give both the input
# gradient ``dw = corr(k, dy v)`` and the filter gradient's cross spectrum; 6 product stages a
# signal instead of the separate kernels' 8). Takes precedence over `MOSAIC_BACKWARD` /
# `MOSAIC_FILTER_GRAD` where it serves the call (transform sizes 2048..8192, bfloat16);
# elsewhere those flags decide. Off until measured on the device. Read at trace time like
# MOSAIC_BACKWARD; `fft_conv_mosaic_gpu(backward="mosaic_fused")` chooses it explicitly.
MOSAIC_FUSED_BACKWARD = False


@dataclasses.dataclass(frozen=True)
class _MosaicCall:
  """Static description of a Mosaic GPU forward and its backward.

  ``backward``: "triton" (the Triton path's backward, residuals ``(u, k, x, v, kf)`` with
  the Triton plan's spectrum), "mosaic" (residuals ``(u, k, x, v, kf, c)``: the Mosaic
  filter spectrum and the ungated convolution ``c = conv(k, u x)`` when ``v`` is given,
  so that ``dv = dy c`` needs no second convolution) or "mosaic_fused" (the same
  residuals; ``dw`` and ``dk`` from the fused backward kernel).
  """

  causal: bool
  triton: _TritonCall
  config: _mosaic.MosaicFFTConvConfig | _mosaic_long.LongFFTConvConfig | None = None
  backward: str = "triton"
  long: bool = False  # the long-sequence kernel (transform sizes 16384, 32768)
  filter_grad: str = "triton"  # "mosaic": the Mosaic dk kernel (where it serves the call)

  def conv(self, u, k, x, v, **kw):
    """The Mosaic forward (or, with ``conjugate=True``, the correlation)."""
    fn = _mosaic_long.fft_conv_mosaic_long if self.long else _mosaic.fft_conv_mosaic
    return fn(u, k, x, v, causal=self.causal, config=self.config,
              interpret=self.triton.interpret, **kw)

  def spectrum(self, u, k):
    """The kernel's filter spectrum of ``k`` (shared by forward and backward)."""
    seq, filter_len = u.shape[-1], k.shape[-1]
    if self.long:
      geo = _mosaic_long.conv_geometry(seq, filter_len, u.dtype, causal=self.causal,
                                       config=self.config)
      return _mosaic_long.filter_spectrum(k, geo, u.dtype)
    geo, _ = _mosaic.conv_geometry(seq, filter_len, u.dtype, causal=self.causal,
                                   config=self.config)
    return _mosaic.filter_spectrum(k, geo)

  def filter_grad_fn(self):
    """``dk(u, x, dy, v)`` float32 for the backward, or None for the Triton path's own."""
    if self.filter_grad != "mosaic":
      return None
    return functools.partial(_mosaic_filter_grad, causal=self.causal,
                             filter_len=self.triton.filter_len,
                             interpret=self.triton.interpret)


def _mosaic_filter_grad(u, x, dy, v, *, causal: bool, filter_len: int, interpret: bool):
  """``dk [channels, filter_len]`` float32 from the Mosaic filter-gradient kernel.

  ``u``, ``dy``: ``[batch, channels, seq]``; ``x``, ``v``: the pre- and post-gates of the
  same shape, or None. The gates are applied in XLA (float32 products rounded to
  ``u.dtype``, as the forward's pre-gate): ``w = u x``, ``d = dy v`` (the caller checks
  :func:`_mosaic_dk_serves`)."""
  return _mosaic_dk.filter_grad_mosaic(_mosaic.gated(u, x, u.dtype),
                                       _mosaic.gated(dy.astype(u.dtype), v, u.dtype),
                                       filter_len, causal=causal, interpret=interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _mosaic_conv(u, k, x, v, call: _MosaicCall):
  """``v * conv(k, u * x)`` ``[batch, channels, seq]`` in ``u.dtype`` (x, v may be None)."""
  return call.conv(u, k, x, v)


def _mosaic_conv_fwd(u, k, x, v, call: _MosaicCall):
  if call.backward not in ("mosaic", "mosaic_fused"):
    y = _mosaic_conv(u, k, x, v, call)
    return y, (u, k, x, v, _plan_filter_spectrum(k, call.triton.plan))
  kf = call.spectrum(u, k)
  c = call.conv(u, k, x, None, kf=kf)
  y = _mosaic.gated(c, v, u.dtype)  # the rounding of fft_conv_mosaic's post-gate
  return y, (u, k, x, v, kf, None if v is None else c)


def _mosaic_conv_bwd(call: _MosaicCall, residuals, dy):
  dk_fn = call.filter_grad_fn()
  if call.backward not in ("mosaic", "mosaic_fused"):
    if dk_fn is not None and _mosaic_dk_serves(call, residuals[0]):
      return _triton_conv_bwd(call.triton, residuals, dy, filter_grad=dk_fn)
    return _triton_conv_bwd(call.triton, residuals, dy)
  u, k, x, v, kf, c = residuals
  dy = dy.astype(u.dtype)
  dk = None
  if call.backward == "mosaic_fused":
    # dw = corr(k, dy v) and dk from one kernel (the gates in XLA, float32 products
    # rounded to u.dtype, as the forward's pre-gate).
    gated = lambda a, g: _mosaic.gated(a, g, u.dtype)  # noqa: E731
    geo, _ = _mosaic_bwd.bwd_geometry(u.shape[-1], k.shape[-1], u.dtype, causal=call.causal)
    same = kf.shape == (k.shape[0], 2, geo.n_1, geo.n_2)  # (a config with another n_1)
    dw, dk = _mosaic_bwd.fft_conv_backward_mosaic(
        gated(u, x), gated(dy, v), k, causal=call.causal, kf=kf if same else None,
        interpret=call.triton.interpret)
  else:
    # dw = corr(k, dy * v): the Mosaic kernel with the conjugated filter spectrum.
    dw = call.conv(dy, k, v, None, conjugate=True, kf=kf)
  if x is None:
    du, dx = dw, None
  else:
    dw32 = dw.astype(jnp.float32)
    du = (dw32 * x.astype(jnp.float32)).astype(u.dtype)
    dx = (dw32 * u.astype(jnp.float32)).astype(x.dtype)
  dv = None if v is None else (
      (dy.astype(jnp.float32) * c.astype(jnp.float32)).astype(u.dtype).astype(v.dtype))
  if dk is None and dk_fn is not None and _mosaic_dk_serves(call, u):
    dk = dk_fn(u, x, dy, v)
  elif dk is None:
    dk = _triton_filter_grad(u, x, dy, v, call.triton)
  return du, dk.astype(k.dtype), dx, dv


def _mosaic_dk_serves(call: _MosaicCall, u) -> bool:
  """The Mosaic filter-gradient kernel serves this call's transform and dtype."""
  n = fft_size(u.shape[-1], call.triton.filter_len, causal=call.causal)
  return _mosaic_dk.unsupported(n, u.shape[-1], u.dtype) is None


def _mosaic_fused_unsupported(u, k, *, causal: bool) -> str | None:
  """None when the fused backward kernel serves this call, else the reason."""
  n = fft_size(u.shape[-1], k.shape[-1], causal=causal)
  return _mosaic_bwd.unsupported(n, u.shape[-1], u.dtype)


_mosaic_conv.defvjp(_mosaic_conv_fwd, _mosaic_conv_bwd)


def _triton_call(u, k, *, causal: bool, interpret: bool) -> _TritonCall:
  seq, filter_len = u.shape[-1], k.shape[-1]
  n = fft_size(seq, filter_len, causal=causal)
  cfg = _triton.config_for(n)
  return _TritonCall(_triton.geometry(n, seq, inner=cfg.inner), seq, filter_len,
                     jnp.dtype(u.dtype).name, cfg, _triton.dk_config_for(n), bool(interpret))


def _mosaic_impl(u, k, *, causal, gate, frequency_keep, interpret=False):
  del frequency_keep  # supports() sends frequency-sparse calls elsewhere
  x, v = gate if gate is not None else (None, None)
  n = fft_size(u.shape[-1], k.shape[-1], causal=causal)
  backward = "mosaic" if MOSAIC_BACKWARD else "triton"
  if MOSAIC_FUSED_BACKWARD and _mosaic_fused_unsupported(u, k, causal=causal) is None:
    backward = "mosaic_fused"
  call = _MosaicCall(causal, _triton_call(u, k, causal=causal, interpret=interpret),
                     backward=backward,
                     long=n in _mosaic_long.SIZES,
                     filter_grad="mosaic" if MOSAIC_FILTER_GRAD else "triton")
  return _mosaic_conv(u, k, x, v, call)


def fft_conv_mosaic_gpu(u: jax.Array, k: jax.Array, *, causal: bool = True,
                        gate: tuple[jax.Array | None, jax.Array | None] | None = None,
                        config: (_mosaic.MosaicFFTConvConfig | _mosaic_long.LongFFTConvConfig
                                 | None) = None,
                        backward: str | None = None, long: bool | None = None,
                        filter_grad: str | None = None,
                        interpret: bool = False) -> jax.Array:
  """The ``"mosaic_gpu"`` implementation with explicit choices (benchmarks, tuning).

  Shapes and semantics as :func:`fft_conv` (bfloat16/float16 ``u``, transform sizes the
  Mosaic kernels serve); ``config``: the kernel's launch parameters (None: its default;
  a ``LongFFTConvConfig`` for transform sizes 16384 / 32768); ``backward``: "mosaic" or
  "triton" or "mosaic_fused" (the fused backward kernel: input and filter gradients in
  one pass; NotImplementedError where it cannot serve the call; None:
  ``MOSAIC_FUSED_BACKWARD`` where it serves, else ``MOSAIC_BACKWARD``); ``long``: serve transform sizes 16384 / 32768 with
  the long-sequence kernel (None: ``MOSAIC_LONG``); ``filter_grad``: the backward's filter
  gradient on the Mosaic kernel ("mosaic"; NotImplementedError where it cannot serve the
  call) or the Triton kernel ("triton"); None: ``MOSAIC_FILTER_GRAD`` (the Mosaic kernel
  where it serves, else Triton).
  """
  _validate(u, k, causal, gate, None)
  n = fft_size(u.shape[-1], k.shape[-1], causal=causal)
  if backward is None:
    backward = "mosaic" if MOSAIC_BACKWARD else "triton"
    if MOSAIC_FUSED_BACKWARD and _mosaic_fused_unsupported(u, k, causal=causal) is None:
      backward = "mosaic_fused"
  if backward not in ("mosaic", "triton", "mosaic_fused"):
    raise ValueError(f"fft_conv_mosaic_gpu: backward must be None, 'mosaic', 'mosaic_fused' "
                     f"or 'triton', got {backward!r}")
  if backward == "mosaic_fused":
    why = _mosaic_fused_unsupported(u, k, causal=causal)
    if why is not None:
      raise NotImplementedError(f"fft_conv_mosaic_gpu: backward='mosaic_fused': {why}")
  if long is not None and not isinstance(long, bool):
    raise TypeError(f"fft_conv_mosaic_gpu: long must be None or a bool, got {long!r}")
  if filter_grad is None:
    filter_grad = "mosaic" if MOSAIC_FILTER_GRAD else "triton"
  elif filter_grad not in ("mosaic", "triton"):
    raise ValueError(f"fft_conv_mosaic_gpu: filter_grad must be None, 'mosaic' or 'triton', "
                     f"got {filter_grad!r}")
  else:
    why = _mosaic_dk.unsupported(n, u.shape[-1], u.dtype) if filter_grad == "mosaic" else None
    if why is not None:
      raise NotImplementedError(f"fft_conv_mosaic_gpu: filter_grad='mosaic': {why}")
  reason = _mosaic_supports(u, k, causal=causal, gate=gate, frequency_keep=None, long=long)
  if reason is not None:
    raise NotImplementedError(f"fft_conv_mosaic_gpu: {reason}")
  is_long = n in _mosaic_long.SIZES
  expected = _mosaic_long.LongFFTConvConfig if is_long else _mosaic.MosaicFFTConvConfig
  if config is not None and not isinstance(config, expected):
    raise TypeError(f"fft_conv_mosaic_gpu: transform size {n} needs config of type "
                    f"{expected.__name__} or None, got {type(config).__name__}")
  x, v = gate if gate is not None else (None, None)
  call = _MosaicCall(causal, _triton_call(u, k, causal=causal, interpret=interpret), config,
                     backward, is_long, filter_grad)
  return _mosaic_conv(u, k, x, v, call)


def _mosaic_supports(u, k, *, causal, gate, frequency_keep, long: bool | None = None):
  reason = _triton_supports(u, k, causal=causal, gate=gate, frequency_keep=frequency_keep)
  if reason is not None:
    return f"backward (Triton): {reason}"
  n = fft_size(u.shape[-1], k.shape[-1], causal=causal)
  if n in _mosaic_long.SIZES:
    if long is False:
      return f"transform size {n}: the long-sequence Mosaic kernel is off (long=False)"
    if long is None and not MOSAIC_LONG:
      return (f"transform size {n}: the long-sequence Mosaic kernel is off (MOSAIC_LONG is "
              f"False until it has been measured on the device)")
    return _mosaic_long.unsupported(n, u.shape[-1], u.dtype)
  return _mosaic.unsupported(n, u.shape[-1], u.dtype)


FFT_CONV_IMPLS: list[_registry.Implementation] = [
    _registry.Implementation("mosaic_gpu", _mosaic_impl, platforms=("gpu",),
                             supports=_mosaic_supports, interpretable=True,
                             device_kinds=_registry.HOPPER_KINDS),
    _registry.Implementation("triton", _triton_impl, platforms=("gpu",),
                             supports=_triton_supports, interpretable=True),
    _registry.Implementation("monarch_xla", _monarch_impl("monarch_xla"),
                             supports=_monarch_supports),
    _registry.Implementation("xla", _reference_impl),
]


def fft_conv(u: jax.Array, k: jax.Array, *, causal: bool = True,
             gate: tuple[jax.Array | None, jax.Array | None] | None = None,
             frequency_keep: float | None = None,
             implementation: str | Sequence[str] | None = None) -> jax.Array:
  """Per-channel long convolution by FFT, optionally gated (module docstring).

  Args:
    u: ``[batch, channels, seq]`` float32/bfloat16/float16.
    k: ``[channels, filter_len]`` with ``1 <= filter_len <= seq``.
    causal: linear causal convolution (True) or circular convolution of period ``seq``.
    gate: None or ``(x, v)``, each ``[batch, channels, seq]`` or None:
      ``y = v * conv(k, u * x)``.
    frequency_keep: None, or the fraction in (0, 1] of the spectrum kept
      (:func:`frequency_band`).
    implementation: None (fastest available), a name, or a sequence of names
      (``"mosaic_gpu"``, ``"triton"``, ``"monarch_xla"``, ``"xla"``; kernels accept
      ``":interpret"``).

  Returns:
    ``[batch, channels, seq]`` in ``u.dtype``.
  """
  _validate(u, k, causal, gate, frequency_keep)
  gate = None if gate is None or (gate[0] is None and gate[1] is None) else tuple(gate)
  return _registry.dispatch("fft_conv", FFT_CONV_IMPLS, implementation, u, k, causal=causal,
                            gate=gate, frequency_keep=frequency_keep)


__all__ = ["FFT_CONV_IMPLS", "fft_conv", "fft_conv_mosaic_gpu", "fft_conv_reference",
           "fft_conv_triton", "fft_size", "frequency_band"]
