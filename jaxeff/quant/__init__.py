"""Quantization formats and algorithms (not kernels): the :class:`QArray` container,
bit packing, round-to-nearest, AWQ, GPTQ, SmoothQuant, mixed precision, QAT fake-quant and
model-level :func:`quantize` with regex rules over parameter paths."""

from jaxeff.quant.formats import (
    FORMATS,
    FormatSpec,
    QArray,
    check_qarray,
    compute_scales,
    dequantize,
    fake_quantize,
    format_spec,
    int_format,
    pack_bits,
    pack_int2,
    pack_int3,
    pack_int4,
    pack_int6,
    packed_shape,
    quantize_tensor,
    quantize_with_scales,
    unpack_bits,
    unpack_int2,
    unpack_int3,
    unpack_int4,
    unpack_int6,
)

__all__ = [
    "FORMATS", "FormatSpec", "QArray", "check_qarray", "compute_scales", "dequantize",
    "fake_quantize", "format_spec", "int_format", "pack_bits", "pack_int2", "pack_int3",
    "pack_int4", "pack_int6", "packed_shape", "quantize_tensor", "quantize_with_scales",
    "unpack_bits", "unpack_int2", "unpack_int3", "unpack_int4", "unpack_int6",
]
