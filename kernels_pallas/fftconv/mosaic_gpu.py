"""Fused FFT convolution (FFT -> filter spectrum -> inverse FFT) for Hopper, Mosaic GPU.

FlashFFTConv (Fu et al., 2023) with the two-level Monarch (Cooley-Tukey four-step)
decomposition ``n = n_1 * n_2``, written for ``wgmma``: every DFT is a matrix product on
the tensor cores with bfloat16/float16 operands in shared memory and float32 accumulators,
and the DFT matrices, twiddles and the channel's filter spectrum stay resident in shared
memory while a CTA loops over the batch of one channel.

A packed signal ``z = u[2p] + i u[2p + 1]`` (two batch rows of one channel; the filter is
real, so the two convolutions stay in the real and imaginary parts) of transform size
``n`` is the row-major matrix ``Z [n_1, n_2]`` (``t = n_2 t_1 + t_2``) whose first ``rows``
rows hold the input (the causal zero padding is never read or multiplied). Per signal:

    A = F1[:, :rows] @ Z              row DFT        M = n_1,  K = rows, N = n_2
    P = A * T                         twiddles ``w_n^(k_1 t_2)``
    Y = P @ F2                        column DFT     M = n_1,  K = N = n_2
    P = Y * K                         the filter spectrum ``FFT_n(k)[k_1 + n_1 k_2] / n``
    B = P @ conj(F2)                  inverse column DFT
    P = B * conj(T)
    y = conj(F1)[:rows, :] @ P        inverse row DFT, only the rows kept (M = rows,
                                      padded to 64 with zero matrix rows when rows < 64)

``y``'s real and imaginary parts are the two batch rows' outputs. With ``conjugate`` the
filter step multiplies by ``conj(K)``: the correlation with the filter (the backward's
input gradient), with the same unread input rows and dropped output rows (the
anti-causal sum reaches ``t + filter_len - 1 < n`` and the input is zero from ``seq`` on). Each complex product is
two ``wgmma`` accumulators (real, imaginary), each the chain of two real products over the
real and imaginary planes, with the sign in a constant ``-Im`` plane (``F1``, ``F2``), so
no float32 adds; ``conj(F1)[:rows, :]`` is ``F1[:, :rows]`` read transposed (when ``rows``
is a multiple of 64). The twiddle and filter multiplies run on the accumulators in
registers (float32) and write the next product's operand planes to shared memory.

Structure: a CTA owns one channel and ``pairs_per_cta`` packed signals; it loads the
constants (DFT planes, twiddles, the channel's filter spectrum) once by TMA, then
``compute_wgs`` warpgroups (FlashAttention-3-style ping-pong: while one warpgroup does its
elementwise work the other's ``wgmma`` runs) each loop over every ``compute_wgs``-th
signal with their own operand planes; each warpgroup prefetches its next signals' input
rows by TMA into a ``stages``-deep ring and writes its outputs by TMA, staged in its
operand planes (``o_in_p``) or a tile of their own.

Why Mosaic GPU: the Triton kernels of :mod:`kernels_pallas.fftconv.triton` fetch the
constants from L2 per signal and chunk and issue mostly ``mma.sync`` with one program per
SM; measured latency-bound at 12% of the tensor-core peak (notes/spectral.md). Here the
constants are fetched once per CTA and every product is a ``wgmma`` with M >= 64.

Limits: ``n_1`` in {64, 128}, ``n_2`` in {32, 64} (``n`` in 2048 .. 8192), ``rows`` a
multiple of 16; bfloat16/float16 input; the whole working set in shared memory
(:func:`smem_bytes`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

WGMMA_M = 64
SMEM_BUDGET_BYTES = 227 * 1024
SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
N1_CHOICES = (64, 128)
N2_CHOICES = (32, 64)


@dataclasses.dataclass(frozen=True)
class MosaicFFTConvConfig:
  """Launch parameters of :func:`fft_conv_fused_mosaic`.

  Attributes:
    n_1: rows of the ``[n_1, n_2]`` view (the row DFT size, the ``wgmma`` M of the row and
      column products); 0 picks 64 for ``n <= 4096`` and 128 above.
    compute_wgs: warpgroups per CTA, each looping over its own signals (1 or 2).
    stages: input ring depth per warpgroup (1: the next signal's rows are fetched after
      this one's row DFT; 2: one more signal ahead).
    pairs_per_cta: packed signals per CTA (0: all pairs of the batch; clipped to a
      divisor of the pair count that is a multiple of ``compute_wgs`` when possible).
    const_dtype: "float32" or the compute dtype ("bfloat16"): twiddles and filter spectrum
      in shared memory (the low-precision form halves their bytes, one more rounding).
    o_in_p: stage the output tile for its TMA store in the warpgroup's operand planes
      (free after the last product; the next signal's first write waits for the store to
      have read them) instead of a staging tile of its own.
    half_twiddles: keep only the first 64 rows of the twiddle table; row block ``h`` of
      64 rows uses ``T[r, t_2] * w_n^(64 h t_2)`` (a per-column factor, one more complex
      multiply of constants in registers). Saves half the table at ``n_1 = 128``.
  """

  n_1: int = 0
  compute_wgs: int = 2
  stages: int = 1
  pairs_per_cta: int = 0
  const_dtype: str = "float32"
  o_in_p: bool = True
  half_twiddles: bool = False

  def __post_init__(self):
    if self.n_1 not in (0,) + N1_CHOICES:
      raise ValueError(f"MosaicFFTConvConfig.n_1 must be 0, 64 or 128, got {self.n_1!r}")
    if self.compute_wgs not in (1, 2):
      raise ValueError(f"MosaicFFTConvConfig.compute_wgs must be 1 or 2, got "
                       f"{self.compute_wgs!r}")
    if self.stages not in (1, 2):
      raise ValueError(f"MosaicFFTConvConfig.stages must be 1 or 2, got {self.stages!r}")
    if not isinstance(self.pairs_per_cta, int) or self.pairs_per_cta < 0:
      raise ValueError(f"MosaicFFTConvConfig.pairs_per_cta must be an int >= 0, got "
                       f"{self.pairs_per_cta!r}")
    if self.const_dtype not in ("float32", "bfloat16", "float16"):
      raise ValueError(f"MosaicFFTConvConfig.const_dtype must be float32, bfloat16 or "
                       f"float16, got {self.const_dtype!r}")


@dataclasses.dataclass(frozen=True)
class MosaicGeometry:
  """The ``[n_1, n_2]`` view of a transform of size ``n`` whose input fills ``rows`` rows."""

  n: int
  n_1: int
  n_2: int
  rows: int

  @property
  def out_m(self) -> int:
    """``wgmma`` M of the inverse row DFT (``rows`` padded to a multiple of 64)."""
    return -(-self.rows // WGMMA_M) * WGMMA_M

  @property
  def transposed_inverse(self) -> bool:
    """The inverse row DFT reads ``F1[:, :rows]`` transposed (no planes of its own)."""
    return self.rows == self.out_m


def geometry(n: int, seq: int, config: MosaicFFTConvConfig | None = None) -> MosaicGeometry:
  """The view used for transform size ``n`` and ``seq`` input / output time steps."""
  cfg = config or MosaicFFTConvConfig()
  n_1 = cfg.n_1 or (64 if n <= 4096 else 128)
  n_2 = n // n_1
  rows = -(-min(seq, n) // n_2)
  rows = -(-rows // 16) * 16
  return MosaicGeometry(n, n_1, n_2, min(rows, n_1))


def default_config(n: int, seq: int, dtype=jnp.bfloat16) -> MosaicFFTConvConfig:
  """The launch parameters used for a transform of size ``n``: the first that fits shared
  memory of (two warpgroups, a 2-deep ring, float32 constants), dropping the ring, then
  float32 constants, then half the twiddle table, then the second warpgroup. ``n <= 2048``
  (seq <= 1024) tries one warpgroup with a 2-deep ring first: measured on H100 (batch 64,
  768 channels, seq 1024) 284.7 us vs 300.7 us with two (notes/spectral.md)."""
  low = jnp.dtype(dtype).name
  first = (MosaicFFTConvConfig(compute_wgs=1, stages=2),) if n <= 2048 else ()
  candidates = first + (
      MosaicFFTConvConfig(compute_wgs=2, stages=2),
      MosaicFFTConvConfig(compute_wgs=2, stages=1),
      MosaicFFTConvConfig(compute_wgs=2, stages=1, const_dtype=low),
      MosaicFFTConvConfig(compute_wgs=2, stages=1, const_dtype=low, half_twiddles=True),
      MosaicFFTConvConfig(compute_wgs=1, stages=2, const_dtype=low),
      MosaicFFTConvConfig(compute_wgs=1, stages=1, const_dtype=low))
  for cfg in candidates:
    if smem_bytes(geometry(n, seq, cfg), cfg, dtype) <= SMEM_BUDGET_BYTES:
      return cfg
  return cfg


def smem_bytes(geo: MosaicGeometry, cfg: MosaicFFTConvConfig, dtype=jnp.bfloat16) -> int:
  """Shared memory of one CTA: constants plus every warpgroup's buffers."""
  b = jnp.dtype(dtype).itemsize
  cb = jnp.dtype(cfg.const_dtype).itemsize
  n_1, n_2, rows = geo.n_1, geo.n_2, geo.rows
  tw_rows = WGMMA_M if cfg.half_twiddles else n_1
  consts = 3 * n_1 * rows * b + 3 * n_2 * n_2 * b + 2 * (tw_rows + n_1) * n_2 * cb
  if cfg.half_twiddles:
    consts += 2 * (n_1 // WGMMA_M) * n_2 * 4
  if not geo.transposed_inverse:
    consts += 3 * geo.out_m * n_1 * b
  per_wg = cfg.stages * 2 * rows * n_2 * b + 2 * n_1 * n_2 * b
  if not cfg.o_in_p:
    per_wg += 2 * geo.out_m * n_2 * b
  return consts + cfg.compute_wgs * per_wg + 1024


def unsupported(n: int, seq: int, dtype, config: MosaicFFTConvConfig | None = None
                ) -> str | None:
  """None when :func:`fft_conv_fused_mosaic` serves this transform, else the reason."""
  if jnp.dtype(dtype) not in SUPPORTED_DTYPES:
    return f"dtype {jnp.dtype(dtype).name} is not bfloat16 or float16"
  cfg = config or default_config(n, seq, dtype)
  geo = geometry(n, seq, cfg)
  if geo.n_1 * geo.n_2 != n or geo.n_2 not in N2_CHOICES:
    return (f"transform size {n} is not n_1 * n_2 with n_1 = {geo.n_1} and n_2 in "
            f"{N2_CHOICES}")
  need = smem_bytes(geo, cfg, dtype)
  if need > SMEM_BUDGET_BYTES:
    return f"{cfg} needs {need} bytes of shared memory > {SMEM_BUDGET_BYTES}"
  return None


def _bits(dtype) -> int:
  return jnp.dtype(dtype).itemsize * 8


def _swizzled(shape, dtype, swizzle: int | None = None):
  """A shared-memory buffer in the tiled, swizzled form TMA and ``wgmma`` use (``wgmma``
  needs one swizzle for both operands: pass the narrowest operand's)."""
  swizzle = swizzle or plgpu.find_swizzle(shape[-1] * _bits(dtype), "operand")
  return plgpu.SMEM(shape, dtype, transforms=(
      plgpu.TilingTransform((8, swizzle * 8 // _bits(dtype))), plgpu.SwizzleTransform(swizzle)))


# --------------------------------------------------------------------------- constants


def dft_constants(geo: MosaicGeometry, dtype) -> dict[str, np.ndarray]:
  """DFT planes and twiddles (numpy, float64 computed, cast to ``dtype`` / float32).

  ``w1 [3, n_1, rows]``: ``Re, Im, -Im`` of ``F1[:, :rows]``; ``f2 [3, n_2, n_2]``:
  ``Re, Im, -Im`` of ``F2``; ``tw [2, n_1, n_2]``: ``w_n^(k_1 t_2)`` (float32);
  ``twc [n_1 / 64, 2, n_2]``: ``w_n^(64 h t_2)`` (float32, for ``half_twiddles``);
  ``e1 [3, out_m, n_1]``: ``Re, Im, -Im`` of ``F1[:rows, :]`` with zero rows up to ``out_m``
  (only when the inverse cannot read ``w1`` transposed).
  """
  n, n_1, n_2, rows = geo.n, geo.n_1, geo.n_2, geo.rows
  k1 = np.arange(n_1)
  f1 = np.exp(-2j * np.pi * np.outer(k1, k1) / n_1)
  k2 = np.arange(n_2)
  f2 = np.exp(-2j * np.pi * np.outer(k2, k2) / n_2)
  tw = np.exp(-2j * np.pi * np.outer(k1, k2) / n)
  planes = lambda m: np.stack([m.real, m.imag, -m.imag])
  blocks = np.arange(n_1 // WGMMA_M)
  twc = np.exp(-2j * np.pi * np.outer(WGMMA_M * blocks, k2) / n)  # w_n^(64 h t_2)
  out = {"w1": planes(f1[:, :rows]).astype(dtype), "f2": planes(f2).astype(dtype),
         "tw": np.stack([tw.real, tw.imag]).astype(np.float32),
         "twc": np.stack([twc.real, twc.imag], axis=1).astype(np.float32)}
  if not geo.transposed_inverse:
    e1 = np.zeros((geo.out_m, n_1), np.complex128)
    e1[:rows] = f1[:rows]
    out["e1"] = planes(e1).astype(dtype)
  return out


def filter_spectrum(k: jax.Array, geo: MosaicGeometry) -> jax.Array:
  """``[channels, 2, n_1, n_2]`` float32: ``FFT_n(k)[k_1 + n_1 k_2] / n`` (re, im planes).

  k: ``[channels, filter_len]``.
  """
  kf = jnp.fft.fft(k.astype(jnp.float32), n=geo.n, axis=-1) / geo.n
  kf = kf.reshape(k.shape[0], geo.n_2, geo.n_1).transpose(0, 2, 1)  # [c, k_1, k_2]
  return jnp.stack([kf.real, kf.imag], axis=1).astype(jnp.float32)


# --------------------------------------------------------------------------- kernel


def complex_products(groups, shape):
  """``wgmma`` complex products, issued together and waited once (inside a kernel).

  groups: ``[(terms_re, terms_im), ...]``, each part a list of ``(a, b)`` shared-memory
  operands whose products ``sum a @ b`` accumulate in one float32 accumulator of ``shape``
  (the sign of ``Re = Mr Xr - Mi Xi`` lives in a ``-Im`` operand plane). Returns
  ``[(re, im), ...]`` (register arrays in the WGMMA layout), one pair per group.
  """
  def body(*accs):
    for g, (terms_re, terms_im) in enumerate(groups):
      for a, b in terms_re:
        plgpu.wgmma(accs[2 * g], a, b)
      for a, b in terms_im:
        plgpu.wgmma(accs[2 * g + 1], a, b)
    plgpu.wgmma_wait(0)
    return tuple(acc[...] for acc in accs)
  out = pl.run_scoped(body, *[plgpu.ACC(shape, jnp.float32) for _ in range(2 * len(groups))])
  return [(out[2 * g], out[2 * g + 1]) for g in range(len(groups))]


def check_packed(fn: str, name: str, z: jax.Array, geo: MosaicGeometry) -> None:
  """Raises ``ValueError`` (naming ``fn`` and the argument ``name``) unless ``z`` is packed
  for ``geo``: ``[pairs, 2, channels, geo.rows, geo.n_2]`` (:func:`pack_pairs`)."""
  _, two, _, rows, n_2 = z.shape
  if two != 2 or rows != geo.rows or n_2 != geo.n_2:
    raise ValueError(f"{fn}: {name} must be [pairs, 2, channels, rows={geo.rows}, "
                     f"n_2={geo.n_2}], got {z.shape}")


def check_spectrum(fn: str, kf: jax.Array, channels: int, geo: MosaicGeometry, *,
                   hint: str = "") -> None:
  """Raises ``ValueError`` unless ``kf`` is ``[channels, 2, geo.n_1, geo.n_2]``
  (:func:`filter_spectrum`); ``hint`` follows the expected shape in the message."""
  if kf.shape != (channels, 2, geo.n_1, geo.n_2):
    raise ValueError(f"{fn}: kf must be [channels={channels}, 2, {geo.n_1}, {geo.n_2}]"
                     f"{hint}, got {kf.shape}")


def spectrum_terms(pr, pi, fr, fi, fn, *, conjugate: bool):
  """``(terms_re, terms_im)`` of :func:`complex_products` for the planes ``P = pr + i pi``
  times a DFT block ``F = fr + i fi`` (``fn`` = ``-fi``), or times ``conj(F)``."""
  if conjugate:
    return [(pr, fr), (pi, fi)], [(pi, fr), (pr, fn)]
  return [(pr, fr), (pi, fn)], [(pr, fi), (pi, fr)]


def cmul(x_re, x_im, m_re, m_im):
  """``(x_re + i x_im) (m_re + i m_im)`` as ``(re, im)``."""
  return x_re * m_re - x_im * m_im, x_re * m_im + x_im * m_re



def _kernel(z_ref, kf_ref, w1_ref, f2_ref, tw_ref, twc_ref, e1_ref, y_ref, s, *,
            geo: MosaicGeometry, cfg: MosaicFFTConvConfig, pairs_per_cta: int, dtype,
            conjugate: bool = False):
  """One CTA: channel ``c``, packed signals ``[g * pairs_per_cta, (g + 1) * pairs_per_cta)``.

  ``conjugate``: multiply by ``conj(K)`` instead of ``K`` (the correlation with the filter,
  the backward's input gradient; the sign flip runs on the loaded constant in registers).

  Invariant of warpgroup ``wg``'s loop at signal ``j`` (its ``j``-th, global pair
  ``p0 + wg + j * compute_wgs``): the copies of its signals ``j .. j + stages - 1`` into
  ring slots ``j % stages ..`` have been issued; the operand planes (or the staging
  tile) may still be read by the previous signal's output copy.
  """
  c = lax.axis_index("channels")
  p0 = lax.axis_index("groups") * pairs_per_cta
  wg = lax.axis_index("wg")
  nw, stages = cfg.compute_wgs, cfg.stages
  count = pairs_per_cta // nw
  layout = plgpu.Layout.WGMMA
  col_layout = plgpu.Layout.WGMMA.reduce(0)
  rows = geo.rows

  @pl.when(wg == 0)
  def _load_constants():
    for name, ref in (("w1", w1_ref), ("f2", f2_ref), ("e1", e1_ref)):
      if ref is None:
        continue
      for plane in range(3):
        plgpu.copy_gmem_to_smem(ref.at[plane], s[name].at[plane], s["const_bar"])
    for plane in range(2):
      plgpu.copy_gmem_to_smem(tw_ref.at[plane], s["tw"].at[plane], s["const_bar"])
      plgpu.copy_gmem_to_smem(kf_ref.at[c, plane], s["kf"].at[plane], s["const_bar"])
    if twc_ref is not None:
      plgpu.copy_gmem_to_smem(twc_ref, s["twc"], s["const_bar"])

  def fetch(j, slot):
    """Starts the copies of this warpgroup's signal ``j`` into ring slot ``slot``."""
    p = p0 + wg + j * nw
    bar = s["z_bar"].at[wg * stages + slot]
    for part in range(2):
      plgpu.copy_gmem_to_smem(z_ref.at[p, part, c], s["z"].at[wg, slot, part], bar)

  for j in range(min(stages, count)):
    fetch(j, j)
  plgpu.barrier_wait(s["const_bar"])

  w1 = [s["w1"].at[i] for i in range(3)]  # Re, Im, -Im of F1[:, :rows]
  f2 = [s["f2"].at[i] for i in range(3)]  # Re, Im, -Im of F2
  if geo.transposed_inverse:
    e1 = [r.T for r in w1]  # F1[:rows, :] = F1[:, :rows]^T
  else:
    e1 = [s["e1"].at[i] for i in range(3)]
  p_re, p_im = s["p"].at[wg, 0], s["p"].at[wg, 1]

  def complex_product(terms_re, terms_im, shape):
    """Two accumulators: ``sum a @ b`` over each part's (a, b) terms, waited."""
    return complex_products([(terms_re, terms_im)], shape)[0]

  def load_const(ref):
    return plgpu.load(ref, layout=layout).astype(jnp.float32)

  def cmul_store(a_re, a_im, m_ref, conj: bool, twiddle: bool = False):
    """``P = A * M`` (or ``A * conj(M)``) into the operand planes in ``dtype``, one
    64-row block at a time (``half_twiddles``: block ``h`` of the twiddles is the first
    block times the column factor ``w_n^(64 h t_2)``)."""
    blocks = [(0, geo.n_1)]
    if twiddle and cfg.half_twiddles:
      blocks = [(h * WGMMA_M, WGMMA_M) for h in range(geo.n_1 // WGMMA_M)]
    for r0, size in blocks:
      m_re = load_const(m_ref.at[0, pl.ds(0, size)])
      m_im = load_const(m_ref.at[1, pl.ds(0, size)])
      if r0:
        col = lambda i: lax.broadcast_in_dim(
            plgpu.load(s["twc"].at[r0 // WGMMA_M, i], layout=col_layout), m_re.shape, [1])
        c_re, c_im = col(0), col(1)
        m_re, m_im = m_re * c_re - m_im * c_im, m_re * c_im + m_im * c_re
      if conj:
        m_im = -m_im
      x_re, x_im = (a_re, a_im) if size == geo.n_1 else (a_re[r0:r0 + size],
                                                            a_im[r0:r0 + size])
      p_re.at[pl.ds(r0, size)][...] = (x_re * m_re - x_im * m_im).astype(dtype)
      p_im.at[pl.ds(r0, size)][...] = (x_re * m_im + x_im * m_re).astype(dtype)
    plgpu.commit_smem()

  @pl.loop(0, count)
  def _signal(j):
    slot = lax.rem(j, stages) if stages > 1 else 0
    plgpu.barrier_wait(s["z_bar"].at[wg * stages + slot])
    z_re, z_im = s["z"].at[wg, slot, 0], s["z"].at[wg, slot, 1]
    # Row DFT of the input rows: A = F1[:, :rows] Z.
    a_re, a_im = complex_product(((w1[0], z_re), (w1[2], z_im)),
                                 ((w1[1], z_re), (w1[0], z_im)), (geo.n_1, geo.n_2))

    @pl.when(j + stages < count)
    def _():
      fetch(j + stages, slot)

    if cfg.o_in_p:
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last output left the planes
    cmul_store(a_re, a_im, s["tw"], conj=False, twiddle=True)
    # Column DFT and the filter: Y = (A T) F2; P = Y K.
    y_re, y_im = complex_product(((p_re, f2[0]), (p_im, f2[2])),
                                 ((p_re, f2[1]), (p_im, f2[0])), (geo.n_1, geo.n_2))
    cmul_store(y_re, y_im, s["kf"], conj=conjugate)
    # Inverse column DFT: B = P conj(F2); P = B conj(T).
    b_re, b_im = complex_product(((p_re, f2[0]), (p_im, f2[1])),
                                 ((p_im, f2[0]), (p_re, f2[2])), (geo.n_1, geo.n_2))
    cmul_store(b_re, b_im, s["tw"], conj=True, twiddle=True)
    # Inverse row DFT, kept rows: y = conj(F1)[:rows, :] P.
    o_re, o_im = complex_product(((e1[0], p_re), (e1[1], p_im)),
                                 ((e1[0], p_im), (e1[2], p_re)), (geo.out_m, geo.n_2))
    if cfg.o_in_p:  # the operand planes are free once the last product is waited
      o_smem = [p_re.at[pl.ds(0, geo.out_m)], p_im.at[pl.ds(0, geo.out_m)]]
    else:
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the staging tile is free
      o_smem = [s["o"].at[wg, 0], s["o"].at[wg, 1]]
    o_smem[0][...] = o_re.astype(dtype)
    o_smem[1][...] = o_im.astype(dtype)
    plgpu.commit_smem()
    p = p0 + wg + j * nw
    for part in range(2):
      plgpu.copy_smem_to_gmem(o_smem[part].at[pl.ds(0, rows)], y_ref.at[p, part, c])

  plgpu.wait_smem_to_gmem(0)


def fft_conv_fused_mosaic(z: jax.Array, kf: jax.Array, geo: MosaicGeometry, *,
                          config: MosaicFFTConvConfig | None = None, conjugate: bool = False,
                          interpret: bool | plgpu.InterpretGPUParams = False) -> jax.Array:
  """The fused convolution (or correlation) of packed signals with per-channel filters.

  Args:
    z: ``[pairs, 2, channels, rows, n_2]`` bfloat16/float16: batch rows ``2p`` and
      ``2p + 1`` of each channel as the real and imaginary planes of pair ``p``, the
      signal's first ``rows * n_2`` time steps (zero beyond ``seq``).
    kf: ``[channels, 2, n_1, n_2]`` float32 from :func:`filter_spectrum`.
    geo: :func:`geometry` of the transform.
    config: launch parameters (None: :func:`default_config`).
    conjugate: multiply by ``conj(kf)``: the circular correlation
      ``y[t] = sum_j k[j] z[(t + j) mod n]`` instead of the convolution.
    interpret: run in Pallas Mosaic GPU interpret mode (CPU); True or an
      ``plgpu.InterpretGPUParams`` (e.g. with ``detect_races=True``).

  Returns:
    ``[pairs, 2, channels, rows, n_2]`` in ``z.dtype``: the first ``rows * n_2`` time
    steps of the circular convolution (correlation) of size ``n`` of each batch row with
    its channel's filter.
  """
  pairs, _, channels, rows, n_2 = z.shape
  dtype = jnp.dtype(z.dtype)
  cfg = config or default_config(geo.n, rows * n_2, dtype)
  check_packed("fft_conv_fused_mosaic", "z", z, geo)
  check_spectrum("fft_conv_fused_mosaic", kf, channels, geo)
  why = unsupported(geo.n, rows * n_2, dtype, cfg)
  if why:
    raise NotImplementedError(f"fft_conv_fused_mosaic: {why}")
  nw = cfg.compute_wgs
  if pairs % nw:
    raise ValueError(f"fft_conv_fused_mosaic: pairs={pairs} must be a multiple of "
                     f"compute_wgs={nw} (pad the batch)")
  ppc = cfg.pairs_per_cta or pairs
  ppc = max(d for d in range(nw, pairs + 1, nw) if pairs % d == 0 and d <= max(ppc, nw))
  stages = min(cfg.stages, ppc // nw)
  cfg = dataclasses.replace(cfg, stages=stages)
  consts = dft_constants(geo, np.dtype(dtype.name) if dtype.name != "bfloat16"
                         else jnp.bfloat16)
  cdt = jnp.dtype(cfg.const_dtype)
  sw = plgpu.find_swizzle(min(rows, n_2) * _bits(dtype), "operand")
  scratch = {
      "w1": _swizzled((3, geo.n_1, rows), dtype, sw),
      "f2": _swizzled((3, n_2, n_2), dtype, sw),
      "tw": _swizzled((2, WGMMA_M if cfg.half_twiddles else geo.n_1, n_2), cdt),
      "kf": _swizzled((2, geo.n_1, n_2), cdt),
      "z": _swizzled((nw, stages, 2, rows, n_2), dtype, sw),
      "p": _swizzled((nw, 2, geo.n_1, n_2), dtype, sw),
      "z_bar": plgpu.Barrier(num_arrivals=2, num_barriers=nw * stages),
  }
  if not cfg.o_in_p:
    scratch["o"] = _swizzled((nw, 2, geo.out_m, n_2), dtype, sw)
  tw = consts["tw"][:, :WGMMA_M] if cfg.half_twiddles else consts["tw"]
  args = [z, kf.astype(cdt), jnp.asarray(consts["w1"]), jnp.asarray(consts["f2"]),
          jnp.asarray(tw).astype(cdt)]
  names = ["z", "kf", "w1", "f2", "tw"]
  copies = 3 + 3 + 2 + 2  # TMA copies (barrier arrivals) of the constants
  if cfg.half_twiddles:
    scratch["twc"] = plgpu.SMEM(consts["twc"].shape, jnp.float32)
    args.append(jnp.asarray(consts["twc"]))
    names.append("twc")
    copies += 1
  if not geo.transposed_inverse:
    scratch["e1"] = _swizzled((3, geo.out_m, geo.n_1), dtype, sw)
    args.append(jnp.asarray(consts["e1"]))
    names.append("e1")
    copies += 3
  scratch["const_bar"] = plgpu.Barrier(num_arrivals=copies)

  def kernel_fn(*refs):
    named = dict(zip(names, refs[:len(names)]))
    y_ref, s_ = refs[len(names):]
    _kernel(named["z"], named["kf"], named["w1"], named["f2"], named["tw"], named.get("twc"),
            named.get("e1"), y_ref, s_, geo=geo, cfg=cfg, pairs_per_cta=ppc, dtype=dtype,
            conjugate=conjugate)

  return plgpu.kernel(
      kernel_fn,
      out_type=jax.ShapeDtypeStruct(z.shape, dtype),
      scratch_types=(scratch,),
      grid=(channels, pairs // ppc),
      grid_names=("channels", "groups"),
      num_threads=nw,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
      interpret=(plgpu.InterpretGPUParams() if interpret is True else interpret or None),
      kernel_name=f"fft_{'corr' if conjugate else 'conv'}_mosaic_{geo.n}",
  )(*args)


def fft_size(seq: int, filter_len: int, *, causal: bool) -> int:
  """Transform size as ``jaxeff.ops.fft_conv.fft_size``."""
  if not causal:
    return seq
  return 1 << max(0, (seq + filter_len - 2).bit_length())


def conv_geometry(seq: int, filter_len: int, dtype, *, causal: bool = True,
                  config: MosaicFFTConvConfig | None = None
                  ) -> tuple[MosaicGeometry, MosaicFFTConvConfig]:
  """The geometry and launch parameters :func:`fft_conv_mosaic` uses for these sizes.

  (For :func:`filter_spectrum` computed once and passed to several calls as ``kf``.)
  Raises NotImplementedError naming the reason when the kernel cannot serve them.
  """
  n = fft_size(seq, filter_len, causal=causal)
  cfg = config or default_config(n, seq, dtype)
  why = unsupported(n, seq, dtype, cfg)
  if why:
    raise NotImplementedError(f"fft_conv_mosaic: {why}")
  return geometry(n, seq, cfg), cfg


def gated(a: jax.Array, g: jax.Array | None, dtype) -> jax.Array:
  """``a * g`` as float32 products rounded to ``dtype`` (``a`` itself when ``g`` is None):
  the gates of every Mosaic FFT-conv wrapper."""
  return a if g is None else (a.astype(jnp.float32) * g.astype(jnp.float32)).astype(dtype)


def pack_pairs(a: jax.Array, pairs: int, rows: int, width: int) -> jax.Array:
  """``[batch, channels, seq]`` -> ``[pairs, 2, channels, rows, width]``: batch rows ``2p``
  and ``2p + 1`` as pair ``p`` (the real and imaginary planes of one complex signal), zero
  rows up to ``2 * pairs``, time zero-padded (or cut) to ``rows * width`` steps."""
  batch, channels, seq = a.shape
  length = rows * width
  if seq > length:
    a = a[..., :length]
  if 2 * pairs != batch or length != seq:
    a = jnp.pad(a, ((0, 2 * pairs - batch), (0, 0), (0, max(0, length - seq))))
  return a.reshape(pairs, 2, channels, rows, width)


def unpack_pairs(y: jax.Array, batch: int, seq: int) -> jax.Array:
  """Inverse of :func:`pack_pairs` on a kernel output: ``[batch, channels, seq]``."""
  pairs, _, channels, rows, width = y.shape
  y = y.reshape(2 * pairs, channels, rows * width)
  return y if y.shape == (batch, channels, seq) else y[:batch, :, :seq]


def fft_conv_mosaic(u: jax.Array, k: jax.Array, x: jax.Array | None = None,
                    v: jax.Array | None = None, *, causal: bool = True,
                    config: MosaicFFTConvConfig | None = None, conjugate: bool = False,
                    kf: jax.Array | None = None,
                    interpret: bool | plgpu.InterpretGPUParams = False) -> jax.Array:
  """``v * conv(k, u * x)`` (or ``v * corr(k, u * x)``), ``jaxeff.ops.fft_conv`` semantics.

  Args:
    u: ``[batch, channels, seq]`` bfloat16/float16.
    k: ``[channels, filter_len]``, ``1 <= filter_len <= seq``.
    x, v: None or ``[batch, channels, seq]``: the Hyena gates (applied in XLA around
      the kernel: ``u * x`` in float32 rounded to ``u.dtype``, ``y * v`` in float32).
    causal: linear causal convolution (transform size ``next_pow2(seq + filter_len - 1)``)
      or circular of period ``seq``.
    config: launch parameters (None: :func:`default_config`).
    conjugate: the correlation with the filter, the adjoint of the convolution (the
      input gradient of ``fft_conv``): causal ``y[t] = sum_{j < filter_len, t + j < seq}
      k[j] w[t + j]`` (anti-causal; the transform size already holds ``t + j < seq +
      filter_len - 1`` without wrapping, and ``w`` is zero from ``seq`` on, so the kernel's
      unread padded rows and dropped output rows are the same as the convolution's), or
      circular ``y[t] = sum_j k[j] w[(t + j) mod seq]``. The kernel multiplies by
      ``conj(FFT(k))``.
    kf: None, or the precomputed :func:`filter_spectrum` ``[channels, 2, n_1, n_2]`` for
      :func:`conv_geometry` of these sizes (``k`` then only gives ``filter_len``).
    interpret: Pallas Mosaic GPU interpret mode (True or ``plgpu.InterpretGPUParams``).

  Returns:
    ``[batch, channels, seq]`` in ``u.dtype``.
  """
  if u.ndim != 3 or k.ndim != 2 or k.shape[0] != u.shape[1]:
    raise ValueError(f"fft_conv_mosaic: u must be [batch, channels, seq] and k "
                     f"[channels, filter_len], got {u.shape} and {k.shape}")
  if not isinstance(conjugate, bool):
    raise TypeError(f"fft_conv_mosaic: conjugate must be a bool, got {conjugate!r}")
  batch, channels, seq = u.shape
  geo, cfg = conv_geometry(seq, k.shape[1], u.dtype, causal=causal, config=config)
  pairs = -(-batch // 2)
  pairs = -(-pairs // cfg.compute_wgs) * cfg.compute_wgs
  z = pack_pairs(gated(u, x, u.dtype), pairs, geo.rows, geo.n_2)
  if kf is None:
    kf = filter_spectrum(k, geo)
  else:
    check_spectrum("fft_conv_mosaic", kf, channels, geo,
                   hint=" (filter_spectrum for these sizes)")
  y = fft_conv_fused_mosaic(z, kf, geo, config=cfg, conjugate=conjugate, interpret=interpret)
  return gated(unpack_pairs(y, batch, seq), v, u.dtype)


__all__ = ["MosaicFFTConvConfig", "MosaicGeometry", "check_packed",
           "check_spectrum", "cmul", "complex_products", "conv_geometry",
           "default_config", "dft_constants", "fft_conv_fused_mosaic", "fft_conv_mosaic",
           "filter_spectrum", "gated", "geometry", "pack_pairs", "smem_bytes", "spectrum_terms",
           "unpack_pairs", "unsupported"]
