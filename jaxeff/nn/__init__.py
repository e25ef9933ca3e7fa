"""Flax Linen modules built on :mod:`jaxeff.ops`."""

from jaxeff.nn.attention import KVCache, MultiHeadAttention
from jaxeff.nn.mlp import SwiGLU
from jaxeff.nn.moe import MoE
from jaxeff.nn.normalization import LayerNorm, RMSNorm
from jaxeff.nn.quant import QuantDense, prepack_params, quantized_inference
from jaxeff.nn.rope import apply_rope, rope_frequencies
from jaxeff.nn.sparse import CatsSwiGLU, SparseDense, compress_params, sparse_inference
from jaxeff.nn.spectral import (AdaptiveFrequencyFilter, FFTConv, GlobalFilter, HyenaOperator,
                                SpectralDense, sst_mask_gradients, sst_reorthogonalize)

__all__ = [
    "AdaptiveFrequencyFilter", "CatsSwiGLU", "FFTConv", "GlobalFilter", "HyenaOperator",
    "KVCache", "LayerNorm", "MoE", "MultiHeadAttention", "QuantDense", "RMSNorm",
    "SparseDense", "SpectralDense", "SwiGLU", "apply_rope", "compress_params", "prepack_params",
    "quantized_inference", "rope_frequencies", "sparse_inference", "sst_mask_gradients",
    "sst_reorthogonalize",
]
