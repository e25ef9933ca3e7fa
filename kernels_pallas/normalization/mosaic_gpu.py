"""Fused RMSNorm / LayerNorm forward and backward as Pallas Mosaic GPU kernels (Hopper).

Memory-bound row normalisation (formulas in :mod:`kernels_pallas.normalization`): each
kernel reads every input byte once from HBM and writes every output byte once.

Structure (both directions): a persistent grid of ``num_programs`` CTAs (two per SM when
their SMEM shares fit, else one), one warpgroup each. Program ``p`` handles row blocks
``p, p + P, p + 2P, ...`` of ``block_rows`` whole rows. A ring of ``num_stages`` shared-memory slots is filled by TMA
bulk copies (a ``[block_rows, features]`` row block is contiguous in HBM, so one
``cp.async.bulk`` moves it; the last, partial block copies exactly its rows). The
result is written back into the slot it was computed from and stored with one bulk copy.
At step ``k`` the program refills the slot of step ``k - 2`` (whose store has finished
reading once at most one store is pending) with block ``k + num_stages - 2``, so
``num_stages - 2`` loads stay in flight while step ``k`` computes.

Inside a step the warpgroup walks the row block in ``[block_rows, block_cols]`` register
chunks laid out with the 4 warps and 32 lanes side by side along the features axis, each
thread holding ``vector_size`` contiguous elements (16 bytes of ``x``) per row. Row
statistics reduce across lanes (shuffles) and warps (a small SMEM scratch); column sums
(``dweight`` / ``dbias``) stay inside each thread. Passes re-read the block from SMEM
instead of holding whole rows in registers, so any ``features`` that fits the SMEM ring is
served; a block that is a single chunk is read once and kept in registers (forward).
LayerNorm uses the exact two-pass variance (mean first), like the reference.

Measured on an H100 (notes/normalization.md): 93-96% of the device's copy bandwidth;
RMSNorm fwd+bwd 1.26x XLA and LayerNorm fwd+bwd 2.0-2.5x XLA at 16384 x 2048..8192 bf16.

Forward saves ``rstd`` (and ``mean`` for LayerNorm) as ``[rows]`` float32; the backward
reads them (prefetched one step ahead), writes ``dx`` and per-program partial sums
``[num_programs, features]`` float32 of ``dweight`` / ``dbias`` kept in SMEM.

Limits: ``features % 128 == 0`` (one 4-warp x 32-lane tile of columns) and the SMEM ring
(at least ``MIN_STAGES`` slots of one row, plus staged weight / bias and, backward, the
float32 partial sums) must fit ``SMEM_BUDGET_BYTES``; :func:`forward_unsupported` /
:func:`backward_unsupported` say why a shape is refused.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels_pallas.normalization import input_grad, normalize, scale_shift

WARPS = 4  # warps in the warpgroup that computes
LANES = 32
THREADS = WARPS * LANES
VECTOR_BYTES = 16  # bytes of x each thread holds contiguously per row (one 128-bit access)
SMEM_BUDGET_BYTES = 200 * 1024  # of the 227 KiB a Hopper CTA may use; the rest is Mosaic scratch
SLOT_TARGET_BYTES = 32 * 1024  # bytes of one input row block (one TMA step)
FWD_CHUNK_ELEMS = 8192  # elements of one [block_rows, block_cols] register chunk (64 a thread)
BWD_CHUNK_ELEMS = 2048  # backward keeps ~5 such chunks live (16 a thread each)
MIN_STAGES = 3  # ring depth for one load in flight ahead of the step being computed
MAX_STAGES = 8
MAX_BLOCK_ROWS = 64
PROGRAMS_PER_SM = 2  # preferred persistent CTAs per SM (they split the SMEM budget); else 1
INTERPRET_PROGRAMS = 2  # persistent programs simulated in interpret mode
DEFAULT_NUM_SMS = 132  # H100 SXM, when the device does not report a core count
STORES_IN_FLIGHT = 1  # bulk stores allowed to be pending when a slot is refilled


@dataclasses.dataclass(frozen=True)
class NormConfig:
  """Block sizes of one kernel launch.

  Attributes:
    block_rows: rows per pipeline step (one TMA copy of ``[block_rows, features]``).
    block_cols: columns per register chunk; a multiple of ``THREADS * vector_size``
      dividing ``features``.
    vector_size: contiguous elements per thread and row (16 bytes of ``x`` at most).
    num_stages: SMEM slots in the TMA ring (>= ``MIN_STAGES``).
    num_programs: persistent CTAs (the grid).
  """

  block_rows: int
  block_cols: int
  vector_size: int
  num_stages: int
  num_programs: int

  def __post_init__(self):
    for name in ("block_rows", "block_cols", "vector_size", "num_programs"):
      if getattr(self, name) < 1:
        raise ValueError(f"NormConfig.{name} must be >= 1, got {getattr(self, name)}")
    if self.block_cols % (THREADS * self.vector_size):
      raise ValueError(f"NormConfig.block_cols={self.block_cols} must be a multiple of "
                       f"{THREADS} * vector_size={THREADS * self.vector_size}")
    if self.num_stages < MIN_STAGES:
      raise ValueError(f"NormConfig.num_stages must be >= {MIN_STAGES}, got {self.num_stages}")


def _vector_size(features: int, itemsize: int) -> int:
  v = VECTOR_BYTES // itemsize
  while v > 1 and features % (THREADS * v):
    v //= 2
  return v


def _pow2_floor(n: int) -> int:
  return 1 << (max(n, 1).bit_length() - 1)


def _make_config(rows: int, features: int, x_itemsize: int, *, inputs: int, fixed_bytes: int,
                 chunk_elems: int, num_sms: int, programs_per_sm: int) -> NormConfig | str:
  """Largest row block (<= SLOT_TARGET_BYTES) whose SMEM ring fits, or the reason none does.

  ``programs_per_sm`` CTAs share one SM's ``SMEM_BUDGET_BYTES``.
  """
  budget = SMEM_BUDGET_BYTES // programs_per_sm
  if features % THREADS:
    return f"features={features} is not a multiple of {THREADS} (4 warps x 32 lanes)"
  v = _vector_size(features, x_itemsize)
  tile_cols = THREADS * v
  row_bytes = features * x_itemsize
  block_rows = min(_pow2_floor(SLOT_TARGET_BYTES // row_bytes), MAX_BLOCK_ROWS,
                   _pow2_floor(max(chunk_elems // tile_cols, 1)), _pow2_floor(rows))
  while True:
    per_stage = inputs * block_rows * row_bytes
    stages = min(MAX_STAGES, (budget - fixed_bytes) // per_stage)
    if stages >= MIN_STAGES or block_rows == 1:
      break
    block_rows //= 2
  if stages < MIN_STAGES:
    need = fixed_bytes + MIN_STAGES * inputs * row_bytes
    return (f"features={features} too large for shared memory: {MIN_STAGES} stages of one row "
            f"need {need} bytes, budget {budget}")
  block_cols = tile_cols
  while (features % (2 * block_cols) == 0 and block_rows * 2 * block_cols <= chunk_elems):
    block_cols *= 2
  # As few programs as give the same number of steps, so they all finish together.
  num_blocks = max(1, pl.cdiv(rows, block_rows))
  steps = pl.cdiv(num_blocks, num_sms * programs_per_sm)
  return NormConfig(block_rows=block_rows, block_cols=block_cols, vector_size=v,
                    num_stages=stages, num_programs=pl.cdiv(num_blocks, steps))


def _first_config(programs_per_sm: int | None, **kwargs) -> NormConfig | str:
  """``programs_per_sm`` if given, else ``PROGRAMS_PER_SM`` when its SMEM share fits, else 1."""
  for pps in (programs_per_sm,) if programs_per_sm else (PROGRAMS_PER_SM, 1):
    cfg = _make_config(programs_per_sm=pps, **kwargs)
    if not isinstance(cfg, str):
      break
  return cfg


def forward_config(rows: int, features: int, dtype, *, weight_dtype=None, bias_dtype=None,
                   num_sms: int = DEFAULT_NUM_SMS, programs_per_sm: int | None = None
                   ) -> NormConfig | str:
  """Forward block sizes for ``x: [rows, features]`` (or the reason the shape is refused)."""
  fixed = sum(features * jnp.dtype(d).itemsize for d in (weight_dtype, bias_dtype) if d is not None)
  return _first_config(programs_per_sm, rows=rows, features=features,
                       x_itemsize=jnp.dtype(dtype).itemsize, inputs=1, fixed_bytes=fixed,
                       chunk_elems=FWD_CHUNK_ELEMS, num_sms=num_sms)


def backward_config(rows: int, features: int, dtype, *, weight_dtype=None, has_bias=False,
                    num_sms: int = DEFAULT_NUM_SMS, programs_per_sm: int | None = None
                    ) -> NormConfig | str:
  """Backward block sizes: two input rings (x, dy) plus float32 dweight / dbias partials."""
  fixed = 0
  if weight_dtype is not None:
    fixed += features * (jnp.dtype(weight_dtype).itemsize + 4)
  if has_bias:
    fixed += features * 4
  return _first_config(programs_per_sm, rows=rows, features=features,
                       x_itemsize=jnp.dtype(dtype).itemsize, inputs=2, fixed_bytes=fixed,
                       chunk_elems=BWD_CHUNK_ELEMS, num_sms=num_sms)


def _checked(config: NormConfig | str) -> NormConfig:
  if isinstance(config, str):
    raise NotImplementedError(config)
  return config


def forward_unsupported(rows: int, features: int, dtype, *, weight_dtype=None,
                        bias_dtype=None) -> str | None:
  """None when the forward kernel serves the shape, else why not."""
  if rows < 1:
    return f"rows={rows}: nothing to normalise"
  for name, d in (("weight", weight_dtype), ("bias", bias_dtype)):
    if d is not None and jnp.dtype(d).itemsize > 4:
      return f"{name}.dtype={jnp.dtype(d)} is wider than float32"
  cfg = forward_config(rows, features, dtype, weight_dtype=weight_dtype, bias_dtype=bias_dtype)
  return cfg if isinstance(cfg, str) else None


def backward_unsupported(rows: int, features: int, dtype, *, weight_dtype=None,
                         has_bias: bool = False) -> str | None:
  """None when the backward kernel serves the shape, else why not."""
  if rows < 1:
    return f"rows={rows}: nothing to normalise"
  cfg = backward_config(rows, features, dtype, weight_dtype=weight_dtype, has_bias=has_bias)
  return cfg if isinstance(cfg, str) else None


def _num_sms(interpret: bool) -> int:
  if interpret:
    return INTERPRET_PROGRAMS
  return getattr(jax.devices()[0], "core_count", None) or DEFAULT_NUM_SMS


def _layouts(vector_size: int):
  """Register layouts: ``[rows, cols]`` chunk, its row vector ``[rows]`` and column vector ``[cols]``.

  Warps and lanes tile the columns (``THREADS * vector_size`` per tile); rows are
  per-thread registers. Row reductions cross lanes and warps; column reductions do not
  leave the thread.
  """
  v = vector_size
  tile = plgpu.Layout.TILED(plgpu.Tiling(((1, THREADS * v), (LANES * v,), (v,))),
                            warp_dims=(-3,), lane_dims=(-2,), vector_dim=-1)
  return tile, tile.reduce(1), tile.reduce(0)


class _Block:
  """Register-level helpers for one ``[block_rows, block_cols]`` chunk geometry."""

  def __init__(self, cfg: NormConfig, features: int):
    self.cfg = cfg
    self.shape = (cfg.block_rows, cfg.block_cols)
    self.layout, self.row_layout, self.col_layout = _layouts(cfg.vector_size)
    self.num_chunks = features // cfg.block_cols
    self.inv_features = 1.0 / features

  def zeros(self):
    return plgpu.layout_cast(jnp.zeros(self.shape, jnp.float32), self.layout)

  def load(self, ref, cols):
    """``ref[:, cols]`` of a ``[block_rows, features]`` SMEM block, as float32."""
    return plgpu.load(ref.at[:, cols], layout=self.layout).astype(jnp.float32)

  def load_cols(self, ref, cols):
    """``ref[cols]`` of a ``[features]`` SMEM vector broadcast over rows, as float32."""
    wide = jnp.dtype(ref.dtype).itemsize * self.cfg.vector_size > VECTOR_BYTES
    v = plgpu.load(ref.at[cols], layout=self.col_layout, optimized=not wide)
    return self.cols(v.astype(jnp.float32))

  def rows(self, v):
    """``[block_rows]`` -> ``[block_rows, block_cols]``."""
    return plgpu.layout_cast(lax.broadcast_in_dim(v, self.shape, (0,)), self.layout)

  def cols(self, v):
    """``[block_cols]`` -> ``[block_rows, block_cols]``."""
    return plgpu.layout_cast(lax.broadcast_in_dim(v, self.shape, (1,)), self.layout)

  def row_mean(self, acc):
    return jnp.sum(acc, axis=1) * self.inv_features

  def chunk_slice(self, c):
    n = self.cfg.block_cols
    return pl.ds(c * n if isinstance(c, int) else pl.multiple_of(c * n, n), n)

  def fold(self, body, init):
    """``init`` folded through ``body(cols, carry)`` over the column chunks."""
    if self.num_chunks == 1:
      return body(self.chunk_slice(0), init)
    return lax.fori_loop(0, self.num_chunks, lambda c, acc: body(self.chunk_slice(c), acc), init)

  def each(self, body):
    """Runs ``body(cols)`` for every column chunk."""
    if self.num_chunks == 1:
      body(self.chunk_slice(0))
      return

    @pl.loop(0, self.num_chunks)
    def _(c):
      body(self.chunk_slice(c))

  def loader(self, ref):
    """``load(cols)`` of a ``[block_rows, features]`` block; reads SMEM once when the block
    is a single chunk (it then stays in registers across the passes)."""
    if self.num_chunks == 1:
      whole = self.load(ref, self.chunk_slice(0))
      return lambda cols: whole
    return lambda cols: self.load(ref, cols)


def _with_block_rows(cfg: NormConfig, rows: int, block, body) -> None:
  """Calls ``body(n)`` with the (static) number of rows ``n`` that ``block`` has in ``x``.

  Only the last block can be partial; it gets its own copies of exactly ``rows % block_rows``
  rows, so no copy ever reaches past ``x`` (copies clamped at the end of the buffer would
  be wrong for a ``vmap``-sliced ``x``).
  """
  tail = rows % cfg.block_rows
  if not tail:
    body(cfg.block_rows)
    return
  is_last = block == pl.cdiv(rows, cfg.block_rows) - 1
  pl.when(is_last)(lambda: body(tail))
  pl.when(jnp.logical_not(is_last))(lambda: body(cfg.block_rows))


def _pipeline(cfg: NormConfig, rows: int, start_loads, wait_loads, compute_and_store, init=()):
  """Persistent TMA ring over this program's row blocks (see the module docstring).

  ``start_loads(block, slot)`` issues the copies of a block into a slot,
  ``wait_loads(slot)`` waits for them, ``compute_and_store(block, slot, carry)`` computes a
  block in place, issues exactly one committed bulk-store group and returns the new carry.
  """
  num_blocks = pl.cdiv(rows, cfg.block_rows)
  program = lax.axis_index("programs")
  num_steps = (num_blocks - 1 - program) // cfg.num_programs + 1
  ahead = cfg.num_stages - 1 - STORES_IN_FLIGHT  # loads in flight beyond the current step

  def block_of(step):
    return program + step * cfg.num_programs

  for step in range(ahead):
    @pl.when(step < num_steps)
    def _prologue():
      start_loads(block_of(step), step)

  def body(step, carry):
    refill = step + ahead

    @pl.when(refill < num_steps)
    def _refill():
      # The slot of step `step - 1 - STORES_IN_FLIGHT` is refilled once its store has read it.
      plgpu.wait_smem_to_gmem(STORES_IN_FLIGHT, wait_read_only=True)
      start_loads(block_of(refill), lax.rem(refill, cfg.num_stages))

    slot = lax.rem(step, cfg.num_stages)
    wait_loads(slot)
    return compute_and_store(block_of(step), slot, carry)

  out = lax.fori_loop(0, num_steps, body, init)
  plgpu.wait_smem_to_gmem(0)
  return out


def _store_row_stats(ref, block, values):
  """``ref[block * n : (block + 1) * n] = values`` for ``values: [n]`` (replicated in every thread)."""
  n = values.shape[0]
  if n == 1:  # a one-element store takes the scalar path, which handles GMEM
    ref[block] = jnp.sum(values)
  else:
    ref[pl.ds(block * n, n)] = values


def _forward_kernel(*refs, cfg: NormConfig, rows: int, features: int, eps: float,
                    subtract_mean: bool, has_weight: bool, has_bias: bool):
  refs = iter(refs)
  x_gmem = next(refs)
  w_gmem = next(refs) if has_weight else None
  b_gmem = next(refs) if has_bias else None
  y_gmem = next(refs)
  mean_gmem = next(refs) if subtract_mean else None
  rstd_gmem = next(refs)
  x_smem = next(refs)
  w_smem = next(refs) if has_weight else None
  b_smem = next(refs) if has_bias else None
  load_bars = next(refs)
  param_bars = next(refs) if has_weight or has_bias else None

  blk = _Block(cfg, features)
  r = cfg.block_rows
  oob = plgpu.OOBFillMode.PROMISE_IN_BOUNDS  # plain bulk copies, never past the end of x

  params = [(g, s) for g, s in ((w_gmem, w_smem), (b_gmem, b_smem)) if g is not None]
  for i, (g, s) in enumerate(params):
    plgpu.copy_gmem_to_smem(g, s, param_bars.at[i], oob_mode=oob)
  for i in range(len(params)):
    plgpu.barrier_wait(param_bars.at[i])

  def start_loads(block, slot):
    _with_block_rows(cfg, rows, block, lambda n: plgpu.copy_gmem_to_smem(
        x_gmem.at[pl.ds(block * r, n)], x_smem.at[slot, pl.ds(0, n)], load_bars.at[slot],
        oob_mode=oob))

  def wait_loads(slot):
    plgpu.barrier_wait(load_bars.at[slot])

  def compute_and_store(block, slot, carry):
    xs = x_smem.at[slot]
    load_x = blk.loader(xs)
    mean_b = None
    if subtract_mean:
      mean = blk.row_mean(blk.fold(lambda cols, acc: acc + load_x(cols), blk.zeros()))
      _store_row_stats(mean_gmem, block, mean)
      mean_b = blk.rows(mean)

    def sum_squares(cols, acc):
      xc = normalize(load_x(cols), mean_b, 1.0)
      return acc + xc * xc

    rstd = lax.rsqrt(blk.row_mean(blk.fold(sum_squares, blk.zeros())) + eps)
    _store_row_stats(rstd_gmem, block, rstd)
    rstd_b = blk.rows(rstd)

    @blk.each
    def _(cols):
      xhat = normalize(load_x(cols), mean_b, rstd_b)
      w = blk.load_cols(w_smem, cols) if has_weight else None
      b = blk.load_cols(b_smem, cols) if has_bias else None
      xs[:, cols] = scale_shift(xhat, w, b).astype(xs.dtype)

    plgpu.commit_smem()
    _with_block_rows(cfg, rows, block, lambda n: plgpu.copy_smem_to_gmem(
        xs.at[pl.ds(0, n)], y_gmem.at[pl.ds(block * r, n)]))
    return carry

  _pipeline(cfg, rows, start_loads, wait_loads, compute_and_store)


def _backward_kernel(*refs, cfg: NormConfig, rows: int, features: int, subtract_mean: bool,
                     has_weight: bool, has_bias: bool):
  refs = iter(refs)
  x_gmem, dy_gmem = next(refs), next(refs)
  w_gmem = next(refs) if has_weight else None
  mean_gmem = next(refs) if subtract_mean else None
  rstd_gmem = next(refs)
  dx_gmem = next(refs)
  dw_gmem = next(refs) if has_weight else None
  db_gmem = next(refs) if has_bias else None
  x_smem, dy_smem = next(refs), next(refs)
  w_smem = next(refs) if has_weight else None
  dw_acc = next(refs) if has_weight else None
  db_acc = next(refs) if has_bias else None
  x_bars, dy_bars = next(refs), next(refs)
  w_bar = next(refs) if has_weight else None

  blk = _Block(cfg, features)
  r = cfg.block_rows
  num_blocks = pl.cdiv(rows, r)
  oob = plgpu.OOBFillMode.PROMISE_IN_BOUNDS
  program = lax.axis_index("programs")

  if has_weight:
    plgpu.copy_gmem_to_smem(w_gmem, w_smem, w_bar, oob_mode=oob)
  # Partial sums start at zero; each thread owns the same columns of dw_acc / db_acc in
  # every chunk (col_layout), so the read-modify-writes below need no barrier.
  for acc_ref in (dw_acc, db_acc):
    if acc_ref is not None:
      zeros = plgpu.layout_cast(jnp.zeros((cfg.block_cols,), jnp.float32), blk.col_layout)

      @blk.each
      def _(cols, acc_ref=acc_ref, zeros=zeros):
        acc_ref[cols] = zeros
  if has_weight:
    plgpu.barrier_wait(w_bar)

  def load_stats(block):
    """Row statistics of a block, loaded from HBM one step before they are used."""
    block = jnp.minimum(block, num_blocks - 1)
    mean = plgpu.load(mean_gmem.at[pl.ds(block * r, r)], layout=blk.row_layout,
                      optimized=False) if subtract_mean else None
    rstd = plgpu.load(rstd_gmem.at[pl.ds(block * r, r)], layout=blk.row_layout, optimized=False)
    return mean, rstd

  def start_loads(block, slot):
    def copy(n):
      src, dst = pl.ds(block * r, n), pl.ds(0, n)
      plgpu.copy_gmem_to_smem(x_gmem.at[src], x_smem.at[slot, dst], x_bars.at[slot], oob_mode=oob)
      plgpu.copy_gmem_to_smem(dy_gmem.at[src], dy_smem.at[slot, dst], dy_bars.at[slot],
                              oob_mode=oob)

    _with_block_rows(cfg, rows, block, copy)

  def wait_loads(slot):
    plgpu.barrier_wait(x_bars.at[slot])
    plgpu.barrier_wait(dy_bars.at[slot])

  def compute_and_store(block, slot, stats):
    next_stats = load_stats(block + cfg.num_programs)
    mean, rstd = stats
    xs, dys = x_smem.at[slot], dy_smem.at[slot]
    mean_b = blk.rows(mean) if subtract_mean else None
    rstd_b = blk.rows(rstd)

    def xhat_g(cols):
      xhat = normalize(blk.load(xs, cols), mean_b, rstd_b)
      dy = blk.load(dys, cols)
      g = dy * blk.load_cols(w_smem, cols) if has_weight else dy
      return xhat, dy, g

    def row_sums(cols, acc):
      xhat, _, g = xhat_g(cols)
      acc_gx, acc_g = acc
      return acc_gx + g * xhat, (acc_g + g if subtract_mean else acc_g)

    acc_gx, acc_g = blk.fold(row_sums, (blk.zeros(), blk.zeros()))
    mean_gx = blk.rows(blk.row_mean(acc_gx))
    mean_g = blk.rows(blk.row_mean(acc_g)) if subtract_mean else None
    # Rows past the end of x hold stale SMEM: keep them out of the column sums.
    valid = plgpu.broadcasted_iota(jnp.int32, blk.shape, 0, layout=blk.layout) < rows - block * r

    @blk.each
    def _(cols):
      xhat, dy, g = xhat_g(cols)
      dys[:, cols] = input_grad(g, xhat, rstd_b, mean_gx, mean_g).astype(dys.dtype)
      if has_weight:
        part = jnp.sum(jnp.where(valid, dy * xhat, 0.0), axis=0)
        dw_acc[cols] = plgpu.load(dw_acc.at[cols], layout=blk.col_layout, optimized=False) + part
      if has_bias:
        part = jnp.sum(jnp.where(valid, dy, 0.0), axis=0)
        db_acc[cols] = plgpu.load(db_acc.at[cols], layout=blk.col_layout, optimized=False) + part

    plgpu.commit_smem()
    _with_block_rows(cfg, rows, block, lambda n: plgpu.copy_smem_to_gmem(
        dys.at[pl.ds(0, n)], dx_gmem.at[pl.ds(block * r, n)]))
    return next_stats

  _pipeline(cfg, rows, start_loads, wait_loads, compute_and_store, init=load_stats(program))
  if has_weight or has_bias:
    plgpu.commit_smem()
    for acc_ref, out in ((dw_acc, dw_gmem), (db_acc, db_gmem)):
      if acc_ref is not None:
        plgpu.copy_smem_to_gmem(acc_ref, out.at[program])
    plgpu.wait_smem_to_gmem(0)


def _interpret_params(interpret: bool):
  return plgpu.InterpretGPUParams() if interpret else False


_COMPILER_PARAMS = plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane)


def _pad_rows(v: jax.Array, length: int) -> jax.Array:
  return v if v.shape[0] == length else jnp.pad(v, (0, length - v.shape[0]))


def norm_forward(x: jax.Array, weight: jax.Array | None, bias: jax.Array | None, *, eps: float,
                 subtract_mean: bool, config: NormConfig | None = None,
                 interpret: bool = False) -> tuple[jax.Array, jax.Array | None, jax.Array]:
  """Fused RMSNorm (``subtract_mean=False``) / LayerNorm forward.

  Args:
    x: ``[rows, features]`` float32 / bfloat16 / float16.
    weight, bias: ``[features]`` or None (any float dtype up to float32).
    eps: added to the variance (mean square) before the reciprocal square root.
    subtract_mean: LayerNorm when True, RMSNorm otherwise.
    config: block sizes; None picks them with :func:`forward_config`.
    interpret: run in Pallas Mosaic GPU interpret mode (any platform).

  Returns:
    ``(y [rows, features] x.dtype, mean [rows] float32 or None, rstd [rows] float32)``.
  """
  rows, features = x.shape
  cfg = config or _checked(forward_config(
      rows, features, x.dtype, weight_dtype=None if weight is None else weight.dtype,
      bias_dtype=None if bias is None else bias.dtype, num_sms=_num_sms(interpret)))
  padded = pl.cdiv(rows, cfg.block_rows) * cfg.block_rows
  stats = jax.ShapeDtypeStruct((padded,), jnp.float32)
  params = [p for p in (weight, bias) if p is not None]
  out_type = [jax.ShapeDtypeStruct(x.shape, x.dtype)] + [stats] * (2 if subtract_mean else 1)
  scratch = [plgpu.SMEM((cfg.num_stages, cfg.block_rows, features), x.dtype)]
  scratch += [plgpu.SMEM((features,), p.dtype) for p in params]
  scratch += [plgpu.Barrier(num_barriers=cfg.num_stages)]
  if params:
    scratch += [plgpu.Barrier(num_barriers=len(params))]
  kernel = functools.partial(
      _forward_kernel, cfg=cfg, rows=rows, features=features, eps=float(eps),
      subtract_mean=subtract_mean, has_weight=weight is not None, has_bias=bias is not None)
  outs = plgpu.kernel(
      kernel, out_type=out_type, scratch_types=scratch, grid=(cfg.num_programs,),
      grid_names=("programs",), compiler_params=_COMPILER_PARAMS,
      interpret=_interpret_params(interpret),
      kernel_name="layer_norm_fwd" if subtract_mean else "rms_norm_fwd")(x, *params)
  y, *stats_out = outs
  stats_out = [s[:rows] for s in stats_out]
  mean = stats_out[0] if subtract_mean else None
  return y, mean, stats_out[-1]


def norm_backward(dy: jax.Array, x: jax.Array, weight: jax.Array | None, mean: jax.Array | None,
                  rstd: jax.Array, *, has_bias: bool, config: NormConfig | None = None,
                  interpret: bool = False
                  ) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
  """Fused RMSNorm / LayerNorm backward (LayerNorm when ``mean`` is given).

  Args:
    dy: ``[rows, features]`` cotangent of ``y``, in ``x.dtype``.
    x: ``[rows, features]`` the forward input.
    weight: ``[features]`` or None.
    mean, rstd: ``[rows]`` float32 from :func:`norm_forward` (mean None for RMSNorm).
    has_bias: also return the partial sums of ``dbias``.
    config: block sizes; None picks them with :func:`backward_config`.
    interpret: run in Pallas Mosaic GPU interpret mode.

  Returns:
    ``(dx [rows, features] x.dtype, dweight_partial [num_programs, features] float32 or
    None, dbias_partial [num_programs, features] float32 or None)``; sum the partials
    over axis 0.
  """
  rows, features = x.shape
  subtract_mean = mean is not None
  has_weight = weight is not None
  cfg = config or _checked(backward_config(
      rows, features, x.dtype, weight_dtype=None if weight is None else weight.dtype,
      has_bias=has_bias, num_sms=_num_sms(interpret)))
  padded = pl.cdiv(rows, cfg.block_rows) * cfg.block_rows
  stats = [_pad_rows(s, padded) for s in (mean, rstd) if s is not None]
  partial = jax.ShapeDtypeStruct((cfg.num_programs, features), jnp.float32)
  out_type = [jax.ShapeDtypeStruct(x.shape, x.dtype)]
  out_type += [partial] * (int(has_weight) + int(has_bias))
  block = plgpu.SMEM((cfg.num_stages, cfg.block_rows, features), x.dtype)
  scratch = [block, block]
  if has_weight:
    scratch += [plgpu.SMEM((features,), weight.dtype), plgpu.SMEM((features,), jnp.float32)]
  if has_bias:
    scratch += [plgpu.SMEM((features,), jnp.float32)]
  scratch += [plgpu.Barrier(num_barriers=cfg.num_stages)] * 2
  if has_weight:
    scratch += [plgpu.Barrier()]
  kernel = functools.partial(
      _backward_kernel, cfg=cfg, rows=rows, features=features, subtract_mean=subtract_mean,
      has_weight=has_weight, has_bias=has_bias)
  inputs = [x, dy] + ([weight] if has_weight else []) + stats
  outs = plgpu.kernel(
      kernel, out_type=out_type, scratch_types=scratch, grid=(cfg.num_programs,),
      grid_names=("programs",), compiler_params=_COMPILER_PARAMS,
      interpret=_interpret_params(interpret),
      kernel_name="layer_norm_bwd" if subtract_mean else "rms_norm_bwd")(*inputs)
  dx, *partials = outs
  dw = partials.pop(0) if has_weight else None
  db = partials.pop(0) if has_bias else None
  return dx, dw, db


__all__ = ["NormConfig", "backward_config", "backward_unsupported", "forward_config",
           "forward_unsupported", "norm_backward", "norm_forward"]
