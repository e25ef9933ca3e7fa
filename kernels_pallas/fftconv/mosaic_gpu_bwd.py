"""Fused backward of the FFT convolution for Hopper, Mosaic GPU: one pass over the batch
gives the input gradient and the filter gradient's cross spectrum.

For ``y = conv(k, a)`` (``jaxeff.ops.fft_conv``; ``a = u x``, output cotangent
``d = dy v``) the backward needs

    dw[b, c, t] = sum_j k[c, j] d[b, c, t + j]  = iFFT(conj(K) D)        (correlation)
    dk[c, j]    = sum_b sum_t a[b, c, t] d[b, c, t + j] = Re(iFFT(G))[j],
    G           = sum_b conj(A_b) D_b                                     (cross spectrum)

and both use ``D = FFT_n(d)``. :mod:`kernels_pallas.fftconv.mosaic_gpu` (``conjugate=True``)
and :mod:`kernels_pallas.fftconv.mosaic_gpu_dk` compute them separately, transforming
``d`` twice (8 product stages a packed signal); this kernel transforms ``a`` and ``d``
once (FlashFFTConv's Monarch decomposition ``n = n_1 n_2`` with ``wgmma``, Fu et al.,
2023) and runs 6 stages a signal. Per packed signal and 64-row block ``h`` of ``k_1``
(every tile a 32-column block, the dk kernel's layout and stages):

    P_X = (F1[rb, :rows] @ Z_X) * T            row DFTs of X in (A, D)    (dk row stage)
    Y_X = P_X @ F2                             column DFTs, per block     (dk column stage)
    G  += conj(Y_A) Y_D                        float32 registers, carried over the signals
    Q   = Y_D * conj(K)                        -> the D planes (held in bf16 until every
                                               column block has been waited)
    R   = (Q @ conj(F2)) * conj(T)             inverse column DFT -> the A planes
    dw  = conj(F1)[:rows, :] @ R               inverse row DFT, kept rows -> D planes -> TMA

Packing as in the dk kernel: batch rows ``2p``, ``2p + 1`` are the real and imaginary parts
of one complex signal; the filter is real, so ``iFFT(conj(K) D)`` keeps the two rows'
correlations apart, and ``Re(iFFT(sum_p conj(A_p) D_p))`` is the batch-summed correlation.

Schedules: ``n_1 = 64`` (``n`` = 2048, 4096): each warpgroup loops over every
``compute_wgs``-th signal with its own ring, planes and ``G``. ``n_1 = 128``
(``n = 8192``): warpgroup ``h`` owns row block ``h`` of every signal (one shared ring,
refilled once both have read a slot); the inverse row DFT contracts over all 128 rows, so
warpgroup ``h`` computes output column block ``h`` from both warpgroups' ``R`` planes (two
cross-warpgroup barriers a signal: ``R`` written, ``R`` read).

Outputs: ``dw`` ``[pairs, 2, channels, rows, n_2]`` in the input dtype and ``G`` as the
dk kernel's ``[partials, 4, channels, n_1, n_2]`` bfloat16 hi/lo terms
(:func:`kernels_pallas.fftconv.mosaic_gpu_dk.filter_grad_from_partials` finishes ``dk``).

Limits: the dk kernel's (``n`` = 2048, 4096, 8192; bfloat16; the working set within shared
memory, :func:`smem_bytes`; circular ``n = 8192`` does not fit).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels_pallas.fftconv.mosaic_gpu import (WGMMA_M, MosaicGeometry, _bits, _swizzled,
                                               check_packed, check_spectrum, cmul,
                                               complex_products, dft_constants,
                                               fft_size, filter_spectrum, geometry,
                                               pack_pairs, unpack_pairs)
from kernels_pallas.fftconv.mosaic_gpu_dk import (_blocked_constants, _row_split,
                                                  column_products, common_unsupported,
                                                  copy_constants, cross_spectrum_add,
                                                  fetch_pair, filter_grad_from_partials,
                                                  first_fitting, launch_split, row_stage,
                                                  twiddle_block,
                                                  write_cross_spectrum)

COL_WIDTH = 32  # columns of every shared-memory tile and the wgmma N


@dataclasses.dataclass(frozen=True)
class MosaicBwdConfig:
  """Launch parameters of :func:`conv_backward_fused_mosaic`.

  Attributes:
    compute_wgs: warpgroups per CTA (1 or 2; ``n_1 = 128`` needs 2, one per row block).
    stages: input ring depth (one ring per warpgroup when ``n_1 = 64``, one shared ring
      when ``n_1 = 128``).
    pairs_per_cta: packed signals per CTA (0: the whole batch; clipped to a divisor of the
      pair count). Several CTAs per channel write partial cross spectra added in XLA.
    const_dtype: twiddle table and filter spectrum in shared memory, "float32" or
      "bfloat16".
    half_twiddles: keep the first 64 rows of the twiddle table (row block 1 multiplies
      by the column factor ``w_n^(64 t_2)``).
  """

  compute_wgs: int = 2
  stages: int = 2
  pairs_per_cta: int = 0
  const_dtype: str = "float32"
  half_twiddles: bool = False

  @property
  def col_width(self) -> int:
    return COL_WIDTH

  def __post_init__(self):
    if self.compute_wgs not in (1, 2):
      raise ValueError(f"MosaicBwdConfig.compute_wgs must be 1 or 2, got {self.compute_wgs!r}")
    if self.stages not in (1, 2):
      raise ValueError(f"MosaicBwdConfig.stages must be 1 or 2, got {self.stages!r}")
    if (isinstance(self.pairs_per_cta, bool) or not isinstance(self.pairs_per_cta, int)
        or self.pairs_per_cta < 0):
      raise ValueError(f"MosaicBwdConfig.pairs_per_cta must be an int >= 0, got "
                       f"{self.pairs_per_cta!r}")
    if self.const_dtype not in ("float32", "bfloat16"):
      raise ValueError(f"MosaicBwdConfig.const_dtype must be float32 or bfloat16, got "
                       f"{self.const_dtype!r}")


def smem_bytes(geo: MosaicGeometry, cfg: MosaicBwdConfig, dtype=jnp.bfloat16) -> int:
  """Shared memory of one CTA: constants (DFT planes, twiddles, filter spectrum, the
  inverse row DFT's own planes when ``rows < 64``), input ring(s), operand planes."""
  b = jnp.dtype(dtype).itemsize
  cb = jnp.dtype(cfg.const_dtype).itemsize
  n_1, n_2, rows = geo.n_1, geo.n_2, geo.rows
  tw_rows = WGMMA_M if cfg.half_twiddles else n_1
  consts = 3 * n_1 * rows * b + 3 * n_2 * n_2 * b + 2 * tw_rows * n_2 * cb + 2 * n_1 * n_2 * cb
  if cfg.half_twiddles:
    consts += 2 * (n_1 // WGMMA_M) * n_2 * 4
  if not geo.transposed_inverse:
    consts += 3 * geo.out_m * n_1 * b
  ring = cfg.stages * 2 * 2 * rows * n_2 * b  # (A, D) x (re, im)
  rings = 1 if _row_split(geo) else cfg.compute_wgs
  planes = 2 * 2 * WGMMA_M * n_2 * b
  return consts + rings * ring + cfg.compute_wgs * planes + 1024


def default_config(n: int, seq: int, dtype=jnp.bfloat16) -> MosaicBwdConfig:
  """The first launch configuration that fits shared memory: two warpgroups with a 2-deep
  ring and float32 constants, then bfloat16 constants, half the twiddle table, the same
  with a 1-deep ring (and, at ``n_1 = 64``, one warpgroup). Unmeasured (the dk kernel's
  order)."""
  geo = geometry(n, seq)
  candidates = tuple(
      MosaicBwdConfig(stages=st, const_dtype=cd, half_twiddles=half)
      for st in (2, 1) for cd, half in (("float32", False), ("bfloat16", False),
                                         ("bfloat16", True)))
  if not _row_split(geo):
    candidates += (MosaicBwdConfig(compute_wgs=1, stages=1, const_dtype="bfloat16",
                                   half_twiddles=True),)
  return first_fitting(candidates, geo, smem_bytes, dtype)


def unsupported(n: int, seq: int, dtype, config: MosaicBwdConfig | None = None) -> str | None:
  """None when :func:`conv_backward_fused_mosaic` serves this transform, else the reason."""
  return common_unsupported(n, seq, dtype, config, smem_bytes, default=default_config)


def blocked_spectrum(kf: jax.Array, cw: int = COL_WIDTH) -> jax.Array:
  """The forward's filter spectrum ``[channels, 2, n_1, n_2]`` as column blocks
  ``[channels, 2, n_2 / cw, n_1, cw]`` (XLA)."""
  c, two, n_1, n_2 = kf.shape
  return kf.reshape(c, two, n_1, n_2 // cw, cw).swapaxes(2, 3)


# --------------------------------------------------------------------------- kernel


def _kernel(za_ref, zd_ref, kf_ref, w1_ref, f2_ref, tw_ref, twc_ref, e1_ref, dw_ref, g_ref, s,
            *, geo: MosaicGeometry, cfg: MosaicBwdConfig, pairs_per_cta: int, dtype):
  """One CTA: channel ``c``, packed signals ``[g * pairs_per_cta, (g + 1) * pairs_per_cta)``.

  Invariant of a warpgroup's loop at its signal ``j``: the copies of signals
  ``j .. j + stages - 1`` into ring slots ``j % stages ..`` have been issued; ``G`` holds
  the cross spectrum of its row block summed over its signals before ``j``; the operand
  planes may still be read by the previous signal's output copy (D planes); at
  ``n_1 = 128`` both warpgroups have finished reading each other's ``R`` planes.
  """
  c = lax.axis_index("channels")
  grp = lax.axis_index("groups")
  wg = lax.axis_index("wg")
  p0 = grp * pairs_per_cta
  nw, stages = cfg.compute_wgs, cfg.stages
  cw = COL_WIDTH
  nb = geo.n_2 // cw
  split = _row_split(geo)
  count = pairs_per_cta if split else pairs_per_cta // nw
  shape = (WGMMA_M, cw)
  rows, out_m = geo.rows, geo.out_m

  @pl.when(wg == 0)
  def _load_constants():
    copy_constants(w1_ref, f2_ref, tw_ref, twc_ref, s, nb)
    for q in range(2):
      for cb in range(nb):
        plgpu.copy_gmem_to_smem(kf_ref.at[c, q, cb], s["kf"].at[q, cb], s["const_bar"])
    if e1_ref is not None:
      for q in range(3):
        plgpu.copy_gmem_to_smem(e1_ref.at[q], s["e1"].at[q], s["const_bar"])

  def load(ref):
    return plgpu.load(ref, layout=plgpu.Layout.WGMMA).astype(jnp.float32)

  def program(i: int):
    """Warpgroup ``i``: row block ``h``, ring ``ri``, its signals ``signal(j)``."""
    h = i if split else 0
    ri = 0 if split else i
    signal = (lambda j: p0 + j) if split else (lambda j: p0 + i + j * nw)
    fetches = i == 0 or not split
    ring = s["z"].at[ri]  # [stages, 2 (A, D), 2 (re, im), nb, rows, cw]
    planes = s["p"].at[i]  # [2 (A, D), 2 (re, im), nb, 64, cw]
    rb = pl.ds(WGMMA_M * h, WGMMA_M)
    w1 = [s["w1"].at[q, rb] for q in range(3)]  # Re, Im, -Im of F1[rb, :rows]
    twiddle = lambda cb: twiddle_block(s, cfg, h, cb, shape)

    def z_bar(slot):
      return s["z_bar"].at[ri * stages + slot]

    def fetch(j, slot):
      fetch_pair(za_ref, zd_ref, signal(j), c, ring.at[slot], z_bar(slot), nb, cw)

    if fetches:
      for j in range(min(stages, count)):
        fetch(j, j)
    plgpu.barrier_wait(s["const_bar"])

    def body(j, g):
      slot = lax.rem(j, stages) if stages > 1 else 0
      plgpu.barrier_wait(z_bar(slot))
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last dw left the D planes
      row_stage(ring.at[slot], w1, planes, twiddle, nb, shape, dtype)
      if split:
        plgpu.barrier_arrive(s["free_bar"].at[slot])
      else:
        @pl.when(j + stages < count)
        def _():
          fetch(j + stages, slot)
      # Column DFTs per output block: G += conj(Y_A) Y_D; Q = Y_D conj(K) (held in bf16
      # until the D planes are free: every block's products read all of them).
      g = list(g)
      q = []
      for cb in range(nb):
        (ya_re, ya_im), (yd_re, yd_im) = column_products(planes, s["f2"], cb, nb, shape)
        g[2 * cb], g[2 * cb + 1] = cross_spectrum_add(g[2 * cb], g[2 * cb + 1], ya_re, ya_im,
                                                      yd_re, yd_im)
        k_re, k_im = load(s["kf"].at[0, cb, rb]), load(s["kf"].at[1, cb, rb])
        q.append(tuple(x.astype(dtype) for x in cmul(yd_re, yd_im, k_re, -k_im)))
      for cb, (q_re, q_im) in enumerate(q):
        planes.at[1, 0, cb][...] = q_re
        planes.at[1, 1, cb][...] = q_im
      plgpu.commit_smem()
      if split and i == 0:
        # Warpgroup 1 has read the slot too (waited on every use, as the dk kernel).
        plgpu.barrier_wait(s["free_bar"].at[slot])

        @pl.when(j + stages < count)
        def _():
          fetch(j + stages, slot)
      # Inverse column DFT: R = (Q conj(F2)) conj(T) into the (free) A planes.
      for cb in range(nb):
        ((b_re, b_im),) = column_products(planes, s["f2"], cb, nb, shape, conjugate=True,
                                          signals=(1,))
        t_re, t_im = twiddle(cb)
        r_re, r_im = cmul(b_re, b_im, t_re, -t_im)
        planes.at[0, 0, cb][...] = r_re.astype(dtype)
        planes.at[0, 1, cb][...] = r_im.astype(dtype)
      plgpu.commit_smem()
      # Inverse row DFT, kept rows: dw = conj(F1)[:rows, :] R, output column blocks `out`.
      if split:
        plgpu.barrier_arrive(s["r_bar"])  # both warpgroups' R written
        plgpu.barrier_wait(s["r_bar"])
        terms_re, terms_im = [], []
        for hh in range(2):  # F1[:rows, rb_hh] = F1[rb_hh, :rows]^T (F1 is symmetric)
          e = [s["w1"].at[qq, pl.ds(WGMMA_M * hh, WGMMA_M)].T for qq in range(3)]
          pr, pi = s["p"].at[hh, 0, 0, h], s["p"].at[hh, 0, 1, h]
          terms_re += [(e[0], pr), (e[1], pi)]
          terms_im += [(e[0], pi), (e[2], pr)]
        groups, out = [(terms_re, terms_im)], [h]
      else:
        e = ([r.T for r in (s["w1"].at[qq] for qq in range(3))] if geo.transposed_inverse
             else [s["e1"].at[qq] for qq in range(3)])
        groups, out = [], list(range(nb))
        for cb in out:
          pr, pi = planes.at[0, 0, cb], planes.at[0, 1, cb]
          groups.append((((e[0], pr), (e[1], pi)), ((e[0], pi), (e[2], pr))))
      accs = complex_products(groups, (out_m, cw))
      if split:
        plgpu.barrier_arrive(s["o_bar"])  # both have read every R plane
        plgpu.barrier_wait(s["o_bar"])
      # The D planes (Q) are read by this warpgroup only: stage dw there.
      for cb, (o_re, o_im) in zip(out, accs):
        planes.at[1, 0, cb][...] = o_re.astype(dtype)
        planes.at[1, 1, cb][...] = o_im.astype(dtype)
      plgpu.commit_smem()
      p = signal(j)
      for cb in out:
        for part in range(2):
          plgpu.copy_smem_to_gmem(planes.at[1, part, cb].at[pl.ds(0, rows)],
                                  dw_ref.at[p, part, c, :, pl.ds(cw * cb, cw)])
      return tuple(g)

    zero = plgpu.layout_cast(jnp.zeros(shape, jnp.float32), plgpu.Layout.WGMMA)
    g = lax.fori_loop(0, count, body, (zero,) * (2 * nb))
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last dw left the D planes
    write_cross_spectrum(g, planes, g_ref, grp if split else grp * nw + i, c, h, nb, cw, dtype)

  for i in range(nw):
    pl.when(wg == i)(lambda i=i: program(i))


def conv_backward_fused_mosaic(za: jax.Array, zd: jax.Array, kf: jax.Array,
                               geo: MosaicGeometry, *, config: MosaicBwdConfig | None = None,
                               interpret: bool | plgpu.InterpretGPUParams = False
                               ) -> tuple[jax.Array, jax.Array]:
  """The correlation ``iFFT(conj(K) FFT(zd))`` and the partial cross spectra
  ``sum_p conj(FFT(za_p)) FFT(zd_p)`` of packed signals, one pass.

  Args:
    za, zd: ``[pairs, 2, channels, rows, n_2]`` bfloat16: the convolution's input
      (``a = u x``) and output cotangent (``d = dy v``), batch rows ``2p``, ``2p + 1`` as
      the real and imaginary planes of pair ``p``, the first ``rows * n_2`` time steps
      (zero beyond the input).
    kf: ``[channels, 2, n_1, n_2]`` float32 from
      :func:`kernels_pallas.fftconv.mosaic_gpu.filter_spectrum` (``FFT_n(k) / n``).
    geo: :func:`kernels_pallas.fftconv.mosaic_gpu.geometry` of the transform.
    config: launch parameters (None: :func:`default_config`).
    interpret: Pallas Mosaic GPU interpret mode (True or ``plgpu.InterpretGPUParams``).

  Returns:
    ``(dw, g)``: ``dw [pairs, 2, channels, rows, n_2]`` in ``zd.dtype``, the first
    ``rows * n_2`` steps of the circular correlation of size ``n`` of each row of ``zd``
    with its channel's filter; ``g [partials, 4, channels, n_1, n_2]`` bfloat16, the dk
    kernel's hi/lo partial cross spectra (:func:`filter_grad_from_partials`).
  """
  pairs, _, channels, rows, n_2 = zd.shape
  dtype = jnp.dtype(zd.dtype)
  cfg = config or default_config(geo.n, rows * n_2, dtype)
  if za.shape != zd.shape or za.dtype != zd.dtype:
    raise ValueError(f"conv_backward_fused_mosaic: za must match zd {zd.shape} {zd.dtype}, "
                     f"got {za.shape} {za.dtype}")
  check_packed("conv_backward_fused_mosaic", "zd", zd, geo)
  check_spectrum("conv_backward_fused_mosaic", kf, channels, geo)
  why = unsupported(geo.n, rows * n_2, dtype, cfg)
  if why:
    raise NotImplementedError(f"conv_backward_fused_mosaic: {why}")
  split, ppc, cfg = launch_split("conv_backward_fused_mosaic", pairs, geo, cfg)
  nw = cfg.compute_wgs
  consts = _blocked_constants(geo, cfg, jnp.bfloat16)
  cw = COL_WIDTH
  nb = n_2 // cw
  rings = 1 if split else nw
  cdt = jnp.dtype(cfg.const_dtype)
  sw = plgpu.find_swizzle(min(rows, cw) * _bits(dtype), "operand")
  scratch = {
      "w1": _swizzled((3, geo.n_1, rows), dtype, sw),
      "f2": _swizzled((3, nb, n_2, cw), dtype, sw),
      "tw": _swizzled(consts["tw"].shape, consts["tw"].dtype),
      "kf": _swizzled((2, nb, geo.n_1, cw), cdt),
      "z": _swizzled((rings, cfg.stages, 2, 2, nb, rows, cw), dtype, sw),
      "p": _swizzled((nw, 2, 2, nb, WGMMA_M, cw), dtype, sw),
      "z_bar": plgpu.Barrier(num_arrivals=2 * 2 * nb, num_barriers=rings * cfg.stages),
  }
  args = [za, zd, blocked_spectrum(kf).astype(cdt), jnp.asarray(consts["w1"]),
          jnp.asarray(consts["f2"]), jnp.asarray(consts["tw"])]
  copies = 3 + 3 * nb + 2 * nb + 2 * nb
  if cfg.half_twiddles:
    scratch["twc"] = plgpu.SMEM(consts["twc"].shape, jnp.float32)
    args.append(jnp.asarray(consts["twc"]))
    copies += 1
  if not geo.transposed_inverse:
    e1 = dft_constants(geo, jnp.bfloat16)["e1"]  # [3, out_m, n_1]
    scratch["e1"] = _swizzled(e1.shape, dtype, sw)
    args.append(jnp.asarray(e1))
    copies += 3
  scratch["const_bar"] = plgpu.Barrier(num_arrivals=copies)
  if split:
    scratch["free_bar"] = plgpu.Barrier(num_arrivals=2, num_barriers=cfg.stages)
    scratch["r_bar"] = plgpu.Barrier(num_arrivals=2)
    scratch["o_bar"] = plgpu.Barrier(num_arrivals=2)
  partials = (pairs // ppc) * (1 if split else nw)

  def kernel_fn(*refs):
    named = dict(zip(["za", "zd", "kf", "w1", "f2", "tw"], refs[:6]))
    rest = list(refs[6:len(args)])
    twc_ref = rest.pop(0) if cfg.half_twiddles else None
    e1_ref = rest.pop(0) if not geo.transposed_inverse else None
    dw_ref, g_ref, s_ = refs[len(args):]
    _kernel(named["za"], named["zd"], named["kf"], named["w1"], named["f2"], named["tw"],
            twc_ref, e1_ref, dw_ref, g_ref, s_, geo=geo, cfg=cfg, pairs_per_cta=ppc,
            dtype=dtype)

  return plgpu.kernel(
      kernel_fn,
      out_type=(jax.ShapeDtypeStruct(zd.shape, dtype),
                jax.ShapeDtypeStruct((partials, 4, channels, geo.n_1, n_2), dtype)),
      scratch_types=(scratch,),
      grid=(channels, pairs // ppc),
      grid_names=("channels", "groups"),
      num_threads=nw,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
      interpret=(plgpu.InterpretGPUParams() if interpret is True else interpret or None),
      kernel_name=f"fft_conv_bwd_mosaic_{geo.n}",
  )(*args)


def bwd_geometry(seq: int, filter_len: int, dtype, *, causal: bool = True,
                 config: MosaicBwdConfig | None = None
                 ) -> tuple[MosaicGeometry, MosaicBwdConfig]:
  """The geometry (the forward kernel's default view, so its filter spectrum can be
  shared) and launch parameters for these sizes. Raises NotImplementedError naming the
  reason."""
  n = fft_size(seq, filter_len, causal=causal)
  cfg = config or default_config(n, seq, dtype)
  why = unsupported(n, seq, dtype, cfg)
  if why:
    raise NotImplementedError(f"fft_conv_backward_mosaic: {why}")
  return geometry(n, seq), cfg


def fft_conv_backward_mosaic(a: jax.Array, d: jax.Array, k: jax.Array, *, causal: bool = True,
                             kf: jax.Array | None = None,
                             config: MosaicBwdConfig | None = None,
                             interpret: bool | plgpu.InterpretGPUParams = False
                             ) -> tuple[jax.Array, jax.Array]:
  """Backward of ``y = conv(k, a)`` (``jaxeff.ops.fft_conv`` semantics) for cotangent ``d``.

  Args:
    a: ``[batch, channels, seq]`` bfloat16, the convolution's input (``u * x`` when gated).
    d: ``[batch, channels, seq]`` bfloat16, its output cotangent (``dy * v`` when gated).
    k: ``[channels, filter_len]``, ``1 <= filter_len <= seq`` (only its length is used
      when ``kf`` is given).
    causal: linear causal convolution or circular of period ``seq``.
    kf: None or the forward's :func:`kernels_pallas.fftconv.mosaic_gpu.filter_spectrum`
      ``[channels, 2, n_1, n_2]`` for these sizes (shared with the forward).
    config: launch parameters (None: :func:`default_config`).
    interpret: Pallas Mosaic GPU interpret mode (True or ``plgpu.InterpretGPUParams``).

  Returns:
    ``(dw, dk)``: ``dw [batch, channels, seq]`` in ``d.dtype``, the correlation
    ``sum_j k[j] d[t + j]`` (causal: terms with ``t + j < seq``; circular: ``mod seq``);
    ``dk [channels, filter_len]`` float32, ``sum_b sum_t a[b, t] d[b, t + j]``.
  """
  if a.ndim != 3 or d.shape != a.shape:
    raise ValueError(f"fft_conv_backward_mosaic: a and d must be [batch, channels, seq] of "
                     f"one shape, got {a.shape} and {d.shape}")
  if d.dtype != a.dtype:
    raise TypeError(f"fft_conv_backward_mosaic: d.dtype must equal a.dtype {a.dtype}, got "
                    f"{d.dtype}")
  batch, channels, seq = a.shape
  if k.ndim != 2 or k.shape[0] != channels or not 1 <= k.shape[1] <= seq:
    raise ValueError(f"fft_conv_backward_mosaic: k must be [channels={channels}, filter_len "
                     f"in [1, {seq}]], got {k.shape}")
  filter_len = k.shape[1]
  geo, cfg = bwd_geometry(seq, filter_len, a.dtype, causal=causal, config=config)
  if kf is None:
    kf = filter_spectrum(k, geo)
  else:
    check_spectrum("fft_conv_backward_mosaic", kf, channels, geo,
                   hint=" (filter_spectrum for these sizes)")
  step = 1 if _row_split(geo) else cfg.compute_wgs
  pairs = -(-batch // 2)
  pairs = -(-pairs // step) * step
  packed = lambda x: pack_pairs(x, pairs, geo.rows, geo.n_2)  # noqa: E731
  dw, g = conv_backward_fused_mosaic(packed(a), packed(d), kf, geo, config=cfg,
                                     interpret=interpret)
  dw = unpack_pairs(dw, batch, seq)
  return dw, filter_grad_from_partials(g, geo, filter_len)


__all__ = ["MosaicBwdConfig", "blocked_spectrum", "bwd_geometry", "conv_backward_fused_mosaic",
           "default_config", "fft_conv_backward_mosaic", "smem_bytes", "unsupported"]
