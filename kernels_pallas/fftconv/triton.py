"""Fused FFT convolution (FFT -> pointwise filter multiply -> inverse FFT, with gating) as a
Pallas kernel lowered through Triton.

FlashFFTConv (Fu et al., 2023) for a two-level Monarch decomposition ``n = n_1 * n_2``:
one program owns one complex signal ``z`` (two batch rows of one channel packed as real
and imaginary parts; the filter is real so the two stay separate) viewed as the matrix
``[n_1, n_2]`` and keeps every intermediate in registers:

    A = F1[:, :in_rows] @ (pre * z)        forward DFT along the rows (zero-padded rows skipped)
    A = A * T                              twiddles w_n^(k_1 n_2)
    Y = A @ F2                             forward DFT along the columns (Monarch order)
    Y = Y * K                              the filter's spectrum (already / n)
    B = Y @ conj(F2)                       inverse DFT along the columns
    B = B * conj(T)
    out = post * (conj(F1)[:out_rows] @ B) inverse DFT along the rows, only the rows kept

Each complex product is four real ``dot`` calls on bfloat16/float16 operands with float32
accumulation (tensor cores); twiddles, the filter multiply and the gates are float32.
``z`` is read once and the output written once; the DFT matrices, twiddles and the filter
spectrum are read per program (they are small and stay in L2).

The same kernel computes the input gradient of the convolution (a correlation): the
caller passes ``conj(K)``.

Triton is chosen for the first fused kernel because it is interpretable on CPU and runs
on any CUDA GPU; a Mosaic GPU (wgmma) version is not written yet (notes/spectral.md).
Limits: ``n_1, n_2`` powers of two in ``[16, 128]``, ``n <= MAX_N`` (the whole complex
``[n_1, n_2]`` tile lives in registers), bfloat16/float16 operands.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

MIN_FACTOR = 16  # smallest dot dimension Triton accepts
MAX_FACTOR = 128
MAX_N = 8192  # complex float32 [n_1, n_2] tile in registers: 64 KiB at 8192 over 8 warps
ELEMS_PER_WARP = 1024
MAX_WARPS = 8
SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


@dataclasses.dataclass(frozen=True)
class FFTConvConfig:
  """Launch parameters of one fused convolution.

  Attributes:
    num_warps: warps per program (one program per packed row).
    num_stages: Triton pipelining depth (the kernel has no loop; 1 keeps registers free).
  """

  num_warps: int
  num_stages: int = 1

  def __post_init__(self):
    if self.num_warps < 1 or self.num_warps & (self.num_warps - 1):
      raise ValueError(f"FFTConvConfig.num_warps must be a power of two, got {self.num_warps}")


def default_config(n_1: int, n_2: int) -> FFTConvConfig:
  warps = max(1, min(MAX_WARPS, n_1 * n_2 // ELEMS_PER_WARP))
  return FFTConvConfig(num_warps=1 << (warps.bit_length() - 1))


def _pow2(v: int) -> bool:
  return v >= 1 and not v & (v - 1)


def unsupported(factors: tuple[int, ...], dtype, *, frequency_sparse: bool = False) -> str | None:
  """None when the kernel serves a plan with these factors, else why not."""
  if jnp.dtype(dtype) not in SUPPORTED_DTYPES:
    return (f"the fused Triton kernel takes bfloat16/float16 inputs (tensor-core matmuls), "
            f"got {jnp.dtype(dtype).name}")
  if len(factors) != 2:
    return f"the fused kernel needs a two-level decomposition, the plan has factors {factors}"
  n_1, n_2 = factors
  if not all(_pow2(f) and MIN_FACTOR <= f <= MAX_FACTOR for f in factors):
    return f"factors {factors} must be powers of two in [{MIN_FACTOR}, {MAX_FACTOR}]"
  if n_1 * n_2 > MAX_N:
    return f"FFT size {n_1 * n_2} > {MAX_N} does not fit in one program's registers"
  if frequency_sparse:
    return "frequency-sparse plans run on 'monarch_xla' (the fused kernel keeps all columns)"
  return None


def _cmatmul(ar, ai, br, bi, compute_dtype):
  """Complex ``(ar + i ai) @ (br + i bi)`` as four real dots, float32 accumulation."""
  dot = functools.partial(jnp.dot, preferred_element_type=jnp.float32)
  ar, ai, br, bi = (x.astype(compute_dtype) for x in (ar, ai, br, bi))
  return dot(ar, br) - dot(ai, bi), dot(ar, bi) + dot(ai, br)


def _kernel(*refs, has_pre, has_post, compute_dtype):
  refs = iter(refs)
  z_ref, kf_ref, f1_ref, tw_ref, f2_ref, g1_ref = (next(refs) for _ in range(6))
  pre_ref = next(refs) if has_pre else None
  post_ref = next(refs) if has_post else None
  out_ref = next(refs)

  zr, zi = z_ref[0].astype(jnp.float32), z_ref[1].astype(jnp.float32)
  if has_pre:
    zr, zi = zr * pre_ref[0].astype(jnp.float32), zi * pre_ref[1].astype(jnp.float32)
  tr, ti = tw_ref[0], tw_ref[1]
  f2r, f2i = f2_ref[0], f2_ref[1]
  # A: [n_1, n_2], the column-wise DFT of the non-zero rows.
  ar, ai = _cmatmul(f1_ref[0], f1_ref[1], zr, zi, compute_dtype)
  ar, ai = ar * tr - ai * ti, ar * ti + ai * tr
  # Y: the spectrum in Monarch order (position (k_1, k_2) holds frequency k_1 + n_1 k_2).
  yr, yi = _cmatmul(ar, ai, f2r, f2i, compute_dtype)
  kr, ki = kf_ref[0], kf_ref[1]
  yr, yi = yr * kr - yi * ki, yr * ki + yi * kr
  # Inverse: conj(F2) along the columns, conj twiddles, conj(F1)[:out_rows] along rows.
  br, bi = _cmatmul(yr, yi, f2r, -f2i, compute_dtype)
  br, bi = br * tr + bi * ti, bi * tr - br * ti
  outr, outi = _cmatmul(g1_ref[0], g1_ref[1], br, bi, compute_dtype)
  if has_post:
    outr, outi = outr * post_ref[0].astype(jnp.float32), outi * post_ref[1].astype(jnp.float32)
  out_ref[0] = outr.astype(out_ref.dtype)
  out_ref[1] = outi.astype(out_ref.dtype)


def fft_conv_fused(z: jax.Array, kf: jax.Array, f1: jax.Array, tw: jax.Array, f2: jax.Array,
                   g1: jax.Array, *, channels: int, pre: jax.Array | None = None,
                   post: jax.Array | None = None, out_dtype=jnp.float32,
                   config: FFTConvConfig | None = None, interpret: bool = False) -> jax.Array:
  """Fused circular convolution of packed complex rows with per-channel spectra.

  Args:
    z: ``[2, rows, in_rows, n_2]`` the signals (real/imag planes), zero rows past
      ``in_rows`` omitted; row ``r`` belongs to channel ``r % channels``.
    kf: ``[2, channels, n_1, n_2]`` float32 filter spectra in Monarch order, scaled by 1/n.
    f1: ``[2, n_1, in_rows]`` forward row DFT ``F1[:, :in_rows]`` (compute dtype).
    tw: ``[2, n_1, n_2]`` float32 twiddles ``w_n^(k_1 t_2)``.
    f2: ``[2, n_2, n_2]`` forward column DFT (compute dtype; its conjugate is the inverse).
    g1: ``[2, out_rows, n_1]`` inverse row DFT ``conj(F1)[:out_rows]`` (compute dtype).
    pre: ``[2, rows, in_rows, n_2]`` multiplier applied to ``z`` before the FFT, or None.
    post: ``[2, rows, out_rows, n_2]`` multiplier applied after the inverse, or None.
    out_dtype: output dtype.
    config: launch parameters; None picks them with :func:`default_config`.
    interpret: run in Pallas interpret mode (any platform).

  Returns:
    ``[2, rows, out_rows, n_2]`` the first ``out_rows * n_2`` outputs of each row.
  """
  _, rows, in_rows, n_2 = z.shape
  n_1 = tw.shape[1]
  out_rows = g1.shape[1]
  compute_dtype = f2.dtype
  cfg = config or default_config(n_1, n_2)
  row_spec = lambda r_: pl.BlockSpec((2, None, r_, n_2), lambda r: (0, r, 0, 0))
  full = lambda a: pl.BlockSpec(a.shape, lambda r: (0,) * a.ndim)
  in_specs = [row_spec(in_rows),
              pl.BlockSpec((2, None, n_1, n_2), lambda r: (0, r % channels, 0, 0)),
              full(f1), full(tw), full(f2), full(g1)]
  inputs = [z, kf, f1, tw, f2, g1]
  if pre is not None:
    in_specs.append(row_spec(in_rows))
    inputs.append(pre)
  if post is not None:
    in_specs.append(row_spec(out_rows))
    inputs.append(post)
  kernel = functools.partial(_kernel, has_pre=pre is not None, has_post=post is not None,
                             compute_dtype=compute_dtype)
  return pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct((2, rows, out_rows, n_2), out_dtype),
      grid=(rows,), in_specs=in_specs, out_specs=row_spec(out_rows),
      compiler_params=pltriton.CompilerParams(num_warps=cfg.num_warps,
                                              num_stages=cfg.num_stages),
      interpret=interpret, name="fft_conv_fused",
  )(*inputs)


__all__ = ["FFTConvConfig", "MAX_N", "default_config", "fft_conv_fused", "unsupported"]
