"""Sparse weight formats: tiled bitmap (Flash-LLM), sliced ELL, N:M structured, block-sparse.

All store a weight ``w: [K, N]`` (``y = x @ w``, K the contraction axis) and are pytrees
(arrays are leaves, shapes and block sizes static), built offline on the host:

* :class:`TiledSparse` -- unstructured sparsity, "load as sparse, compute as dense"
  (Xia et al., 2023, Flash-LLM). ``w`` is cut into ``tile_k x tile_n`` tiles. The bitmap
  has one bit an element in ``uint32`` words that run along K (word ``[s, c]`` holds rows
  ``32 s .. 32 s + 31`` of column ``c``); the non-zero values are packed tile by tile,
  column-major inside a tile, after one leading zero; ``col_ptr[t, c]`` counts the
  values stored before column ``c`` of tile row ``t``. A kernel thread that owns one
  column of a tile expands it with a running count of set bits (an in-register prefix
  sum along its own rows): element ``(r, c)`` is ``values[bit * (col_ptr + rank)]``
  with ``rank`` the set bits of the column up to and including ``r`` (an unset bit reads
  the leading zero, so the gather needs no mask). Bytes per element:
  ``(1 - s) * itemsize + 1/8 + 4 / tile_k`` (bf16, 80% sparsity, 128-row tiles: 0.56
  bytes vs 2 dense, 3.6x fewer).
* :class:`EllSparse` -- unstructured sparsity as sliced ELL (SELL-C-sigma, Kreutzer et
  al. 2014) of ``w``'s columns, for the decode kernel that gathers ``x`` instead of
  expanding ``w``: columns sorted by non-zero count, in blocks of ``block_n``; each
  column's non-zeros in chunks of ``chunk`` slots (bf16 value + one byte of row offset
  from the chunk's base row, so 3 bytes a slot plus ``4 / chunk`` of base). Bytes per
  element ``~(1 - s) * (3 + 4 / chunk)``: 0.63 at 80%, 0.33 at 90%.
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

``compress`` / ``compress_ell`` / ``compress_nm`` / ``compress_bsr`` build them (host-side
numpy: the number of non-zeros is data-dependent), ``decompress`` inverts each exactly.
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
DEFAULT_TILE = (128, 128)


def _static(cls, data, meta):
  return jax.tree_util.register_dataclass(cls, data_fields=data, meta_fields=meta)


@dataclasses.dataclass(frozen=True)
class TiledSparse:
  """Unstructured sparse ``[K, N]`` weight in tiled bitmap form (module docstring).

  Fields:
    values: ``[1 + nnz_padded]``: a zero, then the non-zeros in tile order (tile column,
      tile row, then column-major inside a tile), then zero padding.
    bitmap: uint32 ``[Kp / 32, Np]``; bit ``k % 32`` of word ``[k // 32, c]`` is set when
      ``w[k, c] != 0`` (``Kp``, ``Np``: K, N rounded up to whole tiles).
    col_ptr: int32 ``[Kp / tile_k, Np]``: number of non-zeros stored before column ``c``
      of tile row ``t`` (its values start at ``values[1 + col_ptr[t, c]]``).
    shape: logical ``(K, N)``.
    tile: ``(tile_k, tile_n)``.
    nnz: number of non-zeros.
  """

  values: jax.Array
  bitmap: jax.Array
  col_ptr: jax.Array
  shape: tuple[int, int]
  tile: tuple[int, int]
  nnz: int

  @property
  def padded_shape(self) -> tuple[int, int]:
    return self.bitmap.shape[0] * WORD_BITS, self.bitmap.shape[1]

  @property
  def sparsity(self) -> float:
    return 1.0 - self.nnz / max(1, self.shape[0] * self.shape[1])

  @property
  def dtype(self):
    return self.values.dtype

  def decompress(self) -> jax.Array:
    return decompress(self)


@dataclasses.dataclass(frozen=True)
class EllSparse:
  """Unstructured sparse ``[K, N]`` weight as sliced ELL over sorted columns (module
  docstring): for the kernel that gathers ``x`` (decode, ``M <= 8``).

  Fields:
    data: uint32 ``[C, 3, chunk / 4, block_n]``: chunk ``c`` of a block of ``block_n``
      (sorted) columns holds ``chunk`` slots a column: plane 0 the slots' row offsets (a
      byte each, slot ``4 i + j`` in byte ``j`` of word ``i``), planes 1 and 2 the bf16
      values of slots ``4 i, 4 i + 1`` and ``4 i + 2, 4 i + 3`` (low half first).
    base: int32 ``[C, block_n]``: row of each column's first slot in the chunk (row =
      base + offset).
    block_ptr: int32 ``[Np / block_n + 1]``: chunks of block ``b`` are
      ``block_ptr[b] : block_ptr[b + 1]``.
    inv_perm: int32 ``[N]``: position of column ``c`` among the sorted columns.
    shape: logical ``(K, N)``.
    chunk: slots a column a chunk (a multiple of 16).
    block_n: columns a block.
    nnz: number of non-zeros.
  """

  data: jax.Array
  base: jax.Array
  block_ptr: jax.Array
  inv_perm: jax.Array
  shape: tuple[int, int]
  chunk: int
  block_n: int
  nnz: int

  @property
  def sparsity(self) -> float:
    return 1.0 - self.nnz / max(1, self.shape[0] * self.shape[1])

  @property
  def dtype(self):
    return jnp.dtype(jnp.bfloat16)

  @property
  def num_blocks(self) -> int:
    return self.block_ptr.shape[0] - 1

  def decompress(self) -> jax.Array:
    return decompress(self)


@dataclasses.dataclass(frozen=True)
class NMSparse:
  """N:M sparse ``[K, N]`` weight: ``values [n, G, N]``; ``meta`` uint8 ``[G, N]``
  (``meta_block == 0``) or ``[G / 2, N]`` (two groups a byte in runs of ``2 meta_block``
  groups); ``G >= K / m`` (zero groups pad a packed weight to whole runs).

  ``words`` (2:4 only, for the decode kernel that gathers x): ``values`` uint32
  ``[G / 8, 8, N]`` (group ``8 r + p`` in ``[r, p]``: slot 0's bf16 in the low half, slot
  1's in the high half) and ``meta`` uint32 ``[G / 8, N]`` (group ``8 r + p`` in bits
  ``4 p .. 4 p + 3``: slot 0's row offset, then slot 1's, 2 bits each); G a multiple of 32.
  """

  values: jax.Array
  meta: jax.Array
  shape: tuple[int, int]
  n: int
  m: int
  meta_block: int = 0
  words: bool = False

  def group_meta(self) -> jax.Array:
    """One metadata byte a group: ``[G, N]`` uint8."""
    if self.words:
      shifts = jnp.arange(0, 32, 4, dtype=jnp.uint32)[None, :, None]
      nib = (self.meta[:, None, :] >> shifts) & jnp.uint32(0xF)
      return nib.reshape(-1, self.meta.shape[1]).astype(jnp.uint8)
    return unpack_nm_meta(self.meta, self.meta_block) if self.meta_block else self.meta

  def slot_values(self) -> jax.Array:
    """``[n, G, N]``: the value of slot ``s`` of every group."""
    if not self.words:
      return self.values
    v = self.values.reshape(-1, self.values.shape[2])
    halves = jnp.stack([v & jnp.uint32(0xFFFF), v >> 16]).astype(jnp.uint16)
    return jax.lax.bitcast_convert_type(halves, jnp.bfloat16)

  @property
  def sparsity(self) -> float:
    return 1.0 - self.n / self.m

  @property
  def dtype(self):
    return jnp.dtype(jnp.bfloat16) if self.words else self.values.dtype

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


_static(TiledSparse, ["values", "bitmap", "col_ptr"], ["shape", "tile", "nnz"])
_static(EllSparse, ["data", "base", "block_ptr", "inv_perm"], ["shape", "chunk", "block_n", "nnz"])
_static(NMSparse, ["values", "meta"], ["shape", "n", "m", "meta_block", "words"])
_static(BlockSparse, ["blocks", "block_rows", "counts", "t_cols", "t_slots", "t_counts"],
        ["shape", "block", "num_blocks"])

SPARSE_FORMATS = (TiledSparse, EllSparse, NMSparse, BlockSparse)


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
    tile: ``(tile_k, tile_n)``: multiples of 32, powers of two (the kernel's K and N
      steps).
    dtype: storage dtype of the values (default ``w.dtype``).

  Returns:
    A :class:`TiledSparse`; ``decompress(compress(w))`` equals ``w`` exactly.
  """
  a = _as_matrix(w, "compress")
  tk, tn = tile
  for name, v in (("tile_k", tk), ("tile_n", tn)):
    if v < WORD_BITS or v & (v - 1):
      raise ValueError(f"compress: {name} must be a power of two >= {WORD_BITS}, got {v}")
  dtype = jnp.dtype(dtype or w.dtype)
  k, n = a.shape
  kp, np_ = k + (-k % tk), n + (-n % tn)
  ap = np.zeros((kp, np_), a.dtype)
  ap[:k, :n] = a
  nz = ap != 0
  kt, nt = kp // tk, np_ // tn
  # Tile order [NT, KT, tn, tk]: tile column, tile row, then column-major inside a tile.
  tiles = ap.reshape(kt, tk, nt, tn).transpose(2, 0, 3, 1)
  tmask = nz.reshape(kt, tk, nt, tn).transpose(2, 0, 3, 1)
  values = tiles[tmask]
  if values.size >= 2**31 - 256:
    raise ValueError(f"compress: {values.size} non-zeros overflow int32 pointers")
  counts = tmask.sum(axis=3).reshape(-1)  # [NT * KT * tn]
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
  col_ptr = starts.reshape(nt, kt, tn).transpose(1, 0, 2).reshape(kt, np_)
  bits = nz.reshape(kp // WORD_BITS, WORD_BITS, np_).astype(np.uint64)
  shifts = np.arange(WORD_BITS, dtype=np.uint64)[None, :, None]
  words = (bits << shifts).sum(axis=1).astype(np.uint32)
  pad = -(1 + values.size) % 128 or 128
  values = np.concatenate([np.zeros(1, values.dtype), values, np.zeros(pad, values.dtype)])
  return TiledSparse(jnp.asarray(values, dtype), jnp.asarray(words),
                     jnp.asarray(col_ptr.astype(np.int32)), (k, n), (tk, tn), int(nz.sum()))


def unpack_bitmap(bitmap: jax.Array) -> jax.Array:
  """uint32 ``[R / 32, C]`` -> bool ``[R, C]`` (bit ``r % 32`` of word ``[r // 32, c]``)."""
  shifts = jnp.arange(WORD_BITS, dtype=jnp.uint32)
  bits = (bitmap[:, None, :] >> shifts[None, :, None]) & jnp.uint32(1)
  return bits.reshape(-1, bitmap.shape[1]).astype(bool)


def expand_tiles(ts: TiledSparse) -> jax.Array:
  """The padded dense ``[Kp, Np]`` weight (the kernel's per-tile expansion, whole-matrix)."""
  kp, np_ = ts.padded_shape
  tk = ts.tile[0]
  bits = unpack_bitmap(ts.bitmap).astype(jnp.int32).reshape(kp // tk, tk, np_)
  idx = bits * (ts.col_ptr[:, None, :] + tile_ranks(bits, axis=1))  # 0: the leading zero
  return ts.values[idx].reshape(kp, np_)


# ----------------------------------------------------------------------- sliced ELL


ELL_BLOCK_N = 128
ELL_MAX_OFFSET = 255


def ell_chunk(density: float) -> int:
  """Slots a column a chunk: about 160 rows a chunk (one byte of row offset), 16..64."""
  c = 16
  while c < 64 and 2 * c <= 160 * density + 1e-6:
    c *= 2
  return c


def compress_ell(w: Any, *, block_n: int = ELL_BLOCK_N, chunk: int | None = None,
                 dtype=None) -> EllSparse:
  """Builds the sliced-ELL format of ``w`` (bfloat16 values; zeros are dropped).

  Columns are sorted by their number of non-zeros (so a block's columns need about the
  same number of slots) and cut into blocks of ``block_n``; each column's non-zeros, in
  row order, fill chunks of ``chunk`` slots whose rows lie within 255 of the chunk's
  first (a chunk closes early otherwise; its spare slots hold zeros).

  Args:
    w: ``[K, N]`` float array (concrete, pruned); its values are stored as bfloat16.
    block_n: columns a block (a multiple of 32).
    chunk: slots a column a chunk (16, 32 or 64; default :func:`ell_chunk` of the density).
    dtype: None or bfloat16 (the only storage dtype).

  Returns:
    An :class:`EllSparse`; ``decompress`` gives ``w`` in bfloat16 exactly.
  """
  a = _as_matrix(w, "compress_ell")
  if dtype is not None and jnp.dtype(dtype) != jnp.bfloat16:
    raise ValueError(f"compress_ell: values are stored as bfloat16, got dtype={jnp.dtype(dtype)}")
  if block_n < 32 or block_n % 32:
    raise ValueError(f"compress_ell: block_n must be a multiple of 32, got {block_n}")
  k, n = a.shape
  a16 = a if a.dtype == jnp.bfloat16 else np.asarray(jnp.asarray(a).astype(jnp.bfloat16))
  nz = a16 != 0
  nnz = int(np.count_nonzero(nz))
  chunk = chunk or ell_chunk(nnz / max(a.size, 1))
  if chunk not in (16, 32, 64):
    raise ValueError(f"compress_ell: chunk must be 16, 32 or 64, got {chunk}")
  counts = nz.sum(axis=0)
  perm = np.argsort(-counts, kind="stable")  # sorted position -> column
  np_ = n + (-n % block_n)
  flat = np.ascontiguousarray(a16.view(np.uint16).T)[perm].ravel()  # sorted columns
  where = np.flatnonzero(flat & 0x7FFF)  # by sorted column, then row (-0.0 is a zero)
  cols_nz, rows_nz = np.divmod(where, k)
  vals = flat[where]
  col_start = np.searchsorted(cols_nz, np.arange(np_ + 1))
  # Greedy chunks, all columns at once: a chunk takes up to `chunk` slots whose rows are
  # within ELL_MAX_OFFSET of its first row.
  key = cols_nz.astype(np.int64) * (k + 2 * ELL_MAX_OFFSET) + rows_nz
  pos = col_start[:-1].copy()
  end = col_start[1:]
  rec_col, rec_idx, rec_start, rec_take = [], [], [], []
  nch = np.zeros(np_, np.int64)
  while True:
    live = np.nonzero(pos < end)[0]
    if live.size == 0:
      break
    first = rows_nz[pos[live]]
    lim = np.searchsorted(key, live.astype(np.int64) * (k + 2 * ELL_MAX_OFFSET) + first
                          + ELL_MAX_OFFSET, side="right")
    take = np.minimum(np.minimum(lim, end[live]) - pos[live], chunk)
    rec_col.append(live)
    rec_idx.append(nch[live].copy())
    rec_start.append(pos[live].copy())
    rec_take.append(take)
    nch[live] += 1
    pos[live] += take
  nb = np_ // block_n
  per_block = np.maximum(nch.reshape(nb, block_n).max(axis=1), 1)
  block_ptr = np.concatenate([[0], np.cumsum(per_block)]).astype(np.int64)
  c_total = int(block_ptr[-1])
  off = np.zeros((c_total, chunk, block_n), np.uint8)
  val = np.zeros((c_total, chunk, block_n), np.uint16)
  base = np.zeros((c_total, block_n), np.int32)
  if rec_col:
    col = np.concatenate(rec_col)
    idx = np.concatenate(rec_idx)
    start = np.concatenate(rec_start)
    take = np.concatenate(rec_take)
    ch = block_ptr[col // block_n] + idx
    lane = col % block_n
    first_row = rows_nz[start]
    base[ch, lane] = first_row
    # every slot of every chunk: slot j of record r is non-zero start[r] + j
    rec = np.repeat(np.arange(take.size), take)
    j = np.arange(rec.size) - (np.cumsum(take) - take)[rec]
    src = start[rec] + j
    dst = (ch[rec] * chunk + j) * block_n + lane[rec]
    off.reshape(-1)[dst] = rows_nz[src] - first_row[rec]
    val.reshape(-1)[dst] = vals[src]
  s4 = chunk // 4
  o = off.reshape(c_total, s4, 4, block_n).astype(np.uint32)
  v = val.reshape(c_total, s4, 4, block_n).astype(np.uint32)
  words = np.stack([o[:, :, 0] | o[:, :, 1] << 8 | o[:, :, 2] << 16 | o[:, :, 3] << 24,
                    v[:, :, 0] | v[:, :, 1] << 16, v[:, :, 2] | v[:, :, 3] << 16], axis=1)
  inv_perm = np.empty(n, np.int32)
  inv_perm[perm] = np.arange(n, dtype=np.int32)
  return EllSparse(jnp.asarray(words), jnp.asarray(base), jnp.asarray(block_ptr.astype(np.int32)),
                   jnp.asarray(inv_perm), (k, n), chunk, block_n, nnz)


def expand_ell(w: EllSparse) -> jax.Array:
  """Dense bf16 ``[K, N]`` of an :class:`EllSparse` (scatter of every slot; exact)."""
  k, n = w.shape
  d = w.data
  offs = jnp.stack([(d[:, 0] >> (8 * j)) & 0xFF for j in range(4)], axis=2)  # [C, s4, 4, bn]
  lo, hi = d[:, 1], d[:, 2]
  vbits = jnp.stack([lo & 0xFFFF, lo >> 16, hi & 0xFFFF, hi >> 16], axis=2)
  vals = jax.lax.bitcast_convert_type(vbits.astype(jnp.uint16), jnp.bfloat16)
  c_total = d.shape[0]
  block_of = jnp.searchsorted(w.block_ptr, jnp.arange(c_total), side="right") - 1
  cols = block_of[:, None] * w.block_n + jnp.arange(w.block_n)[None, :]  # sorted columns
  rows = w.base[:, None, None, :] + offs.astype(jnp.int32)
  cols = jnp.broadcast_to(cols[:, None, None, :], rows.shape)
  np_ = w.num_blocks * w.block_n
  dense = jnp.zeros((k, np_), jnp.float32).at[rows.reshape(-1), cols.reshape(-1)].add(
      vals.astype(jnp.float32).reshape(-1), mode="drop")
  return dense[:, w.inv_perm].astype(jnp.bfloat16)


# ------------------------------------------------------------------------------- N:M


# Groups per half-run of packed metadata (the kernel's K step / 2). 16 on the H100 (session 4,
# K = N = 8192): 45.8 / 45.9 / 45.0 us at m = 1 / 4 / 16 against 55.0 / 54.0 / 54.4 with 32
# (1.12-1.19x vs 0.93-0.98x dense bf16).
NM_META_BLOCK = 16


NM_WORDS_GROUPS = 32  # the words layout pads G to whole decode-kernel steps


def compress_nm(w: Any, pattern: str | tuple[int, int] = "2:4", *, dtype=None,
                pack_meta: bool | None = None, meta_block: int = NM_META_BLOCK,
                words: bool = False) -> NMSparse:
  """N:M storage of ``w``, which must already satisfy the pattern along K.

  Args:
    w: ``[K, N]`` with at most ``n`` non-zeros in every group of ``m`` consecutive rows of
      each column (e.g. ``w * nm_mask(w, "2:4")``); K divisible by ``m``.
    pattern: ``"2:4"``, ``"1:4"``, ``"2:8"``, ...
    dtype: storage dtype of the values (default ``w.dtype``).
    pack_meta: two groups a metadata byte (default: when ``n * log2(m) <= 4``).
    meta_block: groups per half-run of packed metadata (a power of two >= 16).
    words: the 2:4 decode layout (:class:`NMSparse` docstring; bf16 values).

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
  if words:
    if (n, m) != (2, 4):
      raise ValueError(f"compress_nm: words=True is the 2:4 layout, got {n}:{m}")
    gp = -(-(k // m) // NM_WORDS_GROUPS) * NM_WORDS_GROUPS
    bits16 = np.asarray(jnp.asarray(vals).astype(jnp.bfloat16)).view(np.uint16)
    v32 = np.zeros((gp, cols), np.uint32)
    v32[:k // m] = bits16[0].astype(np.uint32) | bits16[1].astype(np.uint32) << 16
    nib = np.zeros((gp, cols), np.uint32)
    nib[:k // m] = meta
    m32 = (nib.reshape(gp // 8, 8, cols) << (4 * np.arange(8, dtype=np.uint32))[None, :, None]
           ).sum(axis=1, dtype=np.uint32)
    return NMSparse(jnp.asarray(v32.reshape(gp // 8, 8, cols)), jnp.asarray(m32), (k, cols),
                    n, m, 0, True)
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
    raise TypeError(f"decompress: w must be TiledSparse, EllSparse, NMSparse or BlockSparse, got "
                    f"{type(w).__name__}")
  return _decompress(w)


@jax.jit
def _decompress(w: Any) -> jax.Array:
  if isinstance(w, TiledSparse):
    k, n = w.shape
    return expand_tiles(w)[:k, :n]
  if isinstance(w, EllSparse):
    return expand_ell(w)
  if isinstance(w, NMSparse):
    values = w.slot_values()
    planes = expand_nm([values[s] for s in range(w.n)], w.group_meta(), w.n, w.m)
    k, n = w.shape
    return jnp.stack(planes, axis=1).reshape(-1, n)[:k]
  return bsr_dense(w.blocks, w)


__all__ = ["AUTO_ELL_BREAK_EVEN", "BlockSparse", "EllSparse", "NMSparse", "TiledSparse",
           "auto_format", "bsr_dense", "bsr_from_block_mask", "compress", "compress_bsr",
           "compress_ell", "compress_nm", "decompress", "ell_chunk", "expand_ell", "expand_nm",
           "expand_tiles", "is_sparse", "nm_slot_offsets", "parse_nm", "sparsify",
           "unpack_bitmap"]


# Measured break-even of the unstructured decode kernels (H100 80GB HBM3, K = N = 8192,
# bf16, device time against XLA's dense bf16 dot in the same process; notes/sparse.md,
# session 4): ELL / dense at m = 1: 50% 0.97x, 60% 1.21x, 70% 1.49x, 80% 1.75-2.01x,
# 90% 2.62x; at m = 4: 80% 1.01x, 90% 1.46x; every unstructured kernel lost to dense at
# m >= 16 (tiled 0.28-0.98x, ELL 0.20x). Rows are (largest m, smallest sparsity at which
# the ELL kernel beats dense by >= 5%): 0.55 is interpolated between the measured 50%
# (0.97x) and 60% (1.21x); 0.85 between 80% (1.01x) and 90% (1.46x) at m = 4; m = 2 was
# not measured and takes the m = 1 row (the ELL kernel's cost grows with m).
AUTO_ELL_BREAK_EVEN = ((2, 0.55), (4, 0.85))


def auto_format(sparsity: float, rows: int) -> str:
  """The serving format ``sparsify(fmt="auto")`` picks for an unstructured weight.

  Args:
    sparsity: fraction of zeros of the weight, in ``[0, 1]``.
    rows: the number of activation rows ``m`` the weight will mostly be multiplied with
      (1 for token-by-token decode).

  Returns:
    ``"ell"`` where the measured ELL decode kernel beats the dense product
    (:data:`AUTO_ELL_BREAK_EVEN`), else ``"dense"``.
  """
  if not 0.0 <= sparsity <= 1.0:
    raise ValueError(f"auto_format: sparsity must be in [0, 1], got {sparsity}")
  if isinstance(rows, bool) or not isinstance(rows, (int, np.integer)) or rows < 1:
    raise ValueError(f"auto_format: rows must be a positive int, got {rows!r}")
  for max_rows, break_even in AUTO_ELL_BREAK_EVEN:
    if rows <= max_rows:
      return "ell" if sparsity >= break_even else "dense"
  return "dense"


def sparsify(w: Any, *, fmt: str = "auto", min_sparsity: float | None = None, rows: int = 1,
             **kwargs) -> Any:
  """The serving form of a pruned ``w``: compressed when that is faster, else ``w`` itself
  (the dense fallback, decided once, offline).

  Args:
    w: ``[K, N]`` pruned weight (concrete).
    fmt: ``"auto"`` (default: the measured break-even of :func:`auto_format` for
      ``rows`` activation rows and ``w``'s sparsity; ``"ell"`` or dense), ``"tiled"``
      (:func:`compress`), ``"ell"`` (:func:`compress_ell`), ``"nm"`` (:func:`compress_nm`,
      ``pattern=``) or ``"bsr"`` (:func:`compress_bsr`, ``block=``).
    min_sparsity: in ``[0, 1]``; below it ``w`` stays dense (not for ``"nm"``). Default:
      0.5 for a named format; with ``"auto"`` it overrides the measured break-even.
    rows: with ``"auto"``: the activation rows ``m`` of the products the weight serves.
    **kwargs: passed to the compressor.
  """
  builders = {"tiled": compress, "ell": compress_ell, "nm": compress_nm, "bsr": compress_bsr}
  if fmt != "auto" and fmt not in builders:
    raise ValueError(f"sparsify: fmt must be 'auto' or one of {sorted(builders)}, got {fmt!r}")
  if min_sparsity is not None and not 0.0 <= min_sparsity <= 1.0:
    raise ValueError(f"sparsify: min_sparsity must be in [0, 1], got {min_sparsity}")
  a = _as_matrix(w, "sparsify")
  sparsity = 1.0 - np.count_nonzero(a) / max(a.size, 1)
  if fmt == "auto":
    if isinstance(rows, bool) or not isinstance(rows, (int, np.integer)) or rows < 1:
      raise ValueError(f"sparsify: rows must be a positive int, got {rows!r}")
    if min_sparsity is None:
      fmt = auto_format(sparsity, rows)
    else:
      fmt = "ell" if sparsity >= min_sparsity else "dense"
    return w if fmt == "dense" else compress_ell(w, **kwargs)
  if fmt != "nm" and sparsity < (0.5 if min_sparsity is None else min_sparsity):
    return w
  return builders[fmt](w, **kwargs)
