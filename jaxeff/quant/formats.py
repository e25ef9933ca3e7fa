"""Quantized-tensor container (:class:`QArray`), bit packing and round-to-nearest quantization.

A quantized tensor stores integer (or fp8) codes ``q`` plus float32 ``scales`` and, for
asymmetric formats, float32 ``zeros``; its value is ``w = (q - zero) * scale``
(``w = q * scale`` when symmetric). Scales follow the groups of the *group axis*
(``axis``): a 2-D weight ``w [K, N]`` with ``axis=0`` and ``group_size=g`` has
``scales, zeros: [K // g, N]``; per-channel (``group_size=None``) ``[1, N]``; per-tensor
``[1, 1]``. In general a scale array has the tensor's rank and every scale dimension
divides the tensor's: scale ``s[i, j]`` covers the block
``w[i*bk:(i+1)*bk, j*bn:(j+1)*bn]`` with ``bk = K // s.shape[0]``, ``bn = N // s.shape[1]``
(this also describes the 128x128 block scales of DeepSeek-V3/DeepGEMM-style fp8).
``axis=1`` on ``[K, N]`` (``scales [K, N // g]``) is the *per-input-channel* grouping of
AdaDim (Heo et al., 2023, "Rethinking Channel Dimensions to Isolate Outliers for Low-bit
Weight Quantization of LLMs").

Formats (``fmt``), code ranges and storage (``values``); integer codes are *always packed
along axis 0* (the contraction axis ``K`` of a ``[K, N]`` weight), independent of ``axis``:

=========== ============ ============== ======================= ================================
fmt         symmetric q  asymmetric q   values dtype/shape      packing along axis 0
=========== ============ ============== ======================= ================================
int8        [-127, 127]  [0, 255]       int8 / uint8 [K, N]     none
int6        [-32, 31]    [0, 63]        uint8 [K // 4 * 3, N]   4 codes -> 24-bit word -> 3 bytes
int4        [-8, 7]      [0, 15]        uint8 [K // 2, N]       2 codes -> 1 byte
int3        [-4, 3]      [0, 7]         uint8 [K // 8 * 3, N]   8 codes -> 24-bit word -> 3 bytes
int2        [-2, 1]      [0, 3]         uint8 [K // 4, N]       4 codes -> 1 byte
fp8_e4m3    symmetric only              float8_e4m3fn [K, N]    none (scale = amax / 448)
fp8_e5m2    symmetric only              float8_e5m2 [K, N]      none (scale = amax / 57344)
=========== ============ ============== ======================= ================================

Bit packing (one rule for every width ``b``): rows ``k = c*i + j`` (``c`` codes per word,
``j = 0..c-1``) form the little-endian word ``word_i = sum_j (q[c*i + j] & (2^b - 1)) << (b*j)``,
stored as bytes ``values[B*i + t] = (word_i >> 8t) & 0xFF`` (``B`` bytes per word). For int4
this is ``byte = (q[2i] & 0xF) | ((q[2i+1] & 0xF) << 4)`` (low nibble = even row). Signed
codes are sign-extended on unpacking. Symmetric scales are ``amax / qmax`` (``qmax = 127, 31,
7, 3, 1``; the extra negative code is used only by rounding ties); asymmetric ones are
``(max - min) / (2^b - 1)`` over a range that includes 0, with ``zero = round(-min / scale)``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class FormatSpec:
  """Static description of one quantization format (module docstring table)."""

  name: str
  bits: int
  kind: str  # "int" or "float"
  qmin_sym: float
  qmax_sym: float
  float_dtype: object = None  # fp8 storage dtype

  @property
  def qmax_asym(self) -> int:
    return 2 ** self.bits - 1

  @property
  def packed(self) -> bool:
    return self.kind == "int" and self.bits < 8

  @property
  def codes_per_word(self) -> int:
    return math.lcm(self.bits, 8) // self.bits

  @property
  def bytes_per_word(self) -> int:
    return math.lcm(self.bits, 8) // 8


FORMATS: dict[str, FormatSpec] = {
    "int8": FormatSpec("int8", 8, "int", -127, 127),
    "int6": FormatSpec("int6", 6, "int", -32, 31),
    "int4": FormatSpec("int4", 4, "int", -8, 7),
    "int3": FormatSpec("int3", 3, "int", -4, 3),
    "int2": FormatSpec("int2", 2, "int", -2, 1),
    "fp8_e4m3": FormatSpec("fp8_e4m3", 8, "float", -448.0, 448.0, jnp.float8_e4m3fn),
    "fp8_e5m2": FormatSpec("fp8_e5m2", 8, "float", -57344.0, 57344.0, jnp.float8_e5m2),
}

INT_BITS = {2: "int2", 3: "int3", 4: "int4", 6: "int6", 8: "int8"}


def format_spec(fmt: str, *, name: str = "fmt") -> FormatSpec:
  """Returns the :class:`FormatSpec` of ``fmt`` or raises a ValueError listing the formats."""
  if fmt not in FORMATS:
    raise ValueError(f"{name}: unsupported quantization format {fmt!r}; expected one of "
                     f"{sorted(FORMATS)}")
  return FORMATS[fmt]


def int_format(bits: int) -> str:
  """``bits`` -> integer format name (``4 -> "int4"``); ValueError for unsupported widths."""
  if bits not in INT_BITS:
    raise ValueError(f"bits: unsupported bit width {bits}; expected one of {sorted(INT_BITS)}")
  return INT_BITS[bits]


@dataclasses.dataclass(frozen=True)
class QArray:
  """A quantized tensor: ``dequantize(qa) = (unpack(values) - zeros) * scales`` per block.

  Fields (module docstring for layouts):
    values: packed codes (uint8 for int2/3/4/6, int8/uint8 for int8, float8 for fp8).
    scales: float32, same rank as ``shape``, each dim dividing ``shape``'s;
      ``[K // group_size, N]`` for a grouped ``[K, N]`` weight with ``axis=0``.
    zeros: float32 zero points shaped like ``scales`` (asymmetric only) or None.
    fmt: format name (:data:`FORMATS`).
    shape: logical (unpacked) shape.
    axis: the axis groups run along (0 = contraction axis ``K`` of a ``[K, N]`` weight).
    group_size: codes per group along ``axis``; None = one group spanning the axis.
    symmetric: whether ``zeros`` is absent.
  """

  values: jax.Array
  scales: jax.Array
  zeros: jax.Array | None
  fmt: str
  shape: tuple[int, ...]
  axis: int = 0
  group_size: int | None = None
  symmetric: bool = True

  @property
  def spec(self) -> FormatSpec:
    return format_spec(self.fmt)

  @property
  def bits(self) -> int:
    return self.spec.bits

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def num_groups(self) -> int:
    """Groups along ``axis`` (``scales.shape[axis]``)."""
    return 1 if self.group_size is None else self.shape[self.axis] // self.group_size

  @property
  def is_fp8(self) -> bool:
    return self.spec.kind == "float"

  @property
  def nbytes(self) -> int:
    """Storage bytes of values, scales and zeros."""
    n = _nbytes(self.values) + _nbytes(self.scales)
    return n + (0 if self.zeros is None else _nbytes(self.zeros))

  def dequantize(self, dtype=jnp.float32) -> jax.Array:
    return dequantize(self, dtype)


jax.tree_util.register_dataclass(
    QArray, data_fields=["values", "scales", "zeros"],
    meta_fields=["fmt", "shape", "axis", "group_size", "symmetric"])


def _nbytes(x) -> int:
  return math.prod(x.shape) * jnp.dtype(x.dtype).itemsize


# ----------------------------------------------------------------------------- packing


def packed_shape(shape: Sequence[int], fmt: str) -> tuple[int, ...]:
  """Storage shape of ``values`` for a logical ``shape`` (packing along axis 0)."""
  spec = format_spec(fmt)
  shape = tuple(shape)
  if not spec.packed:
    return shape
  return (shape[0] // spec.codes_per_word * spec.bytes_per_word,) + shape[1:]


def pack_bits(q: jax.Array, bits: int) -> jax.Array:
  """Packs integer codes of width ``bits`` along axis 0 (module docstring layout).

  Args:
    q: ``[K, ...]`` integer codes (signed or unsigned; only the low ``bits`` bits are kept).
    bits: 2, 3, 4 or 6.

  Returns:
    ``[K // c * B, ...]`` uint8, ``c`` codes per ``B``-byte word (``bits=4``: ``[K // 2, ...]``).
  """
  spec = format_spec(int_format(bits))
  if not spec.packed:
    raise ValueError(f"bits: pack_bits packs 2, 3, 4 or 6-bit codes, got {bits}")
  if not jnp.issubdtype(q.dtype, jnp.integer):
    raise TypeError(f"q: expected integer codes, got dtype {q.dtype}")
  c, nb = spec.codes_per_word, spec.bytes_per_word
  if q.ndim == 0 or q.shape[0] % c:
    raise ValueError(f"q: axis 0 (K) of shape {q.shape} must be divisible by the packing "
                     f"factor {c} of {bits}-bit codes")
  return _pack_bits(q, bits)


@functools.partial(jax.jit, static_argnums=(1,))
def _pack_bits(q, bits):
  spec = format_spec(int_format(bits))
  c, nb = spec.codes_per_word, spec.bytes_per_word
  rest = q.shape[1:]
  u = (q.astype(jnp.int32) & (2 ** bits - 1)).astype(jnp.uint32).reshape((-1, c) + rest)
  word = u[:, 0]
  for j in range(1, c):
    word = word | (u[:, j] << (bits * j))
  out = jnp.stack([(word >> (8 * t)) & 0xFF for t in range(nb)], axis=1)
  return out.reshape((-1,) + rest).astype(jnp.uint8)


def unpack_bits(packed: jax.Array, bits: int, *, signed: bool = True) -> jax.Array:
  """Inverse of :func:`pack_bits`: ``[K // c * B, ...]`` uint8 -> ``[K, ...]`` int8 codes.

  ``signed=True`` sign-extends (symmetric codes), ``False`` returns ``[0, 2^bits)``.
  """
  spec = format_spec(int_format(bits))
  if not spec.packed:
    raise ValueError(f"bits: unpack_bits unpacks 2, 3, 4 or 6-bit codes, got {bits}")
  if packed.dtype != jnp.uint8:
    raise TypeError(f"packed: expected uint8, got dtype {packed.dtype}")
  c, nb = spec.codes_per_word, spec.bytes_per_word
  if packed.ndim == 0 or packed.shape[0] % nb:
    raise ValueError(f"packed: axis 0 of shape {packed.shape} must be divisible by the "
                     f"{nb} bytes per word of {bits}-bit codes")
  return _unpack_bits(packed, bits, signed)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _unpack_bits(packed, bits, signed):
  spec = format_spec(int_format(bits))
  c, nb = spec.codes_per_word, spec.bytes_per_word
  rest = packed.shape[1:]
  b = packed.astype(jnp.uint32).reshape((-1, nb) + rest)
  word = b[:, 0]
  for t in range(1, nb):
    word = word | (b[:, t] << (8 * t))
  mask = 2 ** bits - 1
  codes = jnp.stack([(word >> (bits * j)) & mask for j in range(c)], axis=1).astype(jnp.int32)
  if signed:
    codes = jnp.where(codes >= 2 ** (bits - 1), codes - 2 ** bits, codes)
  return codes.reshape((-1,) + rest).astype(jnp.int8 if signed else jnp.uint8)


def pack_int4(q: jax.Array) -> jax.Array:
  """``q: [K, ...]`` int codes -> ``[K // 2, ...]`` uint8, ``byte = q[2i] & 0xF | q[2i+1] << 4``."""
  return pack_bits(q, 4)


def unpack_int4(packed: jax.Array, *, signed: bool = True) -> jax.Array:
  """``[K // 2, ...]`` uint8 -> ``[K, ...]`` int8 codes (low nibble = even row)."""
  return unpack_bits(packed, 4, signed=signed)


def pack_int2(q: jax.Array) -> jax.Array:
  """``q: [K, ...]`` -> ``[K // 4, ...]`` uint8 (row ``4i+j`` in bits ``2j..2j+1``)."""
  return pack_bits(q, 2)


def unpack_int2(packed: jax.Array, *, signed: bool = True) -> jax.Array:
  """``[K // 4, ...]`` uint8 -> ``[K, ...]`` int8 codes."""
  return unpack_bits(packed, 2, signed=signed)


def pack_int3(q: jax.Array) -> jax.Array:
  """``q: [K, ...]`` -> ``[K // 8 * 3, ...]`` uint8 (8 codes per little-endian 24-bit word)."""
  return pack_bits(q, 3)


def unpack_int3(packed: jax.Array, *, signed: bool = True) -> jax.Array:
  """``[K // 8 * 3, ...]`` uint8 -> ``[K, ...]`` int8 codes."""
  return unpack_bits(packed, 3, signed=signed)


def pack_int6(q: jax.Array) -> jax.Array:
  """``q: [K, ...]`` -> ``[K // 4 * 3, ...]`` uint8 (4 codes per little-endian 24-bit word)."""
  return pack_bits(q, 6)


def unpack_int6(packed: jax.Array, *, signed: bool = True) -> jax.Array:
  """``[K // 4 * 3, ...]`` uint8 -> ``[K, ...]`` int8 codes."""
  return unpack_bits(packed, 6, signed=signed)


# ------------------------------------------------------------------------ validation


def _normalize_axis(axis: int, ndim: int, name: str = "axis") -> int:
  if not -ndim <= axis < ndim:
    raise ValueError(f"{name}: {axis} is out of range for a rank-{ndim} tensor")
  return axis % ndim


def check_group_size(shape: Sequence[int], axis: int, group_size: int | None) -> None:
  """Raises a ValueError naming ``group_size`` unless it is None or divides ``shape[axis]``."""
  if group_size is None:
    return
  if not isinstance(group_size, (int, np.integer)) or group_size <= 0:
    raise ValueError(f"group_size: expected a positive int or None, got {group_size!r}")
  if shape[axis] % group_size:
    raise ValueError(f"group_size: {group_size} does not divide the length {shape[axis]} of "
                     f"axis {axis} of shape {tuple(shape)}")


def check_qarray(qa: QArray) -> None:
  """Validates a :class:`QArray`'s static fields and array shapes/dtypes (trace-time)."""
  spec = format_spec(qa.fmt, name="qa.fmt")
  shape = tuple(qa.shape)
  if not shape:
    raise ValueError("qa.shape: quantized tensors need rank >= 1, got ()")
  axis = _normalize_axis(qa.axis, len(shape), "qa.axis")
  check_group_size(shape, axis, qa.group_size)
  if spec.packed and shape[0] % spec.codes_per_word:
    raise ValueError(f"qa.shape: axis 0 length {shape[0]} must be divisible by the packing "
                     f"factor {spec.codes_per_word} of {qa.fmt}")
  want = packed_shape(shape, qa.fmt)
  if tuple(qa.values.shape) != want:
    raise ValueError(f"qa.values: shape {tuple(qa.values.shape)} does not match the "
                     f"{qa.fmt} storage shape {want} of logical shape {shape}")
  want_dtype = _storage_dtype(qa.fmt, qa.symmetric)
  if jnp.dtype(qa.values.dtype) != want_dtype:
    raise TypeError(f"qa.values: dtype {qa.values.dtype} does not match the "
                    f"{'symmetric' if qa.symmetric else 'asymmetric'} {qa.fmt} storage "
                    f"dtype {want_dtype}")
  s = tuple(qa.scales.shape)
  if len(s) != len(shape) or any(d == 0 or n % d for n, d in zip(shape, s)):
    raise ValueError(f"qa.scales: shape {s} must have rank {len(shape)} with every dim "
                     f"dividing the tensor shape {shape}")
  if s[axis] != qa.num_groups and s != (1,) * len(shape):
    raise ValueError(f"qa.scales: shape {s} has {s[axis]} groups along axis {axis}, expected "
                     f"{qa.num_groups} (group_size={qa.group_size}) or a per-tensor scale "
                     f"{(1,) * len(shape)}")
  if qa.symmetric != (qa.zeros is None):
    raise ValueError(f"qa.zeros: symmetric={qa.symmetric} requires zeros "
                     f"{'None' if qa.symmetric else 'present'}")
  if qa.zeros is not None and tuple(qa.zeros.shape) != s:
    raise ValueError(f"qa.zeros: shape {tuple(qa.zeros.shape)} must equal scales' {s}")
  if not qa.symmetric and spec.kind == "float":
    raise ValueError(f"qa.symmetric: {qa.fmt} is symmetric only")


def _storage_dtype(fmt: str, symmetric: bool):
  spec = format_spec(fmt)
  if spec.kind == "float":
    return jnp.dtype(spec.float_dtype)
  if spec.packed:
    return jnp.dtype(jnp.uint8)
  return jnp.dtype(jnp.int8 if symmetric else jnp.uint8)


# ------------------------------------------------------------------ scales and quantize


def _expand(s: jax.Array, shape: Sequence[int]) -> jax.Array:
  """Repeats block scales ``s`` (each dim dividing ``shape``'s) to the full ``shape``."""
  for d, (n, m) in enumerate(zip(shape, s.shape)):
    if m != n and m != 1:
      s = jnp.repeat(s, n // m, axis=d)
  return s


def _reduce_blocks(w: jax.Array, block_shape: Sequence[int], op) -> jax.Array:
  """Reduces ``w`` over blocks of ``block_shape`` -> ``[shape[d] // block_shape[d], ...]``."""
  split = []
  for n, b in zip(w.shape, block_shape):
    split += [n // b, b]
  r = w.reshape(split)
  return op(r, axis=tuple(range(1, 2 * w.ndim, 2)))


def scale_block_shape(shape: Sequence[int], axis: int, group_size: int | None,
                      per_tensor: bool = False) -> tuple[int, ...]:
  """Block covered by one scale: ``group_size`` (or the whole axis) along ``axis``, 1 on the
  other axes (per channel), or the whole tensor when ``per_tensor``."""
  shape = tuple(shape)
  if per_tensor:
    return shape
  return tuple((n if group_size is None else group_size) if d == axis else 1
               for d, n in enumerate(shape))


def compute_scales(w: jax.Array, fmt: str, *, axis: int = 0, group_size: int | None = None,
                   symmetric: bool = True, per_tensor: bool = False,
                   clip_ratio: float | jax.Array = 1.0) -> tuple[jax.Array, jax.Array | None]:
  """Round-to-nearest scales (and zeros) of ``w`` for ``fmt``.

  Args:
    w: ``[K, N]`` (any rank) float tensor.
    clip_ratio: multiplies the range (``< 1`` clips outliers; broadcastable to the scales).

  Returns:
    ``(scales, zeros)``, float32 with the tensor's rank (``[K // group_size, N]`` for
    ``axis=0``); ``zeros`` None when symmetric.
  """
  spec = format_spec(fmt)
  axis = _normalize_axis(axis, w.ndim)
  check_group_size(w.shape, axis, group_size)
  if not symmetric and spec.kind == "float":
    raise ValueError(f"symmetric: {fmt} supports symmetric quantization only")
  block = scale_block_shape(w.shape, axis, group_size, per_tensor)
  w = w.astype(jnp.float32)
  if symmetric:
    amax = _reduce_blocks(jnp.abs(w), block, jnp.max) * clip_ratio
    scales = jnp.where(amax > 0, amax / spec.qmax_sym, 1.0)
    return scales.astype(jnp.float32), None
  wmax = jnp.maximum(_reduce_blocks(w, block, jnp.max), 0.0) * clip_ratio
  wmin = jnp.minimum(_reduce_blocks(w, block, jnp.min), 0.0) * clip_ratio
  rng = wmax - wmin
  scales = jnp.where(rng > 0, rng / spec.qmax_asym, 1.0)
  zeros = jnp.clip(jnp.round(-wmin / scales), 0, spec.qmax_asym)
  return scales.astype(jnp.float32), zeros.astype(jnp.float32)


def quantize_codes(w: jax.Array, scales: jax.Array, zeros: jax.Array | None,
                   fmt: str) -> jax.Array:
  """Unpacked codes of ``w`` for given block ``scales``/``zeros`` (round to nearest, clip).

  Returns int32 codes (int formats) or fp8 values, shaped like ``w``.
  """
  spec = format_spec(fmt)
  x = w.astype(jnp.float32) / _expand(scales, w.shape)
  if spec.kind == "float":
    return jnp.clip(x, spec.qmin_sym, spec.qmax_sym).astype(spec.float_dtype)
  if zeros is None:
    return jnp.clip(jnp.round(x), spec.qmin_sym, spec.qmax_sym).astype(jnp.int32)
  return jnp.clip(jnp.round(x) + _expand(zeros, w.shape), 0, spec.qmax_asym).astype(jnp.int32)


def dequantize_codes(q: jax.Array, scales: jax.Array, zeros: jax.Array | None,
                     dtype=jnp.float32) -> jax.Array:
  """``(q - zeros) * scales`` with block scales expanded to ``q``'s shape (float32 math)."""
  x = q.astype(jnp.float32)
  if zeros is not None:
    x = x - _expand(zeros, q.shape)
  return (x * _expand(scales, q.shape)).astype(dtype)


@functools.partial(jax.jit, static_argnames=("fmt", "axis", "group_size", "symmetric",
                                             "per_tensor"))
def fake_quantize(w: jax.Array, fmt: str, *, axis: int = 0, group_size: int | None = None,
                  symmetric: bool = True, per_tensor: bool = False,
                  clip_ratio: float | jax.Array = 1.0) -> jax.Array:
  """``dequantize(quantize_tensor(w, ...))`` without packing, in ``w``'s dtype (no STE)."""
  scales, zeros = compute_scales(w, fmt, axis=axis, group_size=group_size, symmetric=symmetric,
                                 per_tensor=per_tensor, clip_ratio=clip_ratio)
  return dequantize_codes(quantize_codes(w, scales, zeros, fmt), scales, zeros, w.dtype)


def pack_codes(q: jax.Array, fmt: str, symmetric: bool = True) -> jax.Array:
  """Unpacked codes -> ``values`` storage of ``fmt`` (module docstring table)."""
  spec = format_spec(fmt)
  if spec.kind == "float":
    return q.astype(spec.float_dtype)
  if spec.packed:
    return pack_bits(q, spec.bits)
  return q.astype(jnp.int8 if symmetric else jnp.uint8)


def unpack_codes(qa: QArray) -> jax.Array:
  """``qa.values`` -> unpacked codes ``[*qa.shape]`` (int8/uint8, or fp8 values)."""
  spec = qa.spec
  if spec.packed:
    return unpack_bits(qa.values, spec.bits, signed=qa.symmetric)
  return qa.values


def quantize_with_scales(w: jax.Array, scales: jax.Array, zeros: jax.Array | None, fmt: str, *,
                         axis: int = 0, group_size: int | None = None) -> QArray:
  """Quantizes ``w`` with given block ``scales``/``zeros`` into a :class:`QArray`."""
  axis = _normalize_axis(axis, w.ndim)
  scales = jnp.asarray(scales, jnp.float32)
  zeros = None if zeros is None else jnp.asarray(zeros, jnp.float32)
  qa = QArray(jax.ShapeDtypeStruct(packed_shape(w.shape, fmt), _storage_dtype(fmt, zeros is None)),
              scales, zeros, fmt, tuple(w.shape), axis, group_size, zeros is None)
  check_qarray(qa)
  return dataclasses.replace(qa, values=_quantize_pack(w, scales, zeros, fmt))


@functools.partial(jax.jit, static_argnums=(3,))
def _quantize_pack(w, scales, zeros, fmt):
  return pack_codes(quantize_codes(w, scales, zeros, fmt), fmt, zeros is None)


def quantize_tensor(w: jax.Array, fmt: str, *, axis: int = 0, group_size: int | None = None,
                    symmetric: bool = True, per_tensor: bool = False,
                    clip_ratio: float | jax.Array = 1.0) -> QArray:
  """Round-to-nearest quantization of ``w`` into a :class:`QArray`.

  Args:
    w: ``[K, N]`` weight (any rank >= 1; packing runs along axis 0).
    fmt: one of :data:`FORMATS`.
    axis: the axis groups run along (0 = ``K``; 1 = per-input-channel grouping, AdaDim).
    group_size: codes per scale along ``axis``; None = per channel (one group per axis).
    symmetric: ``w = q * scale`` if True, else ``w = (q - zero) * scale`` (int formats).
    per_tensor: one scale for the whole tensor (``scales [1, ..., 1]``).
    clip_ratio: shrinks the range before computing scales (outlier clipping).

  Returns:
    A :class:`QArray` with ``scales [K // group_size, N]`` (``axis=0``).
  """
  spec = format_spec(fmt)
  w = jnp.asarray(w)
  if not jnp.issubdtype(w.dtype, jnp.floating):
    raise TypeError(f"w: expected a floating-point tensor, got dtype {w.dtype}")
  if w.ndim == 0:
    raise ValueError("w: expected rank >= 1, got a scalar")
  axis = _normalize_axis(axis, w.ndim)
  check_group_size(w.shape, axis, group_size)
  if spec.packed and w.shape[0] % spec.codes_per_word:
    raise ValueError(f"w: axis 0 (K) length {w.shape[0]} must be divisible by the packing "
                     f"factor {spec.codes_per_word} of {fmt}")
  if per_tensor and group_size is not None:
    raise ValueError(f"group_size: must be None with per_tensor=True, got {group_size}")
  scales, zeros = _rtn_scales(w, jnp.asarray(clip_ratio, jnp.float32), fmt, axis, group_size,
                              symmetric, per_tensor)
  return quantize_with_scales(w, scales, zeros, fmt, axis=axis, group_size=group_size)


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5, 6))
def _rtn_scales(w, clip_ratio, fmt, axis, group_size, symmetric, per_tensor):
  return compute_scales(w, fmt, axis=axis, group_size=group_size, symmetric=symmetric,
                        per_tensor=per_tensor, clip_ratio=clip_ratio)


def dequantize(qa: QArray, dtype=jnp.float32) -> jax.Array:
  """Reference dequantization: ``[*qa.shape]`` in ``dtype``, ``(q - zeros) * scales``."""
  if not isinstance(qa, QArray):
    raise TypeError(f"qa: expected a QArray, got {type(qa).__name__}")
  check_qarray(qa)
  return _dequantize(qa, jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=(1,))
def _dequantize(qa, dtype):
  return dequantize_codes(unpack_codes(qa), qa.scales, qa.zeros, dtype)


# ---------------------------------------------------------- activation treatment (W8A8)


@dataclasses.dataclass(frozen=True)
class ActQuant:
  """How a quantized linear layer treats its input ``x [..., K]`` (a params-tree leaf stored
  next to the layer's ``kernel``).

  Fields:
    input_scale: float32 ``[K]`` multiplying ``x`` before the matmul (the inverse of the
      AWQ / SmoothQuant per-channel smoothing factors folded into the weight), or None.
    fmt: dynamic per-token activation quantization format (``"int8"``, ``"fp8_e4m3"``;
      W8A8, through :func:`jaxeff.ops.quantized_matmul.quantize_activations`), or None for
      weight-only layers. Static, so it is part of the tree structure
      (jit traces differ between weight-only and W8A8 params).
  """

  input_scale: jax.Array | None = None
  fmt: str | None = None


jax.tree_util.register_dataclass(ActQuant, data_fields=["input_scale"], meta_fields=["fmt"])

