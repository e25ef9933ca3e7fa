"""Portable flash attention (forward and backward) in Pallas' Triton lowering.

FlashAttention-2 (Dao, 2023) for any CUDA GPU and, with ``interpret=True``, for CPU
tests: the forward is parallel over (query block, batch, head) and runs the online
softmax in the log2 domain over the key blocks listed by ``common.BlockSparsity`` (full
blocks unmasked, partial blocks masked, empty blocks skipped); it returns the output and
the log-sum-exp. The backward recomputes the probabilities from the log-sum-exp: one
kernel per key block accumulates dK and dV over the query blocks that touch it, a second
per query block accumulates dQ (deterministic, no atomics). Grouped-query attention
reads the shared K/V through the BlockSpec index maps; the per-query-head dK/dV are
summed over each group afterwards.

On Hopper the Mosaic GPU kernels (``mosaic_gpu.py``) are the fast path; this backend
exists for other GPUs and as an interpretable implementation of the full feature set.
Triton needs power-of-two tiles, so head_dim is zero-padded to a power of two (zero
columns change no dot product) and sequences to whole blocks.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kernels_pallas.attention import common


@dataclasses.dataclass(frozen=True)
class Config:
  """Tile sizes and Triton launch parameters."""

  block_q: int = 64
  block_kv: int = 64
  num_warps: int = 4
  num_stages: int = 2


def default_config(head_dim: int) -> Config:
  if head_dim > 128:
    return Config(block_q=32, block_kv=32, num_warps=8, num_stages=1)
  return Config(num_warps=4 if head_dim <= 64 else 8)


def _params(cfg: Config):
  return pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _list_arrays(sparsity: common.BlockSparsity):
  """The block lists as arrays, the list length padded to a power of two for Triton."""
  idx = jnp.asarray(sparsity.indices)
  cols = idx.shape[2]
  idx = jnp.pad(idx, ((0, 0), (0, 0), (0, pl.next_power_of_2(cols) - cols)))
  return [idx, jnp.asarray(sparsity.counts)]


def _list_specs(sparsity: common.BlockSparsity, row_of):
  """BlockSpecs selecting one row of the block lists for the current program."""
  batched = sparsity.indices.shape[0] != 1
  cols = pl.next_power_of_2(sparsity.indices.shape[2])
  b_of = (lambda *g: row_of(*g)[0]) if batched else (lambda *g: 0)
  return [
      pl.BlockSpec((None, None, cols), lambda *g: (b_of(*g), row_of(*g)[1], 0)),
      pl.BlockSpec((None, None, 2), lambda *g: (b_of(*g), row_of(*g)[1], 0)),
  ]


def _tile_mask(mask: common.MaskSpec, q0, kv0, bq, bkv, q_seg, kv_seg):
  q_pos = q0 + lax.broadcasted_iota(jnp.int32, (bq, bkv), 0)
  kv_pos = kv0 + lax.broadcasted_iota(jnp.int32, (bq, bkv), 1)
  qs = ks = None
  if q_seg is not None:
    qs, ks = q_seg[:, None], kv_seg[None, :]
  return common.allowed(mask, q_pos, kv_pos, qs, ks)


def _logits(qk, scale, soft_cap):
  """Logits in log2 units, and tanh (for the soft-cap derivative) or None."""
  if soft_cap is None:
    return qk * (scale * common.LOG2E), None
  t = jnp.tanh(qk * (scale / soft_cap))
  return t * (soft_cap * common.LOG2E), t


# ----------------------------------------------------------------------------- forward


def _fwd_kernel(*refs, mask, scale, soft_cap, cfg, has_seg):
  it = iter(refs)
  q_ref, k_ref, v_ref = next(it), next(it), next(it)
  qseg_ref, kvseg_ref = (next(it), next(it)) if has_seg else (None, None)
  idx_ref, cnt_ref, o_ref, lse_ref = next(it), next(it), next(it), next(it)
  bq, bkv = cfg.block_q, cfg.block_kv
  q0 = pl.program_id(0) * bq
  q = q_ref[...]
  q_seg = qseg_ref[...] if has_seg else None
  d = q.shape[-1]

  def step(i, carry, masked):
    acc, m_i, l_i = carry
    j = idx_ref[i]
    kv = pl.ds(j * bkv, bkv)
    k = k_ref[kv, :]
    x, _ = _logits(pltriton.dot(q, k, trans_b=True), scale, soft_cap)
    if masked:
      ok = _tile_mask(mask, q0, j * bkv, bq, bkv, q_seg, kvseg_ref[kv] if has_seg else None)
      x = jnp.where(ok, x, -jnp.inf)
    m_new = jnp.maximum(m_i, x.max(axis=1))
    m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
    alpha = jnp.exp2(m_i - m_use)
    p = jnp.exp2(x - m_use[:, None])
    l_i = l_i * alpha + p.sum(axis=1)
    acc = acc * alpha[:, None] + pltriton.dot(p.astype(v_ref.dtype), v_ref[kv, :])
    return acc, m_new, l_i

  carry = (jnp.zeros((bq, d), jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32),
           jnp.zeros((bq,), jnp.float32))
  carry = lax.fori_loop(0, cnt_ref[0], functools.partial(step, masked=False), carry)
  carry = lax.fori_loop(cnt_ref[0], cnt_ref[1], functools.partial(step, masked=True), carry)
  acc, m_i, l_i = carry
  empty = l_i == 0.0
  l_safe = jnp.where(empty, 1.0, l_i)
  o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(empty, -jnp.inf, (m_i + jnp.log2(l_safe)) * common.LN2)


def _fwd_call(q, k, v, q_seg, kv_seg, sparsity, *, mask, scale, soft_cap, cfg, interpret):
  b_sz, tp, n_heads, d = q.shape
  sp, kv_heads = k.shape[1], k.shape[2]
  group = n_heads // kv_heads
  bq = cfg.block_q
  has_seg = q_seg is not None
  in_specs = [
      pl.BlockSpec((None, bq, None, d), lambda i, b, h: (b, i, h, 0)),
      pl.BlockSpec((None, sp, None, d), lambda i, b, h: (b, 0, h // group, 0)),
      pl.BlockSpec((None, sp, None, d), lambda i, b, h: (b, 0, h // group, 0)),
  ]
  args = [q, k, v]
  if has_seg:
    in_specs += [pl.BlockSpec((None, bq), lambda i, b, h: (b, i)),
                 pl.BlockSpec((None, sp), lambda i, b, h: (b, 0))]
    args += [q_seg, kv_seg]
  in_specs += _list_specs(sparsity, lambda i, b, h: (b, i))
  args += _list_arrays(sparsity)
  kernel = functools.partial(_fwd_kernel, mask=mask, scale=scale, soft_cap=soft_cap,
                             cfg=cfg, has_seg=has_seg)
  return pl.pallas_call(
      kernel,
      grid=(tp // bq, b_sz, n_heads),
      in_specs=in_specs,
      out_specs=[pl.BlockSpec((None, bq, None, d), lambda i, b, h: (b, i, h, 0)),
                 pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b_sz, n_heads, tp), jnp.float32)],
      compiler_params=_params(cfg),
      interpret=interpret,
      name="flash_attention_fwd",
  )(*args)


# ---------------------------------------------------------------------------- backward


def _dkdv_kernel(*refs, mask, scale, soft_cap, cfg, has_seg):
  it = iter(refs)
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = (next(it) for _ in range(6))
  qseg_ref, kvseg_ref = (next(it), next(it)) if has_seg else (None, None)
  idx_ref, cnt_ref, dk_ref, dv_ref = next(it), next(it), next(it), next(it)
  bq, bkv = cfg.block_q, cfg.block_kv
  kv0 = pl.program_id(0) * bkv
  k, v = k_ref[...], v_ref[...]
  kv_seg = kvseg_ref[...] if has_seg else None

  def step(i, carry, masked):
    dk, dv = carry
    qb = idx_ref[i]
    rows = pl.ds(qb * bq, bq)
    q, do = q_ref[rows, :], do_ref[rows, :]
    x, t = _logits(pltriton.dot(q, k, trans_b=True), scale, soft_cap)  # [bq, bkv]
    p = jnp.exp2(x - lse_ref[rows][:, None])
    if masked:
      ok = _tile_mask(mask, qb * bq, kv0, bq, bkv, qseg_ref[rows] if has_seg else None, kv_seg)
      p = jnp.where(ok, p, 0.0)
    dv = dv + pltriton.dot(p.astype(do.dtype), do, trans_a=True)
    dp = pltriton.dot(do, v, trans_b=True)
    ds = p * (dp - delta_ref[rows][:, None])
    if t is not None:
      ds = ds * (1.0 - t * t)
    dk = dk + pltriton.dot(ds.astype(q.dtype), q, trans_a=True)
    return dk, dv

  d = k.shape[-1]
  carry = (jnp.zeros((bkv, d), jnp.float32), jnp.zeros((bkv, d), jnp.float32))
  carry = lax.fori_loop(0, cnt_ref[0], functools.partial(step, masked=False), carry)
  dk, dv = lax.fori_loop(cnt_ref[0], cnt_ref[1], functools.partial(step, masked=True), carry)
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(*refs, mask, scale, soft_cap, cfg, has_seg):
  it = iter(refs)
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = (next(it) for _ in range(6))
  qseg_ref, kvseg_ref = (next(it), next(it)) if has_seg else (None, None)
  idx_ref, cnt_ref, dq_ref = next(it), next(it), next(it)
  bq, bkv = cfg.block_q, cfg.block_kv
  q0 = pl.program_id(0) * bq
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]
  q_seg = qseg_ref[...] if has_seg else None

  def step(i, dq, masked):
    j = idx_ref[i]
    kv = pl.ds(j * bkv, bkv)
    k, v = k_ref[kv, :], v_ref[kv, :]
    x, t = _logits(pltriton.dot(q, k, trans_b=True), scale, soft_cap)
    p = jnp.exp2(x - lse[:, None])
    if masked:
      ok = _tile_mask(mask, q0, j * bkv, bq, bkv, q_seg, kvseg_ref[kv] if has_seg else None)
      p = jnp.where(ok, p, 0.0)
    ds = p * (pltriton.dot(do, v, trans_b=True) - delta[:, None])
    if t is not None:
      ds = ds * (1.0 - t * t)
    return dq + pltriton.dot(ds.astype(k.dtype), k)

  dq = jnp.zeros(q.shape, jnp.float32)
  dq = lax.fori_loop(0, cnt_ref[0], functools.partial(step, masked=False), dq)
  dq = lax.fori_loop(cnt_ref[0], cnt_ref[1], functools.partial(step, masked=True), dq)
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _bwd_call(q, k, v, do, lse2, delta, q_seg, kv_seg, fwd_sparsity, bwd_sparsity, *, mask,
              scale, soft_cap, cfg, interpret):
  b_sz, tp, n_heads, d = q.shape
  sp, kv_heads = k.shape[1], k.shape[2]
  group = n_heads // kv_heads
  bq, bkv = cfg.block_q, cfg.block_kv
  has_seg = q_seg is not None
  kw = dict(mask=mask, scale=scale, soft_cap=soft_cap, cfg=cfg, has_seg=has_seg)
  args = [q, k, v, do, lse2, delta] + ([q_seg, kv_seg] if has_seg else [])

  # dK, dV per query head: grid (key block, batch, query head).
  full_q = pl.BlockSpec((None, tp, None, d), lambda j, b, h: (b, 0, h, 0))
  kv_blk = pl.BlockSpec((None, bkv, None, d), lambda j, b, h: (b, j, h // group, 0))
  row_q = pl.BlockSpec((None, None, tp), lambda j, b, h: (b, h, 0))
  specs = [full_q, kv_blk, kv_blk, full_q, row_q, row_q]
  if has_seg:
    specs += [pl.BlockSpec((None, tp), lambda j, b, h: (b, 0)),
              pl.BlockSpec((None, bkv), lambda j, b, h: (b, j))]
  specs += _list_specs(bwd_sparsity, lambda j, b, h: (b, j))
  out_blk = pl.BlockSpec((None, bkv, None, d), lambda j, b, h: (b, j, h, 0))
  per_head = jax.ShapeDtypeStruct((b_sz, sp, n_heads, d), jnp.float32)
  dk, dv = pl.pallas_call(
      functools.partial(_dkdv_kernel, **kw),
      grid=(sp // bkv, b_sz, n_heads),
      in_specs=specs,
      out_specs=[out_blk, out_blk],
      out_shape=[per_head, per_head],
      compiler_params=_params(cfg),
      interpret=interpret,
      name="flash_attention_dkdv",
  )(*args, *_list_arrays(bwd_sparsity))
  dk = dk.reshape(b_sz, sp, kv_heads, group, d).sum(3)
  dv = dv.reshape(b_sz, sp, kv_heads, group, d).sum(3)

  # dQ: grid (query block, batch, query head).
  q_blk = pl.BlockSpec((None, bq, None, d), lambda i, b, h: (b, i, h, 0))
  full_kv = pl.BlockSpec((None, sp, None, d), lambda i, b, h: (b, 0, h // group, 0))
  row_blk = pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))
  specs = [q_blk, full_kv, full_kv, q_blk, row_blk, row_blk]
  if has_seg:
    specs += [pl.BlockSpec((None, bq), lambda i, b, h: (b, i)),
              pl.BlockSpec((None, sp), lambda i, b, h: (b, 0))]
  specs += _list_specs(fwd_sparsity, lambda i, b, h: (b, i))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, **kw),
      grid=(tp // bq, b_sz, n_heads),
      in_specs=specs,
      out_specs=q_blk,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_params(cfg),
      interpret=interpret,
      name="flash_attention_dq",
  )(*args, *_list_arrays(fwd_sparsity))
  return dq, dk, dv


# ---------------------------------------------------------------------------- wrappers


def _padded_head_dim(d: int) -> int:
  return max(16, pl.next_power_of_2(d))


def _prepare(q, k, v, q_seg, kv_seg, is_causal, window, config):
  d = q.shape[-1]
  dp = _padded_head_dim(d)
  cfg = config or default_config(dp)
  t, s_len = q.shape[1], k.shape[1]
  mask = common.MaskSpec(q_len=t, kv_len=s_len, is_causal=is_causal, window=window,
                         has_segment_ids=q_seg is not None)
  tp = common.round_up(t, cfg.block_q)
  sp = common.round_up(s_len, cfg.block_kv)
  pad = lambda x, n: common.pad_axis(common.pad_axis(x, 3, dp), 1, n)
  qs, ks = common.pad_axis(q_seg, 1, tp), common.pad_axis(kv_seg, 1, sp)
  classes = common.block_classes(mask, tp, sp, cfg.block_q, cfg.block_kv, qs, ks)
  return cfg, mask, pad(q, tp), pad(k, sp), pad(v, sp), qs, ks, classes


def forward(q, k, v, q_seg=None, kv_seg=None, *, is_causal: bool = False,
            window: tuple[int, int] | None = None, scale: float,
            soft_cap: float | None = None, config: Config | None = None,
            interpret: bool = False):
  """Flash attention forward.

  Args:
    q: ``[batch, q_len, q_heads, head_dim]``; k, v: ``[batch, kv_len, kv_heads, head_dim]``.
    q_seg, kv_seg: ``[batch, q_len]`` / ``[batch, kv_len]`` int32 segment ids or None.

  Returns:
    ``(out [batch, q_len, q_heads, head_dim], lse [batch, q_heads, q_len] float32)``.
  """
  cfg, mask, qp, kp, vp, qs, ks, classes = _prepare(q, k, v, q_seg, kv_seg, is_causal,
                                                    window, config)
  sparsity = common.sparsity_from_classes(classes)
  out, lse = _fwd_call(qp, kp, vp, qs, ks, sparsity, mask=mask, scale=scale,
                       soft_cap=soft_cap, cfg=cfg, interpret=interpret)
  t, d = q.shape[1], q.shape[3]
  return out[:, :t, :, :d], lse[:, :, :t]


def backward(q, k, v, out, lse, d_out, q_seg=None, kv_seg=None, d_lse=None, *,
             is_causal: bool = False, window: tuple[int, int] | None = None, scale: float,
             soft_cap: float | None = None, config: Config | None = None,
             interpret: bool = False):
  """Flash attention backward; ``d_lse`` (optional) is the cotangent of the lse output.

  Returns ``(dq, dk, dv)`` shaped and typed like ``q, k, v``.
  """
  cfg, mask, qp, kp, vp, qs, ks, classes = _prepare(q, k, v, q_seg, kv_seg, is_causal,
                                                    window, config)
  t, s_len, d = q.shape[1], k.shape[1], q.shape[3]
  tp, dp = qp.shape[1], qp.shape[3]
  delta = jnp.einsum("btnd,btnd->bnt", out.astype(jnp.float32), d_out.astype(jnp.float32))
  if d_lse is not None:
    delta = delta - d_lse
  dop = common.pad_axis(common.pad_axis(d_out, 3, dp), 1, tp)
  fwd_sp = common.sparsity_from_classes(classes)
  bwd_sp = common.sparsity_from_classes(common.transpose_classes(classes))
  lse2 = common.pad_axis(lse * common.LOG2E, 2, tp)
  dq, dk, dv = _bwd_call(qp, kp, vp, dop, lse2, common.pad_axis(delta, 2, tp),
                         qs, ks, fwd_sp, bwd_sp, mask=mask, scale=scale, soft_cap=soft_cap,
                         cfg=cfg, interpret=interpret)
  return (dq[:, :t, :, :d], dk[:, :s_len, :, :d].astype(k.dtype),
          dv[:, :s_len, :, :d].astype(v.dtype))
