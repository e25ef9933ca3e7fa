"""Sparse matmul kernels: the expansion math every backend (and the formats) share.

Formats (built by :mod:`jaxeff.sparse.formats`; ``w: [K, N]``, ``y = x @ w``):

* tiled bitmap (Flash-LLM, Xia et al. 2023): per row of a ``tile_k x tile_n`` tile, a
  bitmap (uint32 words along N) and a pointer to the row's first packed non-zero; the
  value at column ``c`` is ``values[row_ptr + rank(c)]`` with ``rank(c)`` the set bits left
  of ``c`` (:func:`tile_ranks`).
* N:M along K: ``values [n, K / m, N]`` (slot-major) and ``meta [K / m, N]`` uint8 with
  each slot's row offset in its group (``log2(m)`` bits a slot); :func:`expand_nm`
  rebuilds the ``m`` dense row planes of a tile with selects only (no gather, no reshape).
* BSR, ELL per block column (``blocks [N / bn, R, bk, bn]``, ``block_rows``, ``counts``).

Kernels: :mod:`kernels_pallas.sparse.triton` (Pallas Triton lowering; interpretable on CPU).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

WORD_BITS = 32


def tile_ranks(bits: jax.Array, axis: int = -1) -> jax.Array:
  """Exclusive prefix count of ``bits`` (int32 0/1) along ``axis``: the packed position of
  each element among its row's non-zeros."""
  return jnp.cumsum(bits, axis=axis) - bits


def nm_slot_offsets(meta: jax.Array, n: int, m: int) -> list[jax.Array]:
  """Row offset within its group of each slot: ``n`` int32 arrays shaped like ``meta``."""
  bits = int(math.log2(m))
  q = meta.astype(jnp.int32)
  return [(q >> (s * bits)) & (m - 1) for s in range(n)]


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
