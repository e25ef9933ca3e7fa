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

from kernels_pallas.matmul import INT4_MASK, INT4_SIGN, dequantize_values, int4_high, int4_low

MIN_DOT = 16  # Triton's smallest dot dimension
DEFAULT_NUM_SMS = 132
SKINNY_M = 16  # calls with at most this many rows take the split-K path
TARGET_PROGRAMS_PER_SM = 2
MIN_STEPS_PER_SPLIT = 4
DEQUANT_MODES = ("convert", "magic")
# Float bit patterns whose mantissa LSB is 1.0: OR-ing an unsigned code u < 2**m into them
# gives exactly ``base + u`` (bf16 128.0 holds 7 bits, fp16 1024.0 holds 10).
_MAGIC16 = {jnp.dtype(jnp.bfloat16): (0x4300, 128.0), jnp.dtype(jnp.float16): (0x6400, 1024.0)}


def magic_int4(packed: jax.Array, dtype) -> tuple[jax.Array, jax.Array, float]:
  """Signed nibbles of uint8 ``packed`` as ``dtype`` (bf16 / fp16) holding ``q + bias``.

  Returns ``(low nibbles, high nibbles, bias)``: ``(nib ^ 8) = q + 8`` is OR-ed into the
  mantissa of ``base`` (integer ops and a bitcast, no int -> float conversion).
  """
  base, fbase = _MAGIC16[jnp.dtype(dtype)]
  v = packed.astype(jnp.int16)
  lo = lax.bitcast_convert_type((v & INT4_MASK) ^ (base | INT4_SIGN), dtype)
  hi = lax.bitcast_convert_type((v >> 4) ^ (base | INT4_SIGN), dtype)
  return lo, hi, fbase + INT4_SIGN


def magic_int8(q: jax.Array, dtype) -> tuple[jax.Array, float]:
  """int8 ``q`` as ``dtype`` holding ``q + bias`` exactly, without int -> float conversions.

  fp16: ``(q ^ 0x80) = q + 128`` fits the 10-bit mantissa of 1024.0 (bias 1152). bf16 has
  only 7 bits: ``q`` is made exact in float32 (2**23 + q + 128, minus that constant) and
  its high half taken (|q| <= 128 has <= 8 significant bits, so truncation is exact).
  """
  if jnp.dtype(dtype) == jnp.float16:
    v = q.astype(jnp.int16)
    return lax.bitcast_convert_type((v & 0xFF) ^ 0x6480, dtype), 1152.0
  v = q.astype(jnp.int32)
  f = lax.bitcast_convert_type((v & 0xFF) ^ 0x4B000080, jnp.float32) - 8388736.0
  hi = lax.shift_right_logical(lax.bitcast_convert_type(f, jnp.int32), 16)
  return lax.bitcast_convert_type(hi.astype(jnp.int16), dtype), 0.0


@dataclasses.dataclass(frozen=True)
class WeightOnlyConfig:
  """Block sizes of one launch (``block_k`` counts logical K rows, int4 included)."""

  block_m: int = 16
  block_n: int = 128
  block_k: int = 128
  split_k: int = 1
  num_warps: int = 4
  num_stages: int = 3
  # "convert": int -> float32 -> x.dtype conversions (I2F/F2F, quarter rate on Hopper);
  # "magic": the code is OR-ed into the mantissa of a float constant (x.dtype bits), so
  # the tile holds ``q + bias`` exactly with integer ops only, and ``bias * sum(x)`` is
  # subtracted from the dot (symmetric weights; asymmetric ones always convert).
  dequant: str = "convert"

  def __post_init__(self):
    for name in ("block_m", "block_n", "block_k"):
      v = getattr(self, name)
      if v < MIN_DOT or v & (v - 1):
        raise ValueError(f"WeightOnlyConfig.{name} must be a power of two >= {MIN_DOT}, got {v}")
    if self.split_k < 1:
      raise ValueError(f"WeightOnlyConfig.split_k must be >= 1, got {self.split_k}")
    if self.dequant not in DEQUANT_MODES:
      raise ValueError(f"WeightOnlyConfig.dequant must be one of {DEQUANT_MODES}, got "
                       f"{self.dequant!r}")


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

  magic = cfg.dequant == "magic" and not asymmetric and signed

  def x_sum(x_tile):  # [block_m] float32, oriented like the dot's output
    t = jnp.sum(x_tile.astype(jnp.float32), axis=1)
    return t[None, :] if k_major else t[:, None]

  def step(i, acc):
    # invariant: acc = sum over this split's first i K blocks of x_blk @ dequant(w_blk)
    k0 = (split * steps + i) * bk
    g = jnp.minimum(k0 // group_size, num_groups - 1)
    scale = load_scale(s_ref, g)
    zero = load_scale(z_ref, g) if asymmetric else None
    if magic:  # tiles hold q + bias: subtract bias * sum(x) once per dot, scale once
      if bits == 8:
        xt = x_ref[rows, pl.ds(k0, bk)]
        w, bias = magic_int8(load_w(k0, bk), cdtype)
        part = dot(xt, w)
        if bias:
          part = part - bias * x_sum(xt)
      else:
        half = pl.ds(k0 // 2, bk // 2)
        xe, xo = xe_ref[rows, half], xo_ref[rows, half]
        lo, hi, bias = magic_int4(load_w(k0 // 2, bk // 2), cdtype)
        part = dot(xe, lo) + dot(xo, hi) - bias * (x_sum(xe) + x_sum(xo))
      return acc + part * scale
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


# ------------------------------------------------------------- GEMV (no tensor cores)


@dataclasses.dataclass(frozen=True)
class GemvConfig:
  """Blocks of :func:`gemv_weight_only`: ``block_n`` weight rows (output columns) per
  program, ``group_bytes`` contiguous weight bytes per load (one scale group, or a slice of
  a per-channel row), ``groups_per_step`` loads issued together per loop step, ``split_k``
  programs along K."""

  block_n: int = 64
  group_bytes: int = 64
  groups_per_step: int = 2
  split_k: int = 4
  num_warps: int = 4

  def __post_init__(self):
    for name in ("block_n", "group_bytes", "groups_per_step", "split_k"):
      v = getattr(self, name)
      if v < 1 or v & (v - 1):
        raise ValueError(f"GemvConfig.{name} must be a power of two, got {v}")


GEMV_MAX_M = 16


def _gemv_kernel(*refs, bits: int, m: int, steps: int, group_k: int, cfg: GemvConfig):
  if bits == 4:
    xe_ref, xo_ref, w_ref, s_ref, o_ref = refs
  else:
    x_ref, w_ref, s_ref, o_ref = refs
  bn, gb, gps = cfg.block_n, cfg.group_bytes, cfg.groups_per_step
  col_block, split = pl.program_id(0), pl.program_id(1)
  cols = pl.ds(col_block * bn, bn)
  kpb = 2 if bits == 4 else 1  # K values per byte

  def decode(v, shift):
    """Code bits at ``shift`` of int32 ``v`` -> float32 ``1.5 + q / 2**b`` (b = code bits):
    the code (sign bit flipped) becomes the top mantissa bits of 1.0; integer ops only."""
    if bits == 4:
      t = (v << (19 - shift) if shift <= 19 else v >> (shift - 19)) & 0x780000
    else:
      t = (v << 15) & 0x7F8000
    return lax.bitcast_convert_type(t ^ 0x3FC00000, jnp.float32)

  def load_group(j):
    b0 = j * gb
    w = w_ref[cols, pl.ds(b0, gb)].astype(jnp.int32)
    if bits == 4:
      xs = [(xe_ref[r, pl.ds(b0, gb)].astype(jnp.float32),
             xo_ref[r, pl.ds(b0, gb)].astype(jnp.float32)) for r in range(m)]
    else:
      xs = [(x_ref[r, pl.ds(b0, gb)].astype(jnp.float32),) for r in range(m)]
    return w, xs, s_ref[cols, (b0 * kpb) // group_k]

  def group_sum(w, xs, scale):
    """Per row r: scale * sum_k x[r, k] q[n, k] over one group: [m] x [block_n]."""
    planes = [decode(w, 0), decode(w, 4)] if bits == 4 else [decode(w, 0)]
    c1, c2 = (16.0, 24.0) if bits == 4 else (256.0, 384.0)  # q = c1 * f - c2 / 1.5 ...
    out = []
    for xr in xs:
      s = sum(p * xp[None, :] for p, xp in zip(planes, xr))
      xsum = sum(jnp.sum(xp) for xp in xr)
      # sum x q = c1 * sum x f - c2 * sum x   (f = 1.5 + q / c1, c2 = 1.5 * c1)
      out.append((c1 * jnp.sum(s, axis=1) - c2 * xsum) * scale)
    return out

  first = split * steps * gps

  def step(i, carry):
    # carry: this step's prefetched groups and the row accumulators; loads step i + 1
    # before computing step i, so one step of weight bytes is always in flight.
    cur, accs = carry
    nxt = [load_group(jnp.minimum(first + (i + 1) * gps + t, first + steps * gps - 1))
           for t in range(gps)]
    for w, xs, scale in cur:
      accs = [a + g for a, g in zip(accs, group_sum(w, xs, scale))]
    return nxt, accs

  cur = [load_group(first + t) for t in range(gps)]
  accs = [jnp.zeros((bn,), jnp.float32) for _ in range(m)]
  _, accs = lax.fori_loop(0, steps, step, (cur, accs))
  for r, a in enumerate(accs):
    o_ref[split, r, cols] = a


def gemv_unsupported(m: int, *, bits: int, group_size: int | None, k: int,
                     cfg: GemvConfig) -> str | None:
  """None when :func:`gemv_weight_only` serves the call, else why not."""
  if bits not in (4, 8):
    return f"bits={bits} is not 4 or 8"
  if m > GEMV_MAX_M:
    return f"m={m} > {GEMV_MAX_M} rows (the GEMV unrolls one accumulator per row)"
  kpb = 2 if bits == 4 else 1
  if group_size is not None and group_size != cfg.group_bytes * kpb:
    return (f"group_size={group_size} must equal group_bytes x {kpb} = "
            f"{cfg.group_bytes * kpb}")
  return None


def gemv_tile_multiples(bits: int, cfg: GemvConfig) -> tuple[int, int]:
  """``(N, K)`` multiples the operands must be padded to."""
  kpb = 2 if bits == 4 else 1
  return cfg.block_n, cfg.group_bytes * kpb * cfg.groups_per_step * cfg.split_k


def gemv_weight_only(x: jax.Array, values: jax.Array, scales: jax.Array, *, bits: int,
                     group_size: int | None, config: GemvConfig | None = None,
                     interpret: bool = False) -> jax.Array:
  """``x @ dequant(w)`` for a few rows of ``x`` on the CUDA cores (decode, GEMV).

  No tensor cores: each program streams ``[block_n, group_bytes]`` slices of a K-major
  weight (16-byte vector loads along K), decodes codes to floats with integer ops only
  (no int -> float conversion instructions), multiplies by the rows of ``x`` with FMAs and
  reduces along K inside each scale group, then applies the group's scale once.

  Args:
    x: ``[M, K]`` bfloat16 / float16 / float32, ``M <= 16``.
    values: K-major symmetric weight: int8 ``[N, K]`` or uint8 ``[N, K // 2]`` (int4, two
      two's-complement nibbles per byte, even K in the low nibble).
    scales: float32 ``[N, K // group_size]`` (``[N, 1]`` per channel).
    bits: 4 or 8.
    group_size: K values per scale, None for per-channel.
    config: blocks; None picks :class:`GemvConfig` defaults.
    interpret: run in Pallas interpret mode.

  Returns:
    ``[M, N]`` float32. ``N`` and ``K`` must be whole tiles (:func:`gemv_tile_multiples`).
  """
  cfg = config or GemvConfig()
  m, k = x.shape
  n = values.shape[0]
  why = gemv_unsupported(m, bits=bits, group_size=group_size, k=k, cfg=cfg)
  if why:
    raise ValueError(f"gemv_weight_only: {why}")
  tn, tk = gemv_tile_multiples(bits, cfg)
  if n % tn or k % tk:
    raise ValueError(f"gemv_weight_only: (N, K) = {(n, k)} is not a multiple of {(tn, tk)}; "
                     f"pad the operands")
  steps = k // tk
  args = [x[:, 0::2], x[:, 1::2]] if bits == 4 else [x]
  args += [values, scales.astype(jnp.float32)]
  kernel = functools.partial(_gemv_kernel, bits=bits, m=m, steps=steps,
                             group_k=group_size or k, cfg=cfg)
  partial = pl.pallas_call(
      kernel,
      grid=(n // cfg.block_n, cfg.split_k),
      out_shape=jax.ShapeDtypeStruct((cfg.split_k, m, n), jnp.float32),
      compiler_params=pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=1),
      interpret=interpret,
      name=f"int{bits}_gemv",
  )(*args)
  return partial[0] if cfg.split_k == 1 else jnp.sum(partial, axis=0)


__all__ = ["GemvConfig", "WeightOnlyConfig", "default_config", "gemv_tile_multiples",
           "gemv_unsupported", "gemv_weight_only", "magic_int4", "magic_int8", "tile_multiples",
           "unsupported", "weight_only_matmul"]
