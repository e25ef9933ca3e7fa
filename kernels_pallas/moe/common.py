"""Work items of a grouped matmul, computed from ``group_sizes`` (MegaBlocks / megablox).

Rows ``[starts[g], ends[g])`` of ``lhs: [m, k]`` belong to group ``g`` (contiguous, in
group order). Cutting the rows into ``block_m`` tiles, a tile that straddles a group
boundary is visited once per group it holds; an empty group has no visit. So there are at
most ``cdiv(m, block_m) + groups - 1`` visits ("work items"), each described by

* ``item_group[t]``: the group whose weights the visit multiplies by, or ``groups`` for
  the rows past ``sum(group_sizes)`` (the "tail", stored as zeros as in
  ``lax.ragged_dot``),
* ``item_block[t]``: the ``block_m`` row tile it reads and writes,
* ``item_lo[t]``, ``item_size[t]``: the rows ``[block * block_m + lo, ... + lo + size)``
  of that tile that belong to the group (``size == 0`` for padding items past the real
  count, which the kernels skip).

The arrays are computed in XLA before the kernel (a few tiny ops on ``groups`` ints), so
every kernel sees a flat, static-length list of items and needs no per-tile search.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class WorkItems:
  group: jax.Array  # int32 [num_items]
  block: jax.Array  # int32 [num_items]
  lo: jax.Array  # int32 [num_items]
  size: jax.Array  # int32 [num_items]; 0 for padding items

  @property
  def num_items(self) -> int:
    return self.group.shape[0]


jax.tree_util.register_dataclass(WorkItems, data_fields=["group", "block", "lo", "size"],
                                 meta_fields=[])

def num_items(m: int, groups: int, block_m: int) -> int:
  """Static upper bound on the visits: ``cdiv(m, block_m) + groups`` (tail included)."""
  return -(-m // block_m) + groups


def group_bounds(group_sizes: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(starts, ends)`` int32 ``[groups]``: the row range of each group."""
  ends = jnp.cumsum(group_sizes.astype(jnp.int32))
  return ends - group_sizes.astype(jnp.int32), ends


def work_items(group_sizes: jax.Array, m: int, block_m: int) -> WorkItems:
  """The visits of ``block_m`` row tiles by group (module docstring), in row order.

  Group ends are clipped to ``m``; the tail ``[sum(group_sizes), m)`` is group ``groups``.
  """
  groups = group_sizes.shape[0]
  sizes = group_sizes.astype(jnp.int32)
  sizes = jnp.concatenate([sizes, jnp.maximum(m - jnp.sum(sizes), 0)[None]])
  ends = jnp.minimum(jnp.cumsum(sizes), m)
  starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
  sizes = ends - starts
  groups_ = groups + 1
  first = starts // block_m
  last = (ends - 1) // block_m
  tiles = jnp.where(sizes > 0, last - first + 1, 0)
  tile_ends = jnp.cumsum(tiles)
  total = tile_ends[-1]
  t = jnp.arange(num_items(m, groups, block_m), dtype=jnp.int32)
  # The group of item t: the first group whose cumulative tile count exceeds t.
  g = jnp.minimum(jnp.searchsorted(tile_ends, t, side="right"), groups_ - 1).astype(jnp.int32)
  block = first[g] + t - (tile_ends[g] - tiles[g])
  row0 = block * block_m
  lo = jnp.maximum(starts[g], row0)
  hi = jnp.minimum(ends[g], row0 + block_m)
  valid = t < total
  return WorkItems(group=g, block=jnp.where(valid, block, 0).astype(jnp.int32),
                   lo=jnp.where(valid, lo - row0, 0).astype(jnp.int32),
                   size=jnp.where(valid, hi - lo, 0).astype(jnp.int32))


def pad_axis(x: jax.Array, axis: int, multiple: int) -> jax.Array:
  """Zero-pads ``x`` along ``axis`` to a multiple of ``multiple`` (no copy when aligned)."""
  pad = -x.shape[axis] % multiple
  if not pad:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths)
