"""Grouped matmul (MoE expert product) and its transpose for NVIDIA Hopper, Pallas Mosaic GPU.

Two kernels, both with a persistent grid (one CTA per SM looping over work items with
``plgpu.nd_loop``, planar-snake order over (row tile, column tile) for L2 reuse) and a
``max_concurrent_steps``-deep TMA pipeline (``plgpu.emit_pipeline``) feeding ``wgmma``:

* :func:`grouped_matmul`: ``out[rows of g] = lhs[rows of g] @ rhs[g]`` (``rhs[g]^T`` with
  ``transpose_rhs``), the MoE expert forward and the input gradient. Work items come from
  :func:`kernels_pallas.moe.common.work_items`: a ``block_m`` row tile that straddles a
  group boundary is computed once per group in it, and each visit stores only its group's
  rows, through a "ladder" of power-of-two TMA stores (the row count is only known at run
  time; the construction follows jax.experimental.pallas.ops.gpu.ragged_dot_mgpu).
  Empty groups yield no item; padding items (``size == 0``) are skipped.
* :func:`transposed_grouped_matmul` ("tgmm"): ``out[g] = lhs[rows of g]^T @ rhs[rows of g]``,
  the weight gradient. Item ``(g, k tile, n tile)`` walks the ``block_k`` row blocks the
  group touches; the first and last are masked in shared memory so rows of the
  neighbouring groups contribute zero (as in jax.experimental.pallas.ops.gpu.
  transposed_ragged_dot_mgpu). An empty group's tile is stored as zeros.

Limits (the op pads): row counts a multiple of the row tile, contraction a multiple of
``block_k``, output columns a multiple of ``block_n``; 16-bit operands of one dtype.
Interpret mode (``interpret=True``) runs both kernels on CPU (``num_programs`` CTAs).

Not tuned on hardware yet: :func:`default_config` is the Pallas example's best region
(128 x 128 x 64, 4 stages); experiments/bench/suites/moe.py sweeps around it.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels_pallas.moe import common

OPERAND_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
INTERPRET_PROGRAMS = 2


@dataclasses.dataclass(frozen=True)
class GroupedMatmulConfig:
  """Tiles: ``block_m`` rows x ``block_n`` columns of output per item, ``block_k`` of the
  contraction per pipeline step (for tgmm ``block_m`` tiles the contraction rows and
  ``block_k`` the output rows); ``grid_block_n`` column tiles per planar-snake band;
  ``num_programs`` persistent CTAs (None: one per SM)."""

  block_m: int = 128
  block_n: int = 128
  block_k: int = 64
  max_concurrent_steps: int = 4
  grid_block_n: int = 8
  num_programs: int | None = None

  def __post_init__(self):
    for name in ("block_m", "block_n", "block_k"):
      v = getattr(self, name)
      if v < 64 or v % 64:
        raise ValueError(f"GroupedMatmulConfig.{name} must be a positive multiple of 64, got {v}")
    if self.max_concurrent_steps < 2:
      raise ValueError("GroupedMatmulConfig.max_concurrent_steps must be >= 2, got "
                       f"{self.max_concurrent_steps}")


def default_config(m: int, k: int, n: int, groups: int, *, interpret: bool = False
                   ) -> GroupedMatmulConfig:
  """128 x 128 x 64 tiles on hardware; 64-wide tiles and two CTAs when interpreted."""
  del m, k, groups
  if interpret:
    return GroupedMatmulConfig(block_m=64, block_n=64, block_k=64, max_concurrent_steps=2,
                               grid_block_n=1, num_programs=INTERPRET_PROGRAMS)
  block_n = 128 if n % 128 == 0 or n > 64 else 64
  return GroupedMatmulConfig(block_n=block_n)


def _num_programs(cfg: GroupedMatmulConfig) -> int:
  if cfg.num_programs is not None:
    return cfg.num_programs
  dev = jax.devices()[0]
  return getattr(dev, "core_count", None) or 132


def _check_dtype(name, *arrays):
  for a in arrays:
    if jnp.dtype(a.dtype) not in OPERAND_DTYPES:
      raise ValueError(f"{name}: operands must be bfloat16 or float16, got {a.dtype}")
  if len({jnp.dtype(a.dtype) for a in arrays}) != 1:
    raise ValueError(f"{name}: operands must share one dtype, got {[str(a.dtype) for a in arrays]}")


def _store_rows(o_smem, o_gmem, row0, lo, size, col0, block_m: int, block_n: int):
  """Stores rows ``[lo, lo + size)`` of ``o_smem`` to rows ``row0 + lo ...`` of ``o_gmem``.

  TMA copies need static shapes, so ``size`` (known at run time, ``<= block_m``) is written
  as a sum of powers of two, largest first, one store per set bit.
  """
  start = lo
  width = block_m
  while width >= 1:
    @pl.when((size & width) != 0)
    def _(start=start, width=width):
      plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(start, width)],
                              o_gmem.at[pl.ds(row0 + start, width), pl.ds(col0, block_n)])
    start = start + (size & width)
    width //= 2
  plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, m: int,
                   transpose_rhs: bool = False, out_dtype=None,
                   config: GroupedMatmulConfig | None = None,
                   interpret: bool = False) -> jax.Array:
  """``out[rows of g] = lhs[rows of g] @ rhs[g]`` for each group ``g``.

  Args:
    lhs: ``[m_pad, k]`` with ``m_pad`` a multiple of ``block_m`` (rows ``>= m`` unused) and
      ``k`` a multiple of ``block_k``.
    rhs: ``[groups, k, n]`` (``[groups, n, k]`` with ``transpose_rhs``), ``n`` a multiple of
      ``block_n``; same dtype as ``lhs``.
    group_sizes: int32 ``[groups]``; rows past their sum (up to ``m``) are stored as zeros.
    m: the number of real rows.
    out_dtype: output dtype (default ``lhs.dtype``); accumulation is float32.

  Returns:
    ``[m, n]``.
  """
  _check_dtype("grouped_matmul", lhs, rhs)
  m_pad, k = lhs.shape
  groups = rhs.shape[0]
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  if (rhs.shape[2] if transpose_rhs else rhs.shape[1]) != k:
    raise ValueError(f"grouped_matmul: lhs.shape {lhs.shape} and rhs.shape {rhs.shape} "
                     f"(transpose_rhs={transpose_rhs}) differ in K")
  cfg = config or default_config(m, k, n, groups, interpret=interpret)
  bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
  if m_pad % bm or k % bk or n % bn or m > m_pad:
    raise ValueError(f"grouped_matmul: (m_pad, k, n) = {(m_pad, k, n)} must be multiples of "
                     f"{(bm, bk, bn)} with m={m} <= m_pad; pad the operands")
  out_dtype = jnp.dtype(out_dtype or lhs.dtype)
  items = common.work_items(group_sizes, m, bm)
  num_items = items.num_items
  grid_n = n // bn
  band = math.gcd(cfg.grid_block_n, grid_n)

  def body(group_ref, block_ref, lo_ref, size_ref, lhs_gmem, rhs_gmem, o_gmem):
    @plgpu.nd_loop((num_items * grid_n,), collective_axes="sm")
    def _item(info):
      ti, ni = plgpu.planar_snake(info.index[0], (num_items, grid_n), 1, band)
      size = size_ref[ti]

      @pl.when(size > 0)
      def _():
        group, block, lo = group_ref[ti], block_ref[ti], lo_ref[ti]

        def acc_scope(acc_ref):
          @pl.when(group < groups)  # the tail (rows past the groups) stores zeros
          def _():
            plgpu.emit_pipeline(
                lambda _, l_smem, r_smem: plgpu.wgmma(
                    acc_ref, l_smem, r_smem.transpose((1, 0)) if transpose_rhs else r_smem),
                grid=(k // bk,),
                in_specs=[
                    plgpu.BlockSpec((bm, bk), lambda kk: (block, kk), delay_release=1),
                    plgpu.BlockSpec((bn, bk) if transpose_rhs else (bk, bn),
                                    (lambda kk: (ni, kk)) if transpose_rhs
                                    else (lambda kk: (kk, ni)),
                                    delay_release=1),
                ],
                max_concurrent_steps=cfg.max_concurrent_steps,
            )(lhs_gmem, rhs_gmem.at[group])
          return acc_ref[...]

        acc = pl.run_scoped(acc_scope, plgpu.ACC((bm, bn)))

        @functools.partial(pl.run_scoped, o_smem=plgpu.SMEM((bm, bn), dtype=out_dtype))
        def _store(o_smem):
          o_smem[...] = acc.astype(out_dtype)
          plgpu.commit_smem()
          _store_rows(o_smem, o_gmem, block * bm, lo, size, ni * bn, bm, bn)

  kernel = plgpu.kernel(
      body,
      out_type=jax.ShapeDtypeStruct((m, n), out_dtype),
      grid=(_num_programs(cfg),),
      grid_names=("sm",),
      compiler_params=plgpu.CompilerParams(
          lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
      interpret=plgpu.InterpretGPUParams() if interpret else None,
      kernel_name="grouped_matmul",
  )
  return kernel(items.group, items.block, items.lo, items.size, lhs, rhs)


def transposed_grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *,
                              out_dtype=None, config: GroupedMatmulConfig | None = None,
                              interpret: bool = False) -> jax.Array:
  """``out[g] = lhs[rows of g]^T @ rhs[rows of g]`` for each group ``g`` (the weight gradient).

  Args:
    lhs: ``[m_pad, k]``, rows past ``sum(group_sizes)`` ignored; ``m_pad`` a multiple of
      ``block_m`` and ``k`` of ``block_k`` (``block_k`` tiles the output rows here).
    rhs: ``[m_pad, n]``, ``n`` a multiple of ``block_n``; same dtype as ``lhs``.
    group_sizes: int32 ``[groups]``.

  Returns:
    ``[groups, k, n]`` (zeros for empty groups).
  """
  _check_dtype("transposed_grouped_matmul", lhs, rhs)
  m_pad, k = lhs.shape
  m2, n = rhs.shape
  groups = group_sizes.shape[0]
  cfg = config or default_config(m_pad, k, n, groups, interpret=interpret)
  bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k  # bm: contraction rows per step
  if m_pad != m2 or m_pad % bm or k % bk or n % bn:
    raise ValueError(f"transposed_grouped_matmul: lhs {lhs.shape} / rhs {rhs.shape} must "
                     f"share rows that are a multiple of {bm}, with k % {bk} == n % {bn} == 0")
  out_dtype = jnp.dtype(out_dtype or lhs.dtype)
  starts, ends = common.group_bounds(group_sizes)
  first_block = starts // bm
  num_blocks = jnp.where(group_sizes > 0, (ends + bm - 1) // bm - first_block, 0)
  grid_k, grid_n = k // bk, n // bn
  band = math.gcd(cfg.grid_block_n, grid_n)
  swizzle = plgpu.find_swizzle(bk * jnp.dtype(lhs.dtype).itemsize * 8)
  transforms = (plgpu.TilingTransform((8, swizzle // jnp.dtype(lhs.dtype).itemsize)),
                plgpu.SwizzleTransform(swizzle))
  rhs_swizzle = plgpu.find_swizzle(bn * jnp.dtype(rhs.dtype).itemsize * 8)
  rhs_transforms = (plgpu.TilingTransform((8, rhs_swizzle // jnp.dtype(rhs.dtype).itemsize)),
                    plgpu.SwizzleTransform(rhs_swizzle))

  def body(start_ref, end_ref, first_ref, nblocks_ref, lhs_gmem, rhs_gmem, o_gmem):
    @plgpu.nd_loop((groups, grid_k * grid_n), collective_axes="sm")
    def _item(info):
      g = info.index[0]
      ki, ni = plgpu.planar_snake(info.index[1], (grid_k, grid_n), 1, band)
      first, nblocks = first_ref[g], nblocks_ref[g]

      def acc_scope(acc_ref):
        def step(idx, l_smem, r_smem):
          i = idx[0]

          # Rows of the neighbouring groups in the first / last block contribute zero:
          # the lhs tile is masked in shared memory before the wgmma reads it.
          @pl.when((i == 0) | (i == nblocks - 1))
          def _():
            rows = plgpu.layout_cast(lax.broadcasted_iota(jnp.int32, (bm, bk), 0),
                                     plgpu.Layout.WGMMA) + (first + i) * bm
            mask = (rows >= start_ref[g]) & (rows < end_ref[g])
            l_smem[...] = l_smem[...] * mask.astype(l_smem.dtype)
            plgpu.commit_smem()

          plgpu.wgmma(acc_ref, l_smem.transpose((1, 0)), r_smem)

        @pl.when(nblocks > 0)
        def _():
          plgpu.emit_pipeline(
              step,
              grid=(nblocks,),
              in_specs=[
                  plgpu.BlockSpec((bm, bk), lambda i: (first + i, ki), delay_release=1,
                                  transforms=transforms),
                  plgpu.BlockSpec((bm, bn), lambda i: (first + i, ni), delay_release=1,
                                  transforms=rhs_transforms),
              ],
              max_concurrent_steps=cfg.max_concurrent_steps,
          )(lhs_gmem, rhs_gmem)

        return acc_ref[...]

      acc = pl.run_scoped(acc_scope, plgpu.ACC((bk, bn)))

      @functools.partial(pl.run_scoped, o_smem=plgpu.SMEM((bk, bn), dtype=out_dtype))
      def _store(o_smem):
        o_smem[...] = acc.astype(out_dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[g, pl.ds(ki * bk, bk), pl.ds(ni * bn, bn)])
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  kernel = plgpu.kernel(
      body,
      out_type=jax.ShapeDtypeStruct((groups, k, n), out_dtype),
      grid=(_num_programs(cfg),),
      grid_names=("sm",),
      compiler_params=plgpu.CompilerParams(
          lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
      interpret=plgpu.InterpretGPUParams() if interpret else None,
      kernel_name="transposed_grouped_matmul",
  )
  return kernel(starts, ends, first_block.astype(jnp.int32), num_blocks.astype(jnp.int32),
                lhs, rhs)


__all__ = ["GroupedMatmulConfig", "default_config", "grouped_matmul",
           "transposed_grouped_matmul"]
