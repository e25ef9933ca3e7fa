"""Sparse matmul kernels in Pallas' Triton lowering: tiled bitmap (Flash-LLM), sliced ELL,
N:M (tensor-core planes and a 2:4 decode layout), block-sparse (BSR) forward and
backward, and a CATS activation-sparse SwiGLU MLP.

All compute ``y = x @ w`` for ``x: [M, K]`` and a sparse ``w: [K, N]`` (formats in
:mod:`kernels_pallas.sparse`) and read only the compressed bytes of ``w``:

* :func:`tiled_sparse_matmul` ("load as sparse, compute as dense", Xia et al. 2023):
  program ``(n, s, mb)`` owns one ``tile_n`` column block and the ``s``-th of
  ``split_k`` slices of K, for all rows of ``x`` (m <= 64: the tiles are expanded once).
  A thread owns one column of each ``[32, tile_n]`` word tile: it extracts the 32 bits of
  its word, ranks them with a prefix sum down its own registers (no shuffles), gathers
  ``values[bit * (col_ptr + rank)]`` (an unset bit reads the leading zero: no mask) and
  the expanded tile feeds a tensor-core dot. The next step's words are prefetched.
  Partial products of the ``split_k`` slices are summed by the caller.
* :func:`ell_sparse_matmul` (decode, M <= 16): sliced ELL (Kreutzer et al. 2014) of the
  columns; each slot gathers ``x[i, base + offset]`` (x stays in L1 / L2) and accumulates
  ``value * x`` in float32 with FMAs: the weight is never expanded, so the work scales
  with the non-zeros, not with K x N.
* :func:`nm_sparse_matmul`: the tiled partition; a step loads ``n`` value planes and the
  metadata of its groups, rebuilds the ``m`` dense row planes with selects
  (:func:`kernels_pallas.sparse.expand_nm`) and does ``m`` dots against ``x[:, j::m]``.
  :func:`nm_words_matmul` (2:4 decode): uint32 words (two values, eight groups' offsets),
  each slot gathers its ``x`` entry, FMA.
* :func:`bsr_matmul` / :func:`bsr_matmul_t` / :func:`bsr_weight_grad`: block-sparse
  forward ``x @ w``, input gradient ``dy @ w^T`` (walks the transposed index) and weight
  gradient of the kept blocks only (``x_blk^T @ dy_blk``, looping over M).
* :func:`cats_mlp`: decode-time SwiGLU with thresholded activations (Lee et al., 2024,
  CATS) in two kernels: gate and up fused per neuron block (only active neurons' up rows
  are read), then the down projection over active rows only.

Why Triton: the expansions need per-lane gathers and selects on register tiles, which the
Triton lowering has (pointer gathers, masked loads, in-thread scans) and Mosaic GPU's
Pallas dialect lacks; the kernels are also interpretable on CPU. Measurements and the
instruction counts behind the designs: notes/sparse.md.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kernels_pallas.sparse import WORD_BITS, expand_nm, tile_ranks

MIN_DOT = 16  # Triton's smallest dot dimension
DEFAULT_NUM_SMS = 132
TARGET_PROGRAMS_PER_SM = 2
MIN_STEPS_PER_SPLIT = 2


@dataclasses.dataclass(frozen=True)
class SparseMatmulConfig:
  """Launch of :func:`tiled_sparse_matmul` / :func:`nm_sparse_matmul` (the K and N steps
  are the format's tile)."""

  block_m: int = 16
  split_k: int = 1
  num_warps: int = 4
  num_stages: int = 3
  gather: bool = True  # diagnostic (tiled): False skips the value gather (wrong result)
  whole_tile: bool = True  # tiled: expand tiles of <= 4 words at once (else word by word)

  def __post_init__(self):
    if self.block_m < MIN_DOT or self.block_m & (self.block_m - 1):
      raise ValueError(f"SparseMatmulConfig.block_m must be a power of two >= {MIN_DOT}, "
                       f"got {self.block_m}")
    if self.split_k < 1:
      raise ValueError(f"SparseMatmulConfig.split_k must be >= 1, got {self.split_k}")


def default_config(m: int, n: int, k_steps: int, block_n: int,
                   num_sms: int = DEFAULT_NUM_SMS,
                   programs_per_sm: int = TARGET_PROGRAMS_PER_SM) -> SparseMatmulConfig:
  """Split K (a power of two dividing ``k_steps``) until ~``programs_per_sm`` programs an
  SM (the N:M kernel's launch)."""
  block_m = MIN_DOT if m <= MIN_DOT else (32 if m <= 32 else 64)
  programs = max(1, -(-n // block_n)) * max(1, -(-m // block_m))
  split = 1
  while (programs * split < programs_per_sm * num_sms
         and k_steps % (2 * split) == 0 and k_steps // (2 * split) >= MIN_STEPS_PER_SPLIT):
    split *= 2
  return SparseMatmulConfig(block_m=block_m, split_k=split,
                            num_warps=4 if block_m <= 32 else 8, num_stages=3)


TILED_PROGRAMS_PER_SM = 4
MAX_WHOLE_TILE_WORDS = 4  # taller tiles expand word row by word row (no spills)


def tiled_default_config(m: int, n: int, k_steps: int, tile_n: int,
                         num_sms: int = DEFAULT_NUM_SMS) -> SparseMatmulConfig:
  """The tiled kernel's launch: one row block for all of ``m <= 64`` (each program expands
  its tiles once), ``tile_n / 32`` warps (a thread owns one column of a tile, so the rank
  prefix sum stays in registers), split K to ~4 programs an SM."""
  cfg = default_config(m, n, k_steps, tile_n, num_sms, TILED_PROGRAMS_PER_SM)
  return dataclasses.replace(cfg, num_warps=max(1, min(8, tile_n // WORD_BITS)))


def _dot(a, b, **kwargs):
  """Tensor-core dot, float32 accumulation; float32 operands in full precision (no tf32)."""
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return pltriton.dot(a, b, precision=precision, **kwargs)


def _compiler_params(cfg):
  return pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _check_tiles(name: str, m: int, k: int, n: int, tm: int, tk: int, tn: int):
  if m % tm or k % tk or n % tn:
    raise ValueError(f"{name}: (M, K, N) = {(m, k, n)} is not a multiple of the tile "
                     f"{(tm, tk, tn)}; pad the operands")


def _row_mask(row_block, bm: int, m_real: int, width: int) -> jax.Array:
  """``[bm, width]`` True on rows below ``m_real``: padded rows of ``x`` are never stored
  (for ``m = 1`` the partial products cost ``split_k * N`` floats, not ``16x`` that)."""
  r = row_block * bm + lax.broadcasted_iota(jnp.int32, (bm, width), 0)
  return r < m_real


# ----------------------------------------------------------------- tiled bitmap (unstructured)


def _tiled_kernel(x_ref, v_ref, bm_ref, cp_ref, o_ref, *, q_words: int, tile_n: int,
                  steps: int, m_real: int, cfg: SparseMatmulConfig):
  bm = cfg.block_m
  col_block, split, row_block = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  rows = pl.ds(row_block * bm, bm)
  cols = pl.ds(col_block * tile_n, tile_n)
  bit = lax.broadcasted_iota(jnp.uint32, (WORD_BITS, tile_n), 0)

  def word_product(acc, ptr, word, s):
    """``acc + x[:, 32 s : 32 s + 32] @ (the 32 rows of word row s, expanded)``."""
    # one thread owns a column: its 32 rows of this word are consecutive values
    bits = ((word >> bit) & jnp.uint32(1)).astype(jnp.int32)  # [32, tile_n]
    rank = tile_ranks(bits, axis=0)  # in-thread prefix sum along the column
    if cfg.gather:
      vals = v_ref[bits * (ptr + rank)]  # unset bits read values[0] == 0
    else:
      vals = (bits * (ptr + rank)).astype(x_ref.dtype)
    acc = acc + _dot(x_ref[rows, pl.ds(s * WORD_BITS, WORD_BITS)], vals.astype(x_ref.dtype))
    return acc, ptr + jnp.sum(bits, axis=0, keepdims=True)

  tk = q_words * WORD_BITS
  bit3 = lax.broadcasted_iota(jnp.uint32, (q_words, WORD_BITS, tile_n), 1)

  def load_index(kt):
    return cp_ref[pl.ds(kt, 1), cols], bm_ref[pl.ds(kt * q_words, q_words), cols]

  def step(i, carry):
    # invariant: acc = x @ (this split's first i tile rows of w, expanded)
    acc, (ptr, words) = carry
    kt = split * steps + i
    nxt = load_index(kt + jnp.minimum(i + 1, steps - 1) - i)  # prefetch (clamped)
    # the whole tile at once: bits [q, 32, tile_n] -> [tile_k, tile_n] (rows stay in the
    # thread), one prefix sum down the column and one dot a step
    bits = ((words[:, None, :] >> bit3) & jnp.uint32(1)).astype(jnp.int32).reshape(tk, tile_n)
    rank = tile_ranks(bits, axis=0)
    if cfg.gather:
      vals = v_ref[bits * (ptr + rank)]  # unset bits read values[0] == 0
    else:
      vals = (bits * (ptr + rank)).astype(x_ref.dtype)
    acc = acc + _dot(x_ref[rows, pl.ds(kt * tk, tk)], vals.astype(x_ref.dtype))
    return acc, nxt

  def load_index_rows(kt):
    words = [bm_ref[pl.ds(kt * q_words + q, 1), cols] for q in range(q_words)]
    return cp_ref[pl.ds(kt, 1), cols], words  # [1, tile_n] each

  def step_words(i, carry):
    # the same, word row by word row (fewer live registers for tall tiles)
    acc, (ptr, words) = carry
    kt = split * steps + i
    nxt = load_index_rows(kt + jnp.minimum(i + 1, steps - 1) - i)  # prefetch (clamped)
    for q in range(q_words):
      acc, ptr = word_product(acc, ptr, words[q], kt * q_words + q)
    return acc, nxt

  def step_lean(i, acc):
    # the same, one word row at a time and no prefetch: fewer live registers for the
    # wide accumulators of block_m > 32
    kt = split * steps + i

    def word(q, carry):
      acc, ptr = carry
      s = kt * q_words + q
      return word_product(acc, ptr, bm_ref[pl.ds(s, 1), cols], s)

    return lax.fori_loop(0, q_words, word, (acc, cp_ref[pl.ds(kt, 1), cols]))[0]

  acc = jnp.zeros((bm, tile_n), jnp.float32)
  if bm > 32:
    acc = lax.fori_loop(0, steps, step_lean, acc)
  else:
    whole = cfg.whole_tile and q_words <= MAX_WHOLE_TILE_WORDS
    body, first = (step, load_index) if whole else (step_words, load_index_rows)
    acc, _ = lax.fori_loop(0, steps, body, (acc, first(split * steps)))
  pltriton.store(o_ref.at[split, rows, cols], acc,
                 mask=_row_mask(row_block, bm, m_real, tile_n))


def tiled_sparse_matmul(x: jax.Array, values: jax.Array, bitmap: jax.Array,
                        col_ptr: jax.Array, *, tile: tuple[int, int], m_real: int | None = None,
                        config: SparseMatmulConfig | None = None,
                        interpret: bool = False) -> jax.Array:
  """``x @ w`` for a tiled-bitmap ``w`` (fields of ``jaxeff.sparse.TiledSparse``).

  Args:
    x: ``[M, Kp]`` bfloat16 / float16 (float32 runs full-precision dots), ``M`` a
      multiple of ``block_m`` and ``Kp`` of ``tile_k * split_k`` (pad with zeros).
    values: ``[1 + nnz_padded]`` (a leading zero, then the packed non-zeros);
      bitmap: uint32 ``[Kp / 32, Np]``; col_ptr: int32 ``[Kp / tile_k, Np]``.
    tile: ``(tile_k, tile_n)`` of the format.
    m_real: rows of ``x`` that are not padding (default M); only those are written.
    config: launch; None picks :func:`tiled_default_config`.
    interpret: Pallas interpret mode (any platform).

  Returns:
    ``[m_real, Np]`` float32.
  """
  tk, tn = tile
  m, k = x.shape
  n = bitmap.shape[1]
  if bitmap.shape[0] * WORD_BITS != k:
    raise ValueError(f"tiled_sparse_matmul: x has K = {k}, the bitmap "
                     f"{bitmap.shape[0] * WORD_BITS} rows")
  cfg = config or tiled_default_config(m, n, k // tk, tn)
  _check_tiles("tiled_sparse_matmul", m, k, n, cfg.block_m, tk * cfg.split_k, tn)
  steps = k // (tk * cfg.split_k)
  m_real = m if m_real is None else m_real
  kernel = functools.partial(_tiled_kernel, q_words=tk // WORD_BITS, tile_n=tn, steps=steps,
                             m_real=m_real, cfg=cfg)
  partial = pl.pallas_call(
      kernel,
      grid=(n // tn, cfg.split_k, m // cfg.block_m),
      out_shape=jax.ShapeDtypeStruct((cfg.split_k, m, n), jnp.float32),
      compiler_params=_compiler_params(cfg),
      interpret=interpret,
      name="tiled_sparse_matmul",
  )(x, values, bitmap, col_ptr)
  return jnp.sum(partial[:, :m_real], axis=0)


# ------------------------------------------------------------------ sliced ELL (gather x)


@dataclasses.dataclass(frozen=True)
class EllConfig:
  """Launch of :func:`ell_sparse_matmul`: ``split`` programs share a block's chunks."""

  split: int = 1
  num_warps: int = 4
  num_stages: int = 1
  gather_x: bool = True  # diagnostic: False reads x[i, 0] for every slot (wrong result)


def ell_default_config(num_blocks: int, chunks_per_block: int, m: int = 1,
                       num_sms: int = DEFAULT_NUM_SMS) -> EllConfig:
  """About ``ELL_PROGRAMS_PER_SM`` programs an SM, at least two chunks a program, twice
  that split at m = 1; 8 warps past 4 rows of x (the per-row accumulators spread over
  twice the threads)."""
  split = max(1, min(-(-ELL_PROGRAMS_PER_SM * num_sms // max(num_blocks, 1)),
                     chunks_per_block // 2))
  if m == 1:  # H100, 80% sparse 8192^2 (session 4): split 18 26.5 us, 9 30.4 us, 4 40.8 us
    split *= 2
  return EllConfig(split=split, num_warps=4 if m <= 4 else 8)


ELL_PROGRAMS_PER_SM = 4


def _ell_kernel(x_ref, d_ref, b_ref, bp_ref, o_ref, *, k: int, m_rows: int, split: int,
                block_n: int, gather_x: bool = True):
  cb, sp = pl.program_id(0), pl.program_id(1)
  start = bp_ref[cb]
  count = bp_ref[cb + 1] - start
  per = (count + split - 1) // split
  n = jnp.maximum(jnp.minimum(per, count - sp * per), 0)
  first = start + sp * per
  # the column bases, read through a zero-row-stride index in the planes' own layout
  # (a [1, block_n] load would need a layout conversion, i.e. a barrier, every step)
  lane = lax.broadcasted_iota(jnp.int32, d_ref.shape[2:], 1)

  def load(t):
    # clamped: the prefetch past the last chunk, and splits past a short block's chunks
    ch = jnp.minimum(first + jnp.minimum(t, jnp.maximum(n - 1, 0)), d_ref.shape[0] - 1)
    return d_ref[ch, 0], d_ref[ch, 1], d_ref[ch, 2], b_ref[ch * block_n + lane]

  def body(t, carry):
    # invariant: accs[i] = sum over this program's first t chunks of value * x[i, row]
    accs, (w0, w1, w2, base) = carry
    nxt = load(t + 1)  # prefetch the next chunk while this one gathers x
    accs = list(accs)
    for j in range(4):  # slot 4 s + j of every word
      row = base + ((w0 >> (8 * j)) & jnp.uint32(0xFF)).astype(jnp.int32)
      if not gather_x:
        row = row * 0
      vw = w1 if j < 2 else w2
      vbits = (vw << 16) if j % 2 == 0 else (vw & jnp.uint32(0xFFFF0000))
      v = lax.bitcast_convert_type(vbits, jnp.float32)  # the bf16 value, exactly
      for i in range(m_rows):
        accs[i] = accs[i] + v * x_ref[i * k + row].astype(jnp.float32)
    return tuple(accs), nxt

  shape = d_ref.shape[2:]
  init = (tuple(jnp.zeros(shape, jnp.float32) for _ in range(m_rows)), load(0))
  accs, _ = lax.fori_loop(0, n, body, init)
  for i in range(m_rows):
    o_ref[sp, i, pl.ds(cb * block_n, block_n)] = jnp.sum(accs[i], axis=0)


def ell_sparse_matmul(x: jax.Array, data: jax.Array, base: jax.Array, block_ptr: jax.Array,
                      *, chunks_per_block: int = 0, config: EllConfig | None = None,
                      interpret: bool = False) -> jax.Array:
  """``x @ w`` for a sliced-ELL ``w`` (fields of ``jaxeff.sparse.EllSparse``), columns in
  the sorted order.

  Each program walks a share of one block's chunks: it loads a chunk's three word planes
  ``[chunk / 4, block_n]`` (16-byte loads) and the column bases, prefetches the next
  chunk, and for each slot gathers ``x[i, base + offset]`` (``x`` stays in L1/L2) and
  accumulates ``value * x`` in float32 (FMA, no tensor cores: ``M`` is small).

  Args:
    x: ``[M, K]`` (any float dtype; M small: the kernel unrolls over rows).
    data: uint32 ``[C, 3, chunk / 4, block_n]``; base: int32 ``[C, block_n]``;
      block_ptr: int32 ``[NB + 1]``.
    chunks_per_block: the most chunks of a block (for the default split).
    config: launch; None picks :func:`ell_default_config`.

  Returns:
    ``[M, NB * block_n]`` float32 (sorted columns).
  """
  m, k = x.shape
  nb = block_ptr.shape[0] - 1
  block_n = data.shape[3]
  cfg = config or ell_default_config(nb, chunks_per_block, m)
  kernel = functools.partial(_ell_kernel, k=k, m_rows=m, split=cfg.split, block_n=block_n,
                             gather_x=cfg.gather_x)
  partial = pl.pallas_call(
      kernel,
      grid=(nb, cfg.split),
      out_shape=jax.ShapeDtypeStruct((cfg.split, m, nb * block_n), jnp.float32),
      compiler_params=pltriton.CompilerParams(num_warps=cfg.num_warps,
                                              num_stages=cfg.num_stages),
      interpret=interpret,
      name="ell_sparse_matmul",
  )(x.reshape(-1), data, base.reshape(-1), block_ptr)
  return jnp.sum(partial, axis=0)


# ------------------------------------------------------------------------------- N:M


def _nm_kernel(x_ref, v_ref, meta_ref, o_ref, *, n: int, m: int, block_g: int,
               block_n: int, steps: int, m_real: int, packed: bool, cfg: SparseMatmulConfig):
  bm = cfg.block_m
  col_block, split, row_block = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  rows = pl.ds(row_block * bm, bm)
  cols = pl.ds(col_block * block_n, block_n)

  def add_run(acc, g0, meta):
    groups = pl.ds(g0, block_g)
    vals = [v_ref[s, groups, cols] for s in range(n)]
    for j, plane in enumerate(expand_nm(vals, meta, n, m)):
      # dense rows g * m + j of the tile against x[:, j::m]
      acc = acc + _dot(x_ref[j, rows, groups], plane.astype(x_ref.dtype))
    return acc

  def step(i, acc):
    # invariant: acc = x @ (dense rows of this split's first i steps of groups)
    t = split * steps + i
    meta = meta_ref[pl.ds(t * block_g, block_g), cols]
    if not packed:
      return add_run(acc, t * block_g, meta)
    acc = add_run(acc, 2 * t * block_g, meta & 0xF)
    return add_run(acc, (2 * t + 1) * block_g, meta >> 4)

  acc = lax.fori_loop(0, steps, step, jnp.zeros((bm, block_n), jnp.float32))
  pltriton.store(o_ref.at[split, rows, cols], acc,
                 mask=_row_mask(row_block, bm, m_real, block_n))


def nm_block_sizes(m: int) -> tuple[int, int]:
  """``(block_g, block_n)``: groups per K step (128 dense rows, >= 16 for the dots) and
  columns (not yet tuned on a GPU)."""
  return max(MIN_DOT, 128 // m), 128


def nm_sparse_matmul(x_planes: jax.Array, values: jax.Array, meta: jax.Array, *, n: int,
                     m: int, meta_block: int = 0, m_real: int | None = None,
                     config: SparseMatmulConfig | None = None,
                     block_n: int | None = None, interpret: bool = False) -> jax.Array:
  """``x @ w`` for an N:M ``w`` (fields of ``jaxeff.sparse.NMSparse``).

  Args:
    x_planes: ``[m, M, G]``: ``x_planes[j] = x[:, j::m]`` (M a multiple of ``block_m``;
      pad with zeros).
    values: ``[n, G, N]`` (N a multiple of ``block_n``).
    meta: uint8 ``[G, N]`` one byte a group (``meta_block == 0``; G a multiple of
      ``block_g * split_k``), or ``[G / 2, N]`` packed two groups a byte in runs of
      ``2 * meta_block`` groups (G a multiple of ``2 * meta_block * split_k``).
    n, m: the pattern.
    m_real: rows that are not padding (default M).

  Returns:
    ``[m_real, N]`` float32.
  """
  _, rows, g = x_planes.shape
  cols = values.shape[2]
  block_g, bn = nm_block_sizes(m)
  packed = meta_block > 0
  block_g = meta_block if packed else block_g
  per_step = block_g * (2 if packed else 1)
  bn = block_n or bn
  cfg = config or default_config(rows, cols, g // per_step, bn)
  _check_tiles("nm_sparse_matmul", rows, g, cols, cfg.block_m, per_step * cfg.split_k, bn)
  steps = g // (per_step * cfg.split_k)
  m_real = rows if m_real is None else m_real
  kernel = functools.partial(_nm_kernel, n=n, m=m, block_g=block_g, block_n=bn, steps=steps,
                             m_real=m_real, packed=packed, cfg=cfg)
  partial = pl.pallas_call(
      kernel,
      grid=(cols // bn, cfg.split_k, rows // cfg.block_m),
      out_shape=jax.ShapeDtypeStruct((cfg.split_k, rows, cols), jnp.float32),
      compiler_params=_compiler_params(cfg),
      interpret=interpret,
      name=f"nm{n}_{m}_sparse_matmul",
  )(x_planes, values, meta)
  return jnp.sum(partial[:, :m_real], axis=0)


# -------------------------------------------------------------- 2:4 words (gather x)


NM_WORDS_ROWS = 4  # word rows a step: 4 x 8 groups = 128 dense rows
NM_WORDS_PROGRAMS_PER_SM = 4


def nm_words_default_split(n_blocks: int, row_steps: int,
                           num_sms: int = DEFAULT_NUM_SMS) -> int:
  """Split the K steps (a power of two dividing them) to ~4 programs an SM."""
  split = 1
  while (n_blocks * split < NM_WORDS_PROGRAMS_PER_SM * num_sms and row_steps % (2 * split) == 0
         and row_steps // (2 * split) >= MIN_STEPS_PER_SPLIT):
    split *= 2
  return split


def _nm_words_kernel(x_ref, v_ref, m_ref, o_ref, *, k: int, m_rows: int, steps: int,
                     block_n: int):
  cb, sp = pl.program_id(0), pl.program_id(1)
  cols = pl.ds(cb * block_n, block_n)
  r_in_step = lax.broadcasted_iota(jnp.int32, (NM_WORDS_ROWS, block_n), 0)

  def load(t):
    rs = pl.ds((sp * steps + jnp.minimum(t, steps - 1)) * NM_WORDS_ROWS, NM_WORDS_ROWS)
    return m_ref[rs, cols], tuple(v_ref[rs, p, cols] for p in range(8))

  def body(t, carry):
    # invariant: accs[i] = sum over this program's first t steps of value * x[i, row]
    accs, (meta, vals) = carry
    nxt = load(t + 1)  # prefetch the next step's words
    group_row = ((sp * steps + t) * NM_WORDS_ROWS + r_in_step) * 32  # dense row of group 8r
    accs = list(accs)
    for p in range(8):  # group 8 r + p of every word
      for slot in range(2):
        off = ((meta >> (4 * p + 2 * slot)) & jnp.uint32(3)).astype(jnp.int32)
        row = group_row + (4 * p) + off
        vbits = (vals[p] << 16) if slot == 0 else (vals[p] & jnp.uint32(0xFFFF0000))
        v = lax.bitcast_convert_type(vbits, jnp.float32)
        for i in range(m_rows):
          accs[i] = accs[i] + v * x_ref[i * k + row].astype(jnp.float32)
    return tuple(accs), nxt

  zeros = jnp.zeros((NM_WORDS_ROWS, block_n), jnp.float32)
  accs, _ = lax.fori_loop(0, steps, body, (tuple(zeros for _ in range(m_rows)), load(0)))
  for i in range(m_rows):
    o_ref[sp, i, cols] = jnp.sum(accs[i], axis=0)


def nm_words_matmul(x: jax.Array, values: jax.Array, meta: jax.Array, *, block_n: int = 128,
                    split: int | None = None, num_warps: int = 4,
                    interpret: bool = False) -> jax.Array:
  """``x @ w`` for a 2:4 ``w`` in the words layout (``jaxeff.sparse.NMSparse`` with
  ``words=True``), for decode: no expansion of ``w``; each slot gathers its ``x`` entry
  (``row = 32 r + 4 p + offset``; the four rows of a group share a sector, so a warp's
  gather touches one or two) and accumulates ``value * x`` in float32.

  Args:
    x: ``[M, Kp]`` with ``Kp = 32 * values.shape[0]`` (pad with zeros; M small).
    values: uint32 ``[Kp / 32, 8, N]``; meta: uint32 ``[Kp / 32, N]``; N a multiple of
      ``block_n``.

  Returns:
    ``[M, N]`` float32.
  """
  m, k = x.shape
  g8, _, n = values.shape
  if k != 32 * g8:
    raise ValueError(f"nm_words_matmul: x has K = {k}, the words hold {32 * g8} rows")
  _check_tiles("nm_words_matmul", m, g8, n, 1, NM_WORDS_ROWS, block_n)
  row_steps = g8 // NM_WORDS_ROWS
  split = split or nm_words_default_split(n // block_n, row_steps)
  if row_steps % split:
    raise ValueError(f"nm_words_matmul: split {split} must divide the {row_steps} K steps")
  kernel = functools.partial(_nm_words_kernel, k=k, m_rows=m, steps=row_steps // split,
                             block_n=block_n)
  partial = pl.pallas_call(
      kernel, grid=(n // block_n, split),
      out_shape=jax.ShapeDtypeStruct((split, m, n), jnp.float32),
      compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret, name="nm24_words_matmul",
  )(x.reshape(-1), values, meta)
  return jnp.sum(partial, axis=0)


def _nm_words_dot_kernel(x_ref, v_ref, m_ref, o_ref, *, rows: int, tile_n: int, steps: int,
                         m_real: int, block_m: int):
  cb, sp = pl.program_id(0), pl.program_id(1)
  cols = pl.ds(cb * tile_n, tile_n)
  nib_shift = lax.broadcasted_iota(jnp.uint32, (rows, 8, tile_n), 1) * 4
  row_in_group = lax.broadcasted_iota(jnp.uint32, (rows, 8, 4, tile_n), 2)
  tk = rows * 32

  def step(i, acc):
    # invariant: acc = x @ (this split's first i steps of 32 * rows dense rows)
    t = sp * steps + i
    rs = pl.ds(t * rows, rows)
    nib = (m_ref[rs, cols][:, None, :] >> nib_shift) & jnp.uint32(0xF)  # [rows, 8, tile_n]
    vals = v_ref[rs, :, cols]
    o0, o1 = (nib & 3)[:, :, None, :], (nib >> 2)[:, :, None, :]
    lo, hi = (vals & jnp.uint32(0xFFFF))[:, :, None, :], (vals >> 16)[:, :, None, :]
    # dense row 32 r + 4 p + j: slot 0's value where its offset is j, else slot 1's, else 0
    dense = jnp.where(o0 == row_in_group, lo, jnp.where(o1 == row_in_group, hi, jnp.uint32(0)))
    dense = lax.bitcast_convert_type(dense.reshape(tk, tile_n).astype(jnp.uint16),
                                     jnp.bfloat16)
    return acc + _dot(x_ref[:, pl.ds(t * tk, tk)], dense.astype(x_ref.dtype))

  acc = lax.fori_loop(0, steps, step, jnp.zeros((block_m, tile_n), jnp.float32))
  pltriton.store(o_ref.at[sp, :, cols], acc, mask=_row_mask(0, block_m, m_real, tile_n))


def nm_words_dot_matmul(x: jax.Array, values: jax.Array, meta: jax.Array, *,
                        m_real: int | None = None, tile_n: int = 128, rows: int = 4,
                        split: int | None = None, num_warps: int = 4, num_stages: int = 3,
                        interpret: bool = False) -> jax.Array:
  """``x @ w`` for a 2:4 ``w`` in the words layout, on the tensor cores (any ``M <= 64``).

  A step loads ``rows`` word rows (``32 * rows`` dense rows; cp.async-pipelined, feeding
  the dot), rebuilds the dense bf16 tile with two compares and two selects an element
  (``[rows, 8, 4, tile_n]`` reshaped in registers to ``[32 * rows, tile_n]``) and multiplies
  it with the matching columns of ``x``.

  Args:
    x: ``[M, Kp]`` (M a multiple of 16 up to 64, ``Kp = 32 * values.shape[0]``; pad with
      zeros).
    values: uint32 ``[Kp / 32, 8, N]``; meta: uint32 ``[Kp / 32, N]``.
    m_real: rows of ``x`` that are not padding (default M).

  Returns:
    ``[m_real, N]`` float32.
  """
  m, k = x.shape
  g8, _, n = values.shape
  if k != 32 * g8:
    raise ValueError(f"nm_words_dot_matmul: x has K = {k}, the words hold {32 * g8} rows")
  _check_tiles("nm_words_dot_matmul", m, g8, n, MIN_DOT, rows, tile_n)
  row_steps = g8 // rows
  split = split or nm_words_default_split(n // tile_n, row_steps)
  if row_steps % split:
    raise ValueError(f"nm_words_dot_matmul: split {split} must divide the {row_steps} K steps")
  m_real = m if m_real is None else m_real
  kernel = functools.partial(_nm_words_dot_kernel, rows=rows, tile_n=tile_n,
                             steps=row_steps // split, m_real=m_real, block_m=m)
  partial = pl.pallas_call(
      kernel, grid=(n // tile_n, split),
      out_shape=jax.ShapeDtypeStruct((split, m, n), jnp.float32),
      compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret, name="nm24_words_dot_matmul",
  )(x, values, meta)
  return jnp.sum(partial[:, :m_real], axis=0)


# ------------------------------------------------------------------------------- BSR


@dataclasses.dataclass(frozen=True)
class BsrConfig:
  block_m: int = 32
  num_warps: int = 4
  num_stages: int = 2


def _bsr_fwd_kernel(x_ref, b_ref, rows_ref, counts_ref, o_ref, *, bk: int, bn: int, bm: int):
  col, row_block = pl.program_id(0), pl.program_id(1)
  rows = pl.ds(row_block * bm, bm)

  def body(r, acc):
    # invariant: acc = x[rows] @ (block column `col`, its first r stored blocks)
    kb = rows_ref[col, r]
    return acc + _dot(x_ref[rows, pl.ds(kb * bk, bk)], b_ref[col, r].astype(x_ref.dtype))

  acc = lax.fori_loop(0, counts_ref[col], body, jnp.zeros((bm, bn), jnp.float32))
  o_ref[rows, pl.ds(col * bn, bn)] = acc.astype(o_ref.dtype)


def bsr_matmul(x: jax.Array, blocks: jax.Array, block_rows: jax.Array, counts: jax.Array, *,
               out_dtype=jnp.float32, config: BsrConfig | None = None,
               interpret: bool = False) -> jax.Array:
  """``x [M, K] @ w [K, N]`` for BSR ``w`` (``blocks [N / bn, R, bk, bn]``); M a multiple
  of ``block_m``. Returns ``[M, N]`` in ``out_dtype``."""
  cfg = config or BsrConfig()
  m, k = x.shape
  nb, _, bk, bn = blocks.shape
  _check_tiles("bsr_matmul", m, k, nb * bn, cfg.block_m, bk, bn)
  kernel = functools.partial(_bsr_fwd_kernel, bk=bk, bn=bn, bm=cfg.block_m)
  return pl.pallas_call(
      kernel, grid=(nb, m // cfg.block_m),
      out_shape=jax.ShapeDtypeStruct((m, nb * bn), out_dtype),
      compiler_params=_compiler_params(cfg), interpret=interpret, name="bsr_matmul",
  )(x, blocks, block_rows, counts)


def _bsr_t_kernel(dy_ref, b_ref, tcols_ref, tslots_ref, tcounts_ref, o_ref, *, bk: int,
                  bn: int, bm: int):
  row, row_block = pl.program_id(0), pl.program_id(1)
  rows = pl.ds(row_block * bm, bm)

  def body(t, acc):
    # invariant: acc = dy[rows] @ (first t blocks of block row `row`)^T
    c, slot = tcols_ref[row, t], tslots_ref[row, t]
    wb = b_ref[c, slot].astype(dy_ref.dtype)  # [bk, bn]
    return acc + _dot(dy_ref[rows, pl.ds(c * bn, bn)], wb, trans_b=True)

  acc = lax.fori_loop(0, tcounts_ref[row], body, jnp.zeros((bm, bk), jnp.float32))
  o_ref[rows, pl.ds(row * bk, bk)] = acc.astype(o_ref.dtype)


def bsr_matmul_t(dy: jax.Array, blocks: jax.Array, t_cols: jax.Array, t_slots: jax.Array,
                 t_counts: jax.Array, *, k: int, out_dtype=jnp.float32,
                 config: BsrConfig | None = None, interpret: bool = False) -> jax.Array:
  """``dy [M, N] @ w^T`` for BSR ``w`` (walks the transposed index). Returns ``[M, K]``."""
  cfg = config or BsrConfig()
  m, n = dy.shape
  _, _, bk, bn = blocks.shape
  _check_tiles("bsr_matmul_t", m, k, n, cfg.block_m, bk, bn)
  kernel = functools.partial(_bsr_t_kernel, bk=bk, bn=bn, bm=cfg.block_m)
  return pl.pallas_call(
      kernel, grid=(k // bk, m // cfg.block_m),
      out_shape=jax.ShapeDtypeStruct((m, k), out_dtype),
      compiler_params=_compiler_params(cfg), interpret=interpret, name="bsr_matmul_t",
  )(dy, blocks, t_cols, t_slots, t_counts)


def _bsr_dw_kernel(x_ref, dy_ref, rows_ref, counts_ref, o_ref, *, bk: int, bn: int, bm: int,
                   m_steps: int):
  col, slot = pl.program_id(0), pl.program_id(1)
  kb = rows_ref[col, slot]
  # padded slots stay zero (arithmetic, not a select of literals: see moe/triton.py)
  steps = m_steps * (slot < counts_ref[col]).astype(jnp.int32)

  def body(i, acc):
    # invariant: acc = x[:i*bm, block rows]^T @ dy[:i*bm, block cols]
    mrows = pl.ds(i * bm, bm)
    return acc + _dot(x_ref[mrows, pl.ds(kb * bk, bk)], dy_ref[mrows, pl.ds(col * bn, bn)],
                        trans_a=True)

  acc = lax.fori_loop(0, steps, body, jnp.zeros((bk, bn), jnp.float32))
  o_ref[col, slot] = acc.astype(o_ref.dtype)


def bsr_weight_grad(x: jax.Array, dy: jax.Array, block_rows: jax.Array, counts: jax.Array, *,
                    block: tuple[int, int], out_dtype=jnp.float32,
                    config: BsrConfig | None = None, interpret: bool = False) -> jax.Array:
  """Gradient of the stored blocks: ``[N / bn, R, bk, bn]`` with block ``(c, r)`` =
  ``x[:, rows of block]^T @ dy[:, cols of c]`` (zero for padded slots)."""
  cfg = config or BsrConfig()
  m, k = x.shape
  n = dy.shape[1]
  bk, bn = block
  nb, r = block_rows.shape
  _check_tiles("bsr_weight_grad", m, k, n, cfg.block_m, bk, bn)
  kernel = functools.partial(_bsr_dw_kernel, bk=bk, bn=bn, bm=cfg.block_m,
                             m_steps=m // cfg.block_m)
  return pl.pallas_call(
      kernel, grid=(nb, r),
      out_shape=jax.ShapeDtypeStruct((nb, r, bk, bn), out_dtype),
      compiler_params=_compiler_params(cfg), interpret=interpret, name="bsr_weight_grad",
  )(x, dy, block_rows, counts)


# ------------------------------------------------------------------------------ CATS


@dataclasses.dataclass(frozen=True)
class CatsConfig:
  """Launch of :func:`cats_mlp`: ``block_h`` neurons a program in the gate / up kernel
  (``block_d`` columns a load), ``down_block_h x down_block_d`` tiles in the down kernel
  split ``down_split`` ways over the neurons."""

  block_h: int = 16
  block_d: int = 256
  down_block_h: int = 32
  down_block_d: int = 256
  down_split: int = 32
  num_warps: int = 4


def cats_default_config(m: int, d: int, h: int, num_sms: int = DEFAULT_NUM_SMS) -> CatsConfig:
  """Register budget ~64 float32 accumulators a thread: tiles shrink as ``m`` grows."""
  block_d = next((b for b in (256, 128, 64) if d % b == 0 and b * m <= 256), 64)
  down_d = next((b for b in ((256, 128, 64) if m <= 2 else (128, 64)) if d % b == 0), 64)
  down_h = 8
  while down_h < 32 and 2 * down_h * down_d * m <= 8192:  # <= ~64 accumulators a thread
    down_h *= 2
  blocks = -(-d // down_d)
  steps = max(1, h // down_h)
  split = 1
  while blocks * split * 2 <= 4 * num_sms and steps % (2 * split) == 0:
    split *= 2
  return CatsConfig(block_h=16, block_d=block_d, down_block_h=down_h, down_block_d=down_d,
                    down_split=split)


def _gemv_rows(w_ref, x_ref, hs, *, m_rows: int, block_h: int, block_d: int, d: int,
               mask=None):
  """``[m_rows][block_h]``: ``x[i] . w[h]`` over all of D (float32), rows ``hs`` of
  ``w [H, D]`` (rows with ``mask`` False are never fetched: they read as zero).

  ``x`` is read through a ``[block_h, block_d]`` index with zero row stride, so it takes
  the weight tile's register layout (no conversion); the next chunk's weights are loaded
  before this chunk's products (a register double buffer)."""
  cols = lax.broadcasted_iota(jnp.int32, (block_h, block_d), 1)

  def load_w(j):
    ds = pl.ds(jnp.minimum(j, d // block_d - 1) * block_d, block_d)
    if mask is None:
      return w_ref[hs, ds]
    return pltriton.load(w_ref.at[hs, ds], mask=jnp.broadcast_to(mask, (block_h, block_d)),
                         other=0)

  def body(j, carry):
    # invariant: accs[i] = x[i, :j*block_d] * w[:, :j*block_d] (not yet summed over D)
    accs, w = carry
    nxt = load_w(j + 1)
    wf = w.astype(jnp.float32)
    accs = tuple(a + wf * x_ref[i * d + j * block_d + cols].astype(jnp.float32)
                 for i, a in enumerate(accs))
    return accs, nxt

  init = (tuple(jnp.zeros((block_h, block_d), jnp.float32) for _ in range(m_rows)), load_w(0))
  accs, _ = lax.fori_loop(0, d // block_d, body, init)
  return [jnp.sum(a, axis=1) for a in accs]


def _cats_gate_up_kernel(x_ref, wg_ref, wu_ref, t_ref, hid_ref, act_ref, *, m_rows: int,
                         cfg: CatsConfig, d: int):
  bh = cfg.block_h
  hs = pl.ds(pl.program_id(0) * bh, bh)
  t = t_ref[0]
  gate = _gemv_rows(wg_ref, x_ref, hs, m_rows=m_rows, block_h=bh, block_d=cfg.block_d, d=d)
  act = [g / (1.0 + jnp.exp(-g)) for g in gate]  # silu
  keep = [jnp.abs(a) > t for a in act]
  active = keep[0]
  for k in keep[1:]:
    active = active | k
  # only active neurons' rows of up^T are read
  up = _gemv_rows(wu_ref, x_ref, hs, m_rows=m_rows, block_h=bh, block_d=cfg.block_d, d=d,
                  mask=active[:, None])
  for i in range(m_rows):
    hid_ref[pl.ds(i, 1), hs] = jnp.where(keep[i], act[i] * up[i], 0.0)[None, :]
  act_ref[hs] = active.astype(jnp.int32)


def _cats_down_kernel(hid_ref, act_ref, wd_ref, o_ref, *, m_rows: int, cfg: CatsConfig,
                      steps: int):
  bh, bd = cfg.down_block_h, cfg.down_block_d
  cb, sp = pl.program_id(0), pl.program_id(1)
  cols = pl.ds(cb * bd, bd)

  def body(s, accs):
    # invariant: accs[i] = sum over this split's first s row blocks of hid[i, h] * down[h]
    hs = pl.ds((sp * steps + s) * bh, bh)
    active = act_ref[hs] != 0
    mask = jnp.broadcast_to(active[:, None], (bh, bd))
    w = pltriton.load(wd_ref.at[hs, cols], mask=mask, other=0).astype(jnp.float32)
    return tuple(a + hid_ref[i, hs][:, None] * w
                 for i, a in enumerate(accs))

  accs = lax.fori_loop(0, steps, body,
                       tuple(jnp.zeros((bh, bd), jnp.float32) for _ in range(m_rows)))
  for i in range(m_rows):
    o_ref[sp, pl.ds(i, 1), cols] = jnp.sum(accs[i], axis=0)[None, :]


def cats_mlp(x: jax.Array, gate_t: jax.Array, up_t: jax.Array, down: jax.Array,
             threshold: jax.Array, *, config: CatsConfig | None = None,
             interpret: bool = False) -> tuple[jax.Array, jax.Array]:
  """CATS SwiGLU at decode: ``((|a| > t) * a * (x @ up)) @ down``, ``a = silu(x @ gate)``.

  Two kernels, both streaming whole weight rows: (1) each program takes ``block_h``
  neurons, computes their gate over all of D (every row of ``gate^T`` is read), the
  thresholded activation and the per-neuron ``active`` flag (active in some row of x),
  then reads only the active neurons' rows of ``up^T`` (masked loads: inactive rows are
  never fetched) and writes ``hid = a * u``; (2) the down projection reads only active
  rows of ``down``, each program a ``down_block_d`` column slice of one of ``down_split``
  shares of the neurons (partial sums added by the caller).

  Args:
    x: ``[M, D]`` (M small: rows are unrolled).
    gate_t, up_t: ``[H, D]`` (the gate / up projections transposed); down: ``[H, D]``.
    threshold: float32 ``[1]``.

  Returns:
    ``(y [M, D] float32, active [H] int32)``.
  """
  m, d = x.shape
  h = gate_t.shape[0]
  cfg = config or cats_default_config(m, d, h)
  _check_tiles("cats_mlp", m, h, d, 1, cfg.block_h, cfg.block_d)
  _check_tiles("cats_mlp", m, h, d, 1, cfg.down_block_h * cfg.down_split, cfg.down_block_d)
  params = pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=1)
  hid, active = pl.pallas_call(
      functools.partial(_cats_gate_up_kernel, m_rows=m, cfg=cfg, d=d),
      grid=(h // cfg.block_h,),
      out_shape=(jax.ShapeDtypeStruct((m, h), jnp.float32), jax.ShapeDtypeStruct((h,), jnp.int32)),
      compiler_params=params, interpret=interpret, name="cats_gate_up",
  )(x.reshape(-1), gate_t, up_t, threshold)
  steps = h // (cfg.down_block_h * cfg.down_split)
  partial = pl.pallas_call(
      functools.partial(_cats_down_kernel, m_rows=m, cfg=cfg, steps=steps),
      grid=(d // cfg.down_block_d, cfg.down_split),
      out_shape=jax.ShapeDtypeStruct((cfg.down_split, m, d), jnp.float32),
      compiler_params=params, interpret=interpret, name="cats_down",
  )(hid, active, down)
  return jnp.sum(partial, axis=0), active


__all__ = ["BsrConfig", "CatsConfig", "EllConfig", "SparseMatmulConfig", "bsr_matmul",
           "bsr_matmul_t", "bsr_weight_grad", "cats_default_config", "cats_mlp",
           "default_config", "ell_default_config", "ell_sparse_matmul", "nm_block_sizes",
           "nm_sparse_matmul", "nm_words_default_split", "nm_words_dot_matmul",
           "nm_words_matmul",
           "tiled_default_config", "tiled_sparse_matmul"]
