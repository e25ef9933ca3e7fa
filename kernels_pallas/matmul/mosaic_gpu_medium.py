"""Weight-only int4 / int8 matmul for medium batches (32 < m <= 256) on Hopper, Mosaic GPU.

Computes ``out = x @ dequant(w)`` transposed on the tensor cores (swap-AB, as in jax's
``hopper_mixed_type_matmul_mgpu`` and Marlin-style mixed-input GEMMs):

    out^T [N, M] = (w^T * scale) [N, K] @ x^T [K, M]

The quantized weight is the ``wgmma`` A operand: each step's packed tile is TMA-copied into
a ``num_stages``-deep shared-memory ring, loaded into registers in the WGMMA upcast layouts,
converted to ``x.dtype`` (Mosaic's lop3 / prmt int4 and int8 converters), multiplied by the
group scale of its rows and fed to ``wgmma`` from registers. The rows of ``x`` (up to
``block_m`` = 128 of them per CTA) are the ``wgmma`` N operand, from shared memory.
Accumulation is float32; per-channel scales are applied once to the accumulator.

It is the decode kernel of :mod:`kernels_pallas.matmul.mosaic_gpu` (``weight_only_matmul_t``,
x rows <= 64, 64 weight rows per warpgroup) grown for wider x:

* ``wg_rows`` = 64 or 128 weight rows per compute warpgroup (one or two 64-row ``wgmma``
  M groups, each with its own float32 accumulator ``[64, block_m]``). The L2 traffic of x
  falls as ``1 / (2 * wg_rows)``: every CTA streams all of its x rows over its K range.
* ``block_m`` x rows per CTA (the wgmma N, a multiple of 8, <= 128); wider x gets a grid
  axis of x row tiles that share the weight tiles through L2.
* ``split_k`` CTAs per output tile, each over ``1 / split_k`` of K, so that the grid fills
  the GPU (float32 partials summed by XLA together with the transpose to ``[M, N]``).
* ``pipeline_upcast``: a 64-row sub-tile's ``wgmma`` is issued, then the next sub-tile
  (of this step or the next) is loaded, converted and scaled while it runs.
* ``cluster_n = 2``: two CTAs with neighbouring weight tiles form a cluster and receive
  each x tile through one TMA multicast (each loads half), halving x's L2 reads; a ring
  slot is refilled only when the compute warpgroups of both CTAs have released it (a
  cluster barrier), as in the Pallas Hopper matmul's collective pipeline.

Structure: three warpgroups per CTA (FlashAttention-3 / the Pallas Hopper matmul): a TMA
warpgroup streams weight, x and scale tiles into the ring ("loaded" / "consumed"
mbarriers) and gives its registers away (``setmaxnreg``); two compute warpgroups each own
``wg_rows`` weight rows of the CTA's ``2 * wg_rows`` and stage their float32 result in
shared memory for a TMA store, one 64-row sub-tile at a time.

Interpret mode (``interpret=True``) runs the same kernel on CPU; it takes the ``wgmma`` A
operand from shared memory (interpret mode has no register operands).
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

from kernels_pallas.matmul.mosaic_gpu import _bits, _produce, _swizzled, pad_rows_for_tma

WGMMA_M = 64  # Hopper's wgmma M: weight rows per sub-tile and accumulator
MAX_BLOCK_M = 128  # x rows per CTA (the wgmma N): a [64, 128] float32 accumulator each
SMEM_BUDGET_BYTES = 220 * 1024
MEDIUM_MIN_M = 33  # below this the decode kernel (mosaic_gpu.weight_only_matmul_t) is used
MEDIUM_MAX_M = 256


@dataclasses.dataclass(frozen=True)
class MediumConfig:
  """Blocks of :func:`weight_only_matmul_medium`.

  A CTA owns ``2 * wg_rows`` weight rows (output columns), ``block_m`` rows of x and
  ``1 / split_k`` of K, streamed ``block_k`` at a time through ``num_stages`` slots.
  """

  block_k: int = 128
  num_stages: int = 3
  split_k: int = 2
  wg_rows: int = 64
  block_m: int = 128
  pipeline_upcast: bool = True
  # CTAs per cluster along the weight tiles (1 or 2). 2: the pair shares each x tile
  # through one TMA multicast (half the L2 reads of x) and frees a ring slot only when
  # both CTAs have consumed it.
  cluster_n: int = 1
  compute_registers: int = 232
  memory_registers: int = 40

  def __post_init__(self):
    if self.block_k not in (64, 128, 256):
      raise ValueError(f"MediumConfig.block_k must be 64, 128 or 256, got {self.block_k}")
    if self.wg_rows not in (64, 128):
      raise ValueError(f"MediumConfig.wg_rows must be 64 or 128, got {self.wg_rows}")
    if self.block_m % 8 or not 8 <= self.block_m <= MAX_BLOCK_M:
      raise ValueError(f"MediumConfig.block_m must be a multiple of 8 in [8, {MAX_BLOCK_M}], "
                       f"got {self.block_m}")
    if self.cluster_n not in (1, 2):
      raise ValueError(f"MediumConfig.cluster_n must be 1 or 2, got {self.cluster_n}")
    if self.block_m % (8 * self.cluster_n):
      # The x tile is multicast: each CTA of the pair copies half of its 8-row tiles.
      raise ValueError(f"MediumConfig.block_m must be a multiple of {8 * self.cluster_n} "
                       f"with cluster_n={self.cluster_n}, got {self.block_m}")
    if self.num_stages < 1 or self.split_k < 1:
      raise ValueError(f"MediumConfig needs num_stages >= 1 and split_k >= 1, got "
                       f"{self.num_stages} and {self.split_k}")


def smem_bytes(cfg: MediumConfig, bits: int, x_itemsize: int = 2, interpret: bool = False
               ) -> int:
  """Shared memory of one CTA: the ring, the output staging tiles and the scales."""
  stage = 2 * cfg.wg_rows * cfg.block_k * bits // 8 + cfg.block_m * cfg.block_k * x_itemsize
  stage += 2 * cfg.wg_rows * 4  # group scales
  out = 2 * WGMMA_M * cfg.block_m * 4
  a16 = 2 * WGMMA_M * cfg.block_k * x_itemsize if interpret else 0
  return cfg.num_stages * stage + out + a16 + 2 * cfg.wg_rows * 4


def unsupported(m: int, n: int, k: int, *, bits: int, group_size: int | None,
                cfg: MediumConfig) -> str | None:
  """None when :func:`weight_only_matmul_medium` serves padded shapes of this call."""
  del n, k
  if bits not in (4, 8):
    return f"bits={bits} is not 4 or 8"
  if m > MEDIUM_MAX_M:
    return f"m={m} > {MEDIUM_MAX_M}: wide x is compute-bound, use a dequantize-then-dot"
  if group_size is not None and group_size % cfg.block_k:
    return f"group_size={group_size} is not a multiple of block_k={cfg.block_k}"
  if smem_bytes(cfg, bits) > SMEM_BUDGET_BYTES:
    return f"{cfg} needs {smem_bytes(cfg, bits)} bytes of shared memory > {SMEM_BUDGET_BYTES}"
  return None


def tile_multiples(cfg: MediumConfig, group_size: int | None) -> tuple[int, int]:
  """``(N, K)`` multiples the weight must be padded to (whole scale groups per split)."""
  tk = cfg.block_k * cfg.split_k
  if group_size is not None:
    tk = math.lcm(tk, group_size * cfg.split_k)
  return 2 * cfg.wg_rows * cfg.cluster_n, tk


def medium_config(m: int, n: int, k: int, *, bits: int, group_size: int | None = None,
                  num_sms: int = 132, **overrides) -> MediumConfig:
  """A :class:`MediumConfig` for ``x [m, k] @ w [k, n]``.

  ``block_m``: x rows in as few tiles of <= 128 as possible (a multiple of 8, of 16 with
  ``cluster_n = 2``). ``split_k``:
  the largest of 1, 2, 4, 8 with ``tiles * split_k <= num_sms`` and at least 4 K steps a
  split, so the grid fills the GPU about once. ``num_stages``: the most (<= 4) that fit
  ``SMEM_BUDGET_BYTES``. ``overrides`` replace fields before ``split_k`` / stages are
  chosen (those two only when not overridden).
  """
  m_tiles = -(-m // MAX_BLOCK_M)
  rows = 8 * overrides.get("cluster_n", 1)
  block_m = -(-(-(-m // m_tiles)) // rows) * rows
  cfg = MediumConfig(block_m=block_m, cluster_n=overrides.get("cluster_n", 1))
  cfg = dataclasses.replace(cfg, **{k_: v for k_, v in overrides.items()
                                    if k_ not in ("split_k", "num_stages")})
  m_tiles = -(-m // cfg.block_m)
  tiles = -(-n // (2 * cfg.wg_rows * cfg.cluster_n)) * cfg.cluster_n * m_tiles
  split = 1
  if "split_k" in overrides:
    split = overrides["split_k"]
  else:
    for s in (2, 4, 8):
      if tiles * s <= num_sms and k >= 4 * s * cfg.block_k:
        split = s
  if group_size is not None:
    while split > 1 and (k // split) % group_size:
      split //= 2
  cfg = dataclasses.replace(cfg, split_k=split)
  if "num_stages" in overrides:
    return dataclasses.replace(cfg, num_stages=overrides["num_stages"])
  for stages in (4, 3, 2, 1):
    cfg = dataclasses.replace(cfg, num_stages=stages)
    if smem_bytes(cfg, bits) <= SMEM_BUDGET_BYTES:
      break
  return cfg


def _kernel(x_ref, w_ref, s_ref, out_ref, s, *, cfg: MediumConfig, steps: int,
            group_steps: int, per_channel: bool, xdtype, a_via_smem: bool):
  """Compute warpgroup ``wg``: out^T[rows, x cols] += (w[rows, k] * scale) @ x^T[k, cols]."""
  stages, bk, wr, bm = cfg.num_stages, cfg.block_k, cfg.wg_rows, cfg.block_m
  subtiles = wr // WGMMA_M
  wg = lax.axis_index("wg")
  split = lax.axis_index("splits")
  n_tile = lax.axis_index("n_tiles")
  if cfg.cluster_n > 1:
    n_tile = n_tile * cfg.cluster_n + lax.axis_index("cluster")
  row0 = n_tile * (2 * wr)
  col0 = lax.axis_index("m_tiles") * bm
  step0 = split * steps
  upcast = (plgpu.Layout.WGMMA_UPCAST_4X if _bits(w_ref.dtype) == 4
            else plgpu.Layout.WGMMA_UPCAST_2X)
  row_layout = plgpu.Layout.WGMMA.reduce(1)

  @pl.when(wg < 2)
  def _compute():
    plgpu.set_max_registers(cfg.compute_registers, action="increase")
    if per_channel:
      plgpu.copy_gmem_to_smem(
          s_ref.at[0, pl.ds(n_tile * 2 * subtiles + wg * subtiles, subtiles)],
          s["scale"].at[0, wg], s["s_bar"].at[wg])
      plgpu.barrier_wait(s["s_bar"].at[wg])

    def wait_step(i):
      """Waits for step i's weight, x and scale tiles (once per step and barrier phase)."""
      slot = lax.rem(i, stages)
      plgpu.barrier_wait(s["w_bar"].at[slot])
      plgpu.barrier_wait(s["x_bar"].at[slot])
      if not per_channel:
        plgpu.barrier_wait(s["s_bar"].at[2 * slot + wg])

    def weight_tile(i, j):
      """Sub-tile j (64 rows) of step i's weight rows of this warpgroup: upcast to x.dtype
      and multiplied by its group's scale (per row, in x.dtype)."""
      slot = lax.rem(i, stages)
      w = plgpu.load(s["w"].at[slot, pl.ds(wg * wr + j * WGMMA_M, WGMMA_M)], layout=upcast)
      w = plgpu.layout_cast(w, plgpu.Layout.WGMMA).astype(xdtype)
      if not per_channel:
        scale = plgpu.load(s["scale"].at[slot, wg, j], layout=row_layout).astype(xdtype)
        w = w * lax.broadcast_in_dim(scale, w.shape, [0])
      return w

    def multiply(acc_ref, i, w):
      """Issues acc += w @ x_i^T (async)."""
      slot = lax.rem(i, stages)
      if a_via_smem:  # interpret mode takes wgmma operands from refs only
        s["a16"].at[wg][...] = w
        plgpu.commit_smem()
        w = s["a16"].at[wg]
      plgpu.wgmma(acc_ref, w, s["x"].at[slot].T)

    def release(i):
      plgpu.barrier_arrive(s["consumed"].at[lax.rem(i, stages)])

    def run(*accs):
      if not cfg.pipeline_upcast:
        def step(i, carry):
          wait_step(i)
          for j in range(subtiles):
            multiply(accs[j], i, weight_tile(i, j))
            plgpu.wgmma_wait(0)
          release(i)
          return carry

        lax.fori_loop(0, steps, step, None)
      else:
        # Invariant: the carry is step i's sub-tile 0, upcast and scaled (its barriers
        # waited). Each sub-tile's wgmma runs while the next sub-tile is prepared.
        def step(i, w, last):
          for j in range(subtiles):
            multiply(accs[j], i, w)
            if j + 1 < subtiles:
              w = weight_tile(i, j + 1)
            elif not last:
              wait_step(i + 1)
              w = weight_tile(i + 1, 0)
            plgpu.wgmma_wait(0)  # the register operand and (at the end) the slot are free
          release(i)
          return w

        wait_step(0)
        w = lax.fori_loop(0, steps - 1, lambda i, w: step(i, w, False), weight_tile(0, 0))
        step(steps - 1, w, True)
      return tuple(acc[...] for acc in accs)

    accs = pl.run_scoped(run, *[plgpu.ACC((WGMMA_M, bm), jnp.float32)
                                for _ in range(subtiles)])
    o_smem = s["out"].at[wg]
    for j, acc in enumerate(accs):
      if per_channel:  # one scale per weight row, applied once in float32
        scale = plgpu.load(s["scale"].at[0, wg, j], layout=row_layout)
        acc = acc * lax.broadcast_in_dim(scale, acc.shape, [0])
      if j:
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the staging tile is free again
      o_smem[...] = acc
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(
          o_smem, out_ref.at[split, pl.ds(row0 + wg * wr + j * WGMMA_M, WGMMA_M),
                             pl.ds(col0, bm)])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == 2)
  def _memory():
    plgpu.set_max_registers(cfg.memory_registers, action="decrease")

    def issue(i, slot, wait):
      if wait:
        plgpu.barrier_wait(s["consumed"].at[slot])
      ks = pl.ds((step0 + i) * bk, bk)
      plgpu.copy_gmem_to_smem(w_ref.at[pl.ds(row0, 2 * wr), ks], s["w"].at[slot],
                              s["w_bar"].at[slot])
      plgpu.copy_gmem_to_smem(x_ref.at[pl.ds(col0, bm), ks], s["x"].at[slot],
                              s["x_bar"].at[slot],
                              collective_axes="cluster" if cfg.cluster_n > 1 else None)
      if not per_channel:
        g = (step0 + i) // group_steps
        for half in range(2):  # [G, N / 64, 64]: this warpgroup's sub-tiles of group g
          first = n_tile * 2 * subtiles + half * subtiles
          plgpu.copy_gmem_to_smem(s_ref.at[g, pl.ds(first, subtiles)],
                                  s["scale"].at[slot, half], s["s_bar"].at[2 * slot + half])

    _produce(issue, stages, steps, s["consumed"])


def weight_only_matmul_medium(x: jax.Array, w_t: jax.Array, scales: jax.Array, *,
                              group_size: int | None, config: MediumConfig | None = None,
                              interpret: bool = False, scales_t: bool = False,
                              out_dtype=jnp.float32) -> jax.Array:
  """``x @ dequant(w)`` for a medium number of rows of ``x`` (module docstring).

  Args:
    x: ``[M, K]`` bfloat16 / float16, ``M <= 256`` (read in ``block_m``-row TMA boxes;
      rows past M are zero-filled by the copy, so x is never padded).
    w_t: ``[N, K]`` int8, or ``jnp.int4`` (two codes per byte, K-major): symmetric codes.
    scales: ``[N, K // group_size]`` (``[N, 1]`` per channel), float32 or castable; with
      ``scales_t`` the same transposed, ``[K // group_size, N]`` (no per-call transpose).
    group_size: K values per scale, None for per-channel.
    config: blocks; None picks :func:`medium_config`.
    interpret: run in Pallas Mosaic GPU interpret mode.
    scales_t: ``scales`` is ``[G, N]``.
    out_dtype: output dtype (cast in the XLA epilogue with the split-K sum).

  Returns:
    ``[M, N]`` in ``out_dtype``. ``N`` and ``K`` must be whole tiles (:func:`tile_multiples`).
  """
  m, k = x.shape
  n = w_t.shape[0]
  bits = _bits(w_t.dtype)
  if jnp.dtype(w_t.dtype) not in (jnp.dtype(jnp.int8), jnp.dtype(jnp.int4)):
    raise TypeError(f"weight_only_matmul_medium: w_t must be int8 or int4 [N, K], got "
                    f"{w_t.dtype}")
  if x.dtype not in (jnp.bfloat16, jnp.float16) or x.ndim != 2:
    raise TypeError(f"weight_only_matmul_medium: x must be bfloat16 / float16 [M, K], got "
                    f"{x.dtype} {x.shape}")
  cfg = config or medium_config(m, n, k, bits=bits, group_size=group_size)
  why = unsupported(m, n, k, bits=bits, group_size=group_size, cfg=cfg)
  if why:
    raise ValueError(f"weight_only_matmul_medium: {why}")
  tn, tk = tile_multiples(cfg, group_size)
  if n % tn or k % tk or w_t.shape[1] != k:
    raise ValueError(f"weight_only_matmul_medium: (N, K) = {(n, k)} (w_t {w_t.shape}) is "
                     f"not a multiple of {(tn, tk)}; pad the operands")
  groups = 1 if group_size is None else k // group_size
  want = (groups, n) if scales_t else (n, groups)
  if scales.shape != want:
    raise ValueError(f"weight_only_matmul_medium: scales must be "
                     f"{'[K // group_size, N]' if scales_t else '[N, K // group_size]'} = "
                     f"{want}, got {scales.shape}")
  bm = cfg.block_m
  m_tiles = -(-m // bm)
  steps = k // cfg.block_k // cfg.split_k
  per_channel = group_size is None
  stages = min(cfg.num_stages, steps)
  cfg = dataclasses.replace(cfg, num_stages=stages)
  subtiles = cfg.wg_rows // WGMMA_M
  scratch = {
      "w": _swizzled((stages, 2 * cfg.wg_rows, cfg.block_k), w_t.dtype),
      "x": _swizzled((stages, bm, cfg.block_k), x.dtype),
      "out": _swizzled((2, WGMMA_M, bm), jnp.float32),
      "w_bar": plgpu.Barrier(num_barriers=stages),
      "x_bar": plgpu.Barrier(num_barriers=stages),
      # released by both compute warpgroups (of both CTAs when the x tile is multicast)
      "consumed": (plgpu.ClusterBarrier(collective_axes=("cluster",), num_arrivals=2,
                                        num_barriers=stages) if cfg.cluster_n > 1 else
                   plgpu.Barrier(num_arrivals=2, num_barriers=stages)),
  }
  if per_channel:
    scratch["scale"] = plgpu.SMEM((1, 2, subtiles, WGMMA_M), jnp.float32)
    scratch["s_bar"] = plgpu.Barrier(num_barriers=2)
  else:
    scratch["scale"] = plgpu.SMEM((stages, 2, subtiles, WGMMA_M), jnp.float32)
    scratch["s_bar"] = plgpu.Barrier(num_barriers=2 * stages)
  if interpret:
    scratch["a16"] = _swizzled((2, WGMMA_M, cfg.block_k), x.dtype)
  kernel = functools.partial(_kernel, cfg=cfg, steps=steps,
                             group_steps=(group_size or k) // cfg.block_k,
                             per_channel=per_channel, xdtype=x.dtype, a_via_smem=interpret)
  # [G, N / 64, 64]: one TMA row per 64-row sub-tile and K group
  s_gn = scales.astype(jnp.float32) if scales_t else scales.astype(jnp.float32).T
  s3 = s_gn.reshape(groups, n // WGMMA_M, WGMMA_M)
  cluster = dict(cluster=(cfg.cluster_n,), cluster_names=("cluster",)) if (
      cfg.cluster_n > 1) else {}
  partial = plgpu.kernel(
      kernel,
      out_type=jax.ShapeDtypeStruct((cfg.split_k, n, m_tiles * bm), jnp.float32),
      scratch_types=(scratch,),
      grid=(m_tiles, n // tn, cfg.split_k),
      grid_names=("m_tiles", "n_tiles", "splits"),
      **cluster,
      num_threads=3,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
      interpret=plgpu.InterpretGPUParams() if interpret else None,
      kernel_name=f"int{bits}_weight_only_medium",
  )(pad_rows_for_tma(x, 8 * cfg.cluster_n), w_t, s3)  # whole m tiles are unchanged by
  # the pad (bm is a multiple of 16); a multicast x copy needs an even count of 8-row tiles
  out = partial[0] if cfg.split_k == 1 else jnp.sum(partial, axis=0)
  return out[:, :m].T.astype(out_dtype)


__all__ = ["MEDIUM_MAX_M", "MEDIUM_MIN_M", "MediumConfig", "medium_config", "smem_bytes",
           "tile_multiples", "unsupported", "weight_only_matmul_medium"]
