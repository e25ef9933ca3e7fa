"""Real FFTs (``rfft`` / ``irfft``) on the Monarch matmul decomposition, bfloat16-capable.

``jnp.fft`` rejects bfloat16; these run the transform as DFT-matrix products
(:mod:`jaxeff.spectral.monarch`) with the input's precision as matmul operands
(bfloat16/float16 -> tensor cores with float32 accumulation; float32 -> ``HIGHEST``), so a
bfloat16 activation is transformed without an upcast pass. Real-input packing: two real
rows form one complex signal ``z = a + i b``; their spectra separate as
``A[f] = (Z[f] + conj(Z[-f])) / 2`` and ``B[f] = (Z[f] - conj(Z[-f])) / (2 i)``
(and the inverse packs two Hermitian spectra the same way), so each complex transform
serves two real ones. Sizes whose factors do not fit the decomposition (a prime factor
above ``monarch.MAX_PRIME_FACTOR``) fall back to ``jnp.fft`` in float32.

Error: float32 inputs match ``numpy.fft`` to ~1e-6 relative; bfloat16 operands give
~3e-3 relative (rounding of the input and of the DFT matrices, ``O(sqrt(levels))`` growth).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxeff.spectral import monarch

_REAL_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _rows_last(x: jax.Array, axis: int) -> tuple[jax.Array, tuple[int, ...]]:
  x = jnp.moveaxis(x, axis, -1)
  return x.reshape(-1, x.shape[-1]), x.shape[:-1]


def _fit(x: jax.Array, n: int) -> jax.Array:
  if x.shape[-1] >= n:
    return x[..., :n]
  return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, n - x.shape[-1])])


def _pack_pairs(x: jax.Array) -> jax.Array:
  """``[rows, n]`` -> ``[2, ceil(rows / 2), n]``: rows 2p / 2p+1 as real / imaginary parts."""
  rows = x.shape[0]
  x = jnp.pad(x, ((0, rows % 2), (0, 0)))
  return x.reshape(-1, 2, x.shape[-1]).transpose(1, 0, 2)


def _natural_order(plan: monarch.MonarchPlan) -> np.ndarray:
  """Monarch position of each natural frequency."""
  return np.argsort(monarch.natural_frequencies(plan))


def rfft(x: jax.Array, n: int | None = None, axis: int = -1) -> jax.Array:
  """Real-input DFT along ``axis`` (as ``jnp.fft.rfft``), accepting bfloat16/float16.

  Args:
    x: real ``[..., length, ...]`` float32/bfloat16/float16.
    n: transform size (the axis is cut or zero-padded to it); default its length.
    axis: the transformed axis.

  Returns:
    complex64 ``[..., n // 2 + 1, ...]``.
  """
  if not hasattr(x, "dtype") or jnp.dtype(x.dtype) not in _REAL_DTYPES:
    raise TypeError(f"rfft: x must be a float32/bfloat16/float16 array, got "
                    f"{getattr(x, 'dtype', type(x))}")
  if x.ndim < 1:
    raise ValueError(f"rfft: x must have at least one axis, got shape {x.shape}")
  axis = axis % x.ndim
  n = x.shape[axis] if n is None else n
  if not isinstance(n, int) or n < 1:
    raise ValueError(f"rfft: n must be a positive int, got {n!r}")
  plan = monarch.make_plan(n)
  if plan is None:
    return jnp.fft.rfft(x.astype(jnp.float32), n=n, axis=axis)
  rows, lead = _rows_last(x, axis)
  num_rows = rows.shape[0]
  z = _pack_pairs(_fit(rows, n))
  spec = monarch.fft(z, plan, compute_dtype=x.dtype)[..., _natural_order(plan)]
  zc = jax.lax.complex(spec[0], spec[1])  # [pairs, n]
  mirror = jnp.conj(jnp.roll(zc[:, ::-1], 1, axis=-1))  # conj(Z[-f])
  a, b = (zc + mirror) / 2, (zc - mirror) / 2j
  out = jnp.stack([a, b], 1).reshape(-1, n)[:num_rows, : n // 2 + 1]
  return jnp.moveaxis(out.reshape(*lead, n // 2 + 1), -1, axis)


def irfft(spectrum: jax.Array, n: int | None = None, axis: int = -1, *,
          compute_dtype=jnp.float32) -> jax.Array:
  """Inverse of :func:`rfft` along ``axis`` (as ``jnp.fft.irfft``).

  Args:
    spectrum: complex ``[..., m, ...]`` (a real array is taken as zero imaginary part).
    n: output length; default ``2 * (m - 1)``.
    axis: the transformed axis.
    compute_dtype: matmul operand dtype (``jnp.bfloat16`` for tensor cores).

  Returns:
    float32 ``[..., n, ...]``.
  """
  if not hasattr(spectrum, "dtype") or not (
      jnp.issubdtype(spectrum.dtype, jnp.complexfloating) or
      jnp.dtype(spectrum.dtype) in _REAL_DTYPES):
    raise TypeError(f"irfft: spectrum must be a complex or float array, got "
                    f"{getattr(spectrum, 'dtype', type(spectrum))}")
  if jnp.dtype(compute_dtype) not in _REAL_DTYPES:
    raise TypeError(f"irfft: compute_dtype must be float32, bfloat16 or float16, got "
                    f"{compute_dtype}")
  axis = axis % spectrum.ndim
  m = spectrum.shape[axis]
  n = 2 * (m - 1) if n is None else n
  if not isinstance(n, int) or n < 1:
    raise ValueError(f"irfft: n must be a positive int, got {n!r} (spectrum length {m})")
  spectrum = spectrum.astype(jnp.complex64)
  plan = monarch.make_plan(n)
  if plan is None:
    return jnp.fft.irfft(spectrum, n=n, axis=axis)
  rows, lead = _rows_last(spectrum, axis)
  half = n // 2 + 1
  rows = _fit(rows, half)
  # Hermitian extension to all n frequencies: X[f] = conj(X[n - f]) for f > n / 2.
  tail = jnp.conj(rows[:, 1: n - half + 1][:, ::-1])
  full = jnp.concatenate([rows, tail], axis=-1)
  full = full.at[:, 0].set(full[:, 0].real)
  if n % 2 == 0:
    full = full.at[:, n // 2].set(full[:, n // 2].real)
  pr, pi = _pack_pairs(full.real), _pack_pairs(full.imag)
  # Z = A + i B with A, B Hermitian: its inverse is a + i b for the real signals a, b.
  z = jnp.stack([pr[0] - pi[1], pi[0] + pr[1]])[..., monarch.natural_frequencies(plan)]
  out = monarch.ifft(z, plan, compute_dtype=compute_dtype) / n
  out = out.transpose(1, 0, 2).reshape(-1, n)[: rows.shape[0]]
  return jnp.moveaxis(out.reshape(*lead, n), -1, axis)


__all__ = ["irfft", "rfft"]
