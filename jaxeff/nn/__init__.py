"""Flax Linen modules built on :mod:`jaxeff.ops`."""

from jaxeff.nn.normalization import LayerNorm, RMSNorm

__all__ = ["LayerNorm", "RMSNorm"]
