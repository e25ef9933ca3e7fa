"""Grouped matmul and its transpose in Pallas' Triton lowering (any CUDA GPU, interpretable).

Same work items and semantics as :mod:`kernels_pallas.moe.mosaic_gpu`, one program per
item instead of a persistent loop:

* :func:`grouped_matmul`: program ``(column tile, item)`` multiplies the item's
  ``block_m`` row tile by its group's weights over all of K and stores only the group's
  rows (a masked store; padding items loop zero times and store nothing).
* :func:`transposed_grouped_matmul`: program ``(column tile, k tile, group)`` walks the
  row blocks the group touches, loading rows outside the group as zeros (masked loads),
  and accumulates ``lhs_blk^T @ rhs_blk``.

This is the portable path (Ampere and older, or where Mosaic GPU is unavailable); on
Hopper the Mosaic GPU kernels are preferred (TMA + wgmma). Pallas' Triton lowering is
deprecated since jax 0.11 but present in the pinned version.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kernels_pallas.moe import common


@dataclasses.dataclass(frozen=True)
class TritonGroupedMatmulConfig:
  """Tile sizes (``block_m`` tiles rows of ``lhs``; in tgmm, the contraction rows)."""

  block_m: int = 64
  block_n: int = 128
  block_k: int = 64
  num_warps: int = 4
  num_stages: int = 3

  def __post_init__(self):
    for name in ("block_m", "block_n", "block_k"):
      v = getattr(self, name)
      if v < 16 or v & (v - 1):
        raise ValueError(f"TritonGroupedMatmulConfig.{name} must be a power of two >= 16, "
                         f"got {v}")


def default_config(m: int, k: int, n: int, *, interpret: bool = False
                   ) -> TritonGroupedMatmulConfig:
  del m, k, n
  if interpret:
    return TritonGroupedMatmulConfig(block_m=32, block_n=32, block_k=32)
  return TritonGroupedMatmulConfig()


def _gmm_kernel(group_ref, block_ref, lo_ref, size_ref, lhs_ref, rhs_ref, o_ref, *,
                cfg: TritonGroupedMatmulConfig, k_steps: int, transpose_rhs: bool):
  bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
  ni, t = pl.program_id(0), pl.program_id(1)
  group, block, lo, size = group_ref[t], block_ref[t], lo_ref[t], size_ref[t]
  rows, cols = pl.ds(block * bm, bm), pl.ds(ni * bn, bn)

  def step(i, acc):
    # invariant: acc = lhs[tile, :i*bk] @ rhs[group, :i*bk, cols]
    ks = pl.ds(i * bk, bk)
    a = lhs_ref[rows, ks]
    if transpose_rhs:
      return acc + pltriton.dot(a, rhs_ref[group, cols, ks], trans_b=True)
    return acc + pltriton.dot(a, rhs_ref[group, ks, cols])

  # tail items run no steps (zeros). Arithmetic, not jnp.where: a select of two literals
  # lowers to an i1 loop bound in Pallas Triton, which the Triton verifier rejects.
  steps = k_steps * ((size > 0) & (group < rhs_ref.shape[0])).astype(jnp.int32)
  acc = lax.fori_loop(0, steps, step, jnp.zeros((bm, bn), jnp.float32))
  r = lax.broadcasted_iota(jnp.int32, (bm, bn), 0)
  mine = (r >= lo) & (r < lo + size)
  pltriton.store(o_ref.at[rows, cols], acc.astype(o_ref.dtype), mask=mine)


def grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, m: int,
                   transpose_rhs: bool = False, out_dtype=None,
                   config: TritonGroupedMatmulConfig | None = None,
                   interpret: bool = False) -> jax.Array:
  """``out[rows of g] = lhs[rows of g] @ rhs[g]`` (see the Mosaic GPU kernel's docstring).

  Args:
    lhs: ``[m_pad, k]``, ``m_pad`` a multiple of ``block_m``, ``k`` of ``block_k``.
    rhs: ``[groups, k, n]`` (``[groups, n, k]`` with ``transpose_rhs``), ``n`` a multiple
      of ``block_n``.
    group_sizes: int32 ``[groups]`` summing to ``m``.
    m: real rows.

  Returns:
    ``[m_pad, n]``; rows ``>= m`` are unspecified.
  """
  m_pad, k = lhs.shape
  groups = rhs.shape[0]
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  cfg = config or default_config(m, k, n, interpret=interpret)
  if m_pad % cfg.block_m or k % cfg.block_k or n % cfg.block_n:
    raise ValueError(f"grouped_matmul: (m_pad, k, n) = {(m_pad, k, n)} must be multiples of "
                     f"{(cfg.block_m, cfg.block_k, cfg.block_n)}; pad the operands")
  items = common.work_items(group_sizes, m, cfg.block_m)
  kernel = functools.partial(_gmm_kernel, cfg=cfg, k_steps=k // cfg.block_k,
                             transpose_rhs=transpose_rhs)
  del groups
  return pl.pallas_call(
      kernel,
      grid=(n // cfg.block_n, items.num_items),
      out_shape=jax.ShapeDtypeStruct((m_pad, n), jnp.dtype(out_dtype or lhs.dtype)),
      compiler_params=pltriton.CompilerParams(num_warps=cfg.num_warps,
                                              num_stages=cfg.num_stages),
      interpret=interpret,
      name="grouped_matmul",
  )(items.group, items.block, items.lo, items.size, lhs, rhs)


def _tgmm_kernel(start_ref, end_ref, lhs_ref, rhs_ref, o_ref, *,
                 cfg: TritonGroupedMatmulConfig):
  bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
  ni, ki, g = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  start, end = start_ref[g], end_ref[g]
  first = start // bm
  nblocks = ((end + bm - 1) // bm - first) * (end > start).astype(jnp.int32)
  cols, kcols = pl.ds(ni * bn, bn), pl.ds(ki * bk, bk)

  def step(i, acc):
    # invariant: acc = sum over the group's rows in its first i blocks of lhs^T rhs
    row0 = (first + i) * bm
    r = lax.broadcasted_iota(jnp.int32, (bm, 1), 0) + row0
    inside = (r >= start) & (r < end)
    a = pltriton.load(lhs_ref.at[pl.ds(row0, bm), kcols], mask=inside, other=0)
    b = pltriton.load(rhs_ref.at[pl.ds(row0, bm), cols], mask=inside, other=0)
    return acc + pltriton.dot(a, b, trans_a=True)

  acc = lax.fori_loop(0, nblocks, step, jnp.zeros((bk, bn), jnp.float32))
  o_ref[g, kcols, cols] = acc.astype(o_ref.dtype)


def transposed_grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *,
                              out_dtype=None, config: TritonGroupedMatmulConfig | None = None,
                              interpret: bool = False) -> jax.Array:
  """``out[g] = lhs[rows of g]^T @ rhs[rows of g]``: ``lhs [m_pad, k]``, ``rhs [m_pad, n]``
  (``m_pad`` a multiple of ``block_m``, ``k`` of ``block_k``, ``n`` of ``block_n``) ->
  ``[groups, k, n]``."""
  m_pad, k = lhs.shape
  n = rhs.shape[1]
  groups = group_sizes.shape[0]
  cfg = config or default_config(m_pad, k, n, interpret=interpret)
  if m_pad % cfg.block_m or k % cfg.block_k or n % cfg.block_n or rhs.shape[0] != m_pad:
    raise ValueError(f"transposed_grouped_matmul: lhs {lhs.shape} / rhs {rhs.shape} must be "
                     f"multiples of {(cfg.block_m, cfg.block_k, cfg.block_n)} with equal rows")
  starts, ends = common.group_bounds(group_sizes)
  return pl.pallas_call(
      functools.partial(_tgmm_kernel, cfg=cfg),
      grid=(n // cfg.block_n, k // cfg.block_k, groups),
      out_shape=jax.ShapeDtypeStruct((groups, k, n), jnp.dtype(out_dtype or lhs.dtype)),
      compiler_params=pltriton.CompilerParams(num_warps=cfg.num_warps,
                                              num_stages=cfg.num_stages),
      interpret=interpret,
      name="transposed_grouped_matmul",
  )(starts, ends, lhs, rhs)


__all__ = ["TritonGroupedMatmulConfig", "default_config", "grouped_matmul",
           "transposed_grouped_matmul"]
