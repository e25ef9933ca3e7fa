"""Fused RMSNorm / LayerNorm forward and backward as Pallas kernels lowered through Triton.

The portable GPU path (any CUDA GPU; formulas in :mod:`kernels_pallas.normalization`),
in the style of the Triton fused LayerNorm tutorial: one program normalises
``block_rows`` whole rows held in registers (``block_cols = next_pow2(features)``
columns, masked), so ``x`` is read once and ``y`` written once. The backward runs
``num_programs`` programs, each walking row blocks ``p, p + P, ...``: it writes ``dx`` and
keeps ``dweight`` / ``dbias`` column sums in registers, stored once as
``[num_programs, features]`` float32 partials that the caller sums.

On Hopper the Mosaic GPU kernels (:mod:`kernels_pallas.normalization.mosaic_gpu`) are
registered first: they move rows with TMA bulk copies through a multi-stage SMEM ring and
measured faster where it matters (H100, bf16, 16384 tokens: RMSNorm fwd+bwd 253 vs 260 us
at 4096 features and 529 vs 576 us at 8192, LayerNorm fwd 8192 217 vs 276 us; this
kernel is within 1-3% on the RMSNorm forward; notes/normalization.md). This file serves
other CUDA GPUs and widths the Mosaic kernels refuse (features not a multiple of 128),
and is interpretable on CPU.

Limits: ``features <= MAX_BLOCK_COLS`` (a row must fit in registers).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kernels_pallas.normalization import input_grad, normalize, scale_shift

MAX_BLOCK_COLS = 16384  # widest row held in registers (32 float32 values a thread at 16 warps)
FWD_BLOCK_ELEMS = 4096  # elements per forward program (rows x padded columns)
BWD_BLOCK_ELEMS = 4096
ELEMS_PER_WARP = 512  # 16 float32 values a thread
MAX_WARPS = 16
PROGRAMS_PER_SM = 4  # backward programs per SM (each keeps dweight / dbias in registers)
DEFAULT_NUM_SMS = 132
INTERPRET_NUM_SMS = 1  # interpret mode: few programs, each walking several row blocks


@dataclasses.dataclass(frozen=True)
class TritonNormConfig:
  """Block sizes of one launch.

  Attributes:
    block_rows: rows per program step (a power of two).
    block_cols: ``next_pow2(features)``; columns past ``features`` are masked.
    num_warps: warps per program.
    num_programs: backward programs (each accumulates dweight / dbias over its blocks);
      the forward launches one program per row block and ignores it.
  """

  block_rows: int
  block_cols: int
  num_warps: int
  num_programs: int = 1

  def __post_init__(self):
    for name in ("block_rows", "block_cols", "num_warps"):
      v = getattr(self, name)
      if v < 1 or v & (v - 1):
        raise ValueError(f"TritonNormConfig.{name} must be a power of two, got {v}")
    if self.num_programs < 1:
      raise ValueError(f"TritonNormConfig.num_programs must be >= 1, got {self.num_programs}")


def _config(rows: int, features: int, block_elems: int, num_programs: int) -> TritonNormConfig:
  block_cols = pl.next_power_of_2(features)
  block_rows = min(max(1, block_elems // block_cols), pl.next_power_of_2(rows))
  num_warps = min(MAX_WARPS, max(1, block_rows * block_cols // ELEMS_PER_WARP))
  num_warps = 1 << (num_warps.bit_length() - 1)
  return TritonNormConfig(block_rows=block_rows, block_cols=block_cols, num_warps=num_warps,
                          num_programs=max(1, min(num_programs, pl.cdiv(rows, block_rows))))


def forward_config(rows: int, features: int) -> TritonNormConfig:
  return _config(rows, features, FWD_BLOCK_ELEMS, 1)


def backward_config(rows: int, features: int, num_sms: int = DEFAULT_NUM_SMS) -> TritonNormConfig:
  return _config(rows, features, BWD_BLOCK_ELEMS, num_sms * PROGRAMS_PER_SM)


def _unsupported(rows: int, features: int) -> str | None:
  if rows < 1:
    return f"rows={rows}: nothing to normalise"
  if features > MAX_BLOCK_COLS:
    return f"features={features} > {MAX_BLOCK_COLS}: a row must fit in registers"
  return None


def forward_unsupported(rows: int, features: int, dtype, *, weight_dtype=None,
                        bias_dtype=None) -> str | None:
  """None when the forward kernel serves the shape, else why not."""
  del dtype, weight_dtype, bias_dtype
  return _unsupported(rows, features)


def backward_unsupported(rows: int, features: int, dtype, *, weight_dtype=None,
                         has_bias: bool = False) -> str | None:
  """None when the backward kernel serves the shape, else why not."""
  del dtype, weight_dtype, has_bias
  return _unsupported(rows, features)


class _Tile:
  """Row / column indices and masks of one ``[block_rows, block_cols]`` tile."""

  def __init__(self, cfg: TritonNormConfig, rows: int, features: int, block):
    self.r = block * cfg.block_rows + jnp.arange(cfg.block_rows)
    self.c = jnp.arange(cfg.block_cols)
    self.row_mask = self.r < rows
    self.col_mask = self.c < features
    self.mask = self.row_mask[:, None] & self.col_mask[None, :]
    self.inv_features = 1.0 / features

  def load(self, ref):
    return pltriton.load(ref.at[self.r[:, None], self.c[None, :]], mask=self.mask,
                         other=0.0).astype(jnp.float32)

  def store(self, ref, value):
    pltriton.store(ref.at[self.r[:, None], self.c[None, :]], value.astype(ref.dtype),
                   mask=self.mask)

  def load_cols(self, ref):
    return pltriton.load(ref.at[self.c], mask=self.col_mask, other=0.0).astype(jnp.float32)[None, :]

  def load_rows(self, ref):
    return pltriton.load(ref.at[self.r], mask=self.row_mask, other=0.0)[:, None]

  def row_mean(self, v):
    return (jnp.sum(v, axis=1) * self.inv_features)[:, None]


def _forward_kernel(*refs, cfg, rows, features, eps, subtract_mean, has_weight, has_bias):
  refs = iter(refs)
  x_ref = next(refs)
  w_ref = next(refs) if has_weight else None
  b_ref = next(refs) if has_bias else None
  y_ref = next(refs)
  mean_ref = next(refs) if subtract_mean else None
  rstd_ref = next(refs)

  t = _Tile(cfg, rows, features, pl.program_id(0))
  x = t.load(x_ref)
  mean = None
  if subtract_mean:
    mean = t.row_mean(x)
    pltriton.store(mean_ref.at[t.r], mean[:, 0], mask=t.row_mask)
  xc = jnp.where(t.mask, normalize(x, mean, 1.0), 0.0)
  rstd = lax.rsqrt(t.row_mean(xc * xc) + eps)
  pltriton.store(rstd_ref.at[t.r], rstd[:, 0], mask=t.row_mask)
  w = t.load_cols(w_ref) if has_weight else None
  b = t.load_cols(b_ref) if has_bias else None
  t.store(y_ref, scale_shift(xc * rstd, w, b))


def _backward_kernel(*refs, cfg, rows, features, subtract_mean, has_weight, has_bias):
  refs = iter(refs)
  x_ref, dy_ref = next(refs), next(refs)
  w_ref = next(refs) if has_weight else None
  mean_ref = next(refs) if subtract_mean else None
  rstd_ref = next(refs)
  dx_ref = next(refs)
  dw_ref = next(refs) if has_weight else None
  db_ref = next(refs) if has_bias else None

  program = pl.program_id(0)
  num_blocks = pl.cdiv(rows, cfg.block_rows)
  num_steps = (num_blocks - 1 - program) // cfg.num_programs + 1
  cols = _Tile(cfg, rows, features, 0)
  w = cols.load_cols(w_ref) if has_weight else None

  def step(i, acc):
    dw_acc, db_acc = acc
    t = _Tile(cfg, rows, features, program + i * cfg.num_programs)
    mean = t.load_rows(mean_ref) if subtract_mean else None
    rstd = t.load_rows(rstd_ref)
    xhat = jnp.where(t.mask, normalize(t.load(x_ref), mean, rstd), 0.0)
    dy = t.load(dy_ref)
    g = dy * w if has_weight else dy
    mean_g = t.row_mean(g) if subtract_mean else None
    t.store(dx_ref, input_grad(g, xhat, rstd, t.row_mean(g * xhat), mean_g))
    # Masked loads gave zeros past the last row, so the column sums need no extra mask.
    return dw_acc + jnp.sum(dy * xhat, axis=0), db_acc + jnp.sum(dy, axis=0)

  zeros = jnp.zeros((cfg.block_cols,), jnp.float32)
  dw_acc, db_acc = lax.fori_loop(0, num_steps, step, (zeros, zeros))
  for ref, acc in ((dw_ref, dw_acc), (db_ref, db_acc)):
    if ref is not None:
      pltriton.store(ref.at[program, cols.c], acc, mask=cols.col_mask)


def _num_sms(interpret: bool) -> int:
  if interpret:
    return INTERPRET_NUM_SMS
  return getattr(jax.devices()[0], "core_count", None) or DEFAULT_NUM_SMS


def norm_forward(x: jax.Array, weight: jax.Array | None, bias: jax.Array | None, *, eps: float,
                 subtract_mean: bool, config: TritonNormConfig | None = None,
                 interpret: bool = False) -> tuple[jax.Array, jax.Array | None, jax.Array]:
  """Fused RMSNorm (``subtract_mean=False``) / LayerNorm forward.

  Args:
    x: ``[rows, features]`` float32 / bfloat16 / float16.
    weight, bias: ``[features]`` or None.
    eps: added to the variance (mean square) before the reciprocal square root.
    subtract_mean: LayerNorm when True, RMSNorm otherwise.
    config: block sizes; None picks them with :func:`forward_config`.
    interpret: run in Pallas interpret mode (any platform).

  Returns:
    ``(y [rows, features] x.dtype, mean [rows] float32 or None, rstd [rows] float32)``.
  """
  rows, features = x.shape
  cfg = config or forward_config(rows, features)
  stats = jax.ShapeDtypeStruct((rows,), jnp.float32)
  out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype)] + [stats] * (2 if subtract_mean else 1)
  params = [p for p in (weight, bias) if p is not None]
  kernel = functools.partial(
      _forward_kernel, cfg=cfg, rows=rows, features=features, eps=float(eps),
      subtract_mean=subtract_mean, has_weight=weight is not None, has_bias=bias is not None)
  y, *stats_out = pl.pallas_call(
      kernel, out_shape=out_shape, grid=(pl.cdiv(rows, cfg.block_rows),),
      compiler_params=pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=1),
      interpret=interpret, name="layer_norm_fwd" if subtract_mean else "rms_norm_fwd",
  )(x, *params)
  return y, (stats_out[0] if subtract_mean else None), stats_out[-1]


def norm_backward(dy: jax.Array, x: jax.Array, weight: jax.Array | None, mean: jax.Array | None,
                  rstd: jax.Array, *, has_bias: bool, config: TritonNormConfig | None = None,
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
    interpret: run in Pallas interpret mode.

  Returns:
    ``(dx [rows, features] x.dtype, dweight_partial [num_programs, features] float32 or
    None, dbias_partial [num_programs, features] float32 or None)``.
  """
  rows, features = x.shape
  has_weight = weight is not None
  cfg = config or backward_config(rows, features, _num_sms(interpret))
  partial = jax.ShapeDtypeStruct((cfg.num_programs, features), jnp.float32)
  out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype)]
  out_shape += [partial] * (int(has_weight) + int(has_bias))
  inputs = [x, dy] + ([weight] if has_weight else []) + [s for s in (mean, rstd) if s is not None]
  kernel = functools.partial(
      _backward_kernel, cfg=cfg, rows=rows, features=features, subtract_mean=mean is not None,
      has_weight=has_weight, has_bias=has_bias)
  dx, *partials = pl.pallas_call(
      kernel, out_shape=out_shape, grid=(cfg.num_programs,),
      compiler_params=pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=2),
      interpret=interpret, name="layer_norm_bwd" if mean is not None else "rms_norm_bwd",
  )(*inputs)
  dw = partials.pop(0) if has_weight else None
  db = partials.pop(0) if has_bias else None
  return dx, dw, db


__all__ = ["TritonNormConfig", "backward_config", "backward_unsupported", "forward_config",
           "forward_unsupported", "norm_backward", "norm_forward"]
