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

* ``"triton"``: one fused Pallas kernel per packed row (FFT -> filter -> iFFT -> gates in
  registers; :mod:`kernels_pallas.fftconv.triton`), bfloat16/float16 inputs, two-level
  plans with ``n <= 8192``, no frequency sparsity; GPU (interpretable on CPU).
* ``"monarch_xla"``: the same Monarch decomposition (:mod:`jaxeff.spectral.monarch`) as
  ``dot_general`` calls that XLA runs on tensor cores: bf16/fp16 inputs give bf16 operands
  with float32 accumulation, float32 inputs use ``Precision.HIGHEST``; one-, two- and
  three-level plans up to ``n = 2**23``; every platform.
* ``"xla"``: the reference, ``jnp.fft.rfft`` / ``irfft`` in float32, differentiated by JAX.

Both Monarch implementations pack two batch rows of one channel as the real and imaginary
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

  backend: str  # "monarch_xla" or "triton"
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
    rows = -(-length // self.block)
    if self.backend == "triton":  # Triton blocks: powers of two, at least 16
      rows = min(self.plan.factors[0], max(_triton.MIN_FACTOR, 1 << (rows - 1).bit_length()))
    return rows


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
  channels, filter_len = k.shape
  rows = -(-filter_len // call.block)
  kz = jnp.pad(k.astype(jnp.float32), ((0, 0), (0, rows * call.block - filter_len)))
  kz = jnp.stack([kz, jnp.zeros_like(kz)]).reshape(2, channels, rows, *call.plan.factors[1:])
  kf = monarch.forward(kz, call.plan, compute_dtype=jnp.float32) / call.plan.n
  mask = _band_mask(call.plan)
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


def _apply_triton(u, kf, pre, post, call: _ConvCall) -> jax.Array:
  batch, channels, seq = u.shape
  n_1, n_2 = call.plan.factors
  cdt = jnp.dtype(call.compute_dtype)
  rows = call.rows_for(seq)
  shape = lambda a: a.reshape(2, -1, rows, n_2)
  z = shape(_pack(u, rows * n_2)).astype(cdt)
  pre_p = None if pre is None else shape(_pack(pre, rows * n_2)).astype(cdt)
  post_p = None if post is None else shape(_pack(post, rows * n_2))
  f1 = monarch.dft_matrix(n_1)
  mats = lambda c, dt: jnp.asarray(np.stack([c.real, c.imag]), dt)
  y = _triton.fft_conv_fused(
      z, kf, mats(f1[:, :rows], cdt), mats(monarch.twiddles(call.plan.n, n_1), jnp.float32),
      mats(monarch.dft_matrix(n_2), cdt), mats(np.conj(f1)[:rows], cdt), channels=channels,
      pre=pre_p, post=post_p, interpret=call.interpret)
  return _unpack(y.reshape(2, -1, rows * n_2), batch, channels, seq)


_APPLY = {"monarch_xla": _apply_monarch, "triton": _apply_triton}


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
  plan = _plan(n, frequency_keep)
  if plan is None:
    return f"transform size {n} has no Monarch decomposition"
  return _triton.unsupported(plan.factors, _compute_dtype(u, gate),
                             frequency_sparse=plan.keep is not None)


def _reference_impl(u, k, *, causal, gate, frequency_keep):
  x, v = gate if gate is not None else (None, None)
  return fft_conv_reference(u, k, x, v, causal=causal, frequency_keep=frequency_keep)


FFT_CONV_IMPLS: list[_registry.Implementation] = [
    _registry.Implementation("triton", _monarch_impl("triton"), platforms=("gpu",),
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
      (``"triton"``, ``"monarch_xla"``, ``"xla"``; kernels accept ``":interpret"``).

  Returns:
    ``[batch, channels, seq]`` in ``u.dtype``.
  """
  _validate(u, k, causal, gate, frequency_keep)
  gate = None if gate is None or (gate[0] is None and gate[1] is None) else tuple(gate)
  return _registry.dispatch("fft_conv", FFT_CONV_IMPLS, implementation, u, k, causal=causal,
                            gate=gate, frequency_keep=frequency_keep)


__all__ = ["FFT_CONV_IMPLS", "fft_conv", "fft_conv_reference", "fft_size", "frequency_band"]
