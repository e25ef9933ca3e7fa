"""The public functional API of jaxeff: one module per op family.

Every op validates its inputs, picks an implementation (``implementation=``; see
:mod:`jaxeff.ops._registry`) and keeps its pure-jnp reference next to the kernels.
Functions share their module's name in several families (``quantized_matmul``,
``sparse_matmul``, ``grouped_matmul``, ``fft_conv``, ``decode_attention``): the package
attribute is the function; import the module with ``from jaxeff.ops.<name> import ...``
or ``importlib.import_module("jaxeff.ops.<name>")``.
"""

from jaxeff.ops.attention import (dot_product_attention, dot_product_attention_with_lse,
                                  flash_attention_backward)
from jaxeff.ops.decode_attention import decode_attention, decode_attention_with_lse
from jaxeff.ops.fft_conv import fft_conv
from jaxeff.ops.grouped_matmul import grouped_matmul, transposed_grouped_matmul
from jaxeff.ops.normalization import layer_norm, rms_norm
from jaxeff.ops.quantized_matmul import (PackedWeight, fp8_dot, prepack, quantize_activations,
                                         quantized_matmul)
from jaxeff.ops.sparse_matmul import cats_mlp, sparse_matmul

__all__ = [
    "PackedWeight", "cats_mlp", "decode_attention", "decode_attention_with_lse",
    "dot_product_attention", "dot_product_attention_with_lse", "fft_conv", "flash_attention_backward",
    "fp8_dot",
    "grouped_matmul", "layer_norm", "prepack", "quantize_activations", "quantized_matmul",
    "rms_norm", "sparse_matmul", "transposed_grouped_matmul",
]
