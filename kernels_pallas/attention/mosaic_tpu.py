"""Flash attention (forward and backward) for TPUs in Pallas Mosaic TPU.

FlashAttention-2 (Dao, 2023) in the TPU style of splash attention: the grid is
``[batch, heads, query blocks, key-list steps]`` with the key axis "arbitrary" (sequential)
and the online-softmax state (running max, running sum, output accumulator) in VMEM
scratch that lives across the key steps. The block lists of ``common.BlockSparsity``
(full blocks first, then partial ones; empty blocks never listed) reach the kernel by
scalar prefetch: the K/V index maps read the list, so empty blocks are neither fetched
nor computed (steps past a row's list repeat the last listed block, which the pipeline
does not fetch again, and ``pl.when`` skips their compute). Full blocks run without any
mask arithmetic; partial blocks apply ``common.allowed`` elementwise.

Backward (deterministic, no atomics): one kernel per key block accumulates dK and dV in
VMEM over every query head of its GQA group and every listed query block (so dK/dV come
out per kv head, summed in a fixed order); a second kernel per query block accumulates dQ
over its listed key blocks. Probabilities are recomputed from the float32 log-sum-exp.

Grouped-query attention reads K/V through the index maps (kv head = q head // group);
K/V are never repeated. Layout inside the kernels is ``[batch, heads, seq, head_dim]``
(the wrappers transpose), sequences are padded to whole blocks and the padded key tail is
masked in-kernel. Fully masked rows give zeros and ``lse = -inf``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas.attention import common


@dataclasses.dataclass(frozen=True)
class Config:
  """Tile sizes. On a TPU ``block_kv`` must be a multiple of 128 or the whole padded key
  length, ``block_q`` a multiple of 8."""

  block_q: int = 128
  block_kv: int = 128

  def __post_init__(self):
    for name in ("block_q", "block_kv"):
      val = getattr(self, name)
      if not isinstance(val, int) or val <= 0 or val % 8:
        raise ValueError(f"mosaic_tpu Config: {name} must be a positive multiple of 8, "
                         f"got {val!r}")


def default_config(q_len: int, kv_len: int) -> Config:
  """128 x 128 tiles (the TPU MXU size); short sequences use one whole-sequence tile."""
  return Config(block_q=min(128, common.round_up(q_len, 8)),
                block_kv=min(128, common.round_up(kv_len, 8)))


def _interpret_arg(interpret):
  if interpret is True:
    return pltpu.InterpretParams()
  return interpret or False


def _dot_t(a, b):
  """``a @ b^T`` in float32 (contracting the last dims)."""
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_tn(a, b):
  """``a^T @ b`` in float32 (contracting the first dims)."""
  return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _dot(a, b):
  return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _logits(qk, scale, soft_cap):
  """Logits (natural units) and tanh (for the soft-cap derivative) or None."""
  if soft_cap is None:
    return qk * scale, None
  t = jnp.tanh(qk * (scale / soft_cap))
  return t * soft_cap, t


def _tile_mask(mask: common.MaskSpec, q0, kv0, bq, bkv, q_seg, kv_seg):
  q_pos = q0 + lax.broadcasted_iota(jnp.int32, (bq, bkv), 0)
  kv_pos = kv0 + lax.broadcasted_iota(jnp.int32, (bq, bkv), 1)
  return common.allowed(mask, q_pos, kv_pos, q_seg, kv_seg)


@dataclasses.dataclass(frozen=True)
class _Lists:
  """Flattened block lists for scalar prefetch and the static facts about them."""

  indices: jax.Array  # [batch or 1 * rows * cols] int32
  counts: jax.Array   # [batch or 1 * rows * 2] int32
  batched: bool
  rows: int
  cols: int
  steps: int          # grid extent of the list axis

  def row(self, b, r):
    return (b if self.batched else 0) * self.rows + r

  def counts_of(self, cnt_ref, b, r):
    base = self.row(b, r) * 2
    return cnt_ref[base], cnt_ref[base + 1]

  def block(self, idx_ref, cnt_ref, b, r, step):
    """Column block at ``step`` of row ``r``, clamped to the last listed one."""
    last = jnp.maximum(cnt_ref[self.row(b, r) * 2 + 1] - 1, 0)
    return idx_ref[self.row(b, r) * self.cols + jnp.minimum(step, last)]


def _lists(sparsity: common.BlockSparsity) -> _Lists:
  idx, cnt = sparsity.indices, sparsity.counts
  nb, rows, cols = idx.shape
  steps = cols
  if isinstance(cnt, np.ndarray):  # static layout: no grid steps past the longest list
    steps = max(1, int(cnt[..., 1].max()))
  return _Lists(jnp.asarray(idx, jnp.int32).reshape(-1), jnp.asarray(cnt, jnp.int32).reshape(-1),
                batched=nb != 1, rows=rows, cols=cols, steps=steps)


# ----------------------------------------------------------------------------- forward


def _fwd_kernel(idx_ref, cnt_ref, *refs, mask, scale, soft_cap, cfg, has_seg, lists):
  it = iter(refs)
  q_ref, k_ref, v_ref = next(it), next(it), next(it)
  qseg_ref, kvseg_ref = (next(it), next(it)) if has_seg else (None, None)
  o_ref, lse_ref, m_sc, l_sc, acc_sc = (next(it) for _ in range(5))
  b, i, step = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  bq, bkv = cfg.block_q, cfg.block_kv
  n_full, n_all = lists.counts_of(cnt_ref, b, i)

  @pl.when(step == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  def body(masked):
    x, _ = _logits(_dot_t(q_ref[...], k_ref[...]), scale, soft_cap)  # [bq, bkv]
    if masked:
      j = lists.block(idx_ref, cnt_ref, b, i, step)
      ok = _tile_mask(mask, i * bq, j * bkv, bq, bkv,
                      qseg_ref[...] if has_seg else None, kvseg_ref[...] if has_seg else None)
      x = jnp.where(ok, x, -jnp.inf)
    m_prev = m_sc[...]
    m_new = jnp.maximum(m_prev, x.max(axis=1, keepdims=True))
    m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
    alpha = jnp.exp(m_prev - m_use)
    p = jnp.exp(x - m_use)
    l_sc[...] = l_sc[...] * alpha + p.sum(axis=1, keepdims=True)
    acc_sc[...] = acc_sc[...] * alpha + _dot(p.astype(v_ref.dtype), v_ref[...])
    m_sc[...] = m_new

  pl.when(step < n_full)(lambda: body(False))
  pl.when((step >= n_full) & (step < n_all))(lambda: body(True))

  @pl.when(step == pl.num_programs(3) - 1)
  def _finish():
    l = l_sc[...]
    empty = l == 0.0
    l_safe = jnp.where(empty, 1.0, l)
    o_ref[...] = (acc_sc[...] / l_safe).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, -jnp.inf, m_sc[...] + jnp.log(l_safe))


def _fwd_call(q, k, v, q_seg, kv_seg, lists: _Lists, *, mask, scale, soft_cap, cfg,
              interpret):
  """q: [b, n, tp, d]; k, v: [b, kh, sp, d]; q_seg [b, tp, 1]; kv_seg [b, 1, sp]."""
  b_sz, n_heads, tp, d = q.shape
  kv_heads = k.shape[1]
  group = n_heads // kv_heads
  bq, bkv = cfg.block_q, cfg.block_kv
  has_seg = q_seg is not None

  def kv_map(b, h, i, s, idx, cnt):
    return (b, h // group, lists.block(idx, cnt, b, i, s), 0)

  in_specs = [
      pl.BlockSpec((None, None, bq, d), lambda b, h, i, s, idx, cnt: (b, h, i, 0)),
      pl.BlockSpec((None, None, bkv, d), kv_map),
      pl.BlockSpec((None, None, bkv, d), kv_map),
  ]
  args = [q, k, v]
  if has_seg:
    in_specs += [
        pl.BlockSpec((None, bq, 1), lambda b, h, i, s, idx, cnt: (b, i, 0)),
        pl.BlockSpec((None, 1, bkv),
                     lambda b, h, i, s, idx, cnt: (b, 0, lists.block(idx, cnt, b, i, s))),
    ]
    args += [q_seg, kv_seg]
  out_map = lambda b, h, i, s, idx, cnt: (b, h, i, 0)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2,
      grid=(b_sz, n_heads, tp // bq, lists.steps),
      in_specs=in_specs,
      out_specs=[pl.BlockSpec((None, None, bq, d), out_map),
                 pl.BlockSpec((None, None, bq, 1), out_map)],
      scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                      pltpu.VMEM((bq, d), jnp.float32)],
  )
  kernel = functools.partial(_fwd_kernel, mask=mask, scale=scale, soft_cap=soft_cap,
                             cfg=cfg, has_seg=has_seg, lists=lists)
  return pl.pallas_call(
      kernel,
      grid_spec=grid_spec,
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b_sz, n_heads, tp, 1), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=_interpret_arg(interpret),
      name="flash_attention_tpu_fwd",
  )(lists.indices, lists.counts, *args)


# ---------------------------------------------------------------------------- backward


def _probs_and_ds(q, k, v, do, lse, delta, *, masked, ok_fn, scale, soft_cap):
  """P [bq, bkv] and dS (d logits before the scale) of one tile."""
  x, t = _logits(_dot_t(q, k), scale, soft_cap)
  p = jnp.exp(x - lse)  # lse = +inf on fully masked rows (set by the wrapper): p = 0
  if masked:
    p = jnp.where(ok_fn(), p, 0.0)
  ds = p * (_dot_t(do, v) - delta)
  if t is not None:
    ds = ds * (1.0 - t * t)
  return p, ds


def _dkdv_kernel(idx_ref, cnt_ref, *refs, mask, scale, soft_cap, cfg, has_seg, lists, group):
  it = iter(refs)
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = (next(it) for _ in range(6))
  qseg_ref, kvseg_ref = (next(it), next(it)) if has_seg else (None, None)
  dk_ref, dv_ref, dk_sc, dv_sc = (next(it) for _ in range(4))
  b, j, g, step = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)
  bq, bkv = cfg.block_q, cfg.block_kv
  n_full, n_all = lists.counts_of(cnt_ref, b, j)

  @pl.when((g == 0) & (step == 0))
  def _init():
    dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

  def body(masked):
    q, do = q_ref[...], do_ref[...]

    def ok_fn():
      qb = lists.block(idx_ref, cnt_ref, b, j, step)
      return _tile_mask(mask, qb * bq, j * bkv, bq, bkv,
                        qseg_ref[...] if has_seg else None, kvseg_ref[...] if has_seg else None)

    p, ds = _probs_and_ds(q, k_ref[...], v_ref[...], do, lse_ref[...], delta_ref[...],
                          masked=masked, ok_fn=ok_fn, scale=scale, soft_cap=soft_cap)
    dv_sc[...] += _dot_tn(p.astype(do.dtype), do)
    dk_sc[...] += _dot_tn(ds.astype(q.dtype), q)

  pl.when(step < n_full)(lambda: body(False))
  pl.when((step >= n_full) & (step < n_all))(lambda: body(True))

  @pl.when((g == group - 1) & (step == pl.num_programs(4) - 1))
  def _finish():
    dk_ref[...] = (dk_sc[...] * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _dq_kernel(idx_ref, cnt_ref, *refs, mask, scale, soft_cap, cfg, has_seg, lists):
  it = iter(refs)
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = (next(it) for _ in range(6))
  qseg_ref, kvseg_ref = (next(it), next(it)) if has_seg else (None, None)
  dq_ref, dq_sc = next(it), next(it)
  b, i, step = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  bq, bkv = cfg.block_q, cfg.block_kv
  n_full, n_all = lists.counts_of(cnt_ref, b, i)

  @pl.when(step == 0)
  def _init():
    dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

  def body(masked):
    k = k_ref[...]

    def ok_fn():
      j = lists.block(idx_ref, cnt_ref, b, i, step)
      return _tile_mask(mask, i * bq, j * bkv, bq, bkv,
                        qseg_ref[...] if has_seg else None, kvseg_ref[...] if has_seg else None)

    _, ds = _probs_and_ds(q_ref[...], k, v_ref[...], do_ref[...], lse_ref[...],
                          delta_ref[...], masked=masked, ok_fn=ok_fn, scale=scale,
                          soft_cap=soft_cap)
    dq_sc[...] += _dot(ds.astype(k.dtype), k)

  pl.when(step < n_full)(lambda: body(False))
  pl.when((step >= n_full) & (step < n_all))(lambda: body(True))

  @pl.when(step == pl.num_programs(3) - 1)
  def _finish():
    dq_ref[...] = (dq_sc[...] * scale).astype(dq_ref.dtype)


def _bwd_call(q, k, v, do, lse, delta, q_seg, kv_seg, fwd_lists: _Lists, bwd_lists: _Lists,
              *, mask, scale, soft_cap, cfg, interpret):
  """Layouts as in ``_fwd_call``; lse/delta: [b, n, tp, 1] float32."""
  b_sz, n_heads, tp, d = q.shape
  kv_heads, sp = k.shape[1], k.shape[2]
  group = n_heads // kv_heads
  bq, bkv = cfg.block_q, cfg.block_kv
  has_seg = q_seg is not None
  kw = dict(mask=mask, scale=scale, soft_cap=soft_cap, cfg=cfg, has_seg=has_seg)
  args = [q, k, v, do, lse, delta] + ([q_seg, kv_seg] if has_seg else [])
  interpret = _interpret_arg(interpret)

  # dK, dV: grid (batch, kv head, key block, group member, query-list step).
  L = bwd_lists

  def q_map(b, kh, j, g, s, idx, cnt):
    return (b, kh * group + g, L.block(idx, cnt, b, j, s), 0)

  kv_map = lambda b, kh, j, g, s, idx, cnt: (b, kh, j, 0)
  specs = [pl.BlockSpec((None, None, bq, d), q_map), pl.BlockSpec((None, None, bkv, d), kv_map),
           pl.BlockSpec((None, None, bkv, d), kv_map), pl.BlockSpec((None, None, bq, d), q_map),
           pl.BlockSpec((None, None, bq, 1), q_map), pl.BlockSpec((None, None, bq, 1), q_map)]
  if has_seg:
    specs += [
        pl.BlockSpec((None, bq, 1),
                     lambda b, kh, j, g, s, idx, cnt: (b, L.block(idx, cnt, b, j, s), 0)),
        pl.BlockSpec((None, 1, bkv), lambda b, kh, j, g, s, idx, cnt: (b, 0, j)),
    ]
  dk, dv = pl.pallas_call(
      functools.partial(_dkdv_kernel, lists=L, group=group, **kw),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2,
          grid=(b_sz, kv_heads, sp // bkv, group, L.steps),
          in_specs=specs,
          out_specs=[pl.BlockSpec((None, None, bkv, d), kv_map)] * 2,
          scratch_shapes=[pltpu.VMEM((bkv, d), jnp.float32)] * 2,
      ),
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary", "arbitrary")),
      interpret=interpret,
      name="flash_attention_tpu_dkdv",
  )(L.indices, L.counts, *args)

  # dQ: grid (batch, q head, query block, key-list step).
  F = fwd_lists

  def k_map(b, h, i, s, idx, cnt):
    return (b, h // group, F.block(idx, cnt, b, i, s), 0)

  q_blk = lambda b, h, i, s, idx, cnt: (b, h, i, 0)
  specs = [pl.BlockSpec((None, None, bq, d), q_blk), pl.BlockSpec((None, None, bkv, d), k_map),
           pl.BlockSpec((None, None, bkv, d), k_map), pl.BlockSpec((None, None, bq, d), q_blk),
           pl.BlockSpec((None, None, bq, 1), q_blk), pl.BlockSpec((None, None, bq, 1), q_blk)]
  if has_seg:
    specs += [
        pl.BlockSpec((None, bq, 1), lambda b, h, i, s, idx, cnt: (b, i, 0)),
        pl.BlockSpec((None, 1, bkv),
                     lambda b, h, i, s, idx, cnt: (b, 0, F.block(idx, cnt, b, i, s))),
    ]
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, lists=F, **kw),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2,
          grid=(b_sz, n_heads, tp // bq, F.steps),
          in_specs=specs,
          out_specs=pl.BlockSpec((None, None, bq, d), q_blk),
          scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)],
      ),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="flash_attention_tpu_dq",
  )(F.indices, F.counts, *args)
  return dq, dk, dv


# ---------------------------------------------------------------------------- wrappers


def _heads_major(x, size):
  """[b, seq, heads, d] -> [b, heads, size, d] (sequence zero-padded to ``size``)."""
  return common.pad_axis(jnp.swapaxes(x, 1, 2), 2, size)


def _prepare(q, k, q_seg, kv_seg, is_causal, window, config):
  t, s_len = q.shape[1], k.shape[1]
  cfg = config or default_config(t, s_len)
  mask = common.MaskSpec(q_len=t, kv_len=s_len, is_causal=is_causal, window=window,
                         has_segment_ids=q_seg is not None)
  tp = common.round_up(t, cfg.block_q)
  sp = common.round_up(s_len, cfg.block_kv)
  qs, ks = common.pad_axis(q_seg, 1, tp), common.pad_axis(kv_seg, 1, sp)
  classes = common.block_classes(mask, tp, sp, cfg.block_q, cfg.block_kv, qs, ks)
  if qs is not None:
    qs, ks = qs[:, :, None], ks[:, None, :]
  return cfg, mask, tp, sp, qs, ks, classes


def forward(q, k, v, q_seg=None, kv_seg=None, *, is_causal: bool = False,
            window: tuple[int, int] | None = None, scale: float,
            soft_cap: float | None = None, config: Config | None = None,
            interpret=False):
  """Flash attention forward.

  Args:
    q: ``[batch, q_len, q_heads, head_dim]``; k, v: ``[batch, kv_len, kv_heads, head_dim]``.
    q_seg, kv_seg: ``[batch, q_len]`` / ``[batch, kv_len]`` int32 segment ids or None.
    interpret: False, True (TPU interpret mode with default ``pltpu.InterpretParams``) or
      an ``InterpretParams``.

  Returns:
    ``(out [batch, q_len, q_heads, head_dim], lse [batch, q_heads, q_len] float32)``.
  """
  cfg, mask, tp, sp, qs, ks, classes = _prepare(q, k, q_seg, kv_seg, is_causal, window, config)
  lists = _lists(common.sparsity_from_classes(classes))
  out, lse = _fwd_call(_heads_major(q, tp), _heads_major(k, sp), _heads_major(v, sp), qs, ks,
                       lists, mask=mask, scale=scale, soft_cap=soft_cap, cfg=cfg,
                       interpret=interpret)
  t = q.shape[1]
  return jnp.swapaxes(out[:, :, :t], 1, 2), lse[:, :, :t, 0]


def backward(q, k, v, out, lse, d_out, q_seg=None, kv_seg=None, d_lse=None, *,
             is_causal: bool = False, window: tuple[int, int] | None = None, scale: float,
             soft_cap: float | None = None, config: Config | None = None,
             interpret=False):
  """Flash attention backward; ``d_lse`` (optional) is the cotangent of the lse output.

  Args: as :func:`forward`, plus ``out [batch, q_len, q_heads, head_dim]``, ``lse
  [batch, q_heads, q_len]`` from it and ``d_out`` shaped like ``out``.

  Returns ``(dq, dk, dv)`` shaped and typed like ``q, k, v``.
  """
  cfg, mask, tp, sp, qs, ks, classes = _prepare(q, k, q_seg, kv_seg, is_causal, window, config)
  t, s_len = q.shape[1], k.shape[1]
  delta = jnp.einsum("btnd,btnd->bnt", out.astype(jnp.float32), d_out.astype(jnp.float32))
  if d_lse is not None:
    delta = delta - d_lse
  lse = jnp.where(lse == -jnp.inf, jnp.inf, lse)  # fully masked rows: p = exp(x - inf) = 0
  col = lambda x: common.pad_axis(x, 2, tp)[..., None]
  fwd_lists = _lists(common.sparsity_from_classes(classes))
  bwd_lists = _lists(common.sparsity_from_classes(common.transpose_classes(classes)))
  dq, dk, dv = _bwd_call(
      _heads_major(q, tp), _heads_major(k, sp), _heads_major(v, sp),
      _heads_major(d_out.astype(q.dtype), tp), col(lse), col(delta), qs, ks, fwd_lists,
      bwd_lists, mask=mask, scale=scale, soft_cap=soft_cap, cfg=cfg, interpret=interpret)
  return (jnp.swapaxes(dq[:, :, :t], 1, 2), jnp.swapaxes(dk[:, :, :s_len], 1, 2),
          jnp.swapaxes(dv[:, :, :s_len], 1, 2))
