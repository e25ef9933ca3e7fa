"""Scaled 8-bit / 16-bit matmul for NVIDIA Hopper in Pallas Mosaic GPU (W8A8 int8, fp8).

Computes ``out[m, n] = sum_k a[m, k] * b_t[n, k]`` with the scales fused:

* ``scale_mode="outer"`` (W8A8 int8, fp8 per-tensor / per-row): one accumulator over all
  of K (int32 for int8, float32 otherwise), multiplied in the epilogue by
  ``a_scale[m] * b_scale[n]`` (per-token activation scale x per-channel weight scale).
* ``scale_mode="block"`` (DeepGEMM-style fp8, Liu et al. 2024 "DeepSeek-V3"): K is cut
  into ``block_k``-wide blocks; each block's partial product is read out of the tensor
  cores and added to a float32 register accumulator times
  ``a_scale[kb, m] * b_scale[kb, n]`` ("promotion" every K block), so scales may change
  along K (1 x 128 activation tiles, 128 x 128 or 128 x 1 weight tiles). With
  ``overlap`` the promotion of block ``kb`` runs while block ``kb + 1``'s wgmma is in
  flight. Weight scales reach shared memory as one ``block_n`` row per K step (the form
  validated on the H100); a compact ``[K / block_k, tiles]`` per-tile scale (one 128-byte
  copy per step, one scalar per tile) crashed on the H100 (``CUDA_ERROR_ILLEGAL_
  INSTRUCTION``, notes/quant_matmul.md) and is refused on GPUs (``TILE_SCALES_ON_GPU``).

Both operands are K-major (``a: [M, K]``, ``b_t: [N, K]``), the only form Hopper's
``wgmma`` takes for 8-bit inputs; the op layer transposes (once, offline, for weights).

Structure (FlashAttention-3 / the Pallas Hopper matmul): each CTA owns a
``[2 * block_m, block_n]`` output tile and runs three warpgroups. The memory warpgroup
streams ``[2 * block_m, block_k]`` A tiles and ``[block_n, block_k]`` B tiles (plus the
block scales) with TMA into a ``num_stages``-deep ring guarded by "loaded" / "consumed"
mbarriers and gives its registers to the others (``setmaxnreg``). Each of the two compute
warpgroups issues ``wgmma`` on its ``block_m`` rows of A against the shared B tile,
keeping one wgmma in flight (a slot is released once the next step's wgmma is issued
and the previous one has retired), then scales, converts and stores its tile through
shared memory with a TMA store.

Limits: ``M % (2 * block_m) == 0``, ``N % block_n == 0``, ``K % block_k == 0`` (the op
pads), ``block_k * itemsize == 128`` (one 128-byte swizzle row), ``block_m % 64 == 0``,
``block_n <= 256``. :func:`unsupported` says why a call is refused.
Interpret mode (``interpret=True``) runs the same kernel on CPU.

Measured on an H100 (notes/quant_matmul.md), 4096 x 8192 x 8192: int8 1394 TOP/s and fp8
1305 TFLOP/s ("outer", 1.95x / 1.83x XLA's bf16 dot); ``"block"`` 0.97x bf16 before the
promotion overlap (``MatmulConfig.overlap``). The 2.7e-2 "block" error once seen on the
H100 was the XLA reference's, not the kernel's: XLA dropped the reference's fp8 rounding
of the weight (``jaxeff.ops.quantized_matmul.fp8_to_float32``). With per-column weight
scales (serial and overlapped promotion) the H100 result is 1.26e-4 from a float64
product: Hopper's fp8 ``wgmma`` keeps ~13 fraction bits when it adds products (an
emulation with 13 bits and truncation gives 1.22e-4), so fp8 block results are exact to
~1e-4, not to float32 rounding.
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

SWIZZLE = 128  # bytes: one swizzled row of every operand tile
SMEM_BUDGET_BYTES = 220 * 1024
OPERAND_DTYPES = (jnp.dtype(jnp.int8), jnp.dtype(jnp.float8_e4m3fn), jnp.dtype(jnp.float8_e5m2),
                  jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
SCALE_MODES = ("outer", "block")
# Floats per per-tile weight-scale copy: a warpgroup's TMA moves a multiple of 128 bytes.
TILE_SCALE_VEC = 32
# Compact per-tile weight scales (one 128-byte copy per step from column ``n_tile`` of a
# ``[K / block_k, tiles]`` array) crashed the H100 (CUDA_ERROR_ILLEGAL_INSTRUCTION, device
# call 4 of session 3); interpret mode runs them. False: ``scaled_matmul`` refuses them
# outside interpret mode. ``b_tile_scalar=True`` keeps the per-column copy and reads one
# scalar per tile (the bisecting variant: copy or scalar read).
TILE_SCALES_ON_GPU = False


@dataclasses.dataclass(frozen=True)
class MatmulConfig:
  """Tile sizes. A CTA computes ``[2 * block_m, block_n]`` of the output (``block_m`` rows
  per compute warpgroup) and streams ``block_k`` of K per pipeline step."""

  block_m: int = 128
  block_n: int = 128
  block_k: int = 128
  num_stages: int = 4
  compute_registers: int = 232
  memory_registers: int = 40
  # Block scaling only: each K block's partial product is scaled into the float32 total
  # while the next block's wgmma runs (DeepGEMM's promotion overlap; one more register
  # tile live). False: issue, wait, promote, one block at a time.
  overlap: bool = False

  def __post_init__(self):
    if self.block_m % 64 or self.block_m < 64:
      raise ValueError(f"MatmulConfig.block_m must be a multiple of 64, got {self.block_m}")
    if self.block_n % 64 or not 64 <= self.block_n <= 256:
      raise ValueError(f"MatmulConfig.block_n must be 64, 128, 192 or 256, got {self.block_n}")
    if self.num_stages < 2:
      raise ValueError(f"MatmulConfig.num_stages must be >= 2, got {self.num_stages}")


def smem_bytes(cfg: MatmulConfig, itemsize: int, out_itemsize: int, scale_mode: str) -> int:
  stage = (2 * cfg.block_m + cfg.block_n) * cfg.block_k * itemsize
  if scale_mode == "block":
    stage += (2 * cfg.block_m + cfg.block_n) * 4
  out = 2 * cfg.block_m * cfg.block_n * out_itemsize
  return cfg.num_stages * stage + out + 2 * (cfg.block_m + cfg.block_n) * 4


def default_config(m: int, n: int, k: int, dtype, *, scale_mode: str = "outer",
                   out_dtype=jnp.bfloat16) -> MatmulConfig:
  """Tiles by operand width: 128 bytes of K per step; block scaling keeps two float32
  accumulators live, so it halves ``block_m`` to stay inside the register file."""
  del k
  itemsize = jnp.dtype(dtype).itemsize
  block_k = SWIZZLE // itemsize
  # Measured on H100 at 4096 x 8192 x 8192 (notes/quant_matmul.md): 2 x 64 x 256 tiles beat
  # 2 x 128 x 128 by 6% (int8) / 9% (fp8); block scaling keeps a second accumulator.
  block_m = 64
  block_n = 256 if scale_mode == "outer" and itemsize == 1 and n % 256 == 0 and m > 128 else 128
  cfg = MatmulConfig(block_m=block_m, block_n=block_n, block_k=block_k)
  out_itemsize = jnp.dtype(out_dtype).itemsize
  while cfg.num_stages > 2 and smem_bytes(cfg, itemsize, out_itemsize, scale_mode) > SMEM_BUDGET_BYTES:
    cfg = dataclasses.replace(cfg, num_stages=cfg.num_stages - 1)
  return cfg


def tile_scale_columns(n: int, cfg: MatmulConfig) -> int:
  """Columns of a per-weight-tile block scale ``[K // block_k, tiles]``: one scale per
  ``block_n`` output columns, padded so each tile's ``TILE_SCALE_VEC``-float copy stays in
  bounds and rows stay 16-byte aligned."""
  tiles = -(-n // cfg.block_n) + TILE_SCALE_VEC - 1
  return tiles + (-tiles % TILE_SCALE_VEC)


def tile_multiples(cfg: MatmulConfig) -> tuple[int, int, int]:
  """``(M, N, K)`` multiples the operands must be padded to."""
  return 2 * cfg.block_m, cfg.block_n, cfg.block_k


def unsupported(m: int, n: int, k: int, dtype, *, scale_mode: str,
                cfg: MatmulConfig | None = None, out_dtype=jnp.bfloat16) -> str | None:
  """None when :func:`scaled_matmul` serves padded shapes of this call, else why not."""
  dtype = jnp.dtype(dtype)
  if dtype not in OPERAND_DTYPES:
    return f"operand dtype {dtype} is not one of {[str(d) for d in OPERAND_DTYPES]}"
  if scale_mode not in SCALE_MODES:
    return f"scale_mode {scale_mode!r} is not one of {SCALE_MODES}"
  cfg = cfg or default_config(m, n, k, dtype, scale_mode=scale_mode, out_dtype=out_dtype)
  if cfg.block_k * dtype.itemsize != SWIZZLE:
    return f"block_k={cfg.block_k} x {dtype.itemsize} bytes is not one {SWIZZLE}-byte row"
  if scale_mode == "block" and k % cfg.block_k:
    return f"block scales need K={k} to be a multiple of block_k={cfg.block_k}"
  need = smem_bytes(cfg, dtype.itemsize, jnp.dtype(out_dtype).itemsize, scale_mode)
  if need > SMEM_BUDGET_BYTES:
    return f"{cfg} needs {need} bytes of shared memory > {SMEM_BUDGET_BYTES}"
  return None


def _tiled(shape, dtype):
  elems = SWIZZLE // jnp.dtype(dtype).itemsize
  return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, elems)),
                                              plgpu.SwizzleTransform(SWIZZLE)))


def _out_tiled(shape, dtype):
  itemsize = jnp.dtype(dtype).itemsize
  swizzle = min(SWIZZLE, shape[-1] * itemsize)
  return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, swizzle // itemsize)),
                                              plgpu.SwizzleTransform(swizzle)))


def _produce(issue, stages: int, steps: int, consumed) -> None:
  """The loader warpgroup's loop over ``steps`` K blocks in a ring of ``stages`` slots.

  ``issue(i, slot, wait)`` starts the copies of block ``i`` into ``slot`` (after waiting for
  the slot's previous consumer when ``wait``). The last ``stages`` consumptions are observed
  too, so every barrier phase is waited on before the kernel ends.
  """
  for i in range(min(stages, steps)):
    issue(i, i, False)

  @pl.loop(stages, max(steps, stages))
  def _(i):
    issue(i, lax.rem(i, stages), True)

  @pl.loop(max(steps - stages, 0), steps)
  def _(i):
    plgpu.barrier_wait(consumed.at[lax.rem(i, stages)])


def _kernel(a_ref, b_ref, as_ref, bs_ref, out_ref, s, *, cfg: MatmulConfig, scale_mode: str,
            acc_dtype, k_steps: int, b_per_tile: bool, b_tile_scalar: bool):
  bm, bn, bk, stages = cfg.block_m, cfg.block_n, cfg.block_k, cfg.num_stages
  block = scale_mode == "block"
  wg = lax.axis_index("wg")
  row0 = lax.axis_index("m_tiles") * (2 * bm)
  col0 = lax.axis_index("n_tiles") * bn
  layout = plgpu.Layout.WGMMA
  row_layout = plgpu.Layout.WGMMA.reduce(1)
  col_layout = plgpu.Layout.WGMMA.reduce(0)

  def row_bcast(v):
    return lax.broadcast_in_dim(v, (bm, bn), [0])

  def col_bcast(v):
    return lax.broadcast_in_dim(v, (bm, bn), [1])

  @pl.when(wg < 2)
  def _compute():
    plgpu.set_max_registers(cfg.compute_registers, action="increase")
    rows = pl.ds(row0 + wg * bm, bm)
    if not block:  # epilogue scales of this warpgroup's rows and the CTA's columns
      plgpu.copy_gmem_to_smem(as_ref.at[rows], s["a_scale"].at[wg], s["scale_bar"].at[wg])
      plgpu.copy_gmem_to_smem(bs_ref.at[pl.ds(col0, bn)], s["b_scale"].at[wg],
                              s["scale_bar"].at[2 + wg])

    def a_tile(slot):
      return s["a"].at[slot].at[pl.ds(wg * bm, bm)]

    def b_tile(slot):
      return s["b"].at[slot].transpose((1, 0))

    def wait_loaded(slot):
      plgpu.barrier_wait(s["a_bar"].at[slot])
      plgpu.barrier_wait(s["b_bar"].at[slot])
      if block:
        plgpu.barrier_wait(s["as_bar"].at[2 * slot + wg])
        plgpu.barrier_wait(s["bs_bar"].at[slot])

    if block:
      zeros = lambda: plgpu.layout_cast(jnp.zeros((bm, bn), jnp.float32), layout)

      def promote(total, part, slot):
        """total + part * a_scale[rows] * b_scale[cols] of K step ``slot``; frees the slot."""
        sa = plgpu.load(s["as"].at[slot, wg], layout=row_layout)
        if b_per_tile or b_tile_scalar:  # one scale for the [block_k, block_n] weight tile
          sb = s["bs"][slot, 0]
          scaled = part * (row_bcast(sa) * sb)
        else:
          scaled = part * row_bcast(sa) * col_bcast(
              plgpu.load(s["bs"].at[slot], layout=col_layout))
        plgpu.barrier_arrive(s["consumed"].at[slot])
        return total + scaled

      if cfg.overlap:
        # Step i issues its wgmma into a fresh accumulator, then promotes step i - 1's
        # partial product (carried in registers) while the tensor cores run, then retires
        # its own wgmma: the promotion never leaves the tensor cores idle.
        def partial_of(i, promote_prev):
          slot = lax.rem(i, stages)
          wait_loaded(slot)

          def body(acc_ref):
            plgpu.wgmma(acc_ref, a_tile(slot), b_tile(slot))
            total = promote_prev()
            return total, acc_ref[...]

          return pl.run_scoped(body, plgpu.ACC((bm, bn), jnp.float32))

        def step(i, carry):
          total, prev = carry
          return partial_of(i, lambda: promote(total, prev, lax.rem(i + stages - 1, stages)))

        carry = partial_of(0, zeros)
        total, last = lax.fori_loop(1, k_steps, step, carry)
        out = promote(total, last, (k_steps - 1) % stages)
      else:
        def step(i, total):
          slot = lax.rem(i, stages)
          wait_loaded(slot)

          def partial(acc_ref):
            plgpu.wgmma(acc_ref, a_tile(slot), b_tile(slot))
            return acc_ref[...]  # waits for this wgmma (wait_group 0)

          part = pl.run_scoped(partial, plgpu.ACC((bm, bn), jnp.float32))
          return promote(total, part, slot)

        out = lax.fori_loop(0, k_steps, step, zeros())
    else:
      def run(acc_ref):
        def step(i, carry):
          slot = lax.rem(i, stages)
          wait_loaded(slot)
          plgpu.wgmma(acc_ref, a_tile(slot), b_tile(slot))
          plgpu.wgmma_wait(1)  # the previous step's wgmma has retired: release its slot

          @pl.when(i > 0)
          def _():
            plgpu.barrier_arrive(s["consumed"].at[lax.rem(i + stages - 1, stages)])

          return carry

        lax.fori_loop(0, k_steps, step, None)
        plgpu.wgmma_wait(0)
        plgpu.barrier_arrive(s["consumed"].at[(k_steps - 1) % stages])
        return acc_ref[...]

      acc = pl.run_scoped(run, plgpu.ACC((bm, bn), acc_dtype))
      plgpu.barrier_wait(s["scale_bar"].at[wg])
      plgpu.barrier_wait(s["scale_bar"].at[2 + wg])
      sa = plgpu.load(s["a_scale"].at[wg], layout=row_layout)
      sb = plgpu.load(s["b_scale"].at[wg], layout=col_layout)
      out = acc.astype(jnp.float32) * row_bcast(sa) * col_bcast(sb)

    o_smem = s["out"].at[wg]
    o_smem[...] = out.astype(o_smem.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, out_ref.at[rows, pl.ds(col0, bn)])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == 2)
  def _memory():
    plgpu.set_max_registers(cfg.memory_registers, action="decrease")

    def issue(i, slot, wait):
      if wait:
        plgpu.barrier_wait(s["consumed"].at[slot])
      ks = pl.ds(i * bk, bk)
      plgpu.copy_gmem_to_smem(a_ref.at[pl.ds(row0, 2 * bm), ks], s["a"].at[slot],
                              s["a_bar"].at[slot])
      plgpu.copy_gmem_to_smem(b_ref.at[pl.ds(col0, bn), ks], s["b"].at[slot],
                              s["b_bar"].at[slot])
      if block:
        for half in range(2):  # [stages, 2, block_m]: one row vector per warpgroup
          plgpu.copy_gmem_to_smem(as_ref.at[i, pl.ds(row0 + half * bm, bm)],
                                  s["as"].at[slot, half], s["as_bar"].at[2 * slot + half])
        if b_per_tile:  # [K steps, tiles (+ pad)]: 128 bytes from this tile's scale on
          plgpu.copy_gmem_to_smem(bs_ref.at[i, pl.ds(lax.axis_index("n_tiles"), TILE_SCALE_VEC)],
                                  s["bs"].at[slot], s["bs_bar"].at[slot])
        else:
          plgpu.copy_gmem_to_smem(bs_ref.at[i, pl.ds(col0, bn)], s["bs"].at[slot],
                                  s["bs_bar"].at[slot])

    _produce(issue, stages, k_steps, s["consumed"])


def scaled_matmul(a: jax.Array, b_t: jax.Array, a_scale: jax.Array, b_scale: jax.Array, *,
                  scale_mode: str = "outer", out_dtype=jnp.bfloat16,
                  config: MatmulConfig | None = None, interpret: bool = False,
                  b_tile_scalar: bool = False) -> jax.Array:
  """Scaled matmul of K-major operands on Hopper tensor cores.

  Args:
    a: ``[M, K]`` int8 / float8 / bfloat16 / float16 (activations).
    b_t: ``[N, K]`` same dtype as ``a`` (fp8 may mix e4m3 / e5m2): the transposed weight.
    a_scale: float32; ``"outer"``: ``[M]`` per row; ``"block"``: ``[K // block_k, M]``.
    b_scale: float32; ``"outer"``: ``[N]`` per column; ``"block"``: ``[K // block_k, N]``
      (or ``[K // block_k, tile_scale_columns(N)]`` per weight tile: interpret mode only
      unless ``TILE_SCALES_ON_GPU``).
    scale_mode: ``"outer"`` or ``"block"`` (module docstring).
    out_dtype: output dtype (bfloat16, float16 or float32).
    config: tile sizes; None picks :func:`default_config`.
    interpret: run in Pallas Mosaic GPU interpret mode (any platform).
    b_tile_scalar: ``"block"`` with per-column ``b_scale`` constant over each
      ``block_n`` columns (128 x 128 weight tiles, ``block_n = 128``): read one scale per
      tile and step instead of a column vector (diagnostic variant).

  Returns:
    ``[M, N]`` in ``out_dtype``. Shapes must be whole tiles (:func:`tile_multiples`).
  """
  m, k = a.shape
  n, k2 = b_t.shape
  if k != k2:
    raise ValueError(f"scaled_matmul: a.shape {a.shape} and b_t.shape {b_t.shape} differ in K")
  cfg = config or default_config(m, n, k, a.dtype, scale_mode=scale_mode, out_dtype=out_dtype)
  why = unsupported(m, n, k, a.dtype, scale_mode=scale_mode, cfg=cfg, out_dtype=out_dtype)
  if why:
    raise ValueError(f"scaled_matmul: {why}")
  tm, tn, tk = tile_multiples(cfg)
  if m % tm or n % tn or k % tk:
    raise ValueError(f"scaled_matmul: shape (M, N, K) = {(m, n, k)} is not a multiple of the "
                     f"tile {(tm, tn, tk)}; pad the operands")
  k_steps = k // cfg.block_k
  b_per_tile = False
  if scale_mode == "outer":
    if a_scale.shape != (m,) or b_scale.shape != (n,):
      raise ValueError(f"scaled_matmul: outer scales must be [M]={m} and [N]={n}, got "
                       f"{a_scale.shape} and {b_scale.shape}")
  else:
    tiles = tile_scale_columns(n, cfg)
    b_per_tile = b_scale.shape == (k_steps, tiles)
    if a_scale.shape != (k_steps, m) or (b_scale.shape != (k_steps, n) and not b_per_tile):
      raise ValueError(f"scaled_matmul: block scales must be [K/block_k, M]={(k_steps, m)} and "
                       f"[K/block_k, N]={(k_steps, n)} (or per weight tile "
                       f"{(k_steps, tiles)}), got {a_scale.shape} and {b_scale.shape}")
    if b_per_tile and not interpret and not TILE_SCALES_ON_GPU:
      raise ValueError(f"scaled_matmul: per-tile weight scales {b_scale.shape} crashed the H100 "
                       f"(TILE_SCALES_ON_GPU is False); pass per-column scales "
                       f"[K/block_k, N]={(k_steps, n)}")
  if b_tile_scalar and (scale_mode != "block" or b_per_tile):
    raise ValueError("scaled_matmul: b_tile_scalar needs scale_mode='block' with per-column "
                     f"b_scale [K/block_k, N], got scale_mode={scale_mode!r}, b_scale "
                     f"{b_scale.shape}")
  bm, bn, bk, stages = cfg.block_m, cfg.block_n, cfg.block_k, cfg.num_stages
  acc_dtype = jnp.int32 if a.dtype == jnp.int8 else jnp.float32
  scratch = {
      "a": _tiled((stages, 2 * bm, bk), a.dtype),
      "b": _tiled((stages, bn, bk), b_t.dtype),
      "out": _out_tiled((2, bm, bn), out_dtype),
      "a_bar": plgpu.Barrier(num_barriers=stages),
      "b_bar": plgpu.Barrier(num_barriers=stages),
      "consumed": plgpu.Barrier(num_arrivals=2, num_barriers=stages),
  }
  if scale_mode == "block":
    scratch["as"] = plgpu.SMEM((stages, 2, bm), jnp.float32)
    scratch["bs"] = plgpu.SMEM((stages, TILE_SCALE_VEC if b_per_tile else bn), jnp.float32)
    scratch["as_bar"] = plgpu.Barrier(num_barriers=2 * stages)
    scratch["bs_bar"] = plgpu.Barrier(num_barriers=stages)
  else:
    scratch["a_scale"] = plgpu.SMEM((2, bm), jnp.float32)
    scratch["b_scale"] = plgpu.SMEM((2, bn), jnp.float32)
    scratch["scale_bar"] = plgpu.Barrier(num_barriers=4)
  block = scale_mode == "block"
  kernel = functools.partial(_kernel, cfg=cfg, scale_mode=scale_mode, acc_dtype=acc_dtype,
                             k_steps=k_steps, b_per_tile=b_per_tile,
                             b_tile_scalar=b_tile_scalar)
  return plgpu.kernel(
      kernel,
      out_type=jax.ShapeDtypeStruct((m, n), out_dtype),
      scratch_types=(scratch,),
      grid=(n // bn, m // (2 * bm)),
      grid_names=("n_tiles", "m_tiles"),
      num_threads=3,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
      interpret=plgpu.InterpretGPUParams() if interpret else None,
      kernel_name=f"scaled_matmul_{scale_mode}" + ("_overlap" if cfg.overlap and block else ""),
  )(a, b_t, a_scale.astype(jnp.float32), b_scale.astype(jnp.float32))


# ----------------------------------------------- weight-only, few rows (decode): out^T


@dataclasses.dataclass(frozen=True)
class WeightOnlyConfig:
  """Blocks of :func:`weight_only_matmul_t`: each CTA owns ``2 * 64`` weight rows (output
  columns, one 64-row half per compute warpgroup) and ``1 / split_k`` of K, streamed in
  ``block_k``-wide steps through a ``num_stages``-deep ring."""

  block_k: int = 128
  num_stages: int = 4
  split_k: int = 2
  compute_registers: int = 232
  memory_registers: int = 40
  # Software-pipelined upcast: step i's wgmma is issued, then step i + 1's weight tile is
  # loaded, upcast and scaled while it runs (one more weight tile live in registers).
  # False: load, upcast, wgmma, wait, one step at a time. Not yet timed on a GPU.
  pipeline_upcast: bool = False
  # Split K inside the CTA: the two compute warpgroups take the same 64 weight rows (a CTA
  # covers 64 output columns, so the grid has as many CTAs as the 128-row form with twice
  # the split) and the two halves of the CTA's K range; warpgroup 1 hands its float32 sum
  # to warpgroup 0 through shared memory, which adds, casts and stores ``[M, 64]`` of the
  # output transposed (rows past M are dropped by the TMA store). With ``split_k = 1`` the
  # kernel's output is the finished ``[M, N]`` product in the output dtype: no partial
  # sums and no XLA epilogue. False: 128 rows a CTA, one 64-row half per warpgroup,
  # ``[split_k, N, M]`` float32 partials (the form timed on the H100). Not yet timed.
  wg_split_k: bool = False

  def __post_init__(self):
    if self.block_k not in (64, 128, 256):
      raise ValueError(f"WeightOnlyConfig.block_k must be 64, 128 or 256, got {self.block_k}")
    if self.num_stages < 1 or self.split_k < 1:
      raise ValueError(f"WeightOnlyConfig needs num_stages >= 1 and split_k >= 1, got "
                       f"{self.num_stages} and {self.split_k}")


WO_ROWS = 64  # weight rows per compute warpgroup (the wgmma M)
WO_MAX_M = 64


def _bits(dtype) -> int:
  return 4 if jnp.dtype(dtype) in (jnp.dtype(jnp.int4), jnp.dtype(jnp.uint4)) else (
      8 * jnp.dtype(dtype).itemsize)


def _swizzled(shape, dtype):
  bits = _bits(dtype)
  swizzle = plgpu.find_swizzle(shape[-1] * bits, "operand")
  return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, swizzle * 8 // bits)),
                                              plgpu.SwizzleTransform(swizzle)))


def _wo_kernel(x_ref, w_ref, s_ref, out_ref, s, *, cfg: WeightOnlyConfig, steps: int,
               group_steps: int, per_channel: bool, xdtype, a_via_smem: bool, mp: int):
  """Compute warpgroup ``wg``: out^T[rows, :] += (w[rows, k] * scale[rows]) @ x^T[k, :].

  ``x_ref`` holds the true M rows; each x tile is an ``mp``-row TMA box whose rows past M
  are zero-filled by the copy (no padded copy of x). ``s_ref``: scales ``[G, N]``.
  """
  stages, bk = cfg.num_stages, cfg.block_k
  wsplit = cfg.wg_split_k
  wg = lax.axis_index("wg")
  split = lax.axis_index("splits")
  cta_rows = WO_ROWS if wsplit else 2 * WO_ROWS
  row0 = lax.axis_index("n_tiles") * cta_rows
  # First K step of this CTA (and, with wg_split_k, of each warpgroup's half of it).
  step0 = split * steps * (2 if wsplit else 1)
  upcast = plgpu.Layout.WGMMA_UPCAST_4X if _bits(w_ref.dtype) == 4 else plgpu.Layout.WGMMA_UPCAST_2X
  row_layout = plgpu.Layout.WGMMA.reduce(1)
  # Barriers of a slot: one per warpgroup half when the halves arrive separately.
  half_bar = (lambda slot, half: 2 * slot + half) if wsplit else (lambda slot, half: slot)

  @pl.when(wg < 2)
  def _compute():
    plgpu.set_max_registers(cfg.compute_registers, action="increase")
    rows = pl.ds(row0 if wsplit else row0 + wg * WO_ROWS, WO_ROWS)
    if per_channel:
      plgpu.copy_gmem_to_smem(s_ref.at[0, rows], s["scale"].at[wg, 0], s["scale_bar"].at[wg])
      plgpu.barrier_wait(s["scale_bar"].at[wg])
      channel_scale = plgpu.load(s["scale"].at[wg, 0], layout=row_layout)

    def weight_tile(i):
      """Step i's weight rows of this warpgroup, upcast to x.dtype and group-scaled."""
      slot = lax.rem(i, stages)
      plgpu.barrier_wait(s["w_bar"].at[half_bar(slot, wg)])
      w = plgpu.load(s["w"].at[slot, pl.ds(wg * WO_ROWS, WO_ROWS)], layout=upcast)
      w = plgpu.layout_cast(w, plgpu.Layout.WGMMA).astype(xdtype)
      if not per_channel:  # the group's scale, per weight row, in x.dtype (HMUL2)
        plgpu.barrier_wait(s["s_bar"].at[2 * slot + wg])
        scale = plgpu.load(s["scale"].at[slot, wg], layout=row_layout).astype(xdtype)
        w = w * lax.broadcast_in_dim(scale, w.shape, [0])
      return w

    def multiply(acc_ref, i, w, prefetch):
      """acc += w @ x_i^T; ``prefetch()`` runs while the wgmma is in flight and its
      result (the next weight tile) is returned."""
      slot = lax.rem(i, stages)
      plgpu.barrier_wait(s["x_bar"].at[half_bar(slot, wg)])
      if a_via_smem:  # interpret mode takes wgmma operands from refs only
        s["a16"].at[wg][...] = w
        plgpu.commit_smem()
        w = s["a16"].at[wg]
      x_tile = s["x"].at[slot, wg] if wsplit else s["x"].at[slot]
      plgpu.wgmma(acc_ref, w, x_tile.T)
      nxt = prefetch()
      plgpu.wgmma_wait(0)  # the register operand and the slot are free again
      plgpu.barrier_arrive(s["consumed"].at[slot])
      return nxt

    def run(acc_ref):
      if not cfg.pipeline_upcast:
        def step(i, carry):
          multiply(acc_ref, i, weight_tile(i), lambda: None)
          return carry

        lax.fori_loop(0, steps, step, None)
      else:  # invariant: the carry is step i's weight tile, loaded and upcast
        w_last = lax.fori_loop(
            0, steps - 1, lambda i, w: multiply(acc_ref, i, w, lambda: weight_tile(i + 1)),
            weight_tile(0))
        multiply(acc_ref, steps - 1, w_last, lambda: None)
      return acc_ref[...]

    acc = pl.run_scoped(run, plgpu.ACC((WO_ROWS, mp), jnp.float32))
    if not wsplit:
      if per_channel:  # one scale per weight row, applied once in float32
        acc = acc * lax.broadcast_in_dim(channel_scale, acc.shape, [0])
      o_smem = s["out"].at[wg]
      o_smem[...] = acc
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(o_smem, out_ref.at[split, rows])
      plgpu.wait_smem_to_gmem(0)
      return

    # wg_split_k: warpgroup 1's sum over the upper K half joins warpgroup 0's.
    @pl.when(wg == 1)
    def _hand_over():
      s["acc1"][...] = acc
      plgpu.barrier_arrive(s["acc_bar"].at[0])

    @pl.when(wg == 0)
    def _finish():
      plgpu.barrier_wait(s["acc_bar"].at[0])
      total = acc + plgpu.load(s["acc1"], layout=plgpu.Layout.WGMMA, optimized=False)
      if per_channel:
        total = total * lax.broadcast_in_dim(channel_scale, total.shape, [0])
      if "out_t" in s:  # finished product: [mp, 64] of out [M, N], x rows past M dropped
        s["out_t"].T[...] = total.astype(s["out_t"].dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(s["out_t"], out_ref.at[pl.ds(0, mp), rows])
      else:  # float32 partial of this split, [64, mp] of out^T (summed by XLA)
        s["out"].at[0][...] = total
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(s["out"].at[0], out_ref.at[split, rows])
      plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == 2)
  def _memory():
    plgpu.set_max_registers(cfg.memory_registers, action="decrease")

    def issue(i, slot, wait):
      if wait:
        plgpu.barrier_wait(s["consumed"].at[slot])
      for half in range(2 if wsplit else 1):
        k_step = step0 + half * steps + i
        ks = pl.ds(k_step * bk, bk)
        w_rows = WO_ROWS if wsplit else 2 * WO_ROWS
        w_dst = s["w"].at[slot, pl.ds(half * WO_ROWS, WO_ROWS)] if wsplit else s["w"].at[slot]
        plgpu.copy_gmem_to_smem(w_ref.at[pl.ds(row0, w_rows), ks], w_dst,
                                s["w_bar"].at[half_bar(slot, half)])
        plgpu.copy_gmem_to_smem(x_ref.at[pl.ds(0, mp), ks],
                                s["x"].at[slot, half] if wsplit else s["x"].at[slot],
                                s["x_bar"].at[half_bar(slot, half)])
      if not per_channel:
        for half in range(2):
          g = (step0 + (half * steps if wsplit else 0) + i) // group_steps
          first = row0 if wsplit else row0 + half * WO_ROWS
          plgpu.copy_gmem_to_smem(s_ref.at[g, pl.ds(first, WO_ROWS)],
                                  s["scale"].at[slot, half], s["s_bar"].at[2 * slot + half])

    _produce(issue, stages, steps, s["consumed"])


def weight_only_unsupported(m: int, n: int, k: int, *, bits: int, group_size: int | None,
                            cfg: WeightOnlyConfig) -> str | None:
  """None when :func:`weight_only_matmul_t` serves padded shapes of this call, else why."""
  if bits not in (4, 8):
    return f"bits={bits} is not 4 or 8"
  if m > WO_MAX_M:
    return f"m={m} > {WO_MAX_M}: the rows of x are the wgmma N dimension"
  if group_size is not None and group_size % cfg.block_k:
    return f"group_size={group_size} is not a multiple of block_k={cfg.block_k}"
  return None


def weight_only_config(n: int, k: int, *, num_sms: int = 132,
                       wg_split_k: bool = False) -> WeightOnlyConfig:
  """A :class:`WeightOnlyConfig` whose grid fills the GPU about once.

  ``split_k`` is the largest of 1, 2, 4, 8 with ``ceil(n / rows) * split_k <= num_sms``
  (``rows`` = 128, or 64 with ``wg_split_k``; at least 4 K steps a warpgroup). It came
  from per-call H100 times that suggested a cost per wave of CTAs (8192^2 int4 split 2
  51.5 us, split 4 73.5 us); in device time (chained calls, session 4) the gap is 31.2 vs
  34.4 us and the two-wave 4096 x 14336 split 2 runs in 33.8 us, so the dispatch keeps the
  fixed ``WeightOnlyConfig()`` (notes/quant_matmul.md).
  """
  halves = 2 if wg_split_k else 1
  tiles = -(-n // (2 * WO_ROWS // halves))
  cfg = WeightOnlyConfig(wg_split_k=wg_split_k)
  split = 1
  for s in (2, 4, 8):
    if tiles * s <= num_sms and k >= 4 * s * halves * cfg.block_k:
      split = s
  return dataclasses.replace(cfg, split_k=split)


def weight_only_tile_multiples(cfg: WeightOnlyConfig, group_size: int | None
                               ) -> tuple[int, int]:
  """``(N, K)`` multiples the operands must be padded to (whole scale groups per split
  and, with ``wg_split_k``, per warpgroup half)."""
  parts = cfg.split_k * (2 if cfg.wg_split_k else 1)
  tk = cfg.block_k * parts
  if group_size is not None:
    tk = math.lcm(tk, group_size * parts)
  return (WO_ROWS if cfg.wg_split_k else 2 * WO_ROWS), tk


def weight_only_matmul_t(x: jax.Array, w_t: jax.Array, scales: jax.Array, *,
                         group_size: int | None, config: WeightOnlyConfig | None = None,
                         interpret: bool = False, scales_t: bool = False,
                         out_dtype=jnp.float32) -> jax.Array:
  """``x @ dequant(w)`` for a few rows of ``x``, computed transposed on the tensor cores.

  ``out^T [N, M] = (w^T * scale) [N, K] @ x^T [K, M]``: the quantized weight is the
  ``wgmma`` A operand, loaded from shared memory into registers in the upcast layouts,
  converted to ``x.dtype`` (Mosaic's lop3 / prmt int4 and int8 converters), scaled per
  row (output column) and group, while the few rows of ``x`` are the 8..64-wide N operand
  (read as a TMA box of ``ceil(M / 8) * 8`` rows whose rows past M the copy zero-fills).
  K is split over ``split_k`` CTAs so every SM streams weight bytes; with
  ``config.wg_split_k`` also over the CTA's two compute warpgroups, summed in the kernel.

  Args:
    x: ``[M, K]`` bfloat16 / float16, ``M <= 64``.
    w_t: ``[N, K]`` int8 or int4 (``jnp.int4``: two codes per byte, K-major), symmetric.
    scales: float32 ``[N, K // group_size]`` (``[N, 1]`` per channel), or with
      ``scales_t`` the same transposed, ``[K // group_size, N]`` (the kernel's layout:
      one row per K group; :func:`jaxeff.ops.quantized_matmul.prepack` stores it).
    group_size: K values per scale, None for per-channel.
    config: blocks; None picks :class:`WeightOnlyConfig` defaults.
    interpret: run in Pallas Mosaic GPU interpret mode.
    scales_t: ``scales`` is ``[G, N]`` (no per-call transpose).
    out_dtype: output dtype; the kernel casts only with ``wg_split_k`` and ``split_k = 1``
      (otherwise float32 partials are summed by XLA and cast there).

  Returns:
    ``[M, N]`` in ``out_dtype``; ``N``, ``K`` whole tiles (:func:`weight_only_tile_multiples`).
  """
  cfg = config or WeightOnlyConfig()
  m, k = x.shape
  n = w_t.shape[0]
  bits = _bits(w_t.dtype)
  why = weight_only_unsupported(m, n, k, bits=bits, group_size=group_size, cfg=cfg)
  if why:
    raise ValueError(f"weight_only_matmul_t: {why}")
  tn, tk = weight_only_tile_multiples(cfg, group_size)
  if n % tn or k % tk or w_t.shape[1] != k:
    raise ValueError(f"weight_only_matmul_t: (N, K) = {(n, k)} (w_t {w_t.shape}) is not a "
                     f"multiple of {(tn, tk)}; pad the operands")
  groups = 1 if group_size is None else k // group_size
  want = (groups, n) if scales_t else (n, groups)
  if scales.shape != want:
    raise ValueError(f"weight_only_matmul_t: scales must be {'[G, N]' if scales_t else '[N, G]'}"
                     f" = {want}, got {scales.shape}")
  m_rows = m
  x = pad_rows_for_tma(x)
  m = x.shape[0]
  mp = max(8, -(-m // 8) * 8)  # wgmma N; TMA zero-fills x rows m..mp and drops output rows
  wsplit = cfg.wg_split_k
  halves = 2 if wsplit else 1
  steps = k // cfg.block_k // cfg.split_k // halves
  per_channel = group_size is None
  stages = min(cfg.num_stages, steps)
  cfg = dataclasses.replace(cfg, num_stages=stages)
  # The finished [M, N] product straight from the kernel: wg_split_k, no split across
  # CTAs and a 16-bit output (a transposed float32 store does not lower; float32 output
  # takes the partial-sum form and an XLA transpose).
  fused = wsplit and cfg.split_k == 1 and jnp.dtype(out_dtype).itemsize == 2
  scratch = {
      "w": _swizzled((stages, 2 * WO_ROWS, cfg.block_k), w_t.dtype),
      "x": _swizzled((stages, 2, mp, cfg.block_k) if wsplit else (stages, mp, cfg.block_k),
                     x.dtype),
      "w_bar": plgpu.Barrier(num_barriers=halves * stages),
      "x_bar": plgpu.Barrier(num_barriers=halves * stages),
      "consumed": plgpu.Barrier(num_arrivals=2, num_barriers=stages),
  }
  if wsplit:
    scratch["acc1"] = plgpu.SMEM((WO_ROWS, mp), jnp.float32)  # warpgroup 1's sum
    scratch["acc_bar"] = plgpu.Barrier(num_barriers=1)
  if fused:
    scratch["out_t"] = plgpu.SMEM((mp, WO_ROWS), out_dtype)  # [x rows, weight rows]
  else:
    scratch["out"] = _swizzled((1 if wsplit else 2, WO_ROWS, mp), jnp.float32)
  if per_channel:
    scratch["scale"] = plgpu.SMEM((2, 1, WO_ROWS), jnp.float32)
    scratch["scale_bar"] = plgpu.Barrier(num_barriers=2)
  else:
    scratch["scale"] = plgpu.SMEM((stages, 2, WO_ROWS), jnp.float32)
    scratch["s_bar"] = plgpu.Barrier(num_barriers=2 * stages)
  if interpret:
    scratch["a16"] = _swizzled((2, WO_ROWS, cfg.block_k), x.dtype)
  kernel = functools.partial(_wo_kernel, cfg=cfg, steps=steps,
                             group_steps=(group_size or k) // cfg.block_k,
                             per_channel=per_channel, xdtype=x.dtype, a_via_smem=interpret,
                             mp=mp)
  out_type = (jax.ShapeDtypeStruct((m, n), out_dtype) if fused else
              jax.ShapeDtypeStruct((cfg.split_k, n, mp), jnp.float32))
  partial = plgpu.kernel(
      kernel,
      out_type=out_type,
      scratch_types=(scratch,),
      grid=(n // tn, cfg.split_k),
      grid_names=("n_tiles", "splits"),
      num_threads=3,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
      interpret=plgpu.InterpretGPUParams() if interpret else None,
      kernel_name=f"int{bits}_weight_only_t" + ("_wgsplit" if wsplit else ""),
  )(x, w_t, scales.astype(jnp.float32) if scales_t else scales.astype(jnp.float32).T)
  if fused:
    return partial if m == m_rows else partial[:m_rows]
  out = partial[0] if cfg.split_k == 1 else jnp.sum(partial, axis=0)
  return out[:, :m_rows].T.astype(out_dtype)


def pad_rows_for_tma(x: jax.Array, multiple: int = 8) -> jax.Array:
  """``x [M, K]`` with zero rows up to a multiple of ``multiple`` when ``M > 8`` (a TMA
  copy of a ``[M, K]`` array needs M <= 8 or a multiple of 8; the copies zero-fill the rows
  of a tile past M, so smaller M are read as they are). H100: M = 33 failed to lower.
  A copy multicast to a cluster of ``c`` CTAs splits its rows into ``c`` parts of whole
  8-row tiles, so such callers pass ``multiple = 8 c`` (H100: M = 33 padded to 40 failed
  with a cluster of 2: "[5, 2, 8, 64] ... not divisible by the collective size 2")."""
  m = x.shape[0]
  if (m <= 8 and multiple == 8) or m % multiple == 0:
    return x
  return jnp.pad(x, ((0, -m % multiple), (0, 0)))


__all__ = ["MatmulConfig", "WeightOnlyConfig", "default_config", "pad_rows_for_tma", "scaled_matmul",
           "tile_multiples", "tile_scale_columns", "unsupported", "weight_only_config",
           "weight_only_matmul_t", "weight_only_tile_multiples", "weight_only_unsupported"]
