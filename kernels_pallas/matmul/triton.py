"""Weight-only int4 / int8 matmul with fused dequantisation, in Pallas' Triton lowering.

Computes ``y = x @ dequant(w)`` for ``x: [M, K]`` (bfloat16 / float16) and a weight
quantized along K (formulas and layouts in :mod:`kernels_pallas.matmul`), reading the
compressed weight bytes once and never writing a dequantised copy to memory.

Partition: program ``(n, s, mb)`` owns columns ``[n * block_n, (n + 1) * block_n)``, rows
``[mb * block_m, ...)`` of ``x`` and the ``s``-th of ``split_k`` equal slices of K; it walks
its slice in ``block_k`` steps (``block_k`` divides the group size, so one scale row serves
a step) and writes a float32 partial product to ``partial[s]``; the caller sums the
``split_k`` partials. Split-K is what keeps every SM busy for skinny ``x`` (decode,
``M <= 16``): with ``N / block_n`` column blocks alone an 8192-wide layer would occupy
half of an H100's 132 SMs. Skinny calls are memory-bound (the int4 weight is 4x smaller
than bf16), wide ones (``M >= 64``) run on tensor cores with ``split_k = 1``.

Dequantisation in registers: int4 bytes hold K rows ``2i`` (low nibble) and ``2i + 1``
(high nibble), so the caller splits ``x`` into its even and odd columns and each step does
two dots, ``x_even @ low + x_odd @ high``, with no shuffle of the weight. Symmetric
weights are converted exactly (``q`` is an integer <= 127 in magnitude, exact in bf16)
and the group scale multiplies the ``[block_m, block_n]`` partial dot, not the weight
tile; asymmetric weights are dequantised elementwise ``(q - zero) * scale`` first.

Why Triton: it was the quickest path to a fused, interpretable kernel. Measured on an H100
(notes/quant_matmul.md) it is 2.4-3.9x faster than XLA's dequantize-then-dot at m <= 16 but
only 0.7-1.2x XLA's bf16 dot (int4 g128 / int8, K = N = 8192), far from the bandwidth
floor: the per-element dequantisation and the 16-row dot bound it, not HBM. A Mosaic GPU
weight-only kernel (dequantised tile as the register A operand of ``wgmma``) is the
planned fast path; this one stays as the portable fallback (any CUDA GPU, CPU interpret).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kernels_pallas.matmul import dequantize_values, int4_high, int4_low

MIN_DOT = 16  # Triton's smallest dot dimension
DEFAULT_NUM_SMS = 132
SKINNY_M = 16  # calls with at most this many rows take the split-K path
TARGET_PROGRAMS_PER_SM = 2
MIN_STEPS_PER_SPLIT = 4


@dataclasses.dataclass(frozen=True)
class WeightOnlyConfig:
  """Block sizes of one launch (``block_k`` counts logical K rows, int4 included)."""

  block_m: int = 16
  block_n: int = 128
  block_k: int = 128
  split_k: int = 1
  num_warps: int = 4
  num_stages: int = 3

  def __post_init__(self):
    for name in ("block_m", "block_n", "block_k"):
      v = getattr(self, name)
      if v < MIN_DOT or v & (v - 1):
        raise ValueError(f"WeightOnlyConfig.{name} must be a power of two >= {MIN_DOT}, got {v}")
    if self.split_k < 1:
      raise ValueError(f"WeightOnlyConfig.split_k must be >= 1, got {self.split_k}")


def _pow2_floor(v: int) -> int:
  return 1 << (max(v, 1).bit_length() - 1)


def default_config(m: int, n: int, k: int, *, bits: int, group_size: int | None,
                   num_sms: int = DEFAULT_NUM_SMS) -> WeightOnlyConfig:
  """Skinny ``m``: split-K until ~``TARGET_PROGRAMS_PER_SM`` programs per SM; wide: tiles."""
  del bits
  gs = group_size or k
  block_k = min(128, _pow2_floor(gs))
  while gs % block_k:
    block_k //= 2
  block_k = max(block_k, MIN_DOT)
  if m <= SKINNY_M:
    block_n = 128
    col_blocks = max(1, -(-n // block_n))
    steps = max(1, -(-k // block_k))
    split = 1
    while (col_blocks * split < TARGET_PROGRAMS_PER_SM * num_sms
           and steps // (2 * split) >= MIN_STEPS_PER_SPLIT):
      split *= 2
    return WeightOnlyConfig(block_m=MIN_DOT, block_n=block_n, block_k=block_k, split_k=split,
                            num_warps=4, num_stages=4)
  block_m = 64 if m <= 64 else 128
  return WeightOnlyConfig(block_m=block_m, block_n=128, block_k=min(block_k, 64), split_k=1,
                          num_warps=8 if block_m == 128 else 4, num_stages=3)


def tile_multiples(cfg: WeightOnlyConfig) -> tuple[int, int, int]:
  """``(M, N, K)`` multiples the operands must be padded to."""
  return cfg.block_m, cfg.block_n, cfg.block_k * cfg.split_k


def unsupported(*, bits: int, group_size: int | None, k: int,
                cfg: WeightOnlyConfig | None = None) -> str | None:
  """None when :func:`weight_only_matmul` serves the call, else why not."""
  if bits not in (4, 8):
    return f"bits={bits} is not 4 or 8"
  if group_size is not None:
    if group_size < MIN_DOT or group_size & (group_size - 1):
      return f"group_size={group_size} is not a power of two >= {MIN_DOT}"
    if cfg is not None and group_size % cfg.block_k:
      return f"group_size={group_size} is not a multiple of block_k={cfg.block_k}"
  if bits == 4 and k % 2:
    return f"int4 needs an even K, got {k}"
  return None


def _kernel(*refs, bits: int, group_size: int, num_groups: int, steps: int, signed: bool,
            asymmetric: bool, k_major: bool, cfg: WeightOnlyConfig):
  if bits == 4:
    xe_ref, xo_ref, w_ref, s_ref, *rest = refs
  else:
    x_ref, w_ref, s_ref, *rest = refs
  z_ref = rest.pop(0) if asymmetric else None
  (o_ref,) = rest
  bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
  col_block, split, row_block = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  rows = pl.ds(row_block * bm, bm)
  cols = pl.ds(col_block * bn, bn)
  cdtype = (xe_ref if bits == 4 else x_ref).dtype

  def weights(q, scale, zero):
    """The tile as dot operand; the scale still to apply to the dot (None if applied)."""
    if asymmetric:
      return dequantize_values(q, scale, zero).astype(cdtype), None
    return q.astype(jnp.float32).astype(cdtype), scale

  def load_w(k0, width):
    if k_major:  # w_ref: [N, K'] -> tile [block_n, width]
      return w_ref[cols, pl.ds(k0, width)]
    return w_ref[pl.ds(k0, width), cols]

  def load_scale(ref, g):
    return ref[cols, pl.ds(g, 1)] if k_major else ref[pl.ds(g, 1), cols]

  def dot(x_tile, w_tile):
    # k-major: out^T [block_n, block_m] = w^T x^T, the dequantised weight is the A operand
    # straight from registers; else out [block_m, block_n] = x w.
    if k_major:
      return pltriton.dot(w_tile, x_tile, trans_b=True)
    return pltriton.dot(x_tile, w_tile)

  def step(i, acc):
    # invariant: acc = sum over this split's first i K blocks of x_blk @ dequant(w_blk)
    k0 = (split * steps + i) * bk
    g = jnp.minimum(k0 // group_size, num_groups - 1)
    scale = load_scale(s_ref, g)
    zero = load_scale(z_ref, g) if asymmetric else None
    if bits == 8:
      w, post = weights(load_w(k0, bk), scale, zero)
      part = dot(x_ref[rows, pl.ds(k0, bk)], w)
    else:
      packed = load_w(k0 // 2, bk // 2)
      lo, post = weights(int4_low(packed, signed=signed), scale, zero)
      hi, _ = weights(int4_high(packed, signed=signed), scale, zero)
      half = pl.ds(k0 // 2, bk // 2)
      part = dot(xe_ref[rows, half], lo) + dot(xo_ref[rows, half], hi)
    return acc + (part if post is None else part * post)

  shape = (bn, bm) if k_major else (bm, bn)
  acc = lax.fori_loop(0, steps, step, jnp.zeros(shape, jnp.float32))
  if k_major:
    o_ref[split, cols, rows] = acc
  else:
    o_ref[split, rows, cols] = acc


def weight_only_matmul(x: jax.Array, values: jax.Array, scales: jax.Array,
                       zeros: jax.Array | None, *, bits: int, group_size: int | None,
                       signed: bool, k_major: bool = False,
                       config: WeightOnlyConfig | None = None,
                       interpret: bool = False) -> jax.Array:
  """``x @ dequant(w)`` with the dequantisation fused.

  Args:
    x: ``[M, K]`` bfloat16 / float16; ``M``, ``N``, ``K`` whole tiles
      (:func:`tile_multiples`; pad ``x`` with zero rows / columns).
    values: int8 ``[K, N]`` (``bits=8``) or uint8 ``[K // 2, N]`` (``bits=4``, two per byte).
    scales: float32 ``[K // group_size, N]`` (``[1, N]`` per-channel).
    zeros: float32 like ``scales`` (asymmetric) or None.
    bits: 4 or 8.
    group_size: K rows per scale row, None for per-channel.
    signed: int4 nibbles are two's complement (symmetric) rather than 0..15.
    k_major: the weight is stored transposed: ``values [N, K]`` / ``[N, K // 2]`` (the
      same bytes, K contiguous), ``scales`` / ``zeros`` ``[N, K // group_size]``; the
      dequantised tile is then the ``wgmma`` A operand straight from registers.
    config: block sizes; None picks :func:`default_config`.
    interpret: run in Pallas interpret mode (any platform).

  Returns:
    ``[M, N]`` float32.
  """
  m, k = x.shape
  n = values.shape[0] if k_major else values.shape[1]
  cfg = config or default_config(m, n, k, bits=bits, group_size=group_size)
  why = unsupported(bits=bits, group_size=group_size, k=k, cfg=cfg)
  if why:
    raise ValueError(f"weight_only_matmul: {why}")
  tm, tn, tk = tile_multiples(cfg)
  if m % tm or n % tn or k % tk:
    raise ValueError(f"weight_only_matmul: (M, N, K) = {(m, n, k)} is not a multiple of the "
                     f"tile {(tm, tn, tk)}; pad the operands")
  steps = k // tk
  num_groups = scales.shape[1] if k_major else scales.shape[0]
  args = [x[:, 0::2], x[:, 1::2]] if bits == 4 else [x]
  args += [values, scales.astype(jnp.float32)]
  if zeros is not None:
    args.append(zeros.astype(jnp.float32))
  kernel = functools.partial(
      _kernel, bits=bits, group_size=group_size or k, num_groups=num_groups, steps=steps,
      signed=signed, asymmetric=zeros is not None, k_major=k_major, cfg=cfg)
  partial = pl.pallas_call(
      kernel,
      grid=(n // cfg.block_n, cfg.split_k, m // cfg.block_m),
      out_shape=jax.ShapeDtypeStruct((cfg.split_k, n, m) if k_major else (cfg.split_k, m, n),
                                     jnp.float32),
      compiler_params=pltriton.CompilerParams(num_warps=cfg.num_warps,
                                              num_stages=cfg.num_stages),
      interpret=interpret,
      name=f"int{bits}_weight_only_matmul",
  )(*args)
  out = partial[0] if cfg.split_k == 1 else jnp.sum(partial, axis=0)
  return out.T if k_major else out


__all__ = ["WeightOnlyConfig", "default_config", "tile_multiples", "unsupported",
           "weight_only_matmul"]
