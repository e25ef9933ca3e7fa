"""Portable split-KV decode attention in Pallas' Triton lowering (any CUDA GPU, CPU interpret).

Algorithm: FlashDecoding (Dao et al., 2023) with the Lean Attention / stream-K partition
of ``common.make_plan``: a persistent grid of ``num_workers`` programs; program ``w``
walks its equal share of all KV blocks of all (sequence, KV head) items, one *piece*
(the part of one item inside the share) at a time: an inner loop runs the online softmax
(log2 domain) over the piece's blocks, then the piece's normalised partial output and
log-sum-exp go to slot ``item + w``. The inner loop's K/V addresses depend only on its
induction variable, so Triton software-pipelines the loads ``num_stages`` deep.
``common.merge_partials`` combines the pieces. The ``q_len * group`` query rows of one KV
head form one tile (GQA: K/V are read once per KV head), zero-padded to a power of two
>= 16 (Triton's smallest dot).

K/V are read page by page: a block of ``block_kv`` tokens gathers ``block_kv / page_size``
pages through the page table (or a ``block_kv`` slice of one page when pages are larger);
a contiguous cache arrives viewed as pages with an identity table. Quantized caches are
converted to the query dtype in registers (exact) and their per-token scales multiply the
logits (K) and the probabilities (V); int4 tiles are unpacked as the two halves of
head_dim (``common`` explains the packing), per group of head_dim columns, so group
scales stay per-token scalars of each partial dot.

On Hopper the Mosaic GPU kernel (``mosaic_gpu.py``) is the fast path; this one serves
other GPUs, shapes the Mosaic kernel does not (any power-of-two head_dim and page size,
float32 queries), and is the interpretable reference implementation of the partition.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kernels_pallas.decode import common

_MIN_DOT = 16  # Triton's smallest dot dimension


@dataclasses.dataclass(frozen=True)
class Config:
  """Block sizes and launch parameters.

  ``num_workers``: persistent programs; None = ``programs_per_sm`` per SM on a GPU
  (``interpret_workers`` in interpret mode).
  """

  block_kv: int = 64
  num_workers: int | None = None
  programs_per_sm: int = 4
  interpret_workers: int = 3
  num_warps: int = 4
  num_stages: int = 2


def contiguous_page_size(capacity: int) -> int:
  return common.contiguous_page_size(capacity)


def _is_pow2(x: int) -> bool:
  return x >= 1 and x & (x - 1) == 0


def supports(*, head_dim: int, dtype, fmt: str, int4_groups: int, page_size: int,
             rows: int) -> str | None:
  """None when this kernel can serve the call, else the reason."""
  del dtype, rows
  if not _is_pow2(head_dim) or head_dim < _MIN_DOT:
    return f"triton needs a power-of-two head_dim >= {_MIN_DOT}, got {head_dim}"
  if not _is_pow2(page_size):
    return f"triton needs a power-of-two page size, got {page_size}"
  if fmt == "int4":
    width = _int4_width(head_dim, int4_groups)
    if width < _MIN_DOT or not _is_pow2(width):
      return (f"triton int4 needs head_dim / max(groups, 2) to be a power of two >= "
              f"{_MIN_DOT}, got head_dim {head_dim} with {int4_groups} groups")
  return None


def _int4_width(head_dim: int, groups: int) -> int:
  """Byte columns per int4 chunk: one chunk per group pair (low half group, high half)."""
  return head_dim // 2 if groups <= 2 else head_dim // groups


@dataclasses.dataclass(frozen=True)
class _Part:
  """A column range of the head: ``q`` columns ``[q_col, q_col + width)`` are served by
  cache columns ``[c_col, c_col + width)`` (nibble ``"lo"``/``"hi"`` for int4) with
  scale group ``group``."""

  q_col: int
  c_col: int
  width: int
  nibble: str | None
  group: int


def _parts(fmt: str, head_dim: int, groups: int) -> list[_Part]:
  if fmt != "int4":
    return [_Part(0, 0, head_dim, None, 0)]
  width = _int4_width(head_dim, groups)
  gsize = head_dim // groups
  half = head_dim // 2
  parts = []
  for c in range(half // width):
    col = c * width
    parts.append(_Part(col, col, width, "lo", col // gsize))
    parts.append(_Part(half + col, col, width, "hi", (half + col) // gsize))
  return parts


def _kernel(meta_ref, start_ref, seq_ref, head_ref, blk_ref, wfirst_ref, wlast_ref, len_ref,
            table_ref, q_ref, k_ref, v_ref, *refs, fmt, parts, q_len, group, page_size,
            block_kv, window, scale, soft_cap, precision):
  if fmt == "none":
    ks_ref = vs_ref = None
    o_ref, lse_ref = refs
  else:
    ks_ref, vs_ref, o_ref, lse_ref = refs
  rows = q_ref.shape[2]
  cdtype = q_ref.dtype
  ppb, rpp = common.block_pages(page_size, block_kv)
  int4_scales = fmt == "int4"
  w = pl.program_id(0)
  lo, hi = common.worker_range(meta_ref[0], meta_ref[1], w)

  def token_scale(s_ref, pages, row0, h, part):
    if int4_scales:
      s = s_ref[pages, pl.ds(row0, rpp), h, part.group]
    else:
      s = s_ref[pages, pl.ds(row0, rpp), h]
    return s.reshape(1, block_kv)

  def tile(c_ref, pages, row0, h, part):
    x = c_ref[pages, pl.ds(row0, rpp), h, pl.ds(part.c_col, part.width)]
    x = x.reshape(block_kv, part.width)
    if part.nibble is not None:
      lo_half, hi_half = common.unpack_int4(x)
      x = lo_half if part.nibble == "lo" else hi_half
    return x.astype(cdtype)

  def piece(j, done):
    # Item i's blocks [p0, p1) in this worker's share. The inner loop's addresses depend
    # only on its induction variable and these piece constants, so Triton's software
    # pipeliner keeps ``num_stages`` K/V blocks in flight.
    i = wfirst_ref[w] + j
    item_lo = start_ref[i]
    p0 = jnp.maximum(lo, item_lo)
    p1 = jnp.minimum(hi, start_ref[i + 1])
    b, h = seq_ref[i], head_ref[i]
    length = len_ref[b]
    tok_base = (blk_ref[i] - item_lo) * block_kv
    q_pos = common.query_position(lax.broadcasted_iota(jnp.int32, (rows, block_kv), 0),
                                  length, q_len, group)
    qs = [q_ref[b, h, :, pl.ds(part.q_col, part.width)] for part in parts]

    def body(p, carry):
      accs, m_i, l_i = carry
      tok0 = tok_base + p * block_kv
      pages = table_ref[b, pl.ds(tok0 // page_size, ppb)]
      row0 = tok0 % page_size if ppb == 1 else 0
      logits = None
      for part, q in zip(parts, qs):
        s = pltriton.dot(q, tile(k_ref, pages, row0, h, part), trans_b=True,
                         precision=precision)
        if ks_ref is not None:
          s = s * token_scale(ks_ref, pages, row0, h, part)
        logits = s if logits is None else logits + s
      if soft_cap is None:
        x = logits * (scale * common.LOG2E)
      else:
        x = jnp.tanh(logits * (scale / soft_cap)) * (soft_cap * common.LOG2E)
      kv_pos = tok0 + lax.broadcasted_iota(jnp.int32, (rows, block_kv), 1)
      x = jnp.where(common.allowed(q_pos, kv_pos, length, window), x, -jnp.inf)
      m_new = jnp.maximum(m_i, x.max(axis=1))
      m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows with nothing allowed yet
      alpha = jnp.exp2(m_i - m_use)
      prob = jnp.exp2(x - m_use[:, None])
      l_i = l_i * alpha + prob.sum(axis=1)
      new_accs = []
      for part, acc in zip(parts, accs):
        pv = prob if vs_ref is None else prob * token_scale(vs_ref, pages, row0, h, part)
        acc = acc * alpha[:, None] + pltriton.dot(
            pv.astype(cdtype), tile(v_ref, pages, row0, h, part), precision=precision)
        new_accs.append(acc)
      return tuple(new_accs), m_new, l_i

    accs = tuple(jnp.zeros((rows, part.width), jnp.float32) for part in parts)
    carry = (accs, jnp.full((rows,), -jnp.inf, jnp.float32), jnp.zeros((rows,), jnp.float32))
    accs, m_i, l_i = lax.fori_loop(p0, p1, body, carry)
    # The piece's normalised partial output and log-sum-exp go to slot i + w.
    slot = i + w
    empty = l_i == 0.0
    l_safe = jnp.where(empty, 1.0, l_i)
    for part, acc in zip(parts, accs):
      o_ref[slot, :, pl.ds(part.q_col, part.width)] = acc / l_safe[:, None]
    lse_ref[slot, :] = jnp.where(empty, -jnp.inf, (m_i + jnp.log2(l_safe)) * common.LN2)
    return done

  lax.fori_loop(0, jnp.maximum(wlast_ref[w] - wfirst_ref[w] + 1, 0), piece, ())


def _num_workers(cfg: Config, interpret: bool) -> int:
  return common.worker_count(cfg.num_workers, cfg.interpret_workers, cfg.programs_per_sm, interpret)


def decode_attention(query, k_pages, v_pages, page_table, lengths, k_scale=None, v_scale=None,
                     *, fmt: str, window: tuple[int, int] | None, scale: float,
                     soft_cap: float | None, config: Config | None = None,
                     interpret: bool = False, plan: common.Plan | None = None):
  """Split-KV decode attention over a paged cache.

  Args:
    query: ``[batch, q_len, q_heads, head_dim]``.
    k_pages, v_pages: ``[num_pages, page_size, kv_heads, head_dim]`` (int4: ``head_dim // 2``).
    page_table: ``[batch, pages_per_seq]`` int32; lengths: ``[batch]`` int32.
    k_scale, v_scale: ``[num_pages, page_size, kv_heads(, groups)]`` float32 or None.

  Returns:
    ``(out [batch, q_len, q_heads, head_dim] in query.dtype, lse [batch, q_heads, q_len])``.
  """
  cfg = config or Config()
  b, t, n, d = query.shape
  num_pages, page_size, kv_heads = k_pages.shape[:3]
  group = n // kv_heads
  bk = cfg.block_kv
  ppb, _ = common.block_pages(page_size, bk)
  capacity = page_table.shape[1] * page_size
  rows = max(_MIN_DOT, common.next_pow2(t * group))
  groups = k_scale.shape[-1] if fmt == "int4" else 0
  parts = _parts(fmt, d, groups)

  if plan is None:  # a caller may pass one built ahead (same block_kv and workers)
    plan = common.make_plan(lengths, kv_heads=kv_heads, q_len=t, block_kv=bk,
                            capacity=capacity, window=window,
                            num_workers=_num_workers(cfg, interpret))
  table = common.padded_page_table(page_table, num_pages, ppb)
  q_rows = common.query_rows(query, kv_heads, rows)
  meta = jnp.stack([plan.blocks_per_worker, plan.total]).astype(jnp.int32)
  args = [meta, plan.item_start, plan.item_seq, plan.item_head, plan.item_block,
          plan.worker_item, plan.worker_last, jnp.clip(lengths, 0, capacity), table, q_rows,
          k_pages, v_pages]
  if fmt != "none":
    args += [k_scale, v_scale]
  precision = lax.Precision.HIGHEST if query.dtype == jnp.float32 else None
  kernel = functools.partial(
      _kernel, fmt=fmt, parts=parts, q_len=t, group=group, page_size=page_size,
      block_kv=bk, window=window, scale=scale, soft_cap=soft_cap, precision=precision)
  slots = plan.num_slots
  o_part, lse_part = pl.pallas_call(
      kernel,
      grid=(plan.num_workers,),
      out_shape=[jax.ShapeDtypeStruct((slots, rows, d), jnp.float32),
                 jax.ShapeDtypeStruct((slots, rows), jnp.float32)],
      compiler_params=pltriton.CompilerParams(num_warps=cfg.num_warps,
                                              num_stages=cfg.num_stages),
      interpret=interpret,
      name="decode_attention_split_kv",
  )(*args)
  o_items, lse_items = common.merge_partials(o_part, lse_part, plan)
  o, lse = common.scatter_items(o_items, lse_items, plan, b, kv_heads)
  return common.rows_to_output(o, lse, q_len=t, group=group, dtype=query.dtype)
