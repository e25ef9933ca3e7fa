"""The public functional API of jaxeff: one module per op family.

Every op validates its inputs, picks an implementation (``implementation=``; see
:mod:`jaxeff.ops._registry`) and keeps its pure-jnp reference next to the kernels.
"""

from jaxeff.ops.attention import dot_product_attention, dot_product_attention_with_lse
from jaxeff.ops.normalization import layer_norm, rms_norm
from jaxeff.ops.fft_conv import fft_conv
from jaxeff.ops.grouped_matmul import grouped_matmul, transposed_grouped_matmul
from jaxeff.ops.decode_attention import decode_attention, decode_attention_with_lse
from jaxeff.ops.quantized_matmul import (PackedWeight, fp8_dot, prepack, quantize_activations,
                                         quantized_matmul)

__all__ = ["dot_product_attention", "dot_product_attention_with_lse", "layer_norm", "rms_norm"]
__all__ += ["decode_attention", "decode_attention_with_lse"]
__all__ += ["PackedWeight", "fp8_dot", "prepack", "quantize_activations", "quantized_matmul"]
__all__ += ["fft_conv"]
__all__ += ["grouped_matmul", "transposed_grouped_matmul"]
