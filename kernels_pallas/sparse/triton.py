"""Sparse matmul kernels in Pallas' Triton lowering: tiled-bitmap (Flash-LLM), N:M,
block-sparse (BSR) forward and backward, and a CATS activation-sparse SwiGLU MLP.

All compute ``y = x @ w`` for ``x: [M, K]`` and a sparse ``w: [K, N]`` (formats in
:mod:`kernels_pallas.sparse`) and read only the compressed bytes of ``w``:

* :func:`tiled_sparse_matmul` ("load as sparse, compute as dense", Xia et al. 2023):
  program ``(n, s, mb)`` owns one ``tile_n`` column block, the ``s``-th of ``split_k``
  slices of K and ``block_m`` rows of ``x``. Each step loads one tile's bitmap words and
  row pointers, forms the bit matrix ``[tile_k, tile_n]``, ranks the set bits with an
  in-register prefix sum (Triton ``scan``), gathers the packed values at
  ``row_ptr + rank`` (a masked load: only set bits load; a tile's values are contiguous,
  so the gather touches only its own cache lines) and feeds the expanded tile to a
  tensor-core dot. Partial products of the ``split_k`` slices (real rows of ``x`` only)
  are summed by the caller (split-K keeps every SM busy at
  ``M <= 64``, as in :mod:`kernels_pallas.matmul.triton`).
* :func:`nm_sparse_matmul`: the same partition; a step loads ``n`` value planes and the
  metadata of its groups (half a byte a group for 2:4 / 1:4: one byte row serves two runs
  of ``block_g`` groups), rebuilds the ``m`` dense row planes
  with selects (:func:`kernels_pallas.sparse.expand_nm`) and does ``m`` dots against the
  matching strided columns of ``x`` (``x[:, j::m]``, split by the caller): no gather, no
  reshape in the kernel.
* :func:`bsr_matmul` / :func:`bsr_matmul_t` / :func:`bsr_weight_grad`: block-sparse
  forward ``x @ w``, input gradient ``dy @ w^T`` (walks the transposed index) and weight
  gradient of the kept blocks only (``x_blk^T @ dy_blk``, looping over M).
* :func:`cats_mlp`: decode-time SwiGLU with thresholded activations (Lee et al., 2024,
  CATS): given ``a = silu(x @ w_gate)`` zeroed under the threshold and the per-neuron
  ``active`` flags, each program walks ``blocks_per_program`` hidden blocks, loads only
  the rows of ``up^T [H, D]`` and ``down [H, D]`` of active neurons (masked loads: masked
  rows are never fetched) and writes a float32 partial ``[M, D]`` that the caller sums.

Why Triton: the expansion needs per-element gathers / selects and a prefix sum on
register tiles, which the Triton lowering has (``scan``, pointer gathers, masked loads)
and Mosaic GPU's Pallas dialect lacks for now; the kernels are also interpretable on CPU.
None of them has been timed on a GPU yet (notes/sparse.md).
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

  def __post_init__(self):
    if self.block_m < MIN_DOT or self.block_m & (self.block_m - 1):
      raise ValueError(f"SparseMatmulConfig.block_m must be a power of two >= {MIN_DOT}, "
                       f"got {self.block_m}")
    if self.split_k < 1:
      raise ValueError(f"SparseMatmulConfig.split_k must be >= 1, got {self.split_k}")


def default_config(m: int, n: int, k_steps: int, block_n: int,
                   num_sms: int = DEFAULT_NUM_SMS) -> SparseMatmulConfig:
  """Split K (a power of two dividing ``k_steps``) until ~2 programs per SM."""
  block_m = MIN_DOT if m <= MIN_DOT else (32 if m <= 32 else 64)
  programs = max(1, -(-n // block_n)) * max(1, -(-m // block_m))
  split = 1
  while (programs * split < TARGET_PROGRAMS_PER_SM * num_sms
         and k_steps % (2 * split) == 0 and k_steps // (2 * split) >= MIN_STEPS_PER_SPLIT):
    split *= 2
  return SparseMatmulConfig(block_m=block_m, split_k=split,
                            num_warps=4 if block_m <= 32 else 8, num_stages=3)


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


def _tiled_kernel(x_ref, v_ref, bm_ref, rp_ref, o_ref, *, tile_k: int, tile_n: int,
                  steps: int, m_real: int, cfg: SparseMatmulConfig):
  bm = cfg.block_m
  col_block, split, row_block = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  rows = pl.ds(row_block * bm, bm)
  words_per_row = tile_n // WORD_BITS
  word_cols = pl.ds(col_block * words_per_row, words_per_row)
  shift = lax.broadcasted_iota(jnp.uint32, (1, 1, WORD_BITS), 2)

  def step(i, acc):
    # invariant: acc = sum over this split's first i K tiles of x_tile @ expand(w_tile)
    k0 = (split * steps + i) * tile_k
    words = bm_ref[pl.ds(k0, tile_k), word_cols]  # [tile_k, tile_n / 32], coalesced
    bits = ((words[:, :, None] >> shift) & jnp.uint32(1)).astype(jnp.int32)
    bits = bits.reshape(tile_k, tile_n)  # bit c % 32 of word c // 32 -> column c
    base = rp_ref[pl.ds(k0, tile_k), pl.ds(col_block, 1)]  # [tile_k, 1]
    nonzero = bits == 1
    # only set bits load a value: the tile's packed values, gathered at row_ptr + rank
    vals = pltriton.load(v_ref.at[base + tile_ranks(bits, axis=1)], mask=nonzero, other=0)
    return acc + _dot(x_ref[rows, pl.ds(k0, tile_k)], vals.astype(x_ref.dtype))

  acc = lax.fori_loop(0, steps, step, jnp.zeros((bm, tile_n), jnp.float32))
  pltriton.store(o_ref.at[split, rows, pl.ds(col_block * tile_n, tile_n)], acc,
                 mask=_row_mask(row_block, bm, m_real, tile_n))


def tiled_sparse_matmul(x: jax.Array, values: jax.Array, bitmap: jax.Array,
                        row_ptr: jax.Array, *, tile: tuple[int, int], m_real: int | None = None,
                        config: SparseMatmulConfig | None = None,
                        interpret: bool = False) -> jax.Array:
  """``x @ w`` for a tiled-bitmap ``w`` (fields of ``jaxeff.sparse.TiledSparse``).

  Args:
    x: ``[M, Kp]`` bfloat16 / float16 (float32 in interpret mode), ``M`` a multiple of
      ``block_m`` and ``Kp`` of ``tile_k * split_k`` (pad with zeros).
    values: ``[nnz_padded]`` packed non-zeros; bitmap: uint32 ``[Kp, Np / 32]``;
      row_ptr: int32 ``[Kp, Np / tile_n]``.
    tile: ``(tile_k, tile_n)`` of the format.
    m_real: rows of ``x`` that are not padding (default M); only those are computed out.
    config: launch; None picks :func:`default_config`.
    interpret: Pallas interpret mode (any platform).

  Returns:
    ``[m_real, Np]`` float32.
  """
  tk, tn = tile
  m, k = x.shape
  n = bitmap.shape[1] * WORD_BITS
  if bitmap.shape[0] != k:
    raise ValueError(f"tiled_sparse_matmul: x has K = {k}, the bitmap {bitmap.shape[0]} rows")
  cfg = config or default_config(m, n, k // tk, tn)
  _check_tiles("tiled_sparse_matmul", m, k, n, cfg.block_m, tk * cfg.split_k, tn)
  steps = k // (tk * cfg.split_k)
  m_real = m if m_real is None else m_real
  kernel = functools.partial(_tiled_kernel, tile_k=tk, tile_n=tn, steps=steps, m_real=m_real,
                             cfg=cfg)
  partial = pl.pallas_call(
      kernel,
      grid=(n // tn, cfg.split_k, m // cfg.block_m),
      out_shape=jax.ShapeDtypeStruct((cfg.split_k, m, n), jnp.float32),
      compiler_params=_compiler_params(cfg),
      interpret=interpret,
      name="tiled_sparse_matmul",
  )(x, values, bitmap, row_ptr)
  return jnp.sum(partial[:, :m_real], axis=0)


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
  block_m: int = 16
  block_h: int = 32  # neurons a step
  block_d: int = 128  # model-dimension chunk
  blocks_per_program: int = 4
  num_warps: int = 4
  num_stages: int = 2


def cats_default_config(m: int, d: int, h: int, num_sms: int = DEFAULT_NUM_SMS) -> CatsConfig:
  """About two programs per SM over the hidden dimension."""
  block_h, block_d = 32, 128 if d % 128 == 0 else 64 if d % 64 == 0 else 32
  hb = max(1, h // block_h)
  per = 1
  while hb % (2 * per) == 0 and hb // (2 * per) >= TARGET_PROGRAMS_PER_SM * num_sms:
    per *= 2
  return CatsConfig(block_m=MIN_DOT if m <= MIN_DOT else 32 if m <= 32 else 64,
                    block_h=block_h, block_d=block_d, blocks_per_program=per)


def _cats_kernel(x_ref, a_ref, act_ref, up_ref, down_ref, o_ref, *, cfg: CatsConfig,
                 d_steps: int, m_real: int):
  bm, bh, bd = cfg.block_m, cfg.block_h, cfg.block_d
  prog, row_block = pl.program_id(0), pl.program_id(1)
  rows = pl.ds(row_block * bm, bm)
  real = _row_mask(row_block, bm, m_real, bd)  # padded rows are never stored
  for j in range(d_steps):  # the partial output starts at zero
    pltriton.store(o_ref.at[prog, rows, pl.ds(j * bd, bd)], jnp.zeros((bm, bd), jnp.float32),
                   mask=real)

  def hidden_block(b, carry):
    h0 = (prog * cfg.blocks_per_program + b) * bh
    hs = pl.ds(h0, bh)
    active = act_ref[hs][:, None] != 0  # [bh, 1]: rows of up^T / down to fetch

    def up_step(j, u):
      # invariant: u = x[rows, :j*bd] @ up[:j*bd, active neurons of the block]
      wt = pltriton.load(up_ref.at[hs, pl.ds(j * bd, bd)], mask=active, other=0.0)
      return u + _dot(x_ref[rows, pl.ds(j * bd, bd)], wt.astype(x_ref.dtype), trans_b=True)

    u = lax.fori_loop(0, d_steps, up_step, jnp.zeros((bm, bh), jnp.float32))
    hid = (a_ref[rows, hs].astype(jnp.float32) * u).astype(x_ref.dtype)  # zero if inactive

    def down_step(j, c):
      ds = pl.ds(j * bd, bd)
      wd = pltriton.load(down_ref.at[hs, ds], mask=active, other=0.0)
      o_ref[prog, rows, ds] = o_ref[prog, rows, ds] + _dot(hid, wd.astype(x_ref.dtype))
      return c

    return lax.fori_loop(0, d_steps, down_step, carry)

  lax.fori_loop(0, cfg.blocks_per_program, hidden_block, 0)


def cats_mlp(x: jax.Array, a: jax.Array, active: jax.Array, up_t: jax.Array,
             down: jax.Array, *, m_real: int | None = None,
             config: CatsConfig | None = None, interpret: bool = False) -> jax.Array:
  """``(a * (x @ up)) @ down`` loading only active neurons' rows of ``up^T`` and ``down``.

  Args:
    x: ``[M, D]`` (M a multiple of ``block_m``, D of ``block_d``).
    a: ``[M, H]`` thresholded ``silu(x @ w_gate)`` (zero where inactive).
    active: int32 ``[H]``: 1 where any row of ``a`` is non-zero.
    up_t: ``[H, D]`` (the up projection transposed); down: ``[H, D]``.
    m_real: rows that are not padding (default M).

  Returns:
    ``[m_real, D]`` float32.
  """
  m, d = x.shape
  h = up_t.shape[0]
  cfg = config or cats_default_config(m, d, h)
  per_prog = cfg.block_h * cfg.blocks_per_program
  _check_tiles("cats_mlp", m, h, d, cfg.block_m, per_prog, cfg.block_d)
  programs = h // per_prog
  m_real = m if m_real is None else m_real
  kernel = functools.partial(_cats_kernel, cfg=cfg, d_steps=d // cfg.block_d, m_real=m_real)
  partial = pl.pallas_call(
      kernel, grid=(programs, m // cfg.block_m),
      out_shape=jax.ShapeDtypeStruct((programs, m, d), jnp.float32),
      compiler_params=_compiler_params(cfg), interpret=interpret, name="cats_mlp",
  )(x, a, active, up_t, down)
  return jnp.sum(partial[:, :m_real], axis=0)


__all__ = ["BsrConfig", "CatsConfig", "SparseMatmulConfig", "bsr_matmul", "bsr_matmul_t",
           "bsr_weight_grad", "cats_default_config", "cats_mlp", "default_config",
           "nm_block_sizes", "nm_sparse_matmul", "tiled_sparse_matmul"]
