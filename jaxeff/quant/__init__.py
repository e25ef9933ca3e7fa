"""Quantization formats and algorithms (not kernels): the :class:`QArray` container,
bit packing, round-to-nearest, AWQ, GPTQ, SmoothQuant, mixed precision, QAT fake-quant and
model-level :func:`quantize` with regex rules over parameter paths."""

from jaxeff.quant.formats import (
    FORMATS,
    ActQuant,
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
    "FORMATS", "ActQuant", "FormatSpec", "QArray", "check_qarray", "compute_scales", "dequantize",
    "fake_quantize", "format_spec", "int_format", "pack_bits", "pack_int2", "pack_int3",
    "pack_int4", "pack_int6", "packed_shape", "quantize_tensor", "quantize_with_scales",
    "unpack_bits", "unpack_int2", "unpack_int3", "unpack_int4", "unpack_int6",
]

from jaxeff.quant.awq import awq_quantize
from jaxeff.quant.gptq import gptq_quantize, hessian
from jaxeff.quant.mixed_precision import allocate_bits
from jaxeff.quant.model import (
    METHODS,
    QuantRule,
    calibrate,
    mixed_precision_rules,
    model_bytes,
    quantize,
)
from jaxeff.quant.qat import fake_quant_params, fake_quant_ste
from jaxeff.quant.rtn import adadim_quantize, rtn_quantize
from jaxeff.quant.smoothquant import smoothquant_quantize, smoothquant_scales

__all__ += [
    "METHODS", "QuantRule", "adadim_quantize", "allocate_bits", "awq_quantize", "calibrate",
    "fake_quant_params", "fake_quant_ste", "gptq_quantize", "hessian", "mixed_precision_rules",
    "model_bytes", "quantize", "rtn_quantize", "smoothquant_quantize", "smoothquant_scales",
]
