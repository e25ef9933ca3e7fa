"""Sparse weight formats: tiled bitmap (Flash-LLM), N:M structured, block-sparse (BSR).

All three store a weight ``w: [K, N]`` (``y = x @ w``, K the contraction axis) and are
pytrees (arrays are leaves, shapes and block sizes static), built offline on the host:

* :class:`TiledSparse` -- unstructured sparsity, "load as sparse, compute as dense"
  (Xia et al., 2023, Flash-LLM). ``w`` is cut into ``tile_k x tile_n`` tiles; each tile
  keeps a bitmap of its non-zeros (one bit an element, ``uint32`` words along N) and its
  non-zero values packed row-major; ``row_ptr[k, t]`` is where row ``k`` of tile column
  ``t`` starts in ``values``. A kernel step loads one tile's bitmap and values and
  expands them on chip: the value at ``(r, c)`` is ``values[row_ptr[r] + rank]`` where
  ``rank`` is the number of set bits left of ``c`` in row ``r`` (an in-register prefix
  sum), so the expanded tile needs no index per non-zero.
  Bytes per element: ``(1 - s) * itemsize + 1/8 + 4 / tile_n`` (bf16 at 80% sparsity and
  64-wide tiles: 0.59 bytes vs 2 dense, 3.4x fewer).
* :class:`NMSparse` -- N:M structured sparsity along K (at most ``n`` non-zeros in each
  group of ``m`` consecutive rows of a column; Mishra et al., 2021 for 2:4). ``values
  [n, G, N]`` holds slot ``s`` of every group (``G = K / m``, padded with zero groups to
  whole kernel steps when the metadata is packed); the uint8 metadata holds the slots'
  row offsets within the group, ``log2(m)`` bits each (slot ``s`` at bit
  ``s * log2(m)``): two groups a byte when that fits in 4 bits (2:4, 1:4, 1:2;
  ``meta_block`` > 0, layout in :func:`kernels_pallas.sparse.pack_nm_meta`), else one.
  2:4 bf16: ``(2 * 2 + 0.5) / (4 * 2)`` = 0.5625 of dense (1.78x fewer bytes).
* :class:`BlockSparse` -- BSR with ``block_k x block_n`` blocks (16..128), stored per
  block column in ELL form: ``blocks [N / bn, R, bk, bn]``, ``block_rows [N / bn, R]``,
  ``counts [N / bn]`` (R = most blocks in a column; slots past ``counts`` are zero blocks),
  plus the transposed index (``t_cols``, ``t_slots``, ``t_counts``: the blocks of each
  block row) that the backward pass ``dx = dy @ w^T`` walks.

``compress`` / ``compress_nm`` / ``compress_bsr`` build them (host-side numpy: the
number of non-zeros is data-dependent), ``decompress`` inverts each exactly.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas.sparse import (WORD_BITS, expand_nm, nm_slot_offsets, pack_nm_meta,
                                   tile_ranks, unpack_nm_meta)

NM_PATTERNS = ((2, 4), (1, 4), (2, 8), (1, 2), (4, 8))
BSR_BLOCKS = (16, 32, 64, 128)
DEFAULT_TILE = (64, 64)


def _static(cls, data, meta):
  return jax.tree_util.register_dataclass(cls, data_fields=data, meta_fields=meta)


@dataclasses.dataclass(frozen=True)
class TiledSparse:
  """Unstructured sparse ``[K, N]`` weight in tiled bitmap form (module docstring).

  Fields:
    values: ``[nnz_padded]`` non-zeros in tile order (tile row, tile column, then
      row-major inside a tile), padded with at least one zero.
    bitmap: uint32 ``[Kp, Np / 32]``; bit ``c % 32`` of word ``[k, c // 32]`` is set when
      ``w[k, c] != 0`` (``Kp``, ``Np``: K, N rounded up to whole tiles).
    row_ptr: int32 ``[Kp, Np / tile_n]``: index in ``values`` of row ``k``'s first
      non-zero in tile column ``t``.
    shape: logical ``(K, N)``.
    tile: ``(tile_k, tile_n)``.
    nnz: number of non-zeros.
  """

  values: jax.Array
  bitmap: jax.Array
  row_ptr: jax.Array
  shape: tuple[int, int]
  tile: tuple[int, int]
  nnz: int

  @property
  def padded_shape(self) -> tuple[int, int]:
    return self.bitmap.shape[0], self.bitmap.shape[1] * WORD_BITS

  @property
  def sparsity(self) -> float:
    return 1.0 - self.nnz / max(1, self.shape[0] * self.shape[1])

  @property
  def dtype(self):
    return self.values.dtype

  def decompress(self) -> jax.Array:
    return decompress(self)


@dataclasses.dataclass(frozen=True)
class NMSparse:
  """N:M sparse ``[K, N]`` weight: ``values [n, G, N]``; ``meta`` uint8 ``[G, N]``
  (``meta_block == 0``) or ``[G / 2, N]`` (two groups a byte in runs of ``2 meta_block``
  groups); ``G >= K / m`` (zero groups pad a packed weight to whole runs)."""

  values: jax.Array
  meta: jax.Array
  shape: tuple[int, int]
  n: int
  m: int
  meta_block: int = 0

  def group_meta(self) -> jax.Array:
    """One metadata byte a group: ``[G, N]`` uint8."""
    return unpack_nm_meta(self.meta, self.meta_block) if self.meta_block else self.meta

  @property
  def sparsity(self) -> float:
    return 1.0 - self.n / self.m

  @property
  def dtype(self):
    return self.values.dtype

  def decompress(self) -> jax.Array:
    return decompress(self)


@dataclasses.dataclass(frozen=True)
class BlockSparse:
  """Block-sparse ``[K, N]`` weight (BSR, ELL per block column; module docstring)."""

  blocks: jax.Array  # [N / bn, R, bk, bn]
  block_rows: jax.Array  # int32 [N / bn, R]
  counts: jax.Array  # int32 [N / bn]
  t_cols: jax.Array  # int32 [K / bk, R_t]: block column of each block of a block row
  t_slots: jax.Array  # int32 [K / bk, R_t]: its slot in that column's ELL list
  t_counts: jax.Array  # int32 [K / bk]
  shape: tuple[int, int]
  block: tuple[int, int]
  num_blocks: int

  @property
  def sparsity(self) -> float:
    bk, bn = self.block
    return 1.0 - self.num_blocks * bk * bn / max(1, self.shape[0] * self.shape[1])

  @property
  def dtype(self):
    return self.blocks.dtype

  def decompress(self) -> jax.Array:
    return decompress(self)


_static(TiledSparse, ["values", "bitmap", "row_ptr"], ["shape", "tile", "nnz"])
_static(NMSparse, ["values", "meta"], ["shape", "n", "m", "meta_block"])
_static(BlockSparse, ["blocks", "block_rows", "counts", "t_cols", "t_slots", "t_counts"],
        ["shape", "block", "num_blocks"])

SPARSE_FORMATS = (TiledSparse, NMSparse, BlockSparse)


def is_sparse(w: Any) -> bool:
  return isinstance(w, SPARSE_FORMATS)


# ----------------------------------------------------------------------------- checks


def _as_matrix(w: Any, where: str) -> np.ndarray:
  if not hasattr(w, "shape") or not hasattr(w, "dtype"):
    raise TypeError(f"{where}: w must be a 2-D array [K, N], got {type(w).__name__}")
  if len(w.shape) != 2:
    raise ValueError(f"{where}: w must be 2-D [K, N], got shape {tuple(w.shape)}")
  if not jnp.issubdtype(w.dtype, jnp.floating):
    raise TypeError(f"{where}: w must be a float array, got {w.dtype}")
  if isinstance(w, jax.core.Tracer):
    raise TypeError(f"{where}: compresses concrete arrays on the host (the number of "
                    "non-zeros is data-dependent); call it outside jit")
  return np.asarray(w)


def parse_nm(pattern: str | tuple[int, int]) -> tuple[int, int]:
  """``"2:4"`` or ``(2, 4)`` -> ``(2, 4)``, validated against :data:`NM_PATTERNS`."""
  if isinstance(pattern, str):
    try:
      n, m = (int(p) for p in pattern.split(":"))
    except ValueError:
      raise ValueError(f"N:M pattern must look like '2:4', got {pattern!r}") from None
  else:
    n, m = pattern
  if (n, m) not in NM_PATTERNS:
    raise ValueError(f"N:M pattern must be one of "
                     f"{[f'{a}:{b}' for a, b in NM_PATTERNS]}, got {n}:{m}")
  return n, m


# ------------------------------------------------------------------------ tiled bitmap


def compress(w: Any, *, tile: tuple[int, int] = DEFAULT_TILE, dtype=None) -> TiledSparse:
  """Builds the tiled bitmap format of ``w`` (its zeros are the pruned weights).

  Args:
    w: ``[K, N]`` float array (concrete, already pruned: zeros are dropped).
    tile: ``(tile_k, tile_n)``; ``tile_n`` a multiple of 32, both powers of two >= 16
      (the kernel's K and N steps; Triton dots need 16).
    dtype: storage dtype of the values (default ``w.dtype``).

  Returns:
    A :class:`TiledSparse`; ``decompress(compress(w))`` equals ``w`` exactly.
  """
  a = _as_matrix(w, "compress")
  tk, tn = tile
  for name, v in (("tile_k", tk), ("tile_n", tn)):
    if v < 16 or v & (v - 1):
      raise ValueError(f"compress: {name} must be a power of two >= 16, got {v}")
  if tn % WORD_BITS:
    raise ValueError(f"compress: tile_n must be a multiple of {WORD_BITS}, got {tn}")
  dtype = jnp.dtype(dtype or w.dtype)
  k, n = a.shape
  kp, np_ = k + (-k % tk), n + (-n % tn)
  ap = np.zeros((kp, np_), a.dtype)
  ap[:k, :n] = a
  nz = ap != 0
  kt, nt = kp // tk, np_ // tn
  # Tile order: [KT, NT, tk, tn], row-major inside a tile.
  tiles = ap.reshape(kt, tk, nt, tn).transpose(0, 2, 1, 3)
  tmask = nz.reshape(kt, tk, nt, tn).transpose(0, 2, 1, 3)
  values = tiles[tmask]
  row_counts = tmask.sum(axis=3).reshape(-1)  # [KT * NT * tk]
  starts = np.concatenate([[0], np.cumsum(row_counts)[:-1]]).astype(np.int64)
  row_ptr = starts.reshape(kt, nt, tk).transpose(0, 2, 1).reshape(kp, nt)
  if values.size >= 2**31:
    raise ValueError(f"compress: {values.size} non-zeros overflow int32 row pointers")
  bits = nz.reshape(kp, np_ // WORD_BITS, WORD_BITS).astype(np.uint64)
  words = (bits << np.arange(WORD_BITS, dtype=np.uint64)).sum(axis=2).astype(np.uint32)
  pad = 1 + (-(values.size + 1) % 128)  # >= 1 zero: a kernel may read one past the end
  values = np.concatenate([values, np.zeros(pad, values.dtype)])
  return TiledSparse(jnp.asarray(values, dtype), jnp.asarray(words),
                     jnp.asarray(row_ptr.astype(np.int32)), (k, n), (tk, tn),
                     int(nz.sum()))


def unpack_bitmap(bitmap: jax.Array) -> jax.Array:
  """uint32 ``[R, C / 32]`` -> bool ``[R, C]`` (bit ``c % 32`` of word ``c // 32``)."""
  shifts = jnp.arange(WORD_BITS, dtype=jnp.uint32)
  bits = (bitmap[:, :, None] >> shifts) & jnp.uint32(1)
  return bits.reshape(bitmap.shape[0], -1).astype(bool)


def expand_tiles(ts: TiledSparse) -> jax.Array:
  """The padded dense ``[Kp, Np]`` weight (the kernel's per-tile expansion, whole-matrix)."""
  kp, np_ = ts.padded_shape
  tn = ts.tile[1]
  mask = unpack_bitmap(ts.bitmap)
  bits = mask.reshape(kp, np_ // tn, tn).astype(jnp.int32)
  idx = ts.row_ptr[:, :, None] + tile_ranks(bits, axis=2)
  dense = jnp.where(bits == 1, ts.values[jnp.minimum(idx, ts.values.shape[0] - 1)], 0)
  return dense.reshape(kp, np_).astype(ts.values.dtype)


# ------------------------------------------------------------------------------- N:M


NM_META_BLOCK = 32  # groups per half-run of packed metadata (the kernel's K step / 2)


def compress_nm(w: Any, pattern: str | tuple[int, int] = "2:4", *, dtype=None,
                pack_meta: bool | None = None, meta_block: int = NM_META_BLOCK) -> NMSparse:
  """N:M storage of ``w``, which must already satisfy the pattern along K.

  Args:
    w: ``[K, N]`` with at most ``n`` non-zeros in every group of ``m`` consecutive rows of
      each column (e.g. ``w * nm_mask(w, "2:4")``); K divisible by ``m``.
    pattern: ``"2:4"``, ``"1:4"``, ``"2:8"``, ...
    dtype: storage dtype of the values (default ``w.dtype``).
    pack_meta: two groups a metadata byte (default: when ``n * log2(m) <= 4``).
    meta_block: groups per half-run of packed metadata (a power of two >= 16).

  Returns:
    :class:`NMSparse`. Groups with fewer than ``n`` non-zeros keep zeros in the spare slots.
  """
  n, m = parse_nm(pattern)
  a = _as_matrix(w, "compress_nm")
  k, cols = a.shape
  if k % m:
    raise ValueError(f"compress_nm: K = {k} (w.shape {a.shape}) must be divisible by M = {m}")
  bits = int(math.log2(m))
  fits = n * bits <= 4
  pack = fits if pack_meta is None else bool(pack_meta)
  if pack and not fits:
    raise ValueError(f"compress_nm: {n}:{m} needs {n * bits} metadata bits a group; "
                     "pack_meta needs <= 4")
  if pack and (meta_block < 16 or meta_block & (meta_block - 1)):
    raise ValueError(f"compress_nm: meta_block must be a power of two >= 16, got {meta_block}")
  g = a.reshape(k // m, m, cols)
  nz = g != 0
  worst = int(nz.sum(axis=1).max()) if a.size else 0
  if worst > n:
    raise ValueError(f"compress_nm: w is not {n}:{m} sparse along K: a group holds {worst} "
                     f"non-zeros (prune it first, e.g. w * nm_mask(w, '{n}:{m}'))")
  # Slot order: the non-zero rows first (ascending), then the smallest zero rows.
  order = np.argsort(~nz, axis=1, kind="stable")[:, :n, :]  # [K/m, n, N]
  vals = np.take_along_axis(g, order, axis=1).transpose(1, 0, 2)  # [n, K/m, N]
  meta = np.zeros((k // m, cols), np.int32)
  for s in range(n):
    meta |= order[:, s, :].astype(np.int32) << (s * bits)
  meta = jnp.asarray(meta.astype(np.uint8))
  vals = jnp.asarray(vals, dtype or w.dtype)
  if not pack:
    return NMSparse(vals, meta, (k, cols), n, m)
  gp = -(-(k // m) // (2 * meta_block)) * 2 * meta_block
  vals = jnp.pad(vals, ((0, 0), (0, gp - k // m), (0, 0)))
  meta = pack_nm_meta(jnp.pad(meta, ((0, gp - k // m), (0, 0))), meta_block)
  return NMSparse(vals, meta, (k, cols), n, m, meta_block)


# ------------------------------------------------------------------------------- BSR


def compress_bsr(w: Any, *, block: tuple[int, int] = (32, 32), dtype=None) -> BlockSparse:
  """BSR storage of ``w``: the ``block`` tiles holding any non-zero are kept.

  Args:
    w: ``[K, N]``; K and N divisible by the block sizes.
    block: ``(block_k, block_n)``, each one of 16, 32, 64, 128.
    dtype: storage dtype (default ``w.dtype``).
  """
  a = _as_matrix(w, "compress_bsr")
  bk, bn = block
  for name, v in (("block_k", bk), ("block_n", bn)):
    if v not in BSR_BLOCKS:
      raise ValueError(f"compress_bsr: {name} must be one of {BSR_BLOCKS}, got {v}")
  k, n = a.shape
  if k % bk or n % bn:
    raise ValueError(f"compress_bsr: w.shape {a.shape} must be divisible by the block "
                     f"{block}")
  kb, nb = k // bk, n // bn
  tiles = a.reshape(kb, bk, nb, bn).transpose(2, 0, 1, 3)  # [NB, KB, bk, bn]
  present = np.abs(tiles).reshape(nb, kb, -1).max(axis=2) > 0  # [NB, KB]
  return _bsr_from_tiles(tiles, present, (k, n), block, dtype or w.dtype)


def bsr_from_block_mask(w: Any, block_mask: Any, *, block: tuple[int, int], dtype=None
                        ) -> BlockSparse:
  """BSR of ``w`` keeping exactly the blocks where ``block_mask [K / bk, N / bn]`` is set
  (kept blocks may hold zeros: the pattern is fixed, e.g. for training)."""
  a = _as_matrix(w, "bsr_from_block_mask")
  bk, bn = block
  k, n = a.shape
  bm = np.asarray(block_mask, bool)
  if k % bk or n % bn or bm.shape != (k // bk, n // bn):
    raise ValueError(f"bsr_from_block_mask: block_mask shape {bm.shape} must be "
                     f"(K / {bk}, N / {bn}) for w.shape {a.shape}")
  tiles = a.reshape(k // bk, bk, n // bn, bn).transpose(2, 0, 1, 3)
  return _bsr_from_tiles(tiles, bm.T, (k, n), block, dtype or w.dtype)


def _bsr_from_tiles(tiles, present, shape, block, dtype) -> BlockSparse:
  nb, kb, bk, bn = tiles.shape
  counts = present.sum(axis=1)
  r = max(1, int(counts.max()) if counts.size else 1)
  blocks = np.zeros((nb, r, bk, bn), tiles.dtype)
  rows = np.zeros((nb, r), np.int32)
  t_lists = [[] for _ in range(kb)]
  for c in range(nb):
    idx = np.nonzero(present[c])[0]
    blocks[c, :idx.size] = tiles[c, idx]
    rows[c, :idx.size] = idx
    for slot, row in enumerate(idx):
      t_lists[row].append((c, slot))
  rt = max(1, max((len(t) for t in t_lists), default=1))
  t_cols = np.zeros((kb, rt), np.int32)
  t_slots = np.zeros((kb, rt), np.int32)
  for row, lst in enumerate(t_lists):
    for i, (c, slot) in enumerate(lst):
      t_cols[row, i], t_slots[row, i] = c, slot
  t_counts = np.array([len(t) for t in t_lists], np.int32)
  return BlockSparse(jnp.asarray(blocks, dtype), jnp.asarray(rows), jnp.asarray(counts, jnp.int32),
                     jnp.asarray(t_cols), jnp.asarray(t_slots), jnp.asarray(t_counts),
                     tuple(shape), tuple(block), int(counts.sum()))


def bsr_dense(blocks: jax.Array, w: BlockSparse) -> jax.Array:
  """Dense ``[K, N]`` from ``blocks`` laid out like ``w.blocks`` (exact; differentiable in
  ``blocks``: padded ELL slots are masked out)."""
  nb, r, bk, bn = blocks.shape
  kb = w.shape[0] // bk
  valid = (jnp.arange(r)[None, :] < w.counts[:, None]).astype(blocks.dtype)  # [NB, R]
  cols = jnp.broadcast_to(jnp.arange(nb)[:, None], (nb, r))
  dense = jnp.zeros((kb, nb, bk, bn), blocks.dtype)
  dense = dense.at[w.block_rows, cols].add(blocks * valid[:, :, None, None])
  return dense.transpose(0, 2, 1, 3).reshape(w.shape)


# ---------------------------------------------------------------------------- generic


def decompress(w: Any) -> jax.Array:
  """Dense ``[K, N]`` of any sparse format (exact)."""
  if not is_sparse(w):
    raise TypeError(f"decompress: w must be TiledSparse, NMSparse or BlockSparse, got "
                    f"{type(w).__name__}")
  return _decompress(w)


@jax.jit
def _decompress(w: Any) -> jax.Array:
  if isinstance(w, TiledSparse):
    k, n = w.shape
    return expand_tiles(w)[:k, :n]
  if isinstance(w, NMSparse):
    planes = expand_nm([w.values[s] for s in range(w.n)], w.group_meta(), w.n, w.m)
    k, n = w.shape
    return jnp.stack(planes, axis=1).reshape(-1, n)[:k]
  return bsr_dense(w.blocks, w)


__all__ = ["BlockSparse", "NMSparse", "TiledSparse", "bsr_dense", "bsr_from_block_mask",
           "compress", "compress_bsr", "compress_nm", "decompress", "expand_nm",
           "expand_tiles", "is_sparse", "nm_slot_offsets", "parse_nm", "sparsify", "unpack_bitmap"]


def sparsify(w: Any, *, fmt: str = "tiled", min_sparsity: float = 0.5, **kwargs) -> Any:
  """The serving form of a pruned ``w``: compressed when its sparsity reaches
  ``min_sparsity`` (the break-even), else ``w`` itself (the dense fallback, taken once).

  Args:
    w: ``[K, N]`` pruned weight (concrete).
    fmt: ``"tiled"`` (:func:`compress`), ``"nm"`` (:func:`compress_nm`, ``pattern=``) or
      ``"bsr"`` (:func:`compress_bsr`, ``block=``).
    min_sparsity: in ``[0, 1]``.
    **kwargs: passed to the compressor.
  """
  builders = {"tiled": compress, "nm": compress_nm, "bsr": compress_bsr}
  if fmt not in builders:
    raise ValueError(f"sparsify: fmt must be one of {sorted(builders)}, got {fmt!r}")
  if not 0.0 <= min_sparsity <= 1.0:
    raise ValueError(f"sparsify: min_sparsity must be in [0, 1], got {min_sparsity}")
  a = _as_matrix(w, "sparsify")
  if fmt != "nm" and 1.0 - np.count_nonzero(a) / max(a.size, 1) < min_sparsity:
    return w
  return builders[fmt](w, **kwargs)
