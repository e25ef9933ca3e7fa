"""Filter gradient of the FFT convolution (the batch-summed cross spectrum) for Hopper.

The gradient of ``y = conv(k, w)`` (``jaxeff.ops.fft_conv``) with respect to the filter is
the batch-summed correlation

    dk[c, j] = sum_b sum_t w[b, c, t] d[b, c, t + j] = Re(ifft(G_c))[j],
    G_c[f] = sum_b conj(W_b[f]) D_b[f]                (W = FFT_n(w), D = FFT_n(d))

(``w = u x``, ``d = dy v``; causal transforms have ``n >= seq + filter_len - 1``, so the
sums do not wrap for ``j < filter_len``; circular ones are periodic in ``n = seq``).
FlashFFTConv (Fu et al., 2023) computes the spectra with the Monarch (Cooley-Tukey
four-step) decomposition ``n = n_1 n_2`` on the tensor cores; here with ``wgmma`` as in
:mod:`kernels_pallas.fftconv.mosaic_gpu` (whose geometry, DFT planes and twiddles this
kernel reuses).

Packed signals: batch rows ``2p`` and ``2p + 1`` are the real and imaginary parts of one
complex signal, ``W = W_0 + i W_1`` and ``D = D_0 + i D_1``. Then
``conj(W) D = conj(W_0) D_0 + conj(W_1) D_1 + i (conj(W_0) D_1 - conj(W_1) D_0)`` and each
of the four products is the spectrum of a real correlation, so
``Re(ifft(sum_p conj(W_p) D_p)) = sum_b corr(w_b, d_b)``: the kernel accumulates the cross
spectrum of the packed signals directly (no Hermitian split, no ``Z[n - f]`` access), and
a zero row padding an odd batch contributes nothing.

Per packed signal and 64-row block ``h`` of the spectrum rows ``k_1`` (independent in the
forward transform), for ``X`` in (``W``, ``D``):

    A_X = F1[64h:64h+64, :rows] @ Z_X     row DFT       M = 64, K = rows, N = 32 a block
    P_X = A_X * T                         twiddles, bf16 operand planes
    Y_X = P_X @ F2                        column DFT    M = 64, K = n_2, N = 32 a block
    G_h += conj(Y_W) Y_D                  float32 registers, carried over the signals

Every shared-memory tile is a 32-column block (``col_width``; major-dim slices only), so
the float32 accumulators in flight between two ``wgmma`` waits stay at 64 registers a
thread and ``G`` at 32 (``n_2 = 32``) or 64 (``n_2 = 64``).

Schedules: ``n_1 = 64`` (``n`` = 2048, 4096): each compute warpgroup loops over every
``compute_wgs``-th signal of the CTA's channel with its own TMA input ring and its own
``G`` (two partial sums). ``n_1 = 128`` (``n = 8192``): warpgroup ``h`` owns row block
``h`` of every signal; the two share one input ring (warpgroup 0 refills a slot after both
have waited their row DFTs of it) and the twiddle table.

Output: once the loop is done the operand planes are free and receive ``G`` as a two-term
bfloat16 expansion (``hi = bf16(G)``, ``lo = bf16(G - hi)``, 16 significant bits), written
by TMA as ``[partials, 4, channels, n_1, n_2]``; :func:`filter_grad_from_partials` (XLA,
per channel) adds the terms and partials and takes ``Re(ifft)[:filter_len]``.

Limits: the forward kernel's transform sizes (``n`` = 2048, 4096, 8192; ``rows`` a
multiple of 16), bfloat16 inputs (the bf16 expansion keeps float32's exponent range;
float16 planes could not hold it), the working set within shared memory
(:func:`smem_bytes`; circular ``n = 8192`` does not fit).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels_pallas.fftconv.mosaic_gpu import (SMEM_BUDGET_BYTES, WGMMA_M, MosaicGeometry,
                                               _bits, _swizzled, check_packed, cmul,
                                               complex_products, dft_constants, fft_size,
                                               geometry, pack_pairs, spectrum_terms)

SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16),)
SIZES = (2048, 4096, 8192)
ACC_REGS = 64  # float32 accumulator registers a thread in flight between two waits
COL_WIDTHS = (32, 64)


@dataclasses.dataclass(frozen=True)
class MosaicDkConfig:
  """Launch parameters of :func:`filter_grad_fused_mosaic`.

  Attributes:
    compute_wgs: warpgroups per CTA (1 or 2; ``n_1 = 128`` needs 2, one per row block).
    stages: input ring depth (signals in flight; one ring per warpgroup when
      ``n_1 = 64``, one shared ring when ``n_1 = 128``).
    pairs_per_cta: packed signals per CTA (0: the whole batch; clipped to a divisor of
      the pair count). Several CTAs per channel write partial sums added in XLA.
    const_dtype: the twiddle table in shared memory, "float32" or "bfloat16".
    half_twiddles: keep the first 64 rows of the table; row block 1 multiplies by the
      column factor ``w_n^(64 t_2)`` (as the forward's option).
    col_width: columns of every tile and ``wgmma`` N (32, or 64 = whole ``n_2 = 64``
      tiles: 128 accumulator registers in flight in the column DFT).
  """

  compute_wgs: int = 2
  stages: int = 2
  pairs_per_cta: int = 0
  const_dtype: str = "float32"
  half_twiddles: bool = False
  col_width: int = 32

  def __post_init__(self):
    if self.compute_wgs not in (1, 2):
      raise ValueError(f"MosaicDkConfig.compute_wgs must be 1 or 2, got {self.compute_wgs!r}")
    if self.stages not in (1, 2):
      raise ValueError(f"MosaicDkConfig.stages must be 1 or 2, got {self.stages!r}")
    if not isinstance(self.pairs_per_cta, int) or self.pairs_per_cta < 0:
      raise ValueError(f"MosaicDkConfig.pairs_per_cta must be an int >= 0, got "
                       f"{self.pairs_per_cta!r}")
    if self.const_dtype not in ("float32", "bfloat16"):
      raise ValueError(f"MosaicDkConfig.const_dtype must be float32 or bfloat16, got "
                       f"{self.const_dtype!r}")
    if self.col_width not in COL_WIDTHS:
      raise ValueError(f"MosaicDkConfig.col_width must be one of {COL_WIDTHS}, got "
                       f"{self.col_width!r}")


def _row_split(geo: MosaicGeometry) -> bool:
  """``n_1 = 128``: the warpgroups split the spectrum rows (not the signals)."""
  return geo.n_1 > WGMMA_M


def smem_bytes(geo: MosaicGeometry, cfg: MosaicDkConfig, dtype=jnp.bfloat16) -> int:
  """Shared memory of one CTA: constants, input ring(s), operand planes."""
  b = jnp.dtype(dtype).itemsize
  cb = jnp.dtype(cfg.const_dtype).itemsize
  n_1, n_2, rows = geo.n_1, geo.n_2, geo.rows
  tw_rows = WGMMA_M if cfg.half_twiddles else n_1
  consts = 3 * n_1 * rows * b + 3 * n_2 * n_2 * b + 2 * tw_rows * n_2 * cb
  if cfg.half_twiddles:
    consts += 2 * (n_1 // WGMMA_M) * n_2 * 4
  ring = cfg.stages * 2 * 2 * rows * n_2 * b  # (W, D) x (re, im)
  rings = 1 if _row_split(geo) else cfg.compute_wgs
  planes = 2 * 2 * WGMMA_M * n_2 * b
  return consts + rings * ring + cfg.compute_wgs * planes + 1024


def first_fitting(candidates, geo: MosaicGeometry, smem, dtype):
  """The first of ``candidates`` whose ``smem(geo, cfg, dtype)`` fits
  ``SMEM_BUDGET_BYTES`` (the last one when none does: its caller reports the overflow)."""
  for cfg in candidates:
    if smem(geo, cfg, dtype) <= SMEM_BUDGET_BYTES:
      return cfg
  return cfg


def common_unsupported(n: int, seq: int, dtype, cfg, smem, *, default, extra=None
                       ) -> str | None:
  """The reasons shared by the dk and fused-backward kernels, first failing one reported:
  dtype, transform size, one warpgroup per row block at ``n_1 = 128``, the kernel's own
  ``extra(geo, cfg)`` (optional), shared memory ``smem(geo, cfg, dtype)``; ``cfg`` None
  means ``default(n, seq, dtype)``."""
  if jnp.dtype(dtype) not in SUPPORTED_DTYPES:
    return f"dtype {jnp.dtype(dtype).name} is not bfloat16"
  if n not in SIZES:
    return f"transform size {n} is not one of {SIZES}"
  cfg = cfg or default(n, seq, dtype)
  geo = geometry(n, seq)
  if _row_split(geo) and cfg.compute_wgs != 2:
    return f"transform size {n} (n_1 = {geo.n_1}) needs compute_wgs=2 (one per row block)"
  why = extra(geo, cfg) if extra else None
  if why:
    return why
  need = smem(geo, cfg, dtype)
  if need > SMEM_BUDGET_BYTES:
    return f"{cfg} needs {need} bytes of shared memory > {SMEM_BUDGET_BYTES}"
  return None


def launch_split(fn: str, pairs: int, geo: MosaicGeometry, cfg):
  """``(split, pairs_per_cta, cfg)`` of a launch over ``pairs`` packed signals: whether the
  two warpgroups split the rows (``n_1 = 128``) instead of the signals, the signals a CTA
  takes (a divisor of ``pairs``, a multiple of the warpgroups' step, at most
  ``cfg.pairs_per_cta`` when set), and ``cfg`` with its ring no deeper than the signals a
  warpgroup walks. Raises ``ValueError`` (naming ``fn``) when ``pairs`` does not split."""
  split = _row_split(geo)
  nw = cfg.compute_wgs
  step = 1 if split else nw
  if pairs % step:
    raise ValueError(f"{fn}: pairs={pairs} must be a multiple of "
                     f"compute_wgs={nw} (pad the batch with zero rows)")
  ppc = cfg.pairs_per_cta or pairs
  ppc = max(d for d in range(step, pairs + 1, step) if pairs % d == 0 and d <= max(ppc, step))
  count = ppc if split else ppc // nw
  return split, ppc, dataclasses.replace(cfg, stages=min(cfg.stages, count))


def default_config(n: int, seq: int, dtype=jnp.bfloat16) -> MosaicDkConfig:
  """The first launch configuration that fits shared memory: two warpgroups with a 2-deep
  ring and float32 twiddles, then bfloat16 twiddles, half the table, a 1-deep ring (and,
  at ``n_1 = 64``, one warpgroup)."""
  geo = geometry(n, seq)
  candidates = (
      MosaicDkConfig(stages=2),
      MosaicDkConfig(stages=2, const_dtype="bfloat16"),
      MosaicDkConfig(stages=2, const_dtype="bfloat16", half_twiddles=True),
      MosaicDkConfig(stages=1),
      MosaicDkConfig(stages=1, const_dtype="bfloat16", half_twiddles=True))
  if not _row_split(geo):
    candidates += (MosaicDkConfig(compute_wgs=1, stages=1, const_dtype="bfloat16",
                                  half_twiddles=True),)
  return first_fitting(candidates, geo, smem_bytes, dtype)


def unsupported(n: int, seq: int, dtype, config: MosaicDkConfig | None = None) -> str | None:
  """None when :func:`filter_grad_fused_mosaic` serves this transform, else the reason."""
  def col_width(geo, cfg):
    return f"col_width={cfg.col_width} > n_2={geo.n_2}" if cfg.col_width > geo.n_2 else None
  return common_unsupported(n, seq, dtype, config, smem_bytes, default=default_config,
                            extra=col_width)


def _blocked_constants(geo: MosaicGeometry, cfg: MosaicDkConfig, dtype):
  """The forward's DFT planes and twiddles, the column-indexed ones as 32/64-column blocks:
  ``w1 [3, n_1, rows]``, ``f2 [3, nb, n_2, cw]``, ``tw [2, nb, tw_rows, cw]`` and (half
  table) ``twc [n_1 / 64, 2, nb, cw]`` float32."""
  c = dft_constants(geo, dtype)
  cw = cfg.col_width
  nb = geo.n_2 // cw
  tw_rows = WGMMA_M if cfg.half_twiddles else geo.n_1
  blocks = lambda a: a.reshape(a.shape[:-1] + (nb, cw)).swapaxes(-3, -2)
  out = {"w1": c["w1"], "f2": blocks(c["f2"]),
         "tw": blocks(c["tw"][:, :tw_rows]).astype(jnp.dtype(cfg.const_dtype))}
  if cfg.half_twiddles:
    out["twc"] = c["twc"].reshape(-1, 2, nb, cw)
  return out


# --------------------------------------------------------------------------- kernel stages
# (shared with the fused backward, :mod:`kernels_pallas.fftconv.mosaic_gpu_bwd`)


def copy_constants(w1_ref, f2_ref, tw_ref, twc_ref, s, nb: int):
  """Starts the TMA copies of the DFT planes and twiddles into shared memory (arrivals on
  ``s["const_bar"]``: ``3 + 3 nb + 2 nb``, one more with ``twc_ref``)."""
  for q in range(3):
    plgpu.copy_gmem_to_smem(w1_ref.at[q], s["w1"].at[q], s["const_bar"])
    for cb in range(nb):
      plgpu.copy_gmem_to_smem(f2_ref.at[q, cb], s["f2"].at[q, cb], s["const_bar"])
  for q in range(2):
    for cb in range(nb):
      plgpu.copy_gmem_to_smem(tw_ref.at[q, cb], s["tw"].at[q, cb], s["const_bar"])
  if twc_ref is not None:
    plgpu.copy_gmem_to_smem(twc_ref, s["twc"], s["const_bar"])


def fetch_pair(zw_ref, zd_ref, p, c, slot_ref, bar, nb: int, cw: int):
  """Starts the copies of pair ``p``'s input rows of both signals (W, D) of channel ``c``
  into the ring slot ``[2, 2, nb, rows, cw]`` (``4 nb`` arrivals on ``bar``)."""
  for t, ref in enumerate((zw_ref, zd_ref)):
    for part in range(2):
      for cb in range(nb):
        plgpu.copy_gmem_to_smem(ref.at[p, part, c, :, pl.ds(cw * cb, cw)],
                                slot_ref.at[t, part, cb], bar)


def write_cross_spectrum(g, planes, g_ref, partial, c, h: int, nb: int, cw: int, dtype):
  """``G`` (``(re, im)`` per column block, float32) as hi + lo bfloat16 terms into the
  (free) operand planes, then to ``g_ref[partial, :, c, rows of block h]``; waits."""
  for cb in range(nb):
    for part in range(2):
      x = g[2 * cb + part]
      hi = x.astype(dtype)
      planes.at[0, part, cb][...] = hi
      planes.at[1, part, cb][...] = (x - hi.astype(jnp.float32)).astype(dtype)
  plgpu.commit_smem()
  rb = pl.ds(WGMMA_M * h, WGMMA_M)
  for t in range(2):
    for part in range(2):
      for cb in range(nb):
        plgpu.copy_smem_to_gmem(planes.at[t, part, cb],
                                g_ref.at[partial, 2 * t + part, c, rb, pl.ds(cw * cb, cw)])
  plgpu.wait_smem_to_gmem(0)


def twiddle_block(s, cfg: MosaicDkConfig, h: int, cb: int, shape):
  """``T[64h:64h+64, block cb]`` as float32 ``(re, im)`` in the WGMMA layout, from the
  blocked table ``s["tw"] [2, nb, tw_rows, cw]`` (half table: block 0 times the column
  factor ``s["twc"][h]``)."""
  load = lambda ref: plgpu.load(ref, layout=plgpu.Layout.WGMMA).astype(jnp.float32)
  if cfg.half_twiddles:
    m = load(s["tw"].at[0, cb]), load(s["tw"].at[1, cb])
    if h:
      col = lambda q: lax.broadcast_in_dim(
          plgpu.load(s["twc"].at[h, q, cb], layout=plgpu.Layout.WGMMA.reduce(0)), shape, [1])
      m = cmul(*m, col(0), col(1))
    return m
  rb = pl.ds(WGMMA_M * h, WGMMA_M)
  return load(s["tw"].at[0, cb, rb]), load(s["tw"].at[1, cb, rb])


def row_stage(slot_ref, w1, planes, twiddle, nb: int, shape, dtype):
  """Row DFTs and twiddles of both signals of a ring slot into the operand planes:
  ``planes[t, :, cb] = (F1[rb, :rows] Z_t[:, cb]) T[rb, cb]`` for ``t`` in (W, D).

  slot_ref: ``[2 (W, D), 2 (re, im), nb, rows, cw]``; w1: ``Re, Im, -Im`` of
  ``F1[rb, :rows]``; planes: ``[2, 2, nb, 64, cw]``; twiddle(cb) -> float32 (re, im).
  At most ``ACC_REGS`` accumulator registers in flight between two waits.
  """
  jobs = [(t, cb) for t in range(2) for cb in range(nb)]
  per_wait = max(1, ACC_REGS // shape[1])  # a [64, cw] complex accumulator: cw registers
  for a in range(0, len(jobs), per_wait):
    group_jobs = jobs[a:a + per_wait]
    groups = []
    for t, cb in group_jobs:
      zr, zi = slot_ref.at[t, 0, cb], slot_ref.at[t, 1, cb]
      groups.append((((w1[0], zr), (w1[2], zi)), ((w1[1], zr), (w1[0], zi))))
    accs = complex_products(groups, shape)
    for (t, cb), (a_re, a_im) in zip(group_jobs, accs):
      p_re, p_im = cmul(a_re, a_im, *twiddle(cb))
      planes.at[t, 0, cb][...] = p_re.astype(dtype)
      planes.at[t, 1, cb][...] = p_im.astype(dtype)
  plgpu.commit_smem()


def column_products(planes, f2_ref, cb: int, nb: int, shape, conjugate: bool = False,
                    signals=(0, 1)):
  """Column DFT output block ``cb`` of the planes' signals, waited together:
  ``[(re, im), ...]`` of ``sum_kb P_t[:, kb] F2[kb, cb]`` (``conjugate``: ``conj(F2)``)
  for ``t`` in ``signals``. f2_ref: the blocked ``Re, Im, -Im`` planes
  ``[3, nb, n_2, cw]``."""
  cw = shape[1]
  groups = []
  for t in signals:
    terms_re, terms_im = [], []
    for kb in range(nb):
      pr, pi = planes.at[t, 0, kb], planes.at[t, 1, kb]
      fr, fi, fn = (f2_ref.at[q, cb, pl.ds(cw * kb, cw)] for q in range(3))
      re, im = spectrum_terms(pr, pi, fr, fi, fn, conjugate=conjugate)
      terms_re += re
      terms_im += im
    groups.append((terms_re, terms_im))
  return complex_products(groups, shape)


def cross_spectrum_add(g_re, g_im, yw_re, yw_im, yd_re, yd_im):
  """``G + conj(Y_W) Y_D`` as ``(re, im)``."""
  return g_re + yw_re * yd_re + yw_im * yd_im, g_im + yw_re * yd_im - yw_im * yd_re


# --------------------------------------------------------------------------- kernel


def _kernel(zw_ref, zd_ref, w1_ref, f2_ref, tw_ref, twc_ref, g_ref, s, *,
            geo: MosaicGeometry, cfg: MosaicDkConfig, pairs_per_cta: int, dtype):
  """One CTA: channel ``c``, packed signals ``[g * pairs_per_cta, (g + 1) * pairs_per_cta)``.

  Invariant of a warpgroup's loop at its signal ``j``: the copies of signals
  ``j .. j + stages - 1`` into ring slots ``j % stages ..`` have been issued; ``G`` holds
  the cross spectrum of its row block summed over its signals before ``j``; the operand
  planes are free (the previous column DFT has been waited).
  """
  c = lax.axis_index("channels")
  grp = lax.axis_index("groups")
  wg = lax.axis_index("wg")
  p0 = grp * pairs_per_cta
  nw, stages = cfg.compute_wgs, cfg.stages
  cw = cfg.col_width
  nb = geo.n_2 // cw
  split = _row_split(geo)
  count = pairs_per_cta if split else pairs_per_cta // nw
  shape = (WGMMA_M, cw)

  pl.when(wg == 0)(lambda: copy_constants(w1_ref, f2_ref, tw_ref, twc_ref, s, nb))

  def program(i: int):
    """Warpgroup ``i``: row block ``h``, ring ``ri``, its signals ``signal(j)``."""
    h = i if split else 0
    ri = 0 if split else i
    signal = (lambda j: p0 + j) if split else (lambda j: p0 + i + j * nw)
    fetches = i == 0 or not split
    ring = s["z"].at[ri]  # [stages, 2 (W, D), 2 (re, im), nb, rows, cw]
    planes = s["p"].at[i]  # [2 (W, D), 2 (re, im), nb, 64, cw]
    rb = pl.ds(WGMMA_M * h, WGMMA_M)
    w1 = [s["w1"].at[q, rb] for q in range(3)]  # Re, Im, -Im of F1[rb, :rows]

    def z_bar(slot):
      return s["z_bar"].at[ri * stages + slot]

    def fetch(j, slot):
      """Starts the copies of signal ``j``'s input rows (W and D) into ring slot ``slot``."""
      fetch_pair(zw_ref, zd_ref, signal(j), c, ring.at[slot], z_bar(slot), nb, cw)

    twiddle = lambda cb: twiddle_block(s, cfg, h, cb, shape)

    if fetches:
      for j in range(min(stages, count)):
        fetch(j, j)
    plgpu.barrier_wait(s["const_bar"])

    def body(j, g):
      slot = lax.rem(j, stages) if stages > 1 else 0
      plgpu.barrier_wait(z_bar(slot))
      row_stage(ring.at[slot], w1, planes, twiddle, nb, shape, dtype)
      # The ring slot has been read (every product reading it was waited).
      if split:
        plgpu.barrier_arrive(s["free_bar"].at[slot])
      else:
        @pl.when(j + stages < count)
        def _():
          fetch(j + stages, slot)
      # Column DFTs per output block, W and D together; G += conj(Y_W) Y_D.
      g = list(g)
      for cb in range(nb):
        (yw_re, yw_im), (yd_re, yd_im) = column_products(planes, s["f2"], cb, nb, shape)
        g[2 * cb], g[2 * cb + 1] = cross_spectrum_add(g[2 * cb], g[2 * cb + 1], yw_re, yw_im,
                                                      yd_re, yd_im)
      if split and i == 0:
        # Warpgroup 1 has read the slot too (waited on every use: each completed phase is
        # observed, also the last ones whose slot is not refilled).
        plgpu.barrier_wait(s["free_bar"].at[slot])

        @pl.when(j + stages < count)
        def _():
          fetch(j + stages, slot)
      return tuple(g)

    zero = plgpu.layout_cast(jnp.zeros(shape, jnp.float32), plgpu.Layout.WGMMA)
    g = lax.fori_loop(0, count, body, (zero,) * (2 * nb))
    write_cross_spectrum(g, planes, g_ref, grp if split else grp * nw + i, c, h, nb, cw, dtype)

  for i in range(nw):
    pl.when(wg == i)(lambda i=i: program(i))


def filter_grad_fused_mosaic(zw: jax.Array, zd: jax.Array, geo: MosaicGeometry, *,
                             config: MosaicDkConfig | None = None,
                             interpret: bool | plgpu.InterpretGPUParams = False) -> jax.Array:
  """Partial cross spectra ``sum_p conj(FFT(zw_p)) FFT(zd_p)`` per channel, Monarch order.

  Args:
    zw, zd: ``[pairs, 2, channels, rows, n_2]`` bfloat16: batch rows ``2p`` and ``2p + 1``
      of each channel as the real and imaginary planes of pair ``p``, the first
      ``rows * n_2`` time steps (zero beyond the input).
    geo: :func:`kernels_pallas.fftconv.mosaic_gpu.geometry` of the transform.
    config: launch parameters (None: :func:`default_config`).
    interpret: Pallas Mosaic GPU interpret mode (True or ``plgpu.InterpretGPUParams``).

  Returns:
    ``[partials, 4, channels, n_1, n_2]`` bfloat16: ``(re_hi, im_hi, re_lo, im_lo)`` of
    partial sums of ``G[k_1 + n_1 k_2]``; ``G`` is the sum over partials of hi + lo
    (:func:`filter_grad_from_partials`).
  """
  pairs, _, channels, rows, n_2 = zw.shape
  dtype = jnp.dtype(zw.dtype)
  cfg = config or default_config(geo.n, rows * n_2, dtype)
  if zd.shape != zw.shape or zd.dtype != zw.dtype:
    raise ValueError(f"filter_grad_fused_mosaic: zd must match zw {zw.shape} {zw.dtype}, "
                     f"got {zd.shape} {zd.dtype}")
  check_packed("filter_grad_fused_mosaic", "zw", zw, geo)
  why = unsupported(geo.n, rows * n_2, dtype, cfg)
  if why:
    raise NotImplementedError(f"filter_grad_fused_mosaic: {why}")
  split, ppc, cfg = launch_split("filter_grad_fused_mosaic", pairs, geo, cfg)
  nw = cfg.compute_wgs
  consts = _blocked_constants(geo, cfg, jnp.bfloat16)
  cw = cfg.col_width
  nb = n_2 // cw
  rings = 1 if split else nw
  sw = plgpu.find_swizzle(min(rows, cw) * _bits(dtype), "operand")
  scratch = {
      "w1": _swizzled((3, geo.n_1, rows), dtype, sw),
      "f2": _swizzled((3, nb, n_2, cw), dtype, sw),
      "tw": _swizzled(consts["tw"].shape, consts["tw"].dtype),
      "z": _swizzled((rings, cfg.stages, 2, 2, nb, rows, cw), dtype, sw),
      "p": _swizzled((nw, 2, 2, nb, WGMMA_M, cw), dtype, sw),
      "z_bar": plgpu.Barrier(num_arrivals=2 * 2 * nb, num_barriers=rings * cfg.stages),
  }
  args = [zw, zd, jnp.asarray(consts["w1"]), jnp.asarray(consts["f2"]),
          jnp.asarray(consts["tw"])]
  copies = 3 + 3 * nb + 2 * nb
  if cfg.half_twiddles:
    scratch["twc"] = plgpu.SMEM(consts["twc"].shape, jnp.float32)
    args.append(jnp.asarray(consts["twc"]))
    copies += 1
  scratch["const_bar"] = plgpu.Barrier(num_arrivals=copies)
  if split:
    scratch["free_bar"] = plgpu.Barrier(num_arrivals=2, num_barriers=cfg.stages)
  partials = (pairs // ppc) * (1 if split else nw)

  def kernel_fn(*refs):
    zw_ref, zd_ref, w1_ref, f2_ref, tw_ref = refs[:5]
    twc_ref = refs[5] if cfg.half_twiddles else None
    g_ref, s_ = refs[len(args):]
    _kernel(zw_ref, zd_ref, w1_ref, f2_ref, tw_ref, twc_ref, g_ref, s_, geo=geo, cfg=cfg,
            pairs_per_cta=ppc, dtype=dtype)

  return plgpu.kernel(
      kernel_fn,
      out_type=jax.ShapeDtypeStruct((partials, 4, channels, geo.n_1, n_2), dtype),
      scratch_types=(scratch,),
      grid=(channels, pairs // ppc),
      grid_names=("channels", "groups"),
      num_threads=nw,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
      interpret=(plgpu.InterpretGPUParams() if interpret is True else interpret or None),
      kernel_name=f"fft_conv_filter_grad_mosaic_{geo.n}",
  )(*args)


def filter_grad_from_partials(g: jax.Array, geo: MosaicGeometry, filter_len: int) -> jax.Array:
  """``dk [channels, filter_len]`` float32 = ``Re(ifft(G))[:filter_len]`` from the kernel's
  ``[partials, 4, channels, n_1, n_2]`` output (XLA, per channel)."""
  g = g.astype(jnp.float32).sum(0)
  spectrum = lax.complex(g[0] + g[2], g[1] + g[3])  # [channels, k_1, k_2]
  spectrum = spectrum.swapaxes(1, 2).reshape(g.shape[1], geo.n)  # f = k_1 + n_1 k_2
  return jnp.fft.ifft(spectrum, axis=-1)[:, :filter_len].real


def dk_geometry(seq: int, filter_len: int, dtype, *, causal: bool = True,
                config: MosaicDkConfig | None = None
                ) -> tuple[MosaicGeometry, MosaicDkConfig]:
  """The geometry and launch parameters :func:`filter_grad_mosaic` uses for these sizes
  (the forward kernel's view). Raises NotImplementedError naming the reason."""
  n = fft_size(seq, filter_len, causal=causal)
  cfg = config or default_config(n, seq, dtype)
  why = unsupported(n, seq, dtype, cfg)
  if why:
    raise NotImplementedError(f"filter_grad_mosaic: {why}")
  return geometry(n, seq), cfg


def filter_grad_mosaic(w: jax.Array, d: jax.Array, filter_len: int, *, causal: bool = True,
                       config: MosaicDkConfig | None = None,
                       interpret: bool | plgpu.InterpretGPUParams = False) -> jax.Array:
  """The filter gradient of ``fft_conv``: ``dk[c, j] = sum_b sum_t w[b, c, t] d[b, c, t + j]``.

  Args:
    w: ``[batch, channels, seq]`` bfloat16, the convolution's input (``u * x`` when gated).
    d: ``[batch, channels, seq]`` bfloat16, its output cotangent (``dy * v`` when gated).
    filter_len: taps of the filter, ``1 <= filter_len <= seq``.
    causal: linear causal convolution (``d`` is zero from ``seq`` on: the sum stops at
      ``t + j < seq``) or circular of period ``seq`` (``d[(t + j) mod seq]``).
    config: launch parameters (None: :func:`default_config`).
    interpret: Pallas Mosaic GPU interpret mode (True or ``plgpu.InterpretGPUParams``).

  Returns:
    ``[channels, filter_len]`` float32.
  """
  if w.ndim != 3 or d.shape != w.shape:
    raise ValueError(f"filter_grad_mosaic: w and d must be [batch, channels, seq] of one "
                     f"shape, got {w.shape} and {d.shape}")
  batch, channels, seq = w.shape
  if isinstance(filter_len, bool) or not isinstance(filter_len, int) or not (
      1 <= filter_len <= seq):
    raise ValueError(f"filter_grad_mosaic: filter_len must be an int in [1, seq={seq}], got "
                     f"{filter_len!r}")
  if d.dtype != w.dtype:
    raise TypeError(f"filter_grad_mosaic: d.dtype must equal w.dtype {w.dtype}, got "
                    f"{d.dtype}")
  geo, cfg = dk_geometry(seq, filter_len, w.dtype, causal=causal, config=config)
  step = 1 if _row_split(geo) else cfg.compute_wgs
  pairs = -(-batch // 2)
  pairs = -(-pairs // step) * step
  packed = lambda a: pack_pairs(a, pairs, geo.rows, geo.n_2)  # noqa: E731
  g = filter_grad_fused_mosaic(packed(w), packed(d), geo, config=cfg, interpret=interpret)
  return filter_grad_from_partials(g, geo, filter_len)


__all__ = ["MosaicDkConfig", "SIZES", "default_config", "dk_geometry",
           "filter_grad_from_partials", "filter_grad_fused_mosaic", "filter_grad_mosaic",
           "smem_bytes", "unsupported"]
