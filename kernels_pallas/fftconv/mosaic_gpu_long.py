"""Fused FFT convolution for long sequences (transform sizes 16384 and 32768), Mosaic GPU.

FlashFFTConv (Fu et al., 2023) with the two-level Monarch (Cooley-Tukey four-step)
decomposition ``n = 128 x 128`` written for ``wgmma``, the long-sequence companion of
:mod:`kernels_pallas.fftconv.mosaic_gpu` (whose ``[n_1, n_2]`` tile a warpgroup owns
alone and whose constants are all resident: neither fits at ``n = 16384``). A packed
signal ``z = u[2p] + i u[2p + 1]`` is the row-major ``Z [128, 128]`` (``t = 128 t_1 + t_2``)
whose first ``rows`` (64 or 128) rows hold the input. Per signal, with ``F = F_128``:

    A = F[:, :rows] @ Z       row DFT          P = A * T      (T = w_n^(k_1 t_2))
    Y = P @ F                 column DFT       P = Y * K      (K = FFT_n(k)[k_1 + 128 k_2] / n)
    B = P @ conj(F)           inverse column   P = B * conj(T)
    y = conj(F)[:rows, :] @ P                  inverse row DFT, the rows kept

``conjugate`` multiplies by ``conj(K)``: the correlation with the filter (as in the
short kernel). Each complex product is two float32 accumulators, each a chain of real
``wgmma`` over the real and imaginary planes with the sign in a ``-Im`` plane.

Design (shared memory per CTA, bf16 operands, :func:`smem_bytes`):

- ``F`` resident once (``F1 = F2``), planes ``Re, Im, -Im``, in 64-column blocks
  ``f [3, 2, 128, 64]`` (one 128-byte swizzle tile wide): every operand is a ``[64, 64]``
  (or ``[rows, 64]``) tile addressed by major-dim slices. 96 KB.
- Two compute warpgroups work on the same signal: warpgroup ``h`` owns rows
  ``64h .. 64h + 63`` of the row DFT's output, the twiddles, the column DFTs and the filter
  (four ``[64, 64]`` accumulators: one per column block and part), and column block ``h``
  of the inverse row DFT. Cross-warpgroup barriers: after both row DFTs (the input shares
  memory with the operand planes) and before the inverse row DFT (it contracts all rows).
- Operand planes ``P [2, 2, 128, 64]`` (64 KB) also receive the input by TMA (the first
  ``rows`` rows) and stage the output (column block ``h`` by warpgroup ``h``). The next
  signal's input is fetched when both warpgroups' output copies have read ``P``.
- Twiddles ``w_n^((64h + r)(64cb + c)) = T00[r, c] w_n^(64 cb r) w_n^(64 h c + 4096 h cb)``:
  one ``[64, 64]`` table (bf16 16 KB, float32 32 KB) and float32 row / column factors;
  ``h`` and ``cb`` are static (each warpgroup runs its own copy of the loop).
- The filter spectrum (bf16, ``[64, 64]`` chunks ``(h, cb)``) is streamed from L2 through
  one TMA slot per warpgroup (16 KB each), refilled once a chunk is in registers.
- Total 209.5 KB (bf16 table) of the 227 KB; one CTA per SM.

Transform size 32768 (causal seq up to 16384): a radix-2 outer level in XLA
(:func:`fft_conv_mosaic_long`): branch ``k_a`` in {0, 1} of the 16384-point inner
transform gets ``x_ka[m] = w_n^(m k_a) sum_ta (-1)^(ta ka) z[16384 ta + m]`` (all 128 rows),
the two branches run as ``2 * channels`` channels with spectra ``K[k_a + 2 k'] / n``, and
``y[16384 ta + m] = sum_ka (-1)^(ta ka) w_n^(-m ka) b_ka[m]``.

Why not the short kernel's structure: at ``n = 16384`` one warpgroup's ``[128, 128]``
float32 tile needs 256 accumulator registers a thread, and its resident constants would
be ~320 KB (notes/spectral.md, "Session 6").

Limits: inner transform 16384 (``rows`` 64 or 128), bfloat16/float16 input.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels_pallas.fftconv.mosaic_gpu import (SMEM_BUDGET_BYTES, SUPPORTED_DTYPES, _swizzled,
                                               cmul, complex_products, fft_size, gated,
                                               pack_pairs, spectrum_terms, unpack_pairs)

N_1 = 128  # F_128: both factors of the inner transform
INNER_N = N_1 * N_1
B = 64  # block: wgmma M, one 128-byte swizzle tile of bf16 columns
SIZES = (INNER_N, 2 * INNER_N)


@dataclasses.dataclass(frozen=True)
class LongFFTConvConfig:
  """Launch parameters of :func:`fft_conv_fused_long`.

  Attributes:
    pairs_per_cta: packed signals per CTA (0: all pairs of the batch; clipped to a
      divisor of the pair count).
    twiddle_dtype: the ``[64, 64]`` twiddle table in shared memory, "bfloat16" / "float16"
      (16 KB) or "float32" (32 KB).
    overlap: the elementwise step (twiddle / filter multiply, cast) of column block 0
      runs while the products of column block 1 are still in flight (its accumulators read
      with ``wgmma_accumulator_load(wait_n=...)``); the stores to the operand planes wait
      for all products (they read those planes). False: all products, then all stores.
  """

  pairs_per_cta: int = 0
  twiddle_dtype: str = "bfloat16"
  overlap: bool = False

  def __post_init__(self):
    if not isinstance(self.pairs_per_cta, int) or self.pairs_per_cta < 0:
      raise ValueError(f"LongFFTConvConfig.pairs_per_cta must be an int >= 0, got "
                       f"{self.pairs_per_cta!r}")
    if self.twiddle_dtype not in ("float32", "bfloat16", "float16"):
      raise ValueError(f"LongFFTConvConfig.twiddle_dtype must be float32, bfloat16 or "
                       f"float16, got {self.twiddle_dtype!r}")
    if not isinstance(self.overlap, bool):
      raise TypeError(f"LongFFTConvConfig.overlap must be a bool, got {self.overlap!r}")


@dataclasses.dataclass(frozen=True)
class LongGeometry:
  """Transform size ``n`` (16384 or 32768 = ``radix * 16384``) and the inner input rows."""

  n: int
  rows: int

  @property
  def radix(self) -> int:
    return self.n // INNER_N


def geometry(n: int, seq: int) -> LongGeometry:
  """The view for transform size ``n`` and ``seq`` input / output time steps: ``rows`` of
  the inner ``[128, 128]`` tile, a multiple of 64 (all 128 rows when ``n = 32768``)."""
  if n != INNER_N:
    return LongGeometry(n, N_1)
  rows = -(-min(seq, n) // N_1)
  return LongGeometry(n, min(N_1, -(-rows // B) * B))


def smem_bytes(geo: LongGeometry, cfg: LongFFTConvConfig, dtype=jnp.bfloat16) -> int:
  """Shared memory of one CTA (``geo`` does not change it: the input lives in ``P``)."""
  del geo
  b = jnp.dtype(dtype).itemsize
  tb = jnp.dtype(cfg.twiddle_dtype).itemsize
  f = 3 * N_1 * N_1 * b
  p = 2 * N_1 * N_1 * b
  t00 = 2 * B * B * tb
  kf = 2 * 2 * B * B * b  # one [2, 64, 64] slot per warpgroup
  factors = 3 * 2 * B * 4
  return f + p + t00 + kf + factors + 1024


def unsupported(n: int, seq: int, dtype, config: LongFFTConvConfig | None = None
                ) -> str | None:
  """None when :func:`fft_conv_mosaic_long` serves this transform, else the reason."""
  if jnp.dtype(dtype) not in SUPPORTED_DTYPES:
    return f"dtype {jnp.dtype(dtype).name} is not bfloat16 or float16"
  if n not in SIZES:
    return f"transform size {n} is not one of {SIZES} (the long-sequence kernel)"
  cfg = config or LongFFTConvConfig()
  need = smem_bytes(geometry(n, seq), cfg, dtype)
  if need > SMEM_BUDGET_BYTES:
    return f"{cfg} needs {need} bytes of shared memory > {SMEM_BUDGET_BYTES}"
  return None


# --------------------------------------------------------------------------- constants


def dft_constants(dtype, twiddle_dtype) -> dict[str, np.ndarray]:
  """DFT planes and twiddle factors of the inner transform (float64 computed).

  ``f [3, 2, 128, 64]``: ``Re, Im, -Im`` of ``F_128`` in column blocks
  (``f[i, cb, r, c] = plane_i(F)[r, 64 cb + c]``), in ``dtype``;
  ``t00 [2, 64, 64]``: ``w^(r c)`` (``w = exp(-2 pi i / 16384)``), in ``twiddle_dtype``;
  ``tf [3, 2, 64]`` float32: ``w^(64 r)`` (row factor of column block 1), ``w^(64 c)`` and
  ``w^(64 c + 4096)`` (column factors of row block 1, column blocks 0 and 1).
  """
  k = np.arange(N_1)
  f = np.exp(-2j * np.pi * np.outer(k, k) / N_1)
  planes = np.stack([f.real, f.imag, -f.imag])  # [3, 128, 128]
  blocks = planes.reshape(3, N_1, 2, B).transpose(0, 2, 1, 3)
  r = np.arange(B)
  w = lambda e: np.exp(-2j * np.pi * e / INNER_N)
  t00 = w(np.outer(r, r))
  factors = [w(B * r), w(B * r), w(B * r + 4096)]
  return {"f": blocks.astype(dtype),
          "t00": np.stack([t00.real, t00.imag]).astype(twiddle_dtype),
          "tf": np.stack([[v.real, v.imag] for v in factors]).astype(np.float32)}


def filter_spectrum(k: jax.Array, geo: LongGeometry, dtype=jnp.bfloat16) -> jax.Array:
  """``[radix * channels, 2, 2, 2, 64, 64]`` in ``dtype``: ``FFT_n(k)[k_a + radix (k_1 +
  128 k_2)] / n`` for branch ``k_a`` (the channel axis is ``k_a * channels + c``), as chunks
  ``[.., h, cb, part, r, c]`` = row ``64h + r``, column ``64cb + c`` of the ``[k_1, k_2]``
  tile.

  k: ``[channels, filter_len]``.
  """
  channels = k.shape[0]
  kf = jnp.fft.fft(k.astype(jnp.float32), n=geo.n, axis=-1) / geo.n
  kf = kf.reshape(channels, N_1, N_1, geo.radix)  # [c, k_2, k_1, k_a]
  kf = kf.transpose(3, 0, 2, 1).reshape(geo.radix * channels, N_1, N_1)  # [ka*c, k_1, k_2]
  kf = jnp.stack([kf.real, kf.imag], axis=1)  # [C, 2, 128, 128]
  kf = kf.reshape(-1, 2, 2, B, 2, B).transpose(0, 2, 4, 1, 3, 5)  # [C, h, cb, 2, 64, 64]
  return kf.astype(dtype)


# --------------------------------------------------------------------------- kernel


def products_each(groups, shape, consume, *, overlap: bool):
  """Like :func:`complex_products`, but returns ``[consume(g, re, im), ...]``: with
  ``overlap`` group ``g``'s accumulators are read (and consumed) as soon as its own
  products are done, the later groups' still in flight; else after all of them."""
  counts = [len(terms_re) + len(terms_im) for terms_re, terms_im in groups]

  def body(*accs):
    for g, (terms_re, terms_im) in enumerate(groups):
      for a, b in terms_re:
        plgpu.wgmma(accs[2 * g], a, b)
      for a, b in terms_im:
        plgpu.wgmma(accs[2 * g + 1], a, b)
    out = []
    for g in range(len(groups)):
      pending = sum(counts[g + 1:]) if overlap else 0
      re = plgpu.wgmma_accumulator_load(accs[2 * g], wait_n=pending)
      im = plgpu.wgmma_accumulator_load(accs[2 * g + 1], wait_n=pending)
      out.append(consume(g, re, im))
    return tuple(out)
  return pl.run_scoped(body, *[plgpu.ACC(shape, jnp.float32) for _ in range(2 * len(groups))])


def _kernel(z_ref, kf_ref, f_ref, t00_ref, tf_ref, y_ref, s, *, rows: int, ppc: int, dtype,
            conjugate: bool, overlap: bool = False):
  """One CTA: channel ``c``, packed signals ``[g * ppc, (g + 1) * ppc)``, both warpgroups
  on every signal.

  Invariant at the top of signal ``j``: the copy of its input rows into ``P`` has been
  issued (by warpgroup 0, once both warpgroups' outputs of signal ``j - 1`` left ``P``);
  warpgroup ``h``'s filter slot holds (or is receiving) chunk ``(h, 0)``.
  """
  c = lax.axis_index("channels")
  p0 = lax.axis_index("groups") * ppc
  wg = lax.axis_index("wg")
  layout = plgpu.Layout.WGMMA
  f = [[s["f"].at[i, cb] for cb in range(2)] for i in range(3)]  # Re, Im, -Im; [128, 64]
  P = [[s["p"].at[part, cb] for cb in range(2)] for part in range(2)]  # [128, 64]

  def fetch_input(j):
    for part in range(2):
      for cb in range(2):
        plgpu.copy_gmem_to_smem(z_ref.at[p0 + j, part, c, :, pl.ds(B * cb, B)],
                                P[part][cb].at[pl.ds(0, rows)], s["z_bar"])

  def fetch_filter(h, cb):
    for part in range(2):
      plgpu.copy_gmem_to_smem(kf_ref.at[c, h, cb, part], s["kf"].at[h, part],
                              s["kf_bar"].at[h])

  @pl.when(wg == 0)
  def _load_constants():
    for i in range(3):
      for cb in range(2):
        plgpu.copy_gmem_to_smem(f_ref.at[i, cb], s["f"].at[i, cb], s["const_bar"])
    for part in range(2):
      plgpu.copy_gmem_to_smem(t00_ref.at[part], s["t00"].at[part], s["const_bar"])
    plgpu.copy_gmem_to_smem(tf_ref, s["tf"], s["const_bar"])
    fetch_input(0)

  def load(ref):
    return plgpu.load(ref, layout=layout).astype(jnp.float32)

  def factor(i, axis):
    """Row (axis 0) or column (axis 1) factor ``tf[i]`` broadcast to ``[64, 64]``."""
    vec_layout = layout.reduce(1 - axis)
    part = lambda q: lax.broadcast_in_dim(
        plgpu.load(s["tf"].at[i, q], layout=vec_layout), (B, B), [axis])
    return part(0), part(1)

  def program(h: int):
    rb = pl.ds(B * h, B)  # this warpgroup's rows

    def twiddle(cb: int, conj: bool):
      m = load(s["t00"].at[0]), load(s["t00"].at[1])
      if cb:
        m = cmul(*m, *factor(0, 0))
      if h:
        m = cmul(*m, *factor(1 + cb, 1))
      return (m[0], -m[1]) if conj else m

    def store(cb, x):
      P[0][cb].at[rb][...] = x[0]
      P[1][cb].at[rb][...] = x[1]

    def cast(x):
      return x[0].astype(dtype), x[1].astype(dtype)

    def column_dft(conj: bool, consume):
      groups = []
      for cb in range(2):
        terms_re, terms_im = [], []
        for kb in range(2):
          pr, pi = P[0][kb].at[rb], P[1][kb].at[rb]
          fr, fi, fn = (f[i][cb].at[pl.ds(B * kb, B)] for i in range(3))
          re, im = spectrum_terms(pr, pi, fr, fi, fn, conjugate=conj)
          terms_re += re
          terms_im += im
        groups.append((terms_re, terms_im))
      return products_each(groups, (B, B), consume, overlap=overlap)

    def filter_chunk(cb, re, im):
      """``Y K`` for column block ``cb`` (the streamed chunk; the next one is requested
      once every thread has read this one)."""
      plgpu.barrier_wait(s["kf_bar"].at[h])
      k_re, k_im = load(s["kf"].at[h, 0]), load(s["kf"].at[h, 1])
      out = cast(cmul(re, im, k_re, -k_im if conjugate else k_im))
      if cb == 0:
        plgpu.commit_smem()  # a warpgroup barrier: the slot has been read
        fetch_filter(h, 1)
      return out

    fetch_filter(h, 0)
    plgpu.barrier_wait(s["const_bar"])

    @pl.loop(0, ppc)
    def _signal(j):
      plgpu.barrier_wait(s["z_bar"])
      # Row DFT, output rows 64h..: A = F[rb, :rows] Z.
      groups = []
      for cb in range(2):
        terms_re, terms_im = [], []
        for kb in range(rows // B):
          zr, zi = P[0][cb].at[pl.ds(B * kb, B)], P[1][cb].at[pl.ds(B * kb, B)]
          fr, fi, fn = (f[i][kb].at[rb] for i in range(3))
          terms_re += [(fr, zr), (fn, zi)]
          terms_im += [(fi, zr), (fr, zi)]
        groups.append((terms_re, terms_im))
      a = products_each(groups, (B, B), lambda cb, re, im: cast(
          cmul(re, im, *twiddle(cb, conj=False))), overlap=overlap)
      # Both warpgroups have read the input before either overwrites it.
      plgpu.barrier_arrive(s["row_bar"])
      plgpu.barrier_wait(s["row_bar"])
      for cb in range(2):
        store(cb, a[cb])
      plgpu.commit_smem()
      # Column DFT and the filter (streamed chunk by chunk): P = (A T F) K.
      y = column_dft(False, filter_chunk)
      for cb in range(2):
        store(cb, y[cb])
      plgpu.commit_smem()  # also: every thread has read the filter slot

      @pl.when(j + 1 < ppc)
      def _():
        fetch_filter(h, 0)

      # Inverse column DFT: P = (P conj(F)) conj(T).
      b = column_dft(True, lambda cb, re, im: cast(cmul(re, im, *twiddle(cb, conj=True))))
      for cb in range(2):
        store(cb, b[cb])
      plgpu.commit_smem()
      plgpu.barrier_arrive(s["p_bar"])
      plgpu.barrier_wait(s["p_bar"])
      # Inverse row DFT of column block h, kept rows: y = conj(F)[:rows, :] P[:, block h].
      terms_re, terms_im = [], []
      for kb in range(2):
        er, ei, en = (f[i][kb].at[pl.ds(0, rows)] for i in range(3))
        pr, pi = P[0][h].at[pl.ds(B * kb, B)], P[1][h].at[pl.ds(B * kb, B)]
        terms_re += [(er, pr), (ei, pi)]
        terms_im += [(er, pi), (en, pr)]
      ((o_re, o_im),) = complex_products([(terms_re, terms_im)], (rows, B))
      # Column block h of P is read by this warpgroup only: stage the output there.
      P[0][h].at[pl.ds(0, rows)][...] = o_re.astype(dtype)
      P[1][h].at[pl.ds(0, rows)][...] = o_im.astype(dtype)
      plgpu.commit_smem()
      for part in range(2):
        plgpu.copy_smem_to_gmem(P[part][h].at[pl.ds(0, rows)],
                                y_ref.at[p0 + j, part, c, :, pl.ds(B * h, B)])
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)
      plgpu.barrier_arrive(s["free_bar"])
      if h == 0:
        plgpu.barrier_wait(s["free_bar"])

        @pl.when(j + 1 < ppc)
        def _():
          fetch_input(j + 1)

    plgpu.wait_smem_to_gmem(0)

  for h in range(2):
    pl.when(wg == h)(lambda h=h: program(h))


def fft_conv_fused_long(z: jax.Array, kf: jax.Array, geo: LongGeometry, *,
                        config: LongFFTConvConfig | None = None, conjugate: bool = False,
                        interpret: bool | plgpu.InterpretGPUParams = False) -> jax.Array:
  """The fused inner 16384-point convolution (correlation) of packed signals.

  Args:
    z: ``[pairs, 2, channels, rows, 128]`` bfloat16/float16: the real and imaginary planes
      of each packed signal's first ``rows * 128`` time steps (zero beyond the input).
    kf: ``[channels, 2, 2, 2, 64, 64]`` (h, cb, part) in ``z.dtype``: the chunked inner
      spectrum from :func:`filter_spectrum` (for ``n = 32768``: the branch channels).
    geo: :func:`geometry` of the transform (``geo.rows`` must match ``z``).
    config: launch parameters.
    conjugate: multiply by ``conj(kf)`` (the correlation).
    interpret: Pallas Mosaic GPU interpret mode (True or ``plgpu.InterpretGPUParams``).

  Returns:
    ``[pairs, 2, channels, rows, 128]`` in ``z.dtype``: the first ``rows * 128`` time
    steps of the circular 16384-point convolution with the spectrum ``kf``.
  """
  pairs, two, channels, rows, width = z.shape
  dtype = jnp.dtype(z.dtype)
  cfg = config or LongFFTConvConfig()
  if two != 2 or rows != geo.rows or width != N_1:
    raise ValueError(f"fft_conv_fused_long: z must be [pairs, 2, channels, rows={geo.rows}, "
                     f"{N_1}], got {z.shape}")
  if kf.shape != (channels, 2, 2, 2, B, B):
    raise ValueError(f"fft_conv_fused_long: kf must be [channels={channels}, 2, 2, 2, {B}, "
                     f"{B}], got {kf.shape}")
  why = unsupported(INNER_N, rows * N_1, dtype, cfg)
  if why:
    raise NotImplementedError(f"fft_conv_fused_long: {why}")
  ppc = cfg.pairs_per_cta or pairs
  ppc = max(d for d in range(1, pairs + 1) if pairs % d == 0 and d <= ppc)
  consts = dft_constants(jnp.bfloat16 if dtype.name == "bfloat16" else np.dtype(dtype.name),
                         jnp.dtype(cfg.twiddle_dtype))
  scratch = {
      "f": _swizzled((3, 2, N_1, B), dtype),
      "p": _swizzled((2, 2, N_1, B), dtype),
      "t00": _swizzled((2, B, B), jnp.dtype(cfg.twiddle_dtype)),
      "kf": _swizzled((2, 2, B, B), dtype),
      "tf": plgpu.SMEM((3, 2, B), jnp.float32),
      "const_bar": plgpu.Barrier(num_arrivals=3 * 2 + 2 + 1),
      "z_bar": plgpu.Barrier(num_arrivals=4),
      "kf_bar": plgpu.Barrier(num_arrivals=2, num_barriers=2),
      "row_bar": plgpu.Barrier(num_arrivals=2),
      "p_bar": plgpu.Barrier(num_arrivals=2),
      "free_bar": plgpu.Barrier(num_arrivals=2),
  }

  def kernel_fn(z_ref, kf_ref, f_ref, t00_ref, tf_ref, y_ref, s):
    _kernel(z_ref, kf_ref, f_ref, t00_ref, tf_ref, y_ref, s, rows=rows, ppc=ppc, dtype=dtype,
            conjugate=conjugate, overlap=cfg.overlap)

  return plgpu.kernel(
      kernel_fn,
      out_type=jax.ShapeDtypeStruct(z.shape, dtype),
      scratch_types=(scratch,),
      grid=(channels, pairs // ppc),
      grid_names=("channels", "groups"),
      num_threads=2,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
      interpret=(plgpu.InterpretGPUParams() if interpret is True else interpret or None),
      kernel_name=f"fft_{'corr' if conjugate else 'conv'}_mosaic_long_{rows}",
  )(z, kf.astype(dtype), jnp.asarray(consts["f"]), jnp.asarray(consts["t00"]),
    jnp.asarray(consts["tf"]))


# --------------------------------------------------------------------------- op-level


def conv_geometry(seq: int, filter_len: int, dtype, *, causal: bool = True,
                  config: LongFFTConvConfig | None = None) -> LongGeometry:
  """The geometry :func:`fft_conv_mosaic_long` uses (for :func:`filter_spectrum` computed
  once and passed as ``kf``). Raises NotImplementedError naming the reason."""
  n = fft_size(seq, filter_len, causal=causal)
  why = unsupported(n, seq, dtype, config)
  if why:
    raise NotImplementedError(f"fft_conv_mosaic_long: {why}")
  return geometry(n, seq)


def fft_conv_mosaic_long(u: jax.Array, k: jax.Array, x: jax.Array | None = None,
                         v: jax.Array | None = None, *, causal: bool = True,
                         config: LongFFTConvConfig | None = None, conjugate: bool = False,
                         kf: jax.Array | None = None,
                         interpret: bool | plgpu.InterpretGPUParams = False) -> jax.Array:
  """``v * conv(k, u * x)`` (or the correlation), ``jaxeff.ops.fft_conv`` semantics, for
  transform sizes 16384 and 32768 (causal seq 4097 .. 16384, circular 16384 / 32768).

  Args:
    u: ``[batch, channels, seq]`` bfloat16/float16.
    k: ``[channels, filter_len]``, ``1 <= filter_len <= seq``.
    x, v: None or ``[batch, channels, seq]``: the Hyena gates (in XLA around the kernel).
    causal: linear causal convolution or circular of period ``seq``.
    config: launch parameters (None: the defaults).
    conjugate: the correlation with the filter (the adjoint; see
      :func:`kernels_pallas.fftconv.mosaic_gpu.fft_conv_mosaic`).
    kf: None or the precomputed :func:`filter_spectrum` for :func:`conv_geometry`.
    interpret: Pallas Mosaic GPU interpret mode.

  Returns:
    ``[batch, channels, seq]`` in ``u.dtype``.
  """
  if u.ndim != 3 or k.ndim != 2 or k.shape[0] != u.shape[1]:
    raise ValueError(f"fft_conv_mosaic_long: u must be [batch, channels, seq] and k "
                     f"[channels, filter_len], got {u.shape} and {k.shape}")
  if not isinstance(conjugate, bool):
    raise TypeError(f"fft_conv_mosaic_long: conjugate must be a bool, got {conjugate!r}")
  batch, channels, seq = u.shape
  geo = conv_geometry(seq, k.shape[1], u.dtype, causal=causal, config=config)
  dtype = u.dtype
  if kf is None:
    kf = filter_spectrum(k, geo, dtype)
  elif kf.shape != (geo.radix * channels, 2, 2, 2, B, B):
    raise ValueError(f"fft_conv_mosaic_long: kf must be [{geo.radix * channels}, 2, 2, 2, "
                     f"{B}, {B}] (filter_spectrum for these sizes), got {kf.shape}")
  a = gated(u, x, dtype)
  pairs = -(-batch // 2)
  run = lambda z: fft_conv_fused_long(z, kf, geo, config=config, conjugate=conjugate,
                                      interpret=interpret)
  if geo.radix == 1:
    y = unpack_pairs(run(pack_pairs(a, pairs, geo.rows, N_1)), batch, seq)
  else:
    y = _radix2(a, run, geo, pairs, seq, dtype).astype(dtype)
  return gated(y, v, dtype)


def _radix2(a, run, geo: LongGeometry, pairs: int, seq: int, dtype) -> jax.Array:
  """The outer radix-2 level of ``n = 2 * 16384`` in XLA around the inner kernel ``run``:
  ``[batch, channels, seq]`` -> ``[batch, channels, seq]`` float32 (the branch inputs are
  rounded to ``dtype`` for the kernel). Real arithmetic on the (re, im) planes, one
  elementwise fusion before the kernel and one after."""
  batch, channels, _ = a.shape
  half = 1 if seq <= INNER_N else 2  # input halves t_a (the second is zero when seq <= n/2)
  a = jnp.pad(a.astype(jnp.float32),
              ((0, 2 * pairs - batch), (0, 0), (0, half * INNER_N - seq)))
  z = a.reshape(pairs, 2, channels, half, INNER_N)  # [p, part, c, t_a, m]
  m = np.arange(INNER_N)
  cos = jnp.asarray(np.cos(2 * np.pi * m / geo.n).astype(np.float32))
  sin = jnp.asarray(-np.sin(2 * np.pi * m / geo.n).astype(np.float32))  # w_n^m = cos + i sin
  s0 = z[:, :, :, 0] if half == 1 else z[:, :, :, 0] + z[:, :, :, 1]  # [p, part, c, m]
  d = z[:, :, :, 0] if half == 1 else z[:, :, :, 0] - z[:, :, :, 1]
  x1 = jnp.stack([d[:, 0] * cos - d[:, 1] * sin, d[:, 0] * sin + d[:, 1] * cos], axis=1)
  x = jnp.concatenate([s0, x1], axis=2).astype(dtype)  # [p, part, k_a * c + c', m]
  b = run(x.reshape(pairs, 2, 2 * channels, N_1, N_1))
  b = b.reshape(pairs, 2, 2, channels, INNER_N).astype(jnp.float32)  # [p, part, k_a, c, m]
  b0, b1 = b[:, :, 0], b[:, :, 1]
  # w_n^(-m) b_1
  t = jnp.stack([b1[:, 0] * cos + b1[:, 1] * sin, b1[:, 1] * cos - b1[:, 0] * sin], axis=1)
  y = jnp.stack([b0 + t, b0 - t], axis=3) if seq > INNER_N else (b0 + t)[:, :, :, None]
  y = y.reshape(pairs, 2, channels, -1)[..., :seq].reshape(2 * pairs, channels, seq)
  return y[:batch]


__all__ = ["LongFFTConvConfig", "LongGeometry", "conv_geometry", "dft_constants",
           "fft_conv_fused_long", "fft_conv_mosaic_long", "filter_spectrum", "geometry",
           "smem_bytes", "unsupported", "SIZES"]
