"""Quantized matmul kernels: the math every backend shares.

A weight ``w: [K, N]`` is stored quantized along the contraction axis K (axis 0) with
scales ``[K // group, N]`` (per-channel: one group of K rows; per-tensor: ``[1, 1]``) and,
for asymmetric formats, zero points of the same shape:

  w[k, n] = (q[k, n] - zero[k // group, n]) * scale[k // group, n]

Physical layouts (``jaxeff.quant`` containers):

* int8: ``int8 [K, N]``, q in [-127, 127].
* int4: ``uint8 [K // 2, N]``, two values per byte along K:
  ``byte[i, n] = (q[2i, n] & 0xF) | ((q[2i + 1, n] & 0xF) << 4)``; symmetric q in [-8, 7]
  (the nibble is two's complement), asymmetric q in [0, 15].
* fp8: ``float8_e4m3fn / float8_e5m2 [K, N]``.

Kernels (one file per backend):

* :mod:`kernels_pallas.matmul.triton`: weight-only int4 / int8 matmul with the
  dequantisation fused (``y = x @ dequant(w)``), split-K for skinny ``x`` (decode).
* :mod:`kernels_pallas.matmul.mosaic_gpu`: Hopper ``wgmma`` matmul of two 8-bit (int8 or
  fp8) or 16-bit operands with per-row x per-column scales in the epilogue (W8A8, fp8
  per-tensor / per-row) or per-128-K-block scales applied to each K step's partial
  product (DeepGEMM-style fp8 block scaling).

The functions below are the element-wise formulas both the kernels and the op's
reference call.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

INT4_MASK = 0xF
INT4_SIGN = 0x8


def int4_low(packed: jax.Array, *, signed: bool) -> jax.Array:
  """The even-K nibble of each byte of ``packed`` (uint8) as int32 (two's complement if signed)."""
  q = packed.astype(jnp.int32) & INT4_MASK
  return (q ^ INT4_SIGN) - INT4_SIGN if signed else q


def int4_high(packed: jax.Array, *, signed: bool) -> jax.Array:
  """The odd-K nibble of each byte of ``packed`` (uint8) as int32 (two's complement if signed)."""
  q = (packed.astype(jnp.int32) >> 4) & INT4_MASK
  return (q ^ INT4_SIGN) - INT4_SIGN if signed else q


def dequantize_values(q: jax.Array, scale: jax.Array, zero: jax.Array | None) -> jax.Array:
  """``(q - zero) * scale`` in float32 (``scale`` / ``zero`` already broadcast to ``q``)."""
  qf = q.astype(jnp.float32)
  if zero is not None:
    qf = qf - zero
  return qf * scale
