"""Masking and block-sparsity math shared by every flash-attention backend.

Flash attention (FlashAttention-2, Dao 2023) visits the score matrix in
``[block_q, block_kv]`` tiles. Every mask this package supports (end-aligned causal,
sliding windows, packed-sequence segment ids, the padded tail of the key sequence) is
described once here in two forms:

* ``allowed(...)``: the elementwise mask of one tile, computed inside a kernel from
  absolute positions and segment ids (True = attend);
* ``BlockSparsity``: a block-sparse layout in the style of splash attention: for every
  query block the list of key blocks that hold at least one allowed entry, sorted so the
  *full* blocks (every entry allowed, no elementwise mask needed) come first and the
  *partial* ones (mask needed) after. Fully masked blocks are never visited. The backward
  pass uses the transposed layout (for every key block, the query blocks that touch it).

Causal and window masks are static, so their layouts are numpy constants built at trace
time; segment ids make the layout data-dependent and it is built with jnp ops. A caller
may also hand the kernels its own block classes (``EMPTY``/``PARTIAL``/``FULL``) to drive
general block-sparse attention.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

EMPTY, PARTIAL, FULL = 0, 1, 2
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@dataclasses.dataclass(frozen=True)
class MaskSpec:
  """Static masking parameters of one call.

  ``q_len``/``kv_len`` are the true (unpadded) lengths; query row ``i`` sits at key
  position ``i + kv_len - q_len``. ``window = (left, right)`` allows keys in
  ``[pos - left, pos + right]``.
  """

  q_len: int
  kv_len: int
  is_causal: bool = False
  window: tuple[int, int] | None = None
  has_segment_ids: bool = False

  @property
  def offset(self) -> int:
    return self.kv_len - self.q_len

  @property
  def uses_positions(self) -> bool:
    return self.is_causal or self.window is not None


def allowed(spec: MaskSpec, q_pos, kv_pos, q_seg=None, kv_seg=None):
  """Elementwise mask of one tile (True = attend).

  ``q_pos``: query row indices (unpadded numbering, broadcastable to the tile);
  ``kv_pos``: key indices; ``q_seg``/``kv_seg``: segment ids broadcast the same way.
  """
  ok = kv_pos < spec.kv_len
  if spec.uses_positions:
    pos = q_pos + spec.offset
    if spec.is_causal:
      ok = ok & (kv_pos <= pos)
    if spec.window is not None:
      left, right = spec.window
      ok = ok & (kv_pos >= pos - left) & (kv_pos <= pos + right)
  if q_seg is not None:
    ok = ok & (q_seg == kv_seg)
  return ok


def _position_classes(spec: MaskSpec, n_q: int, block_q: int, n_kv: int,
                      block_kv: int) -> np.ndarray:
  """[n_q, n_kv] block classes from positions alone (exact; numpy)."""
  q_lo = np.arange(n_q)[:, None] * block_q + spec.offset
  q_hi = q_lo + block_q - 1
  kv_lo = np.arange(n_kv)[None, :] * block_kv
  kv_hi = kv_lo + block_kv - 1
  big = np.iinfo(np.int64).max // 4
  left, right = big, big
  if spec.window is not None:
    left, right = spec.window
  if spec.is_causal:
    right = min(right, 0)
  # Row q may attend [q - left, q + right] intersected with [0, kv_len).
  empty = (kv_lo > q_hi + right) | (kv_hi < q_lo - left) | (kv_lo >= spec.kv_len)
  full = (kv_lo >= q_hi - left) & (kv_hi <= q_lo + right) & (kv_hi < spec.kv_len)
  if not spec.uses_positions:
    empty = np.broadcast_to(kv_lo >= spec.kv_len, (n_q, n_kv))
    full = np.broadcast_to(kv_hi < spec.kv_len, (n_q, n_kv))
  return np.where(empty, EMPTY, np.where(full, FULL, PARTIAL)).astype(np.int32)


def _segment_classes(q_seg, kv_seg, block_q: int, block_kv: int):
  """[batch, n_q, n_kv] classes from segment-id ranges (conservative for EMPTY)."""
  b, tp = q_seg.shape
  sp = kv_seg.shape[1]
  qs = q_seg.reshape(b, tp // block_q, block_q)
  ks = kv_seg.reshape(b, sp // block_kv, block_kv)
  q_min, q_max = qs.min(-1)[:, :, None], qs.max(-1)[:, :, None]
  k_min, k_max = ks.min(-1)[:, None, :], ks.max(-1)[:, None, :]
  empty = (q_max < k_min) | (k_max < q_min)
  full = (q_min == q_max) & (k_min == k_max) & (q_min == k_min)
  return jnp.where(empty, EMPTY, jnp.where(full, FULL, PARTIAL)).astype(jnp.int32)


def block_classes(spec: MaskSpec, tp: int, sp: int, block_q: int, block_kv: int,
                  q_seg=None, kv_seg=None):
  """Classes ``[batch or 1, tp // block_q, sp // block_kv]`` of the padded problem.

  ``tp``/``sp`` are the padded lengths (multiples of the block sizes); ``q_seg [b, tp]``
  and ``kv_seg [b, sp]`` the padded segment ids, or None. Returns a numpy array when the
  layout is static, else a jnp array.
  """
  pos = _position_classes(spec, tp // block_q, block_q, sp // block_kv, block_kv)[None]
  if q_seg is None:
    return pos
  seg = _segment_classes(q_seg, kv_seg, block_q, block_kv)
  return jnp.minimum(jnp.asarray(pos), seg)


@dataclasses.dataclass(frozen=True)
class BlockSparsity:
  """Per-row block lists (row = query block forward, key block backward).

  ``indices [batch or 1, rows, cols]`` int32: column block ids, full ones first, then
  partial ones, then unused entries; ``counts [batch or 1, rows, 2]`` int32:
  ``(number of full blocks, number of full + partial blocks)``. ``dense`` is True when
  every row visits every column in order with no mask (the kernels then skip the lists).
  """

  indices: jax.Array | np.ndarray
  counts: jax.Array | np.ndarray
  dense: bool


def sparsity_from_classes(classes) -> BlockSparsity:
  """Builds the sorted block lists from ``classes [batch or 1, rows, cols]``."""
  if isinstance(classes, np.ndarray):
    if (classes == FULL).all():
      rows, cols = classes.shape[1:]
      idx = np.broadcast_to(np.arange(cols, dtype=np.int32), classes.shape)
      cnt = np.full(classes.shape[:2] + (2,), cols, np.int32)
      return BlockSparsity(np.ascontiguousarray(idx), cnt, dense=True)
    order = np.argsort(-classes, axis=-1, kind="stable").astype(np.int32)
    cnt = np.stack([(classes == FULL).sum(-1), (classes != EMPTY).sum(-1)], -1)
    return BlockSparsity(order, cnt.astype(np.int32), dense=False)
  order = jnp.argsort(-classes, axis=-1, stable=True).astype(jnp.int32)
  cnt = jnp.stack([(classes == FULL).sum(-1), (classes != EMPTY).sum(-1)], -1)
  return BlockSparsity(order, cnt.astype(jnp.int32), dense=False)


def transpose_classes(classes):
  """Forward layout (rows = query blocks) to backward layout (rows = key blocks)."""
  if isinstance(classes, np.ndarray):
    return np.ascontiguousarray(np.swapaxes(classes, 1, 2))
  return jnp.swapaxes(classes, 1, 2)


def round_up(x: int, m: int) -> int:
  return (x + m - 1) // m * m


def pad_axis(x, axis: int, size: int):
  """Zero-pads ``x`` along ``axis`` to ``size`` (None and already-sized arrays pass through)."""
  if x is None or x.shape[axis] == size:
    return x
  pads = [(0, 0)] * x.ndim
  pads[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pads)
