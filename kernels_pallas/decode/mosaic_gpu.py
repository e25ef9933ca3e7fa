"""Split-KV decode attention for NVIDIA Hopper in Pallas Mosaic GPU (Lean Attention partition).

Algorithm: FlashDecoding (Dao et al., 2023) with the stream-K partition of Lean Attention
(Sanovar et al., 2024), ``common.make_plan``: a persistent grid of ``num_workers`` CTAs
(``ctas_per_sm`` per SM); CTA ``w`` owns an equal share ``[w K, (w + 1) K)`` of the KV
blocks of all (sequence, KV head) items laid end to end, so every SM reads the same
number of bytes however ragged the batch is. The share crosses item boundaries; the part
of each item it covers is a *piece* whose softmax-normalised partial output and
log-sum-exp go to slot ``item + w``; ``common.merge_partials`` combines the pieces.

Per CTA, two warpgroups:

* the *memory* warpgroup walks the CTA's blocks and TMA-copies each block's K and V (one
  copy per page of ``page_size`` rows, located through the page table; a contiguous cache
  arrives as pages with an identity table) and, for quantized caches, the per-token
  scales, into a ``num_stages``-deep shared-memory ring guarded by "loaded"/"consumed"
  mbarriers; it streams straight across piece boundaries, so the ring never drains;
* the *compute* warpgroup holds the ``q_len * group`` query rows of the current item
  (GQA: one KV head's query heads together; padded to the 64 rows of a wgmma tile) and
  runs the online softmax (log2 domain): ``S = Q K^T`` and ``O += P V`` are wgmmas. It
  prefetches the next piece's query tile while the current piece runs. Quantized tiles
  are converted in registers into a bf16/f16 tile that the wgmma reads: int8 and
  float8_e4m3fn values are exact in 16 bits and their per-token scales multiply the
  logits (K) and the probabilities (V), so the result equals the reference's
  dequantization; int4 tiles are unpacked as the two halves of head_dim (``common``) and
  multiplied by their group scale (1 or 2 groups; one bf16 rounding).

*Keys-major form* for quantized caches (``Config.keys_major``, ``_keys_major_compute``):
the compute warpgroup computes ``S^T = K Q^T`` instead, with the 64 keys of a block as the
wgmma's M dimension and the ``q_len * group`` query rows (rounded up to 8) as N, so no
query row is padded to 64 and the converted K tile goes straight into the register A
operand (no shared-memory round trip); the online softmax runs on ``S^T`` (reductions
over keys cross the 4 warps), and ``O^T += V^T P^T`` reads the converted V tile and the
transposed probabilities from shared memory. The conversions are exact and avoid the
integer-to-float units (byte permutes for int8, ``cvt`` for e4m3, bitwise nibble
extraction for int4). int8/fp8 at head_dim 64/128, int4 at head_dim 128. Blocks of 64
keys (one M tile) or 128 (two M tiles: one cross-warp reduction and one ring handshake per
128 keys; ``keys_major_wide_config``).

Why this layout: decode is bandwidth-bound (``group`` flops per byte of KV), so the 64-row
wgmma tile's wasted rows cost tensor-core time the kernel has to spare; what matters is
that every SM keeps ``num_stages`` blocks of K/V in flight at all times, which the
persistent stream-K walk and the warp-specialised ring provide.

Interpret mode (``interpret=True``): the probabilities go to the PV wgmma through shared
memory and accumulators live in scoped refs, the forms Mosaic GPU's interpreter runs;
everything else (partition, ring, barriers, page copies, dequantization) is the GPU code.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels_pallas.decode import common

ROWS = 64  # query rows per wgmma tile
INTERPRET_BLOCK_KV = 64  # interpret mode's default block (smaller tiles interpret faster)
SUPPORTED_HEAD_DIMS = (64, 128)
_MIN_PAGE = 8  # TMA copies whole 8-row tiles into the swizzled ring
# A TMA (cp.async.bulk.tensor) copy must start on a 128-byte boundary of shared memory
# (PTX ISA; not checked by the interpreter). A block of small pages lands its per-page
# float32 scale rows at offsets of page_size * 4 bytes: page size 16 faults on the GPU
# with CUDA_ERROR_MISALIGNED_ADDRESS, so quantized caches need pages of >= 32 tokens.
_TMA_SMEM_ALIGN = 128
_SCALE_BYTES = 4


@dataclasses.dataclass(frozen=True)
class Config:
  """Block sizes. ``block_kv`` tokens per pipeline step; ``num_workers`` persistent CTAs
  (None = ``ctas_per_sm`` per SM; ``interpret_workers`` in interpret mode)."""

  block_kv: int = 128
  num_stages: int = 2
  ctas_per_sm: int = 1
  num_workers: int | None = None
  interpret_workers: int = 3
  alias_output: bool = False  # the output staging reuses the dequantization buffers
  # Quantized caches only: the keys-major form (``S^T = K Q^T``, module docstring) instead
  # of the query-major one with 64 padded query rows.
  keys_major: bool = False
  # Keys-major form: load raw K/V tiles in Mosaic GPU's upcast layout (4 bytes per thread
  # and load), convert there, then relayout to the wgmma layout (one shuffle per register);
  # False: load straight in the wgmma layout (2-byte loads).
  upcast_layout: bool = True


# Whether ``default_config`` picks the keys-major form for quantized caches where it
# applies (``keys_major_supported``). Measured on H100 (B32, 32 q / 8 kv heads, S 8192,
# d 128; notes/decode.md): int8 299 us vs 459 query-major, fp8 289 vs 445, int4 304 vs 474
# (bf16 KV 424 us in the same run).
KEYS_MAJOR_BY_DEFAULT = True
KEYS_MAJOR_BLOCK_KV = 64  # keys per block: the 64-row M dimension of one wgmma
# Keys-major blocks may also span two 64-row M tiles (``keys_major_wide_config``; the op's
# default when ``KEYS_MAJOR_WIDE_BY_DEFAULT``): ``S^T [128, N]`` is one wgmma accumulator of two M tiles, so the
# per-block cross-warp max/sum reductions (their shared-memory exchange and warpgroup
# barriers), the ring's barrier waits and arrivals, the scale loads' address arithmetic
# and the loop overhead are paid once per 128 keys instead of once per 64; the PV wgmma's
# contraction grows from 64 to 128 keys.
KEYS_MAJOR_BLOCK_KVS = (64, 128)
KEYS_MAJOR_WIDE_BY_DEFAULT = False  # not timed on a GPU yet (notes/decode.md, 128-key blocks)


def keys_major_wide_config(fmt: str, **overrides) -> Config:
  """128-key blocks (two M tiles) in the keys-major form, sized for 2 CTAs per SM at
  head_dim 128: int8/fp8 2 stages (ring 2 x 32 KB, V tile 32 KB: ~108 KB per CTA), int4 3
  stages (ring 3 x 16 KB: ~92 KB)."""
  stages = 3 if fmt == "int4" else 2
  return keys_major_config(**{"block_kv": 128, "num_stages": stages, **overrides})


def default_config(head_dim: int, fmt: str) -> Config:
  """Block sizes by shared memory (227 KB per SM and CTA, ~113 KB each for 2 CTAs/SM).

  bf16 (bandwidth-bound): one CTA per SM, 128-token blocks, 2 stages: Q 2 x 64 x d
  (32 KB at d = 128), output staging 64 x d float32 (32 KB), K and V 2 x 64 KB.
  Quantized (conversion work per byte is higher): two CTAs per SM so one CTA's
  conversion and softmax overlap the other's wgmmas; the output staging aliases the
  16-bit dequantized K/V blocks (free at the end of a piece). d = 128: 64-token blocks,
  Q 32 KB + union 32 KB + 2 stages of K/V (16 KB int8/fp8, 8 KB int4) ~ 100 KB.
  """
  if fmt == "none":
    return Config(num_stages=4 if head_dim <= 64 else 2)
  if KEYS_MAJOR_BY_DEFAULT and keys_major_supported(head_dim, fmt):
    return keys_major_wide_config(fmt) if KEYS_MAJOR_WIDE_BY_DEFAULT else keys_major_config()
  stages = 3 if fmt == "int4" else 2
  if head_dim <= 64:
    return Config(block_kv=128, num_stages=stages, ctas_per_sm=2, alias_output=True)
  return Config(block_kv=64, num_stages=stages, ctas_per_sm=2, alias_output=True)


def keys_major_config(**overrides) -> Config:
  """The keys-major form's blocks: 64-key blocks (one wgmma M tile), 3 stages, 2 CTAs per
  SM (shared memory at d 128: K/V ring 3 x 16 KB int8 (8 KB int4), V tile 16 KB, query,
  probability and output tiles < 10 KB)."""
  return dataclasses.replace(
      Config(block_kv=KEYS_MAJOR_BLOCK_KV, num_stages=3, ctas_per_sm=2, keys_major=True),
      **overrides)


def keys_major_supported(head_dim: int, fmt: str) -> bool:
  """The keys-major form serves int8/fp8 at head_dim 64/128 and int4 at head_dim 128 (each
  half of head_dim is a 64-row wgmma M tile of ``O^T``)."""
  return fmt in ("int8", "fp8") or (fmt == "int4" and head_dim == 128)


def contiguous_page_size(capacity: int) -> int:
  return common.contiguous_page_size(capacity)


def supports(*, head_dim: int, dtype, fmt: str, int4_groups: int, page_size: int,
             rows: int) -> str | None:
  """None when this kernel can serve the call, else the reason."""
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return f"mosaic_gpu needs bfloat16/float16 queries, got {jnp.dtype(dtype)}"
  if head_dim not in SUPPORTED_HEAD_DIMS:
    return f"mosaic_gpu supports head_dim in {SUPPORTED_HEAD_DIMS}, got {head_dim}"
  if rows > ROWS:
    return (f"mosaic_gpu serves q_len * q_heads / kv_heads <= {ROWS} query rows per KV head, "
            f"got {rows}")
  for bk in sorted({default_config(head_dim, fmt).block_kv, INTERPRET_BLOCK_KV}):
    if page_size < _MIN_PAGE or (page_size % bk and bk % page_size):
      return (f"mosaic_gpu needs a page size (or, for a contiguous cache, the largest "
              f"power-of-two divisor of the capacity up to 256) that is >= {_MIN_PAGE} and "
              f"divides or is a multiple of {bk}, got {page_size}")
    if fmt != "none" and page_size < bk and page_size * _SCALE_BYTES % _TMA_SMEM_ALIGN:
      return (f"mosaic_gpu {fmt} caches need pages of >= {_TMA_SMEM_ALIGN // _SCALE_BYTES} "
              f"tokens (each page's scale row is one TMA copy into shared memory, which must "
              f"start on a {_TMA_SMEM_ALIGN}-byte boundary), got page size {page_size}")
  if fmt == "int4" and int4_groups not in (1, 2):
    return f"mosaic_gpu int4 needs 1 or 2 scale groups per head, got {int4_groups}"
  return None


def _tiled(shape, dtype, swizzle: int | None = None):
  """A shared-memory tile swizzled for wgmma/TMA (by default the swizzle spans one row,
  up to 128 B)."""
  if swizzle is None:
    swizzle = min(128, shape[-1] * jnp.dtype(dtype).itemsize)
  elems = swizzle // jnp.dtype(dtype).itemsize
  return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, elems)),
                                              plgpu.SwizzleTransform(swizzle)))


def _dequantize(raw, scales, dst, *, fmt: str, dtype):
  """Converts the raw ring tile ``raw [bk, dc]`` into ``dst [bk, d]`` (16-bit, shared
  memory). int8/fp8 values are exact in 16 bits and their per-token scales are applied to
  the logits and probabilities instead (``_token_scale``); int4 tiles are unpacked into the
  two halves of head_dim and multiplied by the group scale of their half,
  ``scales [groups, bk]``."""
  layout = plgpu.Layout.WGMMA
  x = plgpu.load(raw, layout=layout, optimized=True)
  if fmt != "int4":
    dst[...] = x.astype(jnp.float32).astype(dtype)
    return
  bk, dc = raw.shape
  row_layout = layout.reduce(1)

  def scaled(v, g):
    s = lax.broadcast_in_dim(plgpu.load(scales.at[g], layout=row_layout), (bk, dc), [0])
    return (v * s).astype(dtype)

  lo, hi = common.unpack_int4(x)
  dst.at[:, pl.ds(0, dc)][...] = scaled(lo.astype(jnp.float32), 0)
  dst.at[:, pl.ds(dc, dc)][...] = scaled(hi.astype(jnp.float32), scales.shape[0] - 1)


def _token_scale(scales):
  """Per-key scales ``scales [bk]`` (shared memory) in the layout of a ``[rows, bk]``
  tile's columns (broadcast with ``lax.broadcast_in_dim(..., [1])``)."""
  return plgpu.load(scales, layout=plgpu.Layout.WGMMA.reduce(0))


def _exact16(x, fmt: str, dtype):
  """A raw int8 / float8_e4m3fn register tile as ``dtype`` (16-bit), exactly: int8 -> bf16
  directly (Mosaic GPU's byte-permute conversion, no integer-to-float unit), e4m3 -> f16
  (one ``cvt`` per pair) and on to bf16 through f32 when the queries are bf16."""
  if fmt == "int8":
    return x.astype(dtype)
  h = x.astype(jnp.float16)
  return h if jnp.dtype(dtype) == jnp.dtype(jnp.float16) else h.astype(jnp.float32).astype(dtype)


def _int4_halves(x, dtype):
  """Packed int4 bytes ``x [bk, d/2]`` (uint8, offset binary, ``common``) -> the two halves
  of head_dim as exact 16-bit tiles ``(lo, hi)``, with bitwise byte operations only (Mosaic
  GPU has no 8-bit arithmetic or shifts) and the byte conversion of :func:`_exact16`:
  low nibble ``n`` is the byte ``n`` (0..15) minus 8 in 16 bits; the high nibble with its top
  bit flipped, ``(x & 0xF0) ^ 0x80``, is the signed byte ``16 (n - 8)``, scaled by 1/16."""
  if x.dtype != jnp.uint8:
    x = lax.bitcast_convert_type(x, jnp.uint8)

  def as16(byte):
    return lax.bitcast_convert_type(byte, jnp.int8).astype(dtype)

  lo = as16(x & jnp.uint8(0x0F)) - common.INT4_OFFSET
  hi = as16((x & jnp.uint8(0xF0)) ^ jnp.uint8(0x80)) * (1.0 / 16)
  return lo, hi


def _kernel(meta_ref, start_ref, seq_ref, head_ref, blk_ref, wfirst_ref, wlast_ref, len_ref,
            table_ref, q_ref, k_ref, v_ref, *refs, fmt, q_len, group, page_size, block_kv,
            stages, window, scale, soft_cap, alias_output, interpret, keys_major=False,
            upcast_layout=False):
  quant = fmt != "none"
  token_scales = fmt in ("int8", "fp8")  # applied to logits/probabilities, not tiles
  if quant:
    ks_ref, vs_ref, o_ref, lse_ref, s = refs
  else:
    ks_ref = vs_ref = None
    o_ref, lse_ref, s = refs
  kdq = vdq = None
  if keys_major:
    pass  # its buffers are named in _keys_major_compute
  elif alias_output:
    dq_group, o_group = s["dq_o"]
    kdq, vdq, o_stage = dq_group["kdq"], dq_group["vdq"], o_group["o"]
  else:
    o_stage = s["o"]
    if quant:
      kdq, vdq = s["kdq"], s["vdq"]
  bk = block_kv
  d = q_ref.shape[-1]
  dtype = q_ref.dtype
  out_rows = o_ref.shape[1]
  ppb, rpp = common.block_pages(page_size, bk)
  n_scale_groups = ks_ref.shape[1] if quant else 0
  layout = plgpu.Layout.WGMMA
  row_layout = layout.reduce(1)
  w = lax.axis_index("workers")
  wg = lax.axis_index("wg")
  lo, hi = common.worker_range(meta_ref[0], meta_ref[1], w)
  i_first, i_last = wfirst_ref[w], wlast_ref[w]
  n_steps = jnp.maximum(hi - lo, 0)

  def piece(i):
    """Blocks ``[p0, p1)`` of item ``i`` in this worker's share, its sequence and head."""
    p0 = jnp.maximum(lo, start_ref[i])
    p1 = jnp.minimum(hi, start_ref[i + 1])
    return p0, p1, seq_ref[i], head_ref[i]

  def first_token(i, p):
    return (blk_ref[i] + p - start_ref[i]) * bk

  def _compute_keys_major():
    _keys_major_compute(
        s, q_ref, o_ref, lse_ref, piece=piece, first_token=first_token, lo=lo,
        i_first=i_first, i_last=i_last, w=w, len_ref=len_ref, fmt=fmt, q_len=q_len,
        group=group, block_kv=bk, stages=stages, window=window, scale=scale,
        soft_cap=soft_cap, interpret=interpret, upcast_layout=upcast_layout)

  def _compute():
    def load_q(i, qslot):
      _, _, b, h = piece(i)
      plgpu.copy_gmem_to_smem(q_ref.at[b, h], s["q"].at[qslot], s["q_bar"].at[qslot])

    @pl.when(i_last >= i_first)
    def _():
      load_q(i_first, 0)

    def piece_body(j, _):
      i = i_first + j
      qslot = lax.rem(j, 2)
      p0, p1, b, h = piece(i)
      length = len_ref[b]
      plgpu.barrier_wait(s["q_bar"].at[qslot])
      if alias_output:  # the previous piece's output store still reads the union
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

      @pl.when(i < i_last)
      def _():
        load_q(i + 1, 1 - qslot)

      q_smem = s["q"].at[qslot]
      q_pos = length - q_len + _query_token(
          plgpu.broadcasted_iota(jnp.int32, (ROWS, bk), 0, layout=layout), q_len, group)

      def step(p, carry):
        acc, m_i, l_i = carry
        slot = lax.rem(p - lo, stages)
        tok0 = first_token(i, p)
        plgpu.barrier_wait(s["k_bar"].at[slot])
        if token_scales:  # read before k_cons releases the slot to the producer
          k_scale = _token_scale(s["ks"].at[slot, 0])
        if quant:
          _dequantize(s["k"].at[slot], s["ks"].at[slot], kdq, fmt=fmt, dtype=dtype)
          plgpu.commit_smem()
          plgpu.barrier_arrive(s["k_cons"].at[slot])
          k_tile = kdq
        else:
          k_tile = s["k"].at[slot]

        def compute_qk(acc_ref):
          plgpu.wgmma(acc_ref, q_smem, k_tile.transpose((1, 0)))
          return acc_ref[...]

        qk = pl.run_scoped(compute_qk, plgpu.ACC((ROWS, bk), jnp.float32))
        if token_scales:
          qk = qk * lax.broadcast_in_dim(k_scale, (ROWS, bk), [1])
        if not quant:
          plgpu.barrier_arrive(s["k_cons"].at[slot])
        if soft_cap is None:
          x = qk * (scale * common.LOG2E)
        else:
          x = jnp.tanh(qk * (scale / soft_cap)) * (soft_cap * common.LOG2E)
        kv_pos = plgpu.broadcasted_iota(jnp.int32, (ROWS, bk), 1, layout=layout) + tok0
        x = jnp.where(common.allowed(q_pos, kv_pos, length, window), x, -jnp.inf)
        m_new = jnp.maximum(m_i, x.max(axis=1))
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows with nothing allowed yet
        alpha = jnp.exp2(m_i - m_use)
        prob = jnp.exp2(x - lax.broadcast_in_dim(m_use, (ROWS, bk), [0]))
        l_i = l_i * alpha + prob.sum(axis=1)
        acc = acc * lax.broadcast_in_dim(alpha, (ROWS, d), [0])
        plgpu.barrier_wait(s["v_bar"].at[slot])
        if token_scales:  # read before v_cons releases the slot (below)
          prob = prob * lax.broadcast_in_dim(_token_scale(s["vs"].at[slot, 0]), (ROWS, bk), [1])
        p16 = prob.astype(dtype)
        if quant:
          _dequantize(s["v"].at[slot], s["vs"].at[slot], vdq, fmt=fmt, dtype=dtype)
          plgpu.commit_smem()
          plgpu.barrier_arrive(s["v_cons"].at[slot])
          v_tile = vdq
        else:
          v_tile = s["v"].at[slot]
        if interpret:
          s["p"][...] = p16
          plgpu.commit_smem()

          def compute_pv(acc_ref):
            plgpu.wgmma(acc_ref, s["p"], v_tile)
            return acc_ref[...]

          acc = acc + pl.run_scoped(compute_pv, plgpu.ACC((ROWS, d), jnp.float32))
        else:
          def compute_pv(acc_ref):
            plgpu.wgmma(acc_ref, p16, v_tile)

          acc = pl.run_state(compute_pv)(plgpu.ACC.init(acc))
        if not quant:
          plgpu.barrier_arrive(s["v_cons"].at[slot])
        return acc, m_new, l_i

      carry = (plgpu.layout_cast(jnp.full((ROWS, d), 0.0, jnp.float32), layout),
               plgpu.layout_cast(jnp.full((ROWS,), -jnp.inf, jnp.float32), row_layout),
               plgpu.layout_cast(jnp.full((ROWS,), 0.0, jnp.float32), row_layout))
      acc, m_i, l_i = lax.fori_loop(p0, p1, step, carry)

      # The piece's partial result: normalised output and log-sum-exp, to slot i + w.
      empty = l_i == 0.0
      l_safe = jnp.where(empty, 1.0, l_i)
      out = acc * lax.broadcast_in_dim(1.0 / l_safe, (ROWS, d), [0])
      lse = jnp.where(empty, -jnp.inf, (m_i + jnp.log2(l_safe)) * common.LN2)
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous piece's stores
      o_stage[...] = out
      s["lse"][...] = lse
      plgpu.commit_smem()
      slot_id = i + w
      plgpu.copy_smem_to_gmem(o_stage.at[pl.ds(0, out_rows)], o_ref.at[slot_id],
                              commit_group=False)
      plgpu.copy_smem_to_gmem(s["lse"].at[pl.ds(0, out_rows)], lse_ref.at[slot_id],
                              commit_group=False)
      plgpu.commit_smem_to_gmem_group()
      return 0

    lax.fori_loop(0, jnp.maximum(i_last - i_first + 1, 0), piece_body, 0)
    plgpu.wait_smem_to_gmem(0)

  pl.when(wg == 0)(_compute_keys_major if keys_major else _compute)

  @pl.when(wg == 1)
  def _memory():
    def issue(i, p, slot, wait):
      _, _, b, h = piece(i)
      tok0 = first_token(i, p)
      row0 = lax.rem(tok0, page_size) if ppb == 1 else 0
      pages = [table_ref[b, lax.div(tok0, page_size) + c] for c in range(ppb)]
      for name, src, s_src in (("k", k_ref, ks_ref), ("v", v_ref, vs_ref)):
        if wait:
          plgpu.barrier_wait(s[f"{name}_cons"].at[slot])
        bar = s[f"{name}_bar"].at[slot]
        for c, page in enumerate(pages):
          rows = pl.ds(c * rpp, rpp)
          plgpu.copy_gmem_to_smem(src.at[page, pl.ds(row0, rpp), h],
                                  s[name].at[slot, rows], bar)
          for g in range(n_scale_groups):
            plgpu.copy_gmem_to_smem(s_src.at[h, g, pl.ds(page * page_size + row0, rpp)],
                                    s[f"{name}s"].at[slot, g, rows], bar)

    def piece_body(j, _):
      i = i_first + j
      p0, p1, _, _ = piece(i)

      @pl.loop(p0, p1)
      def _(p):
        step_idx = p - lo
        slot = lax.rem(step_idx, stages)

        @pl.when(step_idx < stages)
        def _():
          issue(i, p, slot, False)

        @pl.when(step_idx >= stages)
        def _():
          issue(i, p, slot, True)

      return 0

    lax.fori_loop(0, jnp.maximum(i_last - i_first + 1, 0), piece_body, 0)

    # Observe the last consumptions too, so every barrier phase is waited on.
    @pl.loop(jnp.maximum(n_steps - stages, 0), n_steps)
    def _(t):
      plgpu.barrier_wait(s["k_cons"].at[lax.rem(t, stages)])
      plgpu.barrier_wait(s["v_cons"].at[lax.rem(t, stages)])


def _keys_major_compute(s, q_ref, o_ref, lse_ref, *, piece, first_token, lo, i_first, i_last,
                        w, len_ref, fmt, q_len, group, block_kv, stages, window, scale,
                        soft_cap, interpret, upcast_layout):
  """The compute warpgroup in the keys-major form (quantized caches).

  Per block of ``bk`` = 64 or 128 keys (one or two M tiles): ``S^T [bk, N] = K Q^T`` with
  the converted K tile as the wgmma's register A operand (M = the block's keys; N = the
  ``q_len * group`` query rows rounded up to 8, so nothing is padded to 64) and the query
  tile as the shared-memory B operand;
  the online softmax runs on ``S^T`` (per-query max and sum are reductions over axis 0,
  across the 4 warps); ``O^T [d, N] += V^T P^T`` with the converted V tile (shared memory,
  transposed A) and ``P^T`` (shared memory, transposed B). Per-token K/V scales multiply
  the rows of ``S^T`` and ``P^T`` (int4: per half of head_dim, so each half has its own
  logits accumulator and probability tile). Invariant after each block: ``acc = O^T``
  unnormalised, ``m_i`` the running max (log2 units), ``l_i`` the running sum, per query
  column.
  """
  bk = block_kv
  layout = plgpu.Layout.WGMMA
  key_layout = layout.reduce(1)  # [bk] vectors along S^T's rows
  col_layout = layout.reduce(0)  # [N] vectors along S^T's columns
  _, n_rows, d = s["q"].shape
  dtype = s["q"].dtype
  int4 = fmt == "int4"
  groups = s["ks"].shape[1]
  # Column ranges of head_dim that share one K/V scale group: int4 splits at d/2.
  parts = [(0, d // 2), (d // 2, d // 2)] if int4 else [(0, d)]
  part_group = [min(j, groups - 1) for j in range(len(parts))]
  n_probs = s["p"].shape[0]

  def load_q(i, qslot):
    _, _, b, h = piece(i)
    plgpu.copy_gmem_to_smem(q_ref.at[b, h], s["q"].at[qslot], s["q_bar"].at[qslot])

  @pl.when(i_last >= i_first)
  def _():
    load_q(i_first, 0)

  def piece_body(j, _):
    i = i_first + j
    qslot = lax.rem(j, 2)
    p0, p1, b, h = piece(i)
    length = len_ref[b]
    plgpu.barrier_wait(s["q_bar"].at[qslot])

    @pl.when(i < i_last)
    def _():
      load_q(i + 1, 1 - qslot)

    q_smem = s["q"].at[qslot]
    q_pos = length - q_len + _query_token(
        plgpu.broadcasted_iota(jnp.int32, (bk, n_rows), 1, layout=layout), q_len, group)

    def key_scales(name, slot):
      return [plgpu.load(s[name].at[slot, g], layout=key_layout) for g in range(groups)]

    def converted(raw_ref, relayout: bool):
      """The slot's raw tile as exact 16-bit tiles, one per part of head_dim; in the wgmma
      layout with ``relayout`` (register operands), else as loaded (for a shared store)."""
      load_layout = plgpu.Layout.WGMMA_UPCAST_2X if upcast_layout else layout
      x = plgpu.load(raw_ref, layout=load_layout, optimized=True)
      tiles = list(_int4_halves(x, dtype)) if int4 else [_exact16(x, fmt, dtype)]
      if upcast_layout and relayout:
        tiles = [plgpu.layout_cast(t, layout) for t in tiles]
      return tiles

    def step(p, carry):
      accs, m_i, l_i = carry
      slot = lax.rem(p - lo, stages)
      tok0 = first_token(i, p)
      plgpu.barrier_wait(s["k_bar"].at[slot])
      k_sc = key_scales("ks", slot)
      k_tiles = converted(s["k"].at[slot], relayout=True)
      if interpret:  # the interpreter takes wgmma operands from shared memory only
        for (c0, width), t in zip(parts, k_tiles):
          s["kdq"].at[:, pl.ds(c0, width)][...] = t
        plgpu.commit_smem()
        k_tiles = [s["kdq"].at[:, pl.ds(c0, width)] for c0, width in parts]
      plgpu.barrier_arrive(s["k_cons"].at[slot])  # the slot's K and scales are read

      def compute_qk(*acc_refs):
        for j, ((c0, width), t) in enumerate(zip(parts, k_tiles)):
          acc_ref = acc_refs[part_group[j]]
          plgpu.wgmma(acc_ref, t, q_smem.at[:, pl.ds(c0, width)].transpose((1, 0)))
        return tuple(a[...] for a in acc_refs)

      qk_g = pl.run_scoped(compute_qk, *[plgpu.ACC((bk, n_rows), jnp.float32)
                                         for _ in range(groups)])
      qk = None
      for g in range(groups):
        term = qk_g[g] * lax.broadcast_in_dim(k_sc[g], (bk, n_rows), [0])
        qk = term if qk is None else qk + term
      if soft_cap is None:
        x = qk * (scale * common.LOG2E)
      else:
        x = jnp.tanh(qk * (scale / soft_cap)) * (soft_cap * common.LOG2E)
      kv_pos = plgpu.broadcasted_iota(jnp.int32, (bk, n_rows), 0, layout=layout) + tok0
      x = jnp.where(common.allowed(q_pos, kv_pos, length, window), x, -jnp.inf)
      m_new = jnp.maximum(m_i, x.max(axis=0))
      m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # columns with nothing allowed yet
      alpha = jnp.exp2(m_i - m_use)
      prob = jnp.exp2(x - lax.broadcast_in_dim(m_use, (bk, n_rows), [1]))
      l_i = l_i * alpha + prob.sum(axis=0)
      accs = tuple(a * lax.broadcast_in_dim(alpha, a.shape, [1]) for a in accs)

      plgpu.barrier_wait(s["v_bar"].at[slot])
      v_sc = key_scales("vs", slot)
      v_tiles = converted(s["v"].at[slot], relayout=False)
      for (c0, width), t in zip(parts, v_tiles):
        s["vdq"].at[:, pl.ds(c0, width)][...] = t
      for g in range(n_probs):
        p_g = prob * lax.broadcast_in_dim(v_sc[g], (bk, n_rows), [0])
        s["p"].at[g].transpose((1, 0))[...] = p_g.astype(dtype)
      plgpu.commit_smem()
      plgpu.barrier_arrive(s["v_cons"].at[slot])

      new_accs = []
      for j, (c0, width) in enumerate(parts):
        def pv(acc_ref, c0=c0, width=width, g=part_group[j]):
          # O^T [width, N] += V^T [width, bk] P^T [bk, N] (the refs are sliced in here:
          # run_state cannot close over statically indexed refs).
          plgpu.wgmma(acc_ref, s["vdq"].at[:, pl.ds(c0, width)].transpose((1, 0)),
                      s["p"].at[g].transpose((1, 0)))

        if interpret:
          def compute_pv(acc_ref, pv=pv):
            pv(acc_ref)
            return acc_ref[...]

          new_accs.append(accs[j] + pl.run_scoped(
              compute_pv, plgpu.ACC((width, n_rows), jnp.float32)))
        else:
          new_accs.append(pl.run_state(pv)(plgpu.ACC.init(accs[j])))
      return tuple(new_accs), m_new, l_i

    carry = (tuple(plgpu.layout_cast(jnp.full((width, n_rows), 0.0, jnp.float32), layout)
                   for _, width in parts),
             plgpu.layout_cast(jnp.full((n_rows,), -jnp.inf, jnp.float32), col_layout),
             plgpu.layout_cast(jnp.full((n_rows,), 0.0, jnp.float32), col_layout))
    accs, m_i, l_i = lax.fori_loop(p0, p1, step, carry)

    # The piece's partial result (O^T normalised, and the lse) to slot i + w.
    empty = l_i == 0.0
    l_safe = jnp.where(empty, 1.0, l_i)
    inv = 1.0 / l_safe
    lse = jnp.where(empty, -jnp.inf, (m_i + jnp.log2(l_safe)) * common.LN2)
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous piece's stores
    for (c0, width), a in zip(parts, accs):
      s["o"].at[pl.ds(c0, width)][...] = a * lax.broadcast_in_dim(inv, a.shape, [1])
    s["lse"][...] = lse
    plgpu.commit_smem()
    slot_id = i + w
    plgpu.copy_smem_to_gmem(s["o"], o_ref.at[slot_id], commit_group=False)
    plgpu.copy_smem_to_gmem(s["lse"], lse_ref.at[slot_id], commit_group=False)
    plgpu.commit_smem_to_gmem_group()
    return 0

  lax.fori_loop(0, jnp.maximum(i_last - i_first + 1, 0), piece_body, 0)
  plgpu.wait_smem_to_gmem(0)


def _query_token(row, q_len: int, group: int):
  """Query token ``row // group`` of each row, by comparisons (``q_len`` is small)."""
  t = jnp.zeros_like(row)
  for k in range(1, q_len):
    t = t + jnp.where(row >= k * group, 1, 0)
  return t


def _num_workers(cfg: Config, interpret: bool) -> int:
  return common.worker_count(cfg.num_workers, cfg.interpret_workers, cfg.ctas_per_sm, interpret)


def head_major_scales(scale: jax.Array) -> jax.Array:
  """``[num_pages, page_size, kv_heads(, groups)]`` -> ``[kv_heads, groups, num_pages *
  page_size]``: one contiguous row per (head, group), which TMA can copy per page."""
  p, ps, kh = scale.shape[:3]
  s = scale.reshape(p * ps, kh, -1)
  return jnp.transpose(s, (1, 2, 0))


def decode_attention(query, k_pages, v_pages, page_table, lengths, k_scale=None, v_scale=None,
                     *, fmt: str, window: tuple[int, int] | None, scale: float,
                     soft_cap: float | None, config: Config | None = None,
                     interpret: bool = False, plan: common.Plan | None = None):
  """Split-KV decode attention over a paged cache (see ``triton.decode_attention``).

  Returns ``(out [batch, q_len, q_heads, head_dim], lse [batch, q_heads, q_len])``.
  """
  b, t, n, d = query.shape
  num_pages, page_size, kv_heads = k_pages.shape[:3]
  cfg = config or default_config(d, fmt)
  if interpret and config is None:
    cfg = dataclasses.replace(cfg, block_kv=INTERPRET_BLOCK_KV)  # same code, faster on CPU
  group = n // kv_heads
  bk, stages = cfg.block_kv, cfg.num_stages
  ppb, rpp = common.block_pages(page_size, bk)
  capacity = page_table.shape[1] * page_size
  dtype = query.dtype
  out_rows = common.round_up(t * group, 8)
  if plan is None:  # a caller may pass one built ahead (same block_kv and workers)
    plan = common.make_plan(lengths, kv_heads=kv_heads, q_len=t, block_kv=bk,
                            capacity=capacity, window=window,
                            num_workers=_num_workers(cfg, interpret))
  table = common.padded_page_table(page_table, num_pages, ppb)
  keys_major = cfg.keys_major and fmt != "none"
  if keys_major and (not keys_major_supported(d, fmt) or bk not in KEYS_MAJOR_BLOCK_KVS):
    raise ValueError(f"the keys-major form serves int8/fp8 (head_dim 64/128) and int4 "
                     f"(head_dim 128) with block_kv in {KEYS_MAJOR_BLOCK_KVS}; got fmt "
                     f"{fmt!r}, head_dim {d}, block_kv {bk}")
  q_rows = common.query_rows(query, kv_heads, out_rows if keys_major else ROWS)
  meta = jnp.stack([plan.blocks_per_worker, plan.total]).astype(jnp.int32)
  args = [meta, plan.item_start, plan.item_seq, plan.item_head, plan.item_block,
          plan.worker_item, plan.worker_last, jnp.clip(lengths, 0, capacity), table, q_rows,
          k_pages, v_pages]
  dc = k_pages.shape[-1]
  if keys_major:
    ks, vs = head_major_scales(k_scale), head_major_scales(v_scale)
    args += [ks, vs]
    return _keys_major_call(args, plan, cfg, ks.shape[1], fmt=fmt, q_len=t, group=group,
                            batch=b, kv_heads=kv_heads, head_dim=d, rows=out_rows,
                            raw_dtypes=(k_pages.dtype, v_pages.dtype), dc=dc, dtype=dtype,
                            page_size=page_size, window=window, scale=scale,
                            soft_cap=soft_cap, interpret=interpret)
  # Every 16-bit wgmma operand shares one swizzle; int4 writes the dequantized halves of
  # head_dim as separate column ranges, so the swizzle spans half a row then.
  swz = min(128, (d // 2 if fmt == "int4" else d) * jnp.dtype(dtype).itemsize)
  scratch = {
      "q": _tiled((2, ROWS, d), dtype, swz),
      "k": _tiled((stages, bk, dc), k_pages.dtype),
      "v": _tiled((stages, bk, dc), v_pages.dtype),
      "lse": plgpu.SMEM((ROWS,), jnp.float32),
      "q_bar": plgpu.Barrier(num_barriers=2),
  }
  o_stage = _tiled((ROWS, d), jnp.float32)
  copies = ppb
  alias = cfg.alias_output and fmt != "none"
  if fmt != "none":
    ks, vs = head_major_scales(k_scale), head_major_scales(v_scale)
    groups = ks.shape[1]
    args += [ks, vs]
    copies = ppb * (1 + groups)
    scratch.update(ks=plgpu.SMEM((stages, groups, bk), jnp.float32),
                   vs=plgpu.SMEM((stages, groups, bk), jnp.float32))
    dq = {"kdq": _tiled((bk, d), dtype, swz), "vdq": _tiled((bk, d), dtype, swz)}
    if alias:
      scratch["dq_o"] = plgpu.RefUnion(dq, {"o": o_stage})
    else:
      scratch.update(dq)
  if not alias:
    scratch["o"] = o_stage
  scratch.update(
      k_bar=plgpu.Barrier(num_arrivals=copies, num_barriers=stages),
      v_bar=plgpu.Barrier(num_arrivals=copies, num_barriers=stages),
      k_cons=plgpu.Barrier(num_barriers=stages),
      v_cons=plgpu.Barrier(num_barriers=stages))
  if interpret:
    scratch["p"] = _tiled((ROWS, bk), dtype, swz)
  kernel = functools.partial(
      _kernel, fmt=fmt, q_len=t, group=group, page_size=page_size, block_kv=bk,
      stages=stages, window=window, scale=scale, soft_cap=soft_cap, alias_output=alias,
      interpret=interpret)
  slots = plan.num_slots
  o_part, lse_part = plgpu.kernel(
      kernel,
      out_type=(jax.ShapeDtypeStruct((slots, out_rows, d), jnp.float32),
                jax.ShapeDtypeStruct((slots, out_rows), jnp.float32)),
      scratch_types=(scratch,),
      grid=(plan.num_workers,),
      grid_names=("workers",),
      num_threads=2,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=plgpu.InterpretGPUParams() if interpret else None,
  )(*args)
  o_items, lse_items = common.merge_partials(o_part, lse_part, plan)
  o, lse = common.scatter_items(o_items, lse_items, plan, b, kv_heads)
  return common.rows_to_output(o, lse, q_len=t, group=group, dtype=dtype)


def _keys_major_call(args, plan, cfg: Config, groups: int, *, fmt, q_len, group, batch,
                     kv_heads, head_dim, rows, raw_dtypes, dc, dtype, page_size, window,
                     scale, soft_cap, interpret):
  """The keys-major kernel launch: its shared memory, ``O^T`` partials, and the merge."""
  bk, stages, d = cfg.block_kv, cfg.num_stages, head_dim
  ppb, _ = common.block_pages(page_size, bk)
  int4 = fmt == "int4"
  swz = min(128, (d // 2 if int4 else d) * jnp.dtype(dtype).itemsize)
  o_swz = next(sw for sw in (128, 64, 32) if rows % (sw // 4) == 0)
  n_probs = groups if int4 else 1
  scratch = {
      "q": _tiled((2, rows, d), dtype, swz),
      "k": _tiled((stages, bk, dc), raw_dtypes[0]),
      "v": _tiled((stages, bk, dc), raw_dtypes[1]),
      "ks": plgpu.SMEM((stages, groups, bk), jnp.float32),
      "vs": plgpu.SMEM((stages, groups, bk), jnp.float32),
      "vdq": _tiled((bk, d), dtype, swz),
      "p": _tiled((n_probs, rows, bk), dtype),
      "o": _tiled((d, rows), jnp.float32, o_swz),
      "lse": plgpu.SMEM((rows,), jnp.float32),
      "q_bar": plgpu.Barrier(num_barriers=2),
      "k_bar": plgpu.Barrier(num_arrivals=ppb * (1 + groups), num_barriers=stages),
      "v_bar": plgpu.Barrier(num_arrivals=ppb * (1 + groups), num_barriers=stages),
      "k_cons": plgpu.Barrier(num_barriers=stages),
      "v_cons": plgpu.Barrier(num_barriers=stages),
  }
  if interpret:
    scratch["kdq"] = _tiled((bk, d), dtype, swz)
  kernel = functools.partial(
      _kernel, fmt=fmt, q_len=q_len, group=group, page_size=page_size, block_kv=bk,
      stages=stages, window=window, scale=scale, soft_cap=soft_cap, alias_output=False,
      interpret=interpret, keys_major=True, upcast_layout=cfg.upcast_layout)
  slots = plan.num_slots
  o_part_t, lse_part = plgpu.kernel(
      kernel,
      out_type=(jax.ShapeDtypeStruct((slots, d, rows), jnp.float32),
                jax.ShapeDtypeStruct((slots, rows), jnp.float32)),
      scratch_types=(scratch,),
      grid=(plan.num_workers,),
      grid_names=("workers",),
      num_threads=2,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=plgpu.InterpretGPUParams() if interpret else None,
  )(*args)
  o_part = jnp.swapaxes(o_part_t, 1, 2)  # [slots, rows, d] (small: rows <= 64)
  o_items, lse_items = common.merge_partials(o_part, lse_part, plan)
  o, lse = common.scatter_items(o_items, lse_items, plan, batch, kv_heads)
  return common.rows_to_output(o, lse, q_len=q_len, group=group, dtype=dtype)


# ------------------------------------------------------------------------- self-check


def self_check(fmt: str, seed: int = 0, config: Config | None = None, q_heads: int = 8) -> float:
  """Runs the kernel on a small paged cache of format ``fmt`` (several CTAs, pieces that
  cross items, lengths 0, 1 and the capacity; 2 KV heads) on the current device with
  ``config`` (default: ``default_config`` on 7 workers); returns the relative error against
  a float32 jnp computation (inf when the output is not finite)."""
  b, n, kh, d, ps, per_seq = 5, q_heads, 2, 128, 32, 12
  keys = jax.random.split(jax.random.key(seed), 5)
  q = jax.random.normal(keys[0], (b, 1, n, d), jnp.float32).astype(jnp.bfloat16)
  k = jax.random.normal(keys[1], (b, per_seq * ps, kh, d), jnp.float32)
  v = jax.random.normal(keys[2], (b, per_seq * ps, kh, d), jnp.float32)
  lengths = jnp.array([per_seq * ps, 1, 200, 0, 77], jnp.int32)
  table = jax.random.permutation(keys[3], b * per_seq).reshape(b, per_seq).astype(jnp.int32)
  if fmt == "none":
    kq, vq, ks, vs = k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), None, None
  else:
    kq, ks = common.quantize(k, fmt)
    vq, vs = common.quantize(v, fmt)

  def pages(x):
    if x is None:
      return None
    flat = x.reshape(b * per_seq, ps, *x.shape[2:])
    return jnp.zeros_like(flat).at[table.reshape(-1)].set(flat)

  cfg = dataclasses.replace(config or default_config(d, fmt), num_workers=7)
  fn = jax.jit(lambda *a: decode_attention(*a, fmt=fmt, window=None, scale=d ** -0.5,
                                           soft_cap=None, config=cfg))
  out, _ = fn(q, pages(kq), pages(vq), table, lengths, pages(ks), pages(vs))
  kd, vd = common.dequantize(kq, ks, fmt), common.dequantize(vq, vs, fmt)
  qf = q[:, 0].astype(jnp.float32).reshape(b, kh, n // kh, d)
  logits = jnp.einsum("bkgd,bskd->bkgs", qf, kd) * d ** -0.5
  valid = (jnp.arange(kd.shape[1])[None, :] < lengths[:, None])[:, None, None]
  logits = jnp.where(valid, logits, -jnp.inf)
  m = jnp.max(logits, -1, keepdims=True)
  p = jnp.where(valid, jnp.exp(logits - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
  ref = jnp.einsum("bkgs,bskd->bkgd", p / jnp.maximum(p.sum(-1, keepdims=True), 1e-30), vd)
  out = out.astype(jnp.float32).reshape(ref.shape[0], kh, n // kh, d)
  if not bool(jnp.isfinite(out).all()):
    return float("inf")
  return float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))


CHECK_FORMATS = ("none", "int8", "fp8", "int4")
CHECK_TOLERANCE = 2e-2


def main(argv=None) -> int:
  """``python -m kernels_pallas.decode.mosaic_gpu --check``: runs :func:`self_check` for
  every cache format, printing ``check <fmt> ok|FAIL <error>`` as each finishes; exit 0
  when all pass."""
  import sys
  argv = sys.argv[1:] if argv is None else argv
  if argv != ["--check"]:
    print("usage: python -m kernels_pallas.decode.mosaic_gpu --check")
    return 2
  failed = False
  for fmt in CHECK_FORMATS:
    try:
      err = self_check(fmt)
      ok = err < CHECK_TOLERANCE
      print(f"check {fmt} {'ok' if ok else 'FAIL'} relative error {err:.3e}", flush=True)
    except Exception as e:  # report and go on with the other formats
      ok = False
      msg = str(e).splitlines()[0][:300] if str(e) else ""
      print(f"check {fmt} FAIL {type(e).__name__}: {msg}", flush=True)
    failed |= not ok
  return 1 if failed else 0


CANARY_CACHE_ENV = "DECODE_MOSAIC_CANARY_FILE"


@functools.cache
def canary(timeout_s: float = 150.0) -> dict[str, str | None]:
  """Runs :func:`main` ``--check`` in a subprocess (a hang or crash cannot take the
  caller with it). Returns, per cache format, None when its check passed, else the reason.
  Cached per process, and across processes of one device session when the environment
  variable ``DECODE_MOSAIC_CANARY_FILE`` names a JSON file (read if present, else
  written): the tests and the bench suite then compile the self-check once."""
  import json
  import os
  cache_file = os.environ.get(CANARY_CACHE_ENV)
  if cache_file and os.path.exists(cache_file):
    with open(cache_file) as f:
      return json.load(f)
  result = _run_canary(timeout_s)
  if cache_file:
    with open(cache_file, "w") as f:
      json.dump(result, f)
  return result


def _run_canary(timeout_s: float) -> dict[str, str | None]:
  import os
  import subprocess
  import sys
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
  cmd = [sys.executable, "-m", "kernels_pallas.decode.mosaic_gpu", "--check"]
  try:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env,
                         cwd=root)
    out, tail = res.stdout, (res.stdout + res.stderr).strip().splitlines()[-8:]
    why_missing = "the self-check process ended early: " + " | ".join(tail)
  except subprocess.TimeoutExpired as e:
    out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
    why_missing = f"the self-check did not finish within {timeout_s:.0f} s (a hang?)"
  result = {}
  for fmt in CHECK_FORMATS:
    line = next((l for l in out.splitlines() if l.startswith(f"check {fmt} ")), None)
    if line is None:
      result[fmt] = why_missing
    elif " ok " in line:
      result[fmt] = None
    else:
      result[fmt] = "the Mosaic GPU decode self-check failed: " + line
  return result


if __name__ == "__main__":
  raise SystemExit(main())
