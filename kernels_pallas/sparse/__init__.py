"""Sparse matmul kernels: the expansion math every backend (and the formats) share.

Formats (built by :mod:`jaxeff.sparse.formats`; ``w: [K, N]``, ``y = x @ w``):

* tiled bitmap (Flash-LLM, Xia et al. 2023, with column-major bits): uint32 words along K
  (word ``[s, c]`` = rows ``32 s .. 32 s + 31`` of column ``c``), values packed
  column-major inside each ``tile_k x tile_n`` tile after one leading zero, and a
  pointer per column of a tile row; element ``(r, c)`` is ``values[bit * (ptr + rank)]``
  with ``rank`` the inclusive count of set bits down the column (:func:`tile_ranks`).
* sliced ELL over sorted columns (bf16 value + one byte of row offset a slot).
* N:M along K: ``values [n, G, N]`` (slot-major, ``G = K / m`` groups) and uint8 metadata
  with each slot's row offset in its group (``log2(m)`` bits a slot): one byte a group
  (``meta [G, N]``), or, when the slots fit in 4 bits (2:4, 1:4, 1:2), two groups a byte
  (``meta [G / 2, N]``, :func:`pack_nm_meta`: in each run of ``2 b`` groups, byte row
  ``i`` holds group ``i`` in its low nibble and group ``b + i`` in its high nibble, so a
  kernel step of ``2 b`` groups reads ``b`` byte rows); :func:`expand_nm` rebuilds the
  ``m`` dense row planes of a tile with selects only (no gather, no reshape).
* BSR, ELL per block column (``blocks [N / bn, R, bk, bn]``, ``block_rows``, ``counts``).

Kernels: :mod:`kernels_pallas.sparse.triton` (Pallas Triton lowering; interpretable on CPU).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

WORD_BITS = 32


def tile_ranks(bits: jax.Array, axis: int = -1) -> jax.Array:
  """Inclusive prefix count of ``bits`` (int32 0/1) along ``axis``: one more than the
  packed position of each set element among its column's non-zeros."""
  return jnp.cumsum(bits, axis=axis)


def nm_slot_offsets(meta: jax.Array, n: int, m: int) -> list[jax.Array]:
  """Row offset within its group of each slot: ``n`` int32 arrays shaped like ``meta``."""
  bits = int(math.log2(m))
  q = meta.astype(jnp.int32)
  return [(q >> (s * bits)) & (m - 1) for s in range(n)]


NIBBLE = 4


def pack_nm_meta(meta: jax.Array, block: int) -> jax.Array:
  """One byte a group ``[G, N]`` -> two groups a byte ``[G / 2, N]`` (``G`` a multiple of
  ``2 * block``; every entry < 16)."""
  g, n = meta.shape
  t = meta.astype(jnp.uint8).reshape(g // (2 * block), 2, block, n)
  return (t[:, 0] | (t[:, 1] << NIBBLE)).reshape(g // 2, n)


def unpack_nm_meta(packed: jax.Array, block: int) -> jax.Array:
  """Inverse of :func:`pack_nm_meta`: ``[G / 2, N]`` -> ``[G, N]`` uint8."""
  h, n = packed.shape
  t = packed.astype(jnp.uint8).reshape(h // block, 1, block, n)
  both = jnp.concatenate([t & 0xF, t >> NIBBLE], axis=1)
  return both.reshape(2 * h, n)


def expand_nm(values, meta: jax.Array, n: int, m: int) -> list[jax.Array]:
  """Dense row planes of an N:M tile: ``planes[j][g, c] = w[g * m + j, c]``.

  ``values[s]`` (slot ``s``) and ``meta`` are ``[G, C]`` for a tile of ``G`` groups;
  every plane is ``[G, C]`` in the values' dtype.
  """
  offs = nm_slot_offsets(meta, n, m)
  planes = []
  for j in range(m):
    plane = jnp.zeros(meta.shape, values[0].dtype)
    for s in range(n):
      plane = jnp.where(offs[s] == j, values[s], plane)
    planes.append(plane)
  return planes
