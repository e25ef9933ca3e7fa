"""Quantized matmul: weight-only int4 / int8, W8A8 int8 and fp8 (per-tensor / per-row /
block scales), plus an fp8 linear-layer product with a ``custom_vjp`` for fp8 training.

``quantized_matmul(x, w)`` computes ``x @ dequant(w)`` for a weight ``w: [K, N]`` quantized
along K (a ``jaxeff.quant.QArray`` or a :class:`PackedWeight` from :func:`prepack`):

* ``x`` bfloat16 / float16 / float32: weight-only (int4 packed two per byte, int8; any
  format ``QArray.dequantize`` knows through the reference); GPTQ/AWQ-style serving.
* ``x`` int8 with ``x_scale [..., 1]`` and a symmetric per-channel (or per-tensor) int8
  weight: W8A8 (SmoothQuant, Xiao et al. 2023): ``(x_q @ w_q) * x_scale * w_scale``
  with int32 accumulation.
* ``x`` float8 with ``x_scale [..., 1]`` (per token), ``[]`` (per tensor) or
  ``[..., K // 128]`` (1 x 128 tiles) and an fp8 weight with per-tensor, per-channel or
  128-row block scales (``[K // 128, N // 128]``: DeepGEMM's 128 x 128 tiles): fp8 matmul.

:func:`quantize_activations` makes ``(x_q, x_scale)`` per token (or per 1 x 128 tile).
:func:`fp8_dot` is ``x @ w`` for float ``x, w`` computed in fp8 forward and backward
(both operands of each of the three products quantized on the fly; DeepSeek-V3 / COAT).

Implementations (``implementation=``), fastest first:

* ``"mosaic_gpu"``: :mod:`kernels_pallas.matmul.mosaic_gpu`, Hopper ``wgmma`` with the
  scales fused (W8A8 and fp8 with per-tensor / per-row scales; 8-bit operands must be
  K-major, so a QArray weight is transposed per call: :func:`prepack` does it once).
  fp8 block scales (1 x 128 activation tiles, 128 x 128 weight tiles) have the kernel's
  per-K-block promotion, dispatched on a GPU only once it has passed there
  (``BLOCK_SCALED_KERNEL``; until then the reference serves them).
* ``"triton"``: :mod:`kernels_pallas.matmul.triton`, weight-only int4 / int8 with the
  dequantisation fused and split-K for skinny ``x`` (any CUDA GPU), for ``m <= 64``; a
  K-major :class:`PackedWeight` (native int4 or int8) runs the Mosaic GPU weight-only
  kernels on Hopper instead: :mod:`kernels_pallas.matmul.mosaic_gpu` for ``m <= 32`` and
  :mod:`kernels_pallas.matmul.mosaic_gpu_medium` for ``32 < m <= 256``
  (``WEIGHT_ONLY_DEFAULT``).
* ``"xla"``: the reference below: dequantize, then one dot in float32.

Shapes that are not whole tiles are padded with zeros by this module (zero activations
make padded weights irrelevant); formats or layouts a kernel cannot serve fall back to
the next implementation (``supports`` gives the reason).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxeff.ops import _registry
from kernels_pallas.matmul import dequantize_values as _dequantize_values
from kernels_pallas.matmul import int4_high as _int4_high
from kernels_pallas.matmul import int4_low as _int4_low
from kernels_pallas.matmul import mosaic_gpu as _mosaic_gpu
from kernels_pallas.matmul import mosaic_gpu_medium as _medium
from kernels_pallas.matmul import triton as _triton

FLOAT_X_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
FP8_DTYPES = (jnp.dtype(jnp.float8_e4m3fn), jnp.dtype(jnp.float8_e5m2))
FP8_FORMATS = {"fp8_e4m3": jnp.float8_e4m3fn, "fp8_e5m2": jnp.float8_e5m2}
QMAX = {"int8": 127.0, "fp8_e4m3": 448.0, "fp8_e5m2": 57344.0}
WEIGHT_FORMATS = ("int8", "int6", "int4", "int3", "int2", "fp8_e4m3", "fp8_e5m2")
PACKED_FORMATS = ("int4", "int8", "fp8_e4m3", "fp8_e5m2")
# Measured on H100 (notes/quant_matmul.md): the Triton kernel beats dequantize-then-dot
# 2.7-3.6x at m <= 16 but loses to it at m = 128 (int4 g128: 265 vs 232 us).
TRITON_MAX_M = 64
# Weight-only kernel the "triton" implementation runs: the first row whose weight layout
# and row bound match, (layout, max m, variant of weight_only_matmul, config or None for
# its default). Layouts: "kmajor" = a PackedWeight the Mosaic kernel reads in place
# (int8, or int4 stored as jnp.int4: prepack's default on Hopper), "any" = a QArray or a
# uint8-packed int4 PackedWeight (read in place by "triton"). H100, device time of
# chained calls (session 4, notes/quant_matmul.md), m = 1 / 16: "mosaic" (split 2) int4
# g128 31.2 / 34.5 us at 8192^2 (1.68x / 1.56x XLA bf16), 33.8 / 36.4 at 4096 x 14336,
# 49.5 / 54.2 at 14336 x 4096; int8 33.0 / 34.6, 31.4 / 36.4, 42.3 / 45.1. "triton" on a
# QArray: int4 44.6 / 46.9, 41.5 / 41.5, 41.8 / 41.2; int8 41.6 / 43.2, 40.8 / 43.1,
# 41.6 / 41.9; on a uint8-packed int4 PackedWeight 75 us. "mosaic" needs Hopper;
# elsewhere K-major weights run "triton" (native int4 after a copy to uint8).
# Session 5 (same card, chained, 8192^2, notes/quant_matmul.md): "medium" (Hopper wgmma with
# x rows as N, `_medium.medium_config(..., wg_rows=128)`) int4 g128 m = 64 / 128 / 256
# 34.6 / 45.2 / 78.2 us (1.88x / 1.47x / 0.86x XLA bf16; XLA dequantize-then-dot, the
# previous path for m > 64, 0.26-0.27x), int8 42.3 / 52.5 / 76.6 us; "mosaic" at m = 64:
# int4 42.2, int8 40.8 us. So "mosaic" keeps m <= 32 and "medium" serves m <= 256.
MOSAIC_MAX_M = _medium.MEDIUM_MIN_M - 1
# The small-m Mosaic kernel's default form. False: 128 weight rows a CTA, split-K 2 over
# CTAs, float32 partials summed / transposed / cast by one XLA fusion after the kernel (the
# form timed on the H100). True: `WeightOnlyConfig(split_k=1, wg_split_k=True)`: the same
# number of CTAs (64 rows each, K split over the two compute warpgroups), the sum, the cast
# and the [M, N] store in the kernel, so a call on a prepacked weight is the Pallas call
# alone. Flip once quant_dev's `mosaic_wgsplit*` rows pass and time at least as fast
# (session 6, notes/quant_matmul.md).
MOSAIC_WG_SPLIT_K = False
MEDIUM_WG_ROWS = 128  # weight rows a compute warpgroup: best or within 3% in every case timed
WEIGHT_ONLY_DEFAULT = (("kmajor", MOSAIC_MAX_M, "mosaic", None),
                       ("kmajor", _medium.MEDIUM_MAX_M, "medium", None),
                       ("any", TRITON_MAX_M, "triton", None))
BLOCK = 128  # K tile of block (1 x 128 / 128 x 128) scales
# Block-scaled fp8 (quantized_matmul with 1 x 128 / 128 x 128 scales, fp8_dot(scaling=
# "block")) through the Mosaic kernel on a real GPU. On since the H100 passed
# test_block_scaled_kernel_gpu[serial|overlap] (rel. err. 1.26e-4: fp8 wgmma accumulation)
# and test_fp8_dot_gpu[block] (session 4, notes/quant_matmul.md). Setting it False sends
# block scaling on GPUs to the XLA reference. Per-tile scale copies stay refused (they
# crashed the H100); tile scales are expanded to columns.
BLOCK_SCALED_KERNEL = True
SCALINGS = ("tensor", "row", "block")
TILE_SCALE_FORMS = ("columns", "tile_copy", "column_scalar")
_EPS = 1e-12
_FP8_BITS = {jnp.dtype(jnp.float8_e4m3fn): (4, 3, 7), jnp.dtype(jnp.float8_e5m2): (5, 2, 15)}


def fp8_to_float32(q: jax.Array) -> jax.Array:
  """The exact float32 values of float8 ``q`` (e4m3fn / e5m2), decoded from its bits.

  ``q.astype(float32)`` is not enough for a reference: under XLA's default
  ``xla_allow_excess_precision`` the GPU compiler removes a ``float32 -> float8 ->
  float32`` convert pair inside one program (openxla/xla#41605), so "quantize then
  dequantize" in one jit silently skips the fp8 rounding. Integer bit manipulation after a
  bitcast cannot be removed, so the rounding to fp8 is kept.
  """
  ebits, mbits, bias = _FP8_BITS[jnp.dtype(q.dtype)]
  bits = jax.lax.bitcast_convert_type(q, jnp.uint8).astype(jnp.int32)
  sign = (bits >> 7) & 1
  e = (bits >> mbits) & ((1 << ebits) - 1)
  m = bits & ((1 << mbits) - 1)
  normal = jax.lax.bitcast_convert_type(
      (sign << 31) | ((e - bias + 127) << 23) | (m << (23 - mbits)), jnp.float32)
  sub = m.astype(jnp.float32) * (2.0 ** (1 - bias - mbits))
  sub = jnp.where(sign == 1, -sub, sub)
  if ebits == 4:  # e4m3fn: no infinities, S.1111.111 is NaN
    special = (e == 15) & (m == 7)
    top = jnp.full_like(normal, jnp.nan)
  else:  # e5m2: exponent 31 is inf (m == 0) or NaN
    special = e == 31
    top = jnp.where(m == 0, jnp.where(sign == 1, -jnp.inf, jnp.inf), jnp.nan)
  return jnp.where(special, top, jnp.where(e == 0, sub, normal))


def _to_float32(a: jax.Array) -> jax.Array:
  return fp8_to_float32(a) if jnp.dtype(a.dtype) in FP8_DTYPES else a.astype(jnp.float32)


# ------------------------------------------------------------------------- containers


@dataclasses.dataclass(frozen=True)
class PackedWeight:
  """A quantized weight ``[K, N]`` laid out K-major for the kernels (from :func:`prepack`).

  Fields:
    values: ``[N, K]`` int8 / uint8 / float8, or for int4 ``[N, K // 2]`` uint8 (the
      QArray's bytes transposed: K contiguous, the form ``wgmma`` takes for 8-bit operands
      and in which a dequantised int4 / int8 tile is the A operand from registers) or
      ``[N, K]`` ``jnp.int4`` (the same bytes typed as int4, for the Mosaic GPU kernel:
      ``prepack(w, native_int4=True)``).
    scales: float32 ``[N, G]``: K rows ``[g * K // G, (g + 1) * K // G)`` of column ``n``
      have scale ``scales[n, g]`` (``G = 1``: per channel; per tensor is broadcast).
    zeros: float32 ``[N, G]`` (asymmetric int formats) or None.
    fmt: ``"int4"``, ``"int8"``, ``"fp8_e4m3"`` or ``"fp8_e5m2"``.
    shape: logical ``(K, N)``.
    scales_t: float32 ``[G, N]``, ``scales`` transposed (the same values), or None: the
      layout the Mosaic GPU weight-only kernels read (one row of N scales per K group),
      stored by :func:`prepack` for symmetric int4 / int8 weights (on every platform,
      so the pytree is the same wherever it is built) so that no call transposes the
      scales. A PackedWeight without it (None) still runs: the kernels then transpose
      ``scales`` per call, and ``prepack(pw)`` adds it. An Orbax checkpoint of a
      PackedWeight written before this field existed restores into the new structure
      with ``ocp.args.PyTreeRestore(item=target, partial_restore=True)`` (``scales_t``
      comes back None); serving code usually checkpoints the QArrays and prepacks after
      loading.
  """

  values: jax.Array
  scales: jax.Array
  zeros: jax.Array | None
  fmt: str
  shape: tuple[int, int]
  scales_t: jax.Array | None = None

  @property
  def symmetric(self) -> bool:
    return self.zeros is None

  @property
  def group_size(self) -> int | None:
    g = self.scales.shape[1]
    return None if g == 1 else self.shape[0] // g

  @property
  def native_int4(self) -> bool:
    return jnp.dtype(self.values.dtype) in (jnp.dtype(jnp.int4), jnp.dtype(jnp.uint4))

  def dequantize(self, dtype=jnp.float32) -> jax.Array:
    """``[K, N]`` in ``dtype``: ``(q - zeros) * scales`` (scales repeated over K's groups)."""
    k, _ = self.shape
    if self.fmt == "int4" and self.native_int4:
      q = self.values.astype(jnp.int32)
    elif self.fmt == "int4":
      q = jnp.stack([_int4_low(self.values, signed=self.symmetric),
                     _int4_high(self.values, signed=self.symmetric)], axis=-1)
      q = q.reshape(self.values.shape[0], k)
    else:
      q = self.values
    rep = k // self.scales.shape[1]
    s = jnp.repeat(self.scales, rep, axis=1)
    z = None if self.zeros is None else jnp.repeat(self.zeros, rep, axis=1)
    return _dequantize_values(_to_float32(q), s, z).T.astype(dtype)


jax.tree_util.register_dataclass(PackedWeight,
                                 data_fields=["values", "scales", "zeros", "scales_t"],
                                 meta_fields=["fmt", "shape"])


@dataclasses.dataclass(frozen=True)
class _Weight:
  """Static facts of a weight, validated once (``w`` a QArray or a PackedWeight)."""

  fmt: str
  k: int
  n: int
  groups: int  # scale rows along K
  symmetric: bool
  packed: bool  # a PackedWeight (K-major)


def _weight_info(w: Any) -> _Weight:
  if isinstance(w, PackedWeight):
    k, n = w.shape
    if w.fmt not in PACKED_FORMATS:
      raise ValueError(f"quantized_matmul: w.fmt must be one of {PACKED_FORMATS} for a "
                       f"PackedWeight, got {w.fmt!r}")
    kv = k // 2 if w.fmt == "int4" and not w.native_int4 else k
    if (w.values.shape != (n, kv) or w.scales.ndim != 2 or w.scales.shape[0] != n
        or k % w.scales.shape[1]):
      raise ValueError(f"quantized_matmul: PackedWeight of shape {(k, n)} needs values "
                       f"{(n, kv)} and scales [N, G] with G dividing K, got values "
                       f"{w.values.shape} and scales {w.scales.shape}")
    if w.scales_t is not None and tuple(w.scales_t.shape) != (w.scales.shape[1], n):
      raise ValueError(f"quantized_matmul: PackedWeight.scales_t must be scales transposed, "
                       f"[G, N] = {(w.scales.shape[1], n)}, got {tuple(w.scales_t.shape)}")
    return _Weight(w.fmt, k, n, w.scales.shape[1], w.symmetric, True)
  needed = ("values", "scales", "zeros", "fmt", "shape", "axis", "group_size", "symmetric")
  if not all(hasattr(w, a) for a in needed):
    raise TypeError(f"quantized_matmul: w must be a jaxeff.quant.QArray or a PackedWeight, got "
                    f"{type(w).__name__}")
  if w.fmt not in WEIGHT_FORMATS:
    raise ValueError(f"quantized_matmul: w.fmt must be one of {WEIGHT_FORMATS}, got {w.fmt!r}")
  if len(w.shape) != 2:
    raise ValueError(f"quantized_matmul: w must be a 2-D weight [K, N], got logical shape {w.shape}")
  k, n = w.shape
  s = tuple(w.scales.shape)
  if len(s) != 2 or k % s[0] or n % s[1]:
    raise ValueError(f"quantized_matmul: w.scales shape {s} must be [K // group, N // block] "
                     f"dividing w.shape {(k, n)}")
  if w.axis != 0 and s != (1, 1):
    raise ValueError(f"quantized_matmul: w.axis must be 0 (groups along K), got {w.axis}")
  return _Weight(w.fmt, k, n, s[0], bool(w.symmetric), False)


def _column_scales(scales: jax.Array, n: int) -> jax.Array:
  """``[G, N // b]`` scales -> ``[G, N]`` float32 (per-tensor and 128 x 128 blocks too)."""
  scales = scales.astype(jnp.float32)
  return jnp.repeat(scales, n // scales.shape[1], axis=1) if scales.shape[1] != n else scales


def prepack(w: Any, *, native_int4: bool | None = None,
            scales_t: bool | None = None) -> PackedWeight:
  """Lays a QArray weight out K-major for the kernels (once, offline).

  Args:
    w: a ``QArray`` ``[K, N]`` quantized along K, format int4, int8 or fp8 (or a
      PackedWeight, returned as is unless ``native_int4`` changes its int4 storage).
    native_int4: store symmetric int4 as ``jnp.int4 [N, K]`` (the Mosaic GPU kernel's
      operand type) rather than ``uint8 [N, K // 2]`` (the Triton kernels'). None (the
      default): the layout of the fastest kernel where this runs, i.e. ``jnp.int4`` on a
      Hopper GPU for symmetric int4 whose groups the Mosaic kernel takes (per-channel or
      multiples of 128), ``uint8`` otherwise.
    scales_t: also store the scales as ``[G, N]`` (``PackedWeight.scales_t``, the Mosaic
      GPU weight-only kernels' layout: no transpose per call, ``G * N * 4`` more bytes).
      None (the default): keep an existing ``scales_t``, else store it for symmetric
      int4 and int8 weights, whatever the platform (the same pytree on a host and on
      the GPU).

  Returns:
    A :class:`PackedWeight` (``values`` transposed, scales / zeros ``[N, G]`` float32).
  """
  info = _weight_info(w)
  if info.packed:
    pw = w
  else:
    if info.fmt not in PACKED_FORMATS:
      raise ValueError(f"prepack: w.fmt must be one of {PACKED_FORMATS}, got {info.fmt!r}")
    zeros = None if w.zeros is None else _column_scales(w.zeros, info.n).T
    pw = PackedWeight(w.values.T, _column_scales(w.scales, info.n).T, zeros, info.fmt,
                      (info.k, info.n))
  if native_int4 is None:
    native_int4 = pw.fmt == "int4" and pw.symmetric and (
        pw.native_int4 or (_registry.current_platform() == "gpu" and _on_hopper()
                           and _mosaic_takes_groups(pw.group_size)))
  if pw.fmt == "int4" and native_int4 != pw.native_int4:
    if not pw.symmetric:
      raise ValueError("prepack: native_int4=True needs a symmetric int4 weight (signed "
                       "codes), got an asymmetric one (zero points)")
    n, k = pw.values.shape[0], info.k
    if native_int4:  # little-endian nibbles: code 2i is the low nibble of byte i
      values = jax.lax.bitcast_convert_type(pw.values, jnp.int4).reshape(n, k)
    else:
      values = jax.lax.bitcast_convert_type(pw.values.reshape(n, k // 2, 2), jnp.uint8)
    pw = dataclasses.replace(pw, values=values)
  if scales_t is None:
    scales_t = pw.scales_t is not None or (pw.symmetric and pw.fmt in ("int4", "int8"))
  if not isinstance(scales_t, bool):
    raise TypeError(f"prepack: scales_t must be None or a bool, got {scales_t!r}")
  if scales_t and pw.scales_t is None:
    pw = dataclasses.replace(pw, scales_t=pw.scales.T)
  elif not scales_t and pw.scales_t is not None:
    pw = dataclasses.replace(pw, scales_t=None)
  return pw


# ------------------------------------------------------------------- activation quantization


def quantize_activations(x: jax.Array, fmt: str = "int8", *, block_size: int | None = None
                         ) -> tuple[jax.Array, jax.Array]:
  """Symmetric per-token (or per ``1 x block_size`` tile) quantization of activations.

  Args:
    x: ``[..., K]`` float.
    fmt: ``"int8"``, ``"fp8_e4m3"`` or ``"fp8_e5m2"``.
    block_size: None for one scale per token; else a divisor of K (fp8 block scaling: 128).

  Returns:
    ``(x_q [..., K] int8 / float8, x_scale [..., 1] or [..., K // block_size] float32)``
    with ``x ~= x_q * x_scale`` (scale repeated over each block).
  """
  if fmt not in QMAX:
    raise ValueError(f"quantize_activations: fmt must be one of {sorted(QMAX)}, got {fmt!r}")
  if not hasattr(x, "dtype") or x.dtype not in FLOAT_X_DTYPES or x.ndim < 1:
    raise TypeError(f"quantize_activations: x must be a float array [..., K], got "
                    f"{getattr(x, 'dtype', type(x))} {getattr(x, 'shape', '')}")
  k = x.shape[-1]
  bs = k if block_size is None else block_size
  if bs < 1 or k % bs:
    raise ValueError(f"quantize_activations: block_size={block_size} must divide K={k}")
  xf = x.astype(jnp.float32).reshape(x.shape[:-1] + (k // bs, bs))
  amax = jnp.max(jnp.abs(xf), axis=-1, keepdims=True)
  scale = jnp.maximum(amax, _EPS) / QMAX[fmt]
  q = xf / scale
  if fmt == "int8":
    q = jnp.clip(jnp.round(q), -127, 127).astype(jnp.int8)
  else:
    q = q.astype(FP8_FORMATS[fmt])
  return q.reshape(x.shape), scale[..., 0]


# ---------------------------------------------------------------------------- reference


def _dequantize_x(x2, x_scale2):
  xf = _to_float32(x2)
  if x_scale2 is None:
    return xf
  k = x2.shape[-1]
  return xf * jnp.repeat(x_scale2.astype(jnp.float32), k // x_scale2.shape[-1], axis=-1)


def quantized_matmul_reference(x2: jax.Array, w: Any, x_scale2: jax.Array | None, *,
                               out_dtype) -> jax.Array:
  """Dequantize then dot: ``x2 [M, K]`` (with ``x_scale2 [M, 1 | K // 128]``) -> ``[M, N]``.

  Weight-only calls dequantize ``w`` to ``x.dtype`` (as a user would before a plain dot);
  quantized activations are dequantized to float32.
  """
  if x_scale2 is None and x2.dtype in FLOAT_X_DTYPES:
    wd = _dequantize_weight(w).astype(x2.dtype)
    return jnp.dot(x2, wd, preferred_element_type=jnp.float32).astype(out_dtype)
  xd = _dequantize_x(x2, x_scale2)
  return jnp.dot(xd, _dequantize_weight(w),
                 precision=jax.lax.Precision.HIGHEST).astype(out_dtype)


def _dequantize_weight(w: Any) -> jax.Array:
  """``[K, N]`` float32; fp8 QArray values are decoded exactly (:func:`fp8_to_float32`)."""
  if isinstance(w, PackedWeight) or w.fmt not in FP8_FORMATS:
    return w.dequantize(jnp.float32)
  k, n = w.shape
  s = _column_scales(w.scales, n)
  return fp8_to_float32(w.values) * jnp.repeat(s, k // s.shape[0], axis=0)


# ------------------------------------------------------------------------------ kernels


def _pad2(a: jax.Array, rows: int, cols: int, value=0) -> jax.Array:
  pr, pc = -a.shape[0] % rows, -a.shape[1] % cols
  if pr or pc:
    a = jnp.pad(a, ((0, pr), (0, pc)), constant_values=value)
  return a


def scaled_matmul_nt(a: jax.Array, b_t: jax.Array, a_scale: jax.Array, b_scale: jax.Array, *,
                     scale_mode: str, out_dtype, interpret: bool = False,
                     config: _mosaic_gpu.MatmulConfig | None = None,
                     tile_scales: str = "columns") -> jax.Array:
  """Mosaic GPU scaled matmul of K-major operands, padded to whole tiles.

  ``a: [M, K]``, ``b_t: [N, K]``; ``"outer"``: ``a_scale [M]``, ``b_scale [N]``;
  ``"block"``: ``a_scale [K // 128, M]`` and ``b_scale [K // 128, N]`` (per column) or
  ``[K // 128, ceil(N / 128)]`` (128 x 128 weight tiles, DeepGEMM's layout). How tile
  scales reach the kernel (``tile_scales``): ``"columns"`` repeats them over their
  columns (the kernel form validated on the H100); ``"tile_copy"`` copies one scale per
  tile and step (crashed on the H100: interpret mode, or
  ``_mosaic_gpu.TILE_SCALES_ON_GPU``); ``"column_scalar"`` copies the repeated columns
  but reads one scalar per tile. Returns ``[M, N]``.
  """
  if tile_scales not in TILE_SCALE_FORMS:
    raise ValueError(f"scaled_matmul_nt: tile_scales must be one of {TILE_SCALE_FORMS}, got "
                     f"{tile_scales!r}")
  m, k = a.shape
  n = b_t.shape[0]
  cfg = config or _mosaic_gpu.default_config(m, n, k, a.dtype, scale_mode=scale_mode,
                                             out_dtype=out_dtype)
  tm, tn, tk = _mosaic_gpu.tile_multiples(cfg)
  if scale_mode == "block":
    tk = math.lcm(tk, BLOCK)
  a_p, b_p = _pad2(a, tm, tk), _pad2(b_t, tn, tk)
  scalar = False  # one scale per tile read from the repeated columns
  if scale_mode == "outer":
    sa, sb = jnp.pad(a_scale, (0, -m % tm)), jnp.pad(b_scale, (0, -n % tn))
  else:
    steps = a_p.shape[1] // cfg.block_k
    rep = BLOCK // cfg.block_k
    nb = -(-n // BLOCK)
    compact = b_scale.shape[1] == nb and nb != n
    scalar = compact and cfg.block_n == BLOCK and tile_scales == "column_scalar"
    if compact and (cfg.block_n != BLOCK or tile_scales != "tile_copy"):
      b_scale, compact = jnp.repeat(b_scale, BLOCK, axis=1)[:, :n], False
    sa = _pad2(jnp.repeat(a_scale, rep, axis=0), 1, tm)
    sb = jnp.repeat(b_scale, rep, axis=0)
    sa = jnp.pad(sa, ((0, steps - sa.shape[0]), (0, 0)), constant_values=1.0)
    sb = jnp.pad(sb, ((0, steps - sb.shape[0]), (0, 0)), constant_values=1.0)
    if compact:  # one scale per block_n (= 128) columns, padded for the per-tile copies
      cols = _mosaic_gpu.tile_scale_columns(b_p.shape[0], cfg)
      sb = jnp.pad(sb, ((0, 0), (0, cols - nb)), constant_values=1.0)
    else:
      sb = _pad2(sb, 1, tn)
  out = _mosaic_gpu.scaled_matmul(a_p, b_p, sa.astype(jnp.float32), sb.astype(jnp.float32),
                                  scale_mode=scale_mode, out_dtype=out_dtype, config=cfg,
                                  interpret=interpret, b_tile_scalar=scalar)
  return out[:m, :n]


def _mode(x2, x_scale2) -> str:
  if x_scale2 is None:
    return "weight_only"
  return "w8a8" if x2.dtype == jnp.int8 else "fp8"


def _mosaic_supports(x2, w, x_scale2, *, out_dtype):
  info = _weight_info(w)
  mode = _mode(x2, x_scale2)
  if mode == "weight_only":
    return "mosaic_gpu serves 8-bit activations (W8A8 int8, fp8); use triton for weight-only"
  if mode == "w8a8" and info.groups != 1:
    return f"W8A8 needs per-channel weight scales, got {info.groups} groups along K"
  block = info.groups != 1 or x_scale2.shape[-1] != 1
  if block and (info.k % BLOCK or (info.k // info.groups) % BLOCK):
    return (f"block-scaled fp8 needs K={info.k} and the weight group size "
            f"{info.k // info.groups} to be multiples of {BLOCK}")
  if block and (why := _block_refused()):
    return why
  if jnp.dtype(out_dtype) not in FLOAT_X_DTYPES:
    return f"out_dtype {out_dtype} is not a float type"
  return None


def _block_refused() -> str | None:
  """Why block-scaled fp8 is not run through the kernel here (None: it is)."""
  if BLOCK_SCALED_KERNEL or _registry.current_platform() != "gpu":
    return None
  return ("block-scaled fp8 is served by the XLA reference on GPUs until the kernel passes "
          "there (BLOCK_SCALED_KERNEL, notes/quant_matmul.md)")


def _mosaic_fn(x2, w, x_scale2, *, out_dtype, interpret):
  info = _weight_info(w)
  xs = x_scale2.astype(jnp.float32)
  block = info.groups != 1 or xs.shape[-1] != 1
  if not block:
    pw = prepack(w)
    return scaled_matmul_nt(x2, pw.values, xs[:, 0], pw.scales[:, 0], scale_mode="outer",
                            out_dtype=out_dtype, interpret=interpret)
  kb = info.k // BLOCK
  sa = jnp.broadcast_to(xs.T, (kb, x2.shape[0])) if xs.shape[-1] == 1 else xs.T
  if info.packed:
    values, sb = w.values, w.scales.T  # [G, N] per column
  else:  # 128 x 128 tile scales [G, N // 128] stay compact here (scaled_matmul_nt expands)
    values, sb = w.values.T, w.scales.astype(jnp.float32)
    if sb.shape[1] not in (info.n, -(-info.n // BLOCK)):
      sb = _column_scales(sb, info.n)
  sb = jnp.repeat(sb, kb // sb.shape[0], axis=0)
  return scaled_matmul_nt(x2, values, sa, sb, scale_mode="block", out_dtype=out_dtype,
                          interpret=interpret)


def _triton_supports(x2, w, x_scale2, *, out_dtype):
  del out_dtype
  info = _weight_info(w)
  if x_scale2 is not None:
    return "triton serves weight-only calls (float x); use mosaic_gpu for W8A8 / fp8"
  if x2.dtype == jnp.float32:
    return "triton weight-only needs bfloat16 / float16 x, got float32"
  if info.fmt not in ("int4", "int8"):
    return f"triton serves int4 / int8 weights, got {info.fmt}"
  if x2.shape[0] > TRITON_MAX_M:
    if _weight_only_choice(x2.shape[0], w, interpret=False)[0] == "medium":
      return None  # its own limits were checked by the choice
    return (f"m={x2.shape[0]} > {TRITON_MAX_M}: dequantize-then-dot (XLA) is faster for wide x "
            f"unless a prepacked symmetric weight on Hopper takes the medium-m kernel "
            f"(m <= {_medium.MEDIUM_MAX_M}; notes/quant_matmul.md)")
  bits = 4 if info.fmt == "int4" else 8
  group = None if info.groups == 1 else info.k // info.groups
  return _triton.unsupported(bits=bits, group_size=group, k=info.k)


def _extra_groups(w: PackedWeight, kp: int) -> int:
  """Scale groups to add when K is padded to ``kp`` (0 per channel)."""
  groups = w.scales.shape[1]
  return 0 if groups == 1 else kp // (w.shape[0] // groups) - groups


def _pad_k_major(w: PackedWeight, tn: int, kp: int) -> tuple[jax.Array, jax.Array, Any]:
  """K-major values / scales / zeros padded to ``N % tn == 0`` and ``K = kp`` (padded K
  rows form whole groups of zero codes with scale 1). No op when both are whole tiles."""
  per_byte = 2 if w.fmt == "int4" and not w.native_int4 else 1
  values = _pad2(w.values, tn, kp // per_byte)
  extra = _extra_groups(w, kp)

  def pad(a, value):
    a = _pad2(a, tn, 1, value)
    return jnp.pad(a, ((0, 0), (0, extra)), constant_values=value) if extra else a

  return values, pad(w.scales, 1.0), None if w.zeros is None else pad(w.zeros, 0.0)


def _kernel_scales(w: PackedWeight, tn: int, kp: int) -> jax.Array:
  """``[G', N']`` float32 scales of the Mosaic weight-only kernels (``w.scales_t`` when
  prepacked, else a transpose per call), padded like :func:`_pad_k_major`."""
  if w.scales_t is None:
    return _pad_k_major(w, tn, kp)[1].T
  extra = _extra_groups(w, kp)
  st = _pad2(w.scales_t.astype(jnp.float32), 1, tn, 1.0)
  return jnp.pad(st, ((0, extra), (0, 0)), constant_values=1.0) if extra else st


def weight_only_matmul(x2: jax.Array, w: Any, *, variant: str = "triton", config: Any = None,
                       interpret: bool = False, out_dtype=jnp.float32) -> jax.Array:
  """``x2 @ dequant(w)`` through one weight-only kernel variant, operands padded to its tiles.

  Args:
    x2: ``[M, K]`` bfloat16 / float16.
    w: int4 / int8 ``QArray`` or :class:`PackedWeight` ``[K, N]``.
    variant: ``"triton"`` (tensor-core dot, ``_triton.WeightOnlyConfig``; ``dequant=
      "magic"`` skips int -> float conversions), ``"gemv"`` (CUDA cores, symmetric,
      ``_triton.GemvConfig``, M <= 16), ``"mosaic"`` (Hopper wgmma on ``out^T``,
      symmetric, ``_mosaic_gpu.WeightOnlyConfig``, M <= 64) or ``"medium"`` (Hopper
      wgmma on ``out^T`` with up to 128 x rows as N, symmetric, ``_medium.MediumConfig``,
      M <= 256). ``"gemv"`` / ``"mosaic"`` / ``"medium"`` read K-major weights: pass a
      PackedWeight (``prepack``; ``native_int4=True`` for the Mosaic ones) or the QArray is
      transposed on every call.
    config: the variant's config; None picks its defaults.
    interpret: Pallas interpret mode.
    out_dtype: output dtype (the Mosaic kernel with ``wg_split_k`` casts in the kernel;
      otherwise the cast joins the XLA epilogue).

  Returns:
    ``[M, N]`` in ``out_dtype``.
  """
  info = _weight_info(w)
  bits = 4 if info.fmt == "int4" else 8
  group = None if info.groups == 1 else info.k // info.groups
  m = x2.shape[0]
  if variant in ("mosaic", "medium"):  # Hopper wgmma kernels on K-major weights
    pw = prepack(w, native_int4=True)
    if variant == "mosaic":
      cfg = config or _mosaic_default_config()
      tiles, kernel = _mosaic_gpu.weight_only_tile_multiples, _mosaic_gpu.weight_only_matmul_t
    else:
      cfg = config or _medium_config(m, info, group)
      tiles, kernel = _medium.tile_multiples, _medium.weight_only_matmul_medium
    tn, tk = tiles(cfg, group)
    kp = info.k + (-info.k % tk)
    values = _pad2(pw.values, tn, kp)  # native int4 / int8: one code per element
    # x keeps its M rows (the kernels' TMA zero-fills the rows of a tile past M); K is
    # padded only when it is not a whole number of tiles.
    out = kernel(_pad2(x2, 1, kp), values, _kernel_scales(pw, tn, kp), group_size=group,
                 config=cfg, interpret=interpret, scales_t=True, out_dtype=out_dtype)
    return out if out.shape[1] == info.n else out[:, :info.n]
  if info.packed and w.native_int4:
    w = prepack(w, native_int4=False)
  if variant == "gemv":
    pw = prepack(w, native_int4=False)  # uint8 nibbles (a QArray prepacks native on Hopper)
    kpb = 2 if bits == 4 else 1
    cfg = config or _triton.GemvConfig()
    if group is not None:
      cfg = dataclasses.replace(cfg, group_bytes=group // kpb)
    tn, tk = _triton.gemv_tile_multiples(bits, cfg)
    kp = info.k + (-info.k % tk)
    values, scales, _ = _pad_k_major(pw, tn, kp)
    return _triton.gemv_weight_only(_pad2(x2, 1, kp), values, scales, bits=bits,
                                    group_size=group, config=cfg,
                                    interpret=interpret)[:, :info.n].astype(out_dtype)
  if variant != "triton":
    raise ValueError(f"weight_only_matmul: variant must be 'triton', 'gemv', 'mosaic' or "
                     f"'medium', got {variant!r}")
  cfg = config or _triton.default_config(m, info.n, info.k, bits=bits, group_size=group)
  tm, tn, tk = _triton.tile_multiples(cfg)
  kp = info.k + (-info.k % tk)
  xp = _pad2(x2, tm, tk)
  if info.packed:  # K-major: values [N, K'], scales / zeros [N, G]
    values, scales, zeros = _pad_k_major(w, tn, kp)
  else:
    kv = kp // 2 if bits == 4 else kp
    values = _pad2(w.values, kv, tn)
    scales = _pad2(_column_scales(w.scales, info.n), 1, tn, 1.0)
    zeros = None if w.zeros is None else _pad2(_column_scales(w.zeros, info.n), 1, tn)
  out = _triton.weight_only_matmul(xp, values, scales, zeros, bits=bits, group_size=group,
                                   signed=info.symmetric, k_major=info.packed, config=cfg,
                                   interpret=interpret)
  return out[:m, :info.n].astype(out_dtype)


def _mosaic_default_config() -> _mosaic_gpu.WeightOnlyConfig:
  if MOSAIC_WG_SPLIT_K:
    return _mosaic_gpu.WeightOnlyConfig(split_k=1, wg_split_k=True)
  return _mosaic_gpu.WeightOnlyConfig()


def _on_hopper() -> bool:
  return any(k in _registry._device_kind() for k in _registry.HOPPER_KINDS)


def _mosaic_takes_groups(group_size: int | None) -> bool:
  """Whether the Mosaic weight-only kernel serves int4 scale groups of this size."""
  return _mosaic_gpu.weight_only_unsupported(1, 1, 1, bits=4, group_size=group_size,
                                             cfg=_mosaic_gpu.WeightOnlyConfig()) is None


def _medium_config(m: int, info: Any, group: int | None) -> _medium.MediumConfig:
  return _medium.medium_config(m, info.n, info.k, bits=4 if info.fmt == "int4" else 8,
                               group_size=group, wg_rows=MEDIUM_WG_ROWS)


def _weight_only_choice(m: int, w: Any, *, interpret: bool) -> tuple[str, Any]:
  """``(variant, config)`` of ``WEIGHT_ONLY_DEFAULT`` for ``m`` rows of x and weight ``w``."""
  info = _weight_info(w)
  kmajor = isinstance(w, PackedWeight) and (w.native_int4 or w.fmt == "int8")
  hopper = interpret or _on_hopper()
  for layout, max_m, variant, config in WEIGHT_ONLY_DEFAULT:
    if m > max_m or (layout == "kmajor" and not kmajor):
      continue
    if variant == "mosaic":
      cfg = config or _mosaic_default_config()
      group = None if info.groups == 1 else info.k // info.groups
      if not hopper or not info.symmetric or _mosaic_gpu.weight_only_unsupported(
          m, info.n, info.k, bits=4 if info.fmt == "int4" else 8, group_size=group, cfg=cfg):
        continue
    if variant == "medium":
      group = None if info.groups == 1 else info.k // info.groups
      cfg = config or _medium_config(m, info, group)
      if not hopper or not info.symmetric or _medium.unsupported(
          m, info.n, info.k, bits=4 if info.fmt == "int4" else 8, group_size=group, cfg=cfg):
        continue
    return variant, config
  return "triton", None


def _triton_fn(x2, w, x_scale2, *, out_dtype, interpret):
  del x_scale2
  variant, config = _weight_only_choice(x2.shape[0], w, interpret=interpret)
  return weight_only_matmul(x2, w, variant=variant, config=config, interpret=interpret,
                            out_dtype=out_dtype)


def _xla_fn(x2, w, x_scale2, *, out_dtype):
  return quantized_matmul_reference(x2, w, x_scale2, out_dtype=out_dtype)


QUANTIZED_MATMUL_IMPLS: list[_registry.Implementation] = [
    _registry.Implementation("mosaic_gpu", _mosaic_fn, platforms=("gpu",),
                             supports=_mosaic_supports, interpretable=True,
                             device_kinds=_registry.HOPPER_KINDS),
    _registry.Implementation("triton", _triton_fn, platforms=("gpu",),
                             supports=_triton_supports, interpretable=True),
    _registry.Implementation("xla", _xla_fn),
]


def _validate(x, w, x_scale, out_dtype) -> tuple[_Weight, str]:
  info = _weight_info(w)
  if not hasattr(x, "dtype") or not hasattr(x, "shape") or x.ndim < 1:
    raise TypeError(f"quantized_matmul: x must be an array [..., K], got {type(x).__name__}")
  if x.shape[-1] != info.k:
    raise ValueError(f"quantized_matmul: x.shape[-1] = {x.shape[-1]} must equal K = {info.k} "
                     f"of w.shape {(info.k, info.n)}")
  if x.dtype in FLOAT_X_DTYPES:
    if x_scale is not None:
      raise ValueError("quantized_matmul: x_scale is only for int8 / float8 x, got float "
                       f"x ({x.dtype}) with x_scale")
    mode = "weight_only"
  elif x.dtype == jnp.int8 or x.dtype in FP8_DTYPES:
    mode = "w8a8" if x.dtype == jnp.int8 else "fp8"
    if mode == "w8a8" and (info.fmt != "int8" or not info.symmetric):
      raise ValueError(f"quantized_matmul: int8 x (W8A8) needs a symmetric int8 w, got "
                       f"fmt={info.fmt!r} symmetric={info.symmetric}")
    if mode == "fp8" and info.fmt not in FP8_FORMATS:
      raise ValueError(f"quantized_matmul: float8 x needs an fp8 w, got fmt={info.fmt!r}")
    if x_scale is None:
      raise ValueError(f"quantized_matmul: {x.dtype} x needs x_scale ([..., 1] per token)")
    ok = (x_scale.shape == () or x_scale.shape == x.shape[:-1] + (1,)
          or (mode == "fp8" and info.k % BLOCK == 0
              and x_scale.shape == x.shape[:-1] + (info.k // BLOCK,)))
    if not ok:
      raise ValueError(f"quantized_matmul: x_scale shape {x_scale.shape} must be [] or "
                       f"{x.shape[:-1] + (1,)}" + (f" or {x.shape[:-1] + (info.k // BLOCK,)}"
                                                  if mode == "fp8" else ""))
    if not jnp.issubdtype(x_scale.dtype, jnp.floating):
      raise TypeError(f"quantized_matmul: x_scale must be float, got {x_scale.dtype}")
  else:
    raise TypeError(f"quantized_matmul: x.dtype must be bfloat16/float16/float32 (weight-only), "
                    f"int8 (W8A8) or float8 (fp8), got {x.dtype}")
  if out_dtype is not None and jnp.dtype(out_dtype) not in FLOAT_X_DTYPES:
    raise TypeError(f"quantized_matmul: out_dtype must be bfloat16, float16 or float32, got "
                    f"{out_dtype}")
  return info, mode


def quantized_matmul(x: jax.Array, w: Any, *, x_scale: jax.Array | None = None,
                     out_dtype=None,
                     implementation: str | Sequence[str] | None = None) -> jax.Array:
  """``x @ dequant(w)`` with the dequantisation (or the scales) fused into the kernel.

  Args:
    x: ``[..., K]``: bfloat16 / float16 / float32 (weight-only), int8 (W8A8) or float8.
    w: a ``jaxeff.quant.QArray`` ``[K, N]`` quantized along K (axis 0), or a
      :class:`PackedWeight` from :func:`prepack`.
    x_scale: float32 ``[..., 1]`` (per token) or ``[]`` (per tensor) for int8 / float8
      ``x``; fp8 also ``[..., K // 128]`` (1 x 128 tiles). None for float ``x``.
    out_dtype: output dtype; default ``x.dtype`` for float ``x``, bfloat16 otherwise.
    implementation: None (fastest available), a name or a sequence of names
      (``"mosaic_gpu"``, ``"triton"``, ``"xla"``; ``":interpret"`` suffix for kernels).

  Returns:
    ``[..., N]`` in ``out_dtype``.
  """
  info, mode = _validate(x, w, x_scale, out_dtype)
  if out_dtype is None:
    out_dtype = x.dtype if mode == "weight_only" else jnp.bfloat16
  out_dtype = jnp.dtype(out_dtype)
  lead = x.shape[:-1]
  x2 = x.reshape(-1, info.k)
  xs2 = None
  if x_scale is not None:
    xs2 = jnp.broadcast_to(x_scale.astype(jnp.float32).reshape(-1, x_scale.shape[-1])
                           if x_scale.ndim else x_scale.astype(jnp.float32).reshape(1, 1),
                           (x2.shape[0], x_scale.shape[-1] if x_scale.ndim else 1))
  out = _registry.dispatch("quantized_matmul", QUANTIZED_MATMUL_IMPLS, implementation, x2, w,
                           xs2, out_dtype=out_dtype)
  return out.reshape(lead + (info.n,))


# ---------------------------------------------------------------------------- fp8 training


def _quantize_rows(a: jax.Array, scaling: str, fmt: str, *, weight_blocks: bool = False):
  """Quantize ``a [R, C]`` (C = the contraction axis) to fp8 for :func:`scaled_matmul_nt`.

  Returns ``(q [R, C], scale)`` with scale ``[R]`` (tensor / row), ``[C // 128, R]``
  (block: 1 x 128 tiles) or ``[C // 128, ceil(R / 128)]`` (128 x 128 tiles when
  ``weight_blocks``).
  """
  r, c = a.shape
  af = a.astype(jnp.float32)
  qmax = QMAX[fmt]
  if scaling == "tensor":
    s = jnp.broadcast_to(jnp.maximum(jnp.max(jnp.abs(af)), _EPS) / qmax, (r,))
    q = af / s[:, None]
  elif scaling == "row":
    s = jnp.maximum(jnp.max(jnp.abs(af), axis=1), _EPS) / qmax
    q = af / s[:, None]
  else:
    ap = _pad2(af, BLOCK if weight_blocks else 1, BLOCK)
    rp, cp = ap.shape
    blocks = jnp.abs(ap).reshape(rp, cp // BLOCK, BLOCK).max(axis=2)  # [Rp, C/128]
    if weight_blocks:
      tiles = jnp.maximum(blocks.reshape(rp // BLOCK, BLOCK, -1).max(axis=1), _EPS) / qmax
      s_full = jnp.repeat(tiles, BLOCK, axis=0)[:r]  # [R, C/128]
    else:
      s_full = (jnp.maximum(blocks, _EPS) / qmax)[:r]  # [R, C/128]
    q = (ap[:r].reshape(r, cp // BLOCK, BLOCK) / s_full[:, :, None]).reshape(r, cp)[:, :c]
    s = tiles.T if weight_blocks else s_full.T
  return q.astype(FP8_FORMATS[fmt]), s


def _scaled_xla(a, b_t, sa, sb, *, scale_mode, out_dtype):
  """The XLA twin of :func:`scaled_matmul_nt` (same quantized inputs, float32 math)."""
  af, bf = _to_float32(a), _to_float32(b_t)
  if scale_mode == "outer":
    out = jnp.dot(af, bf.T, precision=jax.lax.Precision.HIGHEST) * sa[:, None] * sb[None, :]
  else:
    k, n = a.shape[1], b_t.shape[0]
    if sb.shape[1] != n:  # 128 x 128 weight tiles [C/128, ceil(N/128)]
      sb = jnp.repeat(sb, BLOCK, axis=1)[:, :n]
    af = af * jnp.repeat(sa.T, BLOCK, axis=1)[:, :k]
    bf = bf * jnp.repeat(sb.T, BLOCK, axis=1)[:, :k]
    out = jnp.dot(af, bf.T, precision=jax.lax.Precision.HIGHEST)
  return out.astype(out_dtype)


@dataclasses.dataclass(frozen=True)
class _Fp8Call:
  scaling: str
  backend: str  # "mosaic_gpu" or "xla"
  interpret: bool


def _fp8_product(a, b_t, call: _Fp8Call, out_dtype, *, b_is_weight: bool = False):
  """``a [R, C] @ b_t [S, C]^T`` with both operands quantized to fp8 e4m3 on the fly."""
  qa, sa = _quantize_rows(a, call.scaling, "fp8_e4m3")
  qb, sb = _quantize_rows(b_t, call.scaling, "fp8_e4m3", weight_blocks=b_is_weight)
  mode = "block" if call.scaling == "block" else "outer"
  if call.backend == "xla":
    return _scaled_xla(qa, qb, sa, sb, scale_mode=mode, out_dtype=out_dtype)
  return scaled_matmul_nt(qa, qb, sa, sb, scale_mode=mode, out_dtype=out_dtype,
                          interpret=call.interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _fp8_dot(x2, w, call: _Fp8Call):
  return _fp8_product(x2, w.T, call, x2.dtype, b_is_weight=True)


def _fp8_dot_fwd(x2, w, call):
  return _fp8_dot(x2, w, call), (x2, w)


def _fp8_dot_bwd(call, res, dy):
  x2, w = res
  dx = _fp8_product(dy, w, call, x2.dtype, b_is_weight=True)  # [M, N] @ [K, N]^T
  dw = _fp8_product(x2.T, dy.T, call, w.dtype)  # [K, M] @ [N, M]^T
  return dx, dw


_fp8_dot.defvjp(_fp8_dot_fwd, _fp8_dot_bwd)


def _fp8_dot_supports(x2, w, *, scaling):
  del x2, w
  return _block_refused() if scaling == "block" else None


def _fp8_dot_impl(backend: str):
  def fn(x2, w, *, scaling, interpret=False):
    return _fp8_dot(x2, w, _Fp8Call(scaling, backend, bool(interpret)))
  return fn


FP8_DOT_IMPLS: list[_registry.Implementation] = [
    _registry.Implementation("mosaic_gpu", _fp8_dot_impl("mosaic_gpu"), platforms=("gpu",),
                             supports=_fp8_dot_supports, interpretable=True,
                             device_kinds=_registry.HOPPER_KINDS),
    _registry.Implementation("xla", _fp8_dot_impl("xla")),
]


def fp8_dot(x: jax.Array, w: jax.Array, *, scaling: str = "row",
            implementation: str | Sequence[str] | None = None) -> jax.Array:
  """``x @ w`` computed in fp8 e4m3 forward and backward (fp8 training of a linear layer).

  Each of the three products (``y = x w``, ``dx = dy w^T``, ``dw = x^T dy``) quantizes
  both operands along its contraction axis: one scale per tensor (``"tensor"``), per row
  (``"row"``), or per 1 x 128 tile with 128 x 128 tiles for ``w`` (``"block"``,
  DeepSeek-V3's recipe). The ``"xla"`` implementation does the same quantization with an
  XLA dot (the reference for the kernel's gradients); on GPUs it also serves ``"block"``
  until the kernel has passed there (``BLOCK_SCALED_KERNEL``).

  Args:
    x: ``[..., K]`` bfloat16 / float16 / float32.
    w: ``[K, N]`` float (master weights).
    scaling: ``"tensor"``, ``"row"`` or ``"block"``.
    implementation: None, ``"mosaic_gpu"`` (``":interpret"``) or ``"xla"``.

  Returns:
    ``[..., N]`` in ``x.dtype``; differentiable in ``x`` and ``w``.
  """
  if scaling not in SCALINGS:
    raise ValueError(f"fp8_dot: scaling must be one of {SCALINGS}, got {scaling!r}")
  for name, a in (("x", x), ("w", w)):
    if not hasattr(a, "dtype") or a.dtype not in FLOAT_X_DTYPES:
      raise TypeError(f"fp8_dot: {name} must be bfloat16/float16/float32, got "
                      f"{getattr(a, 'dtype', type(a).__name__)}")
  if w.ndim != 2 or x.ndim < 1 or x.shape[-1] != w.shape[0]:
    raise ValueError(f"fp8_dot: x [..., K] and w [K, N] must share K, got x.shape {x.shape} "
                     f"and w.shape {w.shape}")
  x2 = x.reshape(-1, x.shape[-1])
  out = _registry.dispatch("fp8_dot", FP8_DOT_IMPLS, implementation, x2, w, scaling=scaling)
  return out.reshape(x.shape[:-1] + (w.shape[1],))


__all__ = ["PackedWeight", "fp8_dot", "fp8_to_float32", "prepack", "quantize_activations",
           "quantized_matmul", "quantized_matmul_reference", "weight_only_matmul"]
