"""Monarch FFT: the discrete Fourier transform as a product of small DFT-matrix multiplies.

Following FlashFFTConv (Fu et al., 2023, "FlashFFTConv: Efficient Convolutions for Long
Sequences with Tensor Cores") and the Cooley-Tukey "four-step" FFT (Bailey, 1990), a DFT of
size ``n = n_1 * n_2 * ... * n_L`` (``L`` = 1, 2 or 3 levels) is computed with the signal
viewed as ``[n_1, n_2, ..., n_L]`` (row-major, ``t = t_1 * (n / n_1) + ...``):

1. multiply by the ``n_1 x n_1`` DFT matrix along the first axis (a matmul),
2. multiply pointwise by the twiddle factors ``w_n^(k_1 * m)`` (``m`` the index over the
   remaining axes),
3. recurse on the remaining ``n / n_1`` points along the other axes.

The result comes out in *digit-reversed* ("Monarch") order: position
``(k_1, k_2, ..., k_L)`` holds frequency ``k_1 + n_1 * k_2 + n_1 * n_2 * k_3``
(:func:`natural_frequencies`). Convolutions never need natural order (the filter's
spectrum is computed in the same order and the inverse undoes it), so no transpose is
done. The inverse runs the steps backwards with conjugated matrices and twiddles.

Complex numbers are real arrays with a leading ``[2]`` axis (real, imaginary). A complex
matmul is ONE real ``dot_general`` that contracts over (real/imag, n) with the stacked
real matrix ``[[Re F, -Im F], [Im F, Re F]]`` of shape ``[2, n, 2, n]``; the operands are
cast to ``compute_dtype`` (bfloat16 / float16: tensor cores; float32: ``Precision.HIGHEST``)
and accumulate in float32 (``preferred_element_type``). Twiddles are applied in float32.

Two structural savings of the paper are expressed here as slices of the DFT matrices:

* zero-padded inputs (causal convolution pads to ``2 * seq``): when only the first
  ``in_rows`` rows of the outermost axis are non-zero, step 1 multiplies by
  ``F[:, :in_rows]``; when only the first ``out_rows`` output rows are wanted, the last
  inverse step multiplies by ``conj(F)[:out_rows]``;
* frequency sparsity: the innermost axis holds the coarsest frequency digit
  (``k_L``, frequency ``k >= (n / n_L) * k_L``), so a band ``|k| < (n / n_L) * c`` is the
  innermost columns ``[0, c) U [n_L - c, n_L)``; the innermost DFT then computes only
  those columns and the spectrum is stored compressed (``keep`` indices).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

MAX_FACTOR = 128  # largest DFT matrix per level (a tensor-core friendly tile edge)
MAX_LEVELS = 3
MAX_PRIME_FACTOR = 1024  # a prime factor up to this size is one dense DFT level

_LOW_PRECISION = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _prime_factors(n: int) -> list[int]:
  out, p = [], 2
  while p * p <= n:
    while n % p == 0:
      out.append(p)
      n //= p
    p += 1
  if n > 1:
    out.append(n)
  return out


def factorize(n: int, max_factor: int = MAX_FACTOR, max_levels: int = MAX_LEVELS
              ) -> tuple[int, ...] | None:
  """Splits ``n`` into at most ``max_levels`` balanced factors, each <= ``max_factor``
  (``2 * max_factor`` when ``n > max_factor ** max_levels``).

  A single prime factor above ``max_factor`` (up to ``MAX_PRIME_FACTOR``) becomes its own
  dense level. Returns None when no such split exists (e.g. ``n`` = a large prime).
  """
  if not isinstance(n, int) or n < 1:
    raise ValueError(f"factorize: n must be a positive int, got {n!r}")
  if n == 1:
    return (1,)
  primes = _prime_factors(n)
  if any(p > MAX_PRIME_FACTOR for p in primes):
    return None
  base = max(max_factor, max(primes))
  # Past max_factor ** max_levels the levels grow to 2 * max_factor (n up to 2**24).
  for limit, levels in [(base, lv) for lv in range(1, max_levels + 1)] + [(2 * base, max_levels)]:
    if n > limit ** levels:
      continue
    # Greedy balanced packing: largest primes first into the currently smallest bin.
    bins = [1] * levels
    for p in sorted(primes, reverse=True):
      i = min(range(levels), key=lambda j: bins[j])
      bins[i] *= p
    if all(b <= limit for b in bins):
      return tuple(sorted(bins, reverse=True))
  return None


@dataclasses.dataclass(frozen=True)
class MonarchPlan:
  """A DFT of size ``n`` as ``len(factors)`` levels of DFT-matrix products.

  Attributes:
    n: transform size.
    factors: ``(n_1, ..., n_L)`` with product ``n``; axis ``i`` of the ``[n_1, ..., n_L]``
      view is contracted with the ``n_i``-point DFT matrix.
    keep: innermost-axis columns kept (frequency sparsity), or None for all.
  """

  n: int
  factors: tuple[int, ...]
  keep: tuple[int, ...] | None = None

  def __post_init__(self):
    if math.prod(self.factors) != self.n:
      raise ValueError(f"MonarchPlan: factors {self.factors} do not multiply to n={self.n}")

  @property
  def spectrum_shape(self) -> tuple[int, ...]:
    """Shape of the (possibly compressed) spectrum's digit axes."""
    last = self.factors[-1] if self.keep is None else len(self.keep)
    return (*self.factors[:-1], last)


def make_plan(n: int, *, frequency_keep: float | None = None,
              max_factor: int = MAX_FACTOR) -> MonarchPlan | None:
  """The plan for an ``n``-point DFT, or None when ``n`` does not factor (module doc).

  ``frequency_keep`` in (0, 1]: keep the band ``|k| < (n / n_L) * c`` with
  ``c = ceil(frequency_keep * n_L / 2)`` (all frequencies when ``2 c >= n_L``).
  """
  factors = factorize(n, max_factor)
  if factors is None:
    return None
  keep = None
  if frequency_keep is not None:
    n_last = factors[-1]
    c = math.ceil(frequency_keep * n_last / 2)
    if 2 * c < n_last:
      keep = tuple(range(c)) + tuple(range(n_last - c, n_last))
  return MonarchPlan(n, factors, keep)


def band_limit(plan: MonarchPlan) -> int | None:
  """``L`` such that the plan keeps exactly the frequencies ``|k| < L`` (None: all)."""
  if plan.keep is None:
    return None
  c = len(plan.keep) // 2
  return c * (plan.n // plan.factors[-1])


def natural_frequencies(plan: MonarchPlan) -> np.ndarray:
  """Frequency index held at each position of the flattened Monarch-order spectrum."""
  digits = np.indices(plan.factors).reshape(len(plan.factors), -1)
  weights = np.cumprod((1,) + plan.factors[:-1])
  freqs = np.tensordot(weights, digits, axes=1).reshape(plan.factors)
  if plan.keep is not None:
    freqs = freqs[..., list(plan.keep)]
  return freqs.reshape(-1)


@functools.lru_cache(maxsize=256)
def _dft_np(n: int) -> np.ndarray:
  k = np.arange(n)
  return np.exp(-2j * np.pi * np.outer(k, k) / n)


def stacked_matrix(f: np.ndarray) -> np.ndarray:
  """``[2, rows, 2, cols]`` real matrix ``[[Re f, -Im f], [Im f, Re f]]`` of a complex ``f``."""
  return np.stack([np.stack([f.real, -f.imag], 1), np.stack([f.imag, f.real], 1)], 0)


def dft_matrix(n: int, *, inverse: bool = False) -> np.ndarray:
  """Complex128 ``[n, n]`` DFT matrix ``w^(j k)``, ``w = exp(-+2 pi i / n)``."""
  f = _dft_np(n)
  return np.conj(f) if inverse else f


def twiddles(n: int, n_1: int, *, inverse: bool = False) -> np.ndarray:
  """Complex128 ``[n_1, n / n_1]`` twiddle factors ``w_n^(k_1 * m)``."""
  m = n // n_1
  t = np.exp(-2j * np.pi * np.outer(np.arange(n_1), np.arange(m)) / n)
  return np.conj(t) if inverse else t


def _dot_kwargs(compute_dtype) -> dict:
  if jnp.dtype(compute_dtype) in _LOW_PRECISION:
    return dict(preferred_element_type=jnp.float32)
  return dict(preferred_element_type=jnp.float32, precision=jax.lax.Precision.HIGHEST)


def _contract(z: jax.Array, mat: np.ndarray, axis: int, compute_dtype) -> jax.Array:
  """``z [2, ..., n(axis), ...]`` times the stacked ``mat [2, k, 2, n]`` over (ri, axis)."""
  w = jnp.asarray(mat, compute_dtype)
  out = jax.lax.dot_general(z.astype(compute_dtype), w, (((0, axis), (2, 3)), ((), ())),
                            **_dot_kwargs(compute_dtype))
  # dot_general puts z's free axes first, then w's [2, k]; move them back in place.
  nd = z.ndim
  out = jnp.moveaxis(out, nd - 2, 0)  # ri to the front
  return jnp.moveaxis(out, nd - 1, axis)


def _complex_mul(z: jax.Array, t: np.ndarray | jax.Array) -> jax.Array:
  """``z [2, ...] * t`` (``t`` complex numpy or ``[2, ...]`` float32), in float32."""
  if isinstance(t, np.ndarray):
    tr, ti = jnp.asarray(t.real, jnp.float32), jnp.asarray(t.imag, jnp.float32)
  else:
    tr, ti = t[0], t[1]
  zr, zi = z[0].astype(jnp.float32), z[1].astype(jnp.float32)
  return jnp.stack([zr * tr - zi * ti, zr * ti + zi * tr])


def _bcast_twiddle(t: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """``[n_1, m]`` twiddles reshaped to the digit axes ``[n_1, n_2, ..., n_L]``."""
  return t.reshape(shape)


def forward(z: jax.Array, plan: MonarchPlan, *, compute_dtype=jnp.float32,
            in_rows: int | None = None) -> jax.Array:
  """Unnormalised forward DFT of complex signals, output in Monarch order.

  Args:
    z: ``[2, rows, in_rows, n_2, ..., n_L]`` (real/imag, rows, the plan's digit axes; the
      outermost digit axis may be cut to its first ``in_rows`` entries, the rest being
      zero padding).
    plan: from :func:`make_plan`.
    compute_dtype: matmul operand dtype (accumulation is float32).
    in_rows: non-zero rows of the outermost axis (default ``z.shape[2]``).

  Returns:
    ``[2, rows, *plan.spectrum_shape]`` float32.
  """
  factors = plan.factors
  levels = len(factors)
  in_rows = z.shape[2] if in_rows is None else in_rows
  if z.shape[3:] != factors[1:] or z.shape[2] != in_rows:
    raise ValueError(f"monarch.forward: z must be [2, rows, {in_rows}, "
                     f"{', '.join(map(str, factors[1:]))}], got {z.shape}")
  n_rest = plan.n
  for level, n_i in enumerate(factors):
    axis = 2 + level
    f = dft_matrix(n_i)
    if level == 0:
      f = f[:, :in_rows]
    if level == levels - 1 and plan.keep is not None:
      f = f[list(plan.keep)]
    z = _contract(z, stacked_matrix(f), axis, compute_dtype)
    if level < levels - 1:
      t = twiddles(n_rest, n_i)  # [n_i, n_rest / n_i]
      z = _complex_mul(z, _bcast_twiddle(t, factors[level:]))
      n_rest //= n_i
  return z


def inverse(z: jax.Array, plan: MonarchPlan, *, compute_dtype=jnp.float32,
            out_rows: int | None = None) -> jax.Array:
  """Unnormalised inverse DFT (``sum_k Z[k] w^(-k t)``) of a Monarch-order spectrum.

  Args:
    z: ``[2, rows, *plan.spectrum_shape]``.
    out_rows: rows of the outermost output axis to compute (default all ``n_1``).

  Returns:
    ``[2, rows, out_rows, n_2, ..., n_L]`` float32 (natural time order).
  """
  factors = plan.factors
  levels = len(factors)
  out_rows = factors[0] if out_rows is None else out_rows
  if z.shape[2:] != plan.spectrum_shape:
    raise ValueError(f"monarch.inverse: z must be [2, rows, "
                     f"{', '.join(map(str, plan.spectrum_shape))}], got {z.shape}")
  sizes = [math.prod(factors[i:]) for i in range(levels)]
  for level in reversed(range(levels)):
    n_i = factors[level]
    axis = 2 + level
    if level < levels - 1:
      t = twiddles(sizes[level], n_i, inverse=True)
      z = _complex_mul(z, _bcast_twiddle(t, factors[level:]))
    f = dft_matrix(n_i, inverse=True)
    if level == levels - 1 and plan.keep is not None:
      f = f[:, list(plan.keep)]
    if level == 0:
      f = f[:out_rows]
    z = _contract(z, stacked_matrix(f), axis, compute_dtype)
  return z


def fft(x: jax.Array, plan: MonarchPlan, *, compute_dtype=jnp.float32) -> jax.Array:
  """Complex ``[2, rows, n]`` -> Monarch-order spectrum ``[2, rows, prod(spectrum_shape)]``."""
  rows = x.shape[1]
  z = forward(x.reshape(2, rows, *plan.factors), plan, compute_dtype=compute_dtype)
  return z.reshape(2, rows, -1)


def ifft(y: jax.Array, plan: MonarchPlan, *, compute_dtype=jnp.float32) -> jax.Array:
  """Monarch-order ``[2, rows, prod(spectrum_shape)]`` -> unnormalised inverse ``[2, rows, n]``."""
  rows = y.shape[1]
  z = inverse(y.reshape(2, rows, *plan.spectrum_shape), plan, compute_dtype=compute_dtype)
  return z.reshape(2, rows, plan.n)


__all__ = ["MAX_FACTOR", "MonarchPlan", "band_limit", "dft_matrix", "factorize", "fft",
           "forward", "ifft", "inverse", "make_plan", "natural_frequencies", "stacked_matrix",
           "twiddles"]
