"""Fused RMSNorm and LayerNorm kernels: the math every backend shares.

RMSNorm (Zhang & Sennrich, 2019) and LayerNorm (Ba et al., 2016) over the last axis of a
``[rows, features]`` array, with float32 statistics:

  forward:   xhat = (x - mean) * rstd,     rstd = 1 / sqrt(mean((x - mean)**2) + eps)
             y    = xhat * weight + bias   (RMSNorm: mean = 0, no bias)
  backward:  g    = dy * weight
             dx   = rstd * (g - xhat * mean(g * xhat) - mean(g))   (RMSNorm: no mean(g))
             dweight = sum_rows(dy * xhat),  dbias = sum_rows(dy)

The backward is the standard closed form (e.g. the Apex / Triton tutorial fused LayerNorm
kernels). Kernels keep per-program partial sums of ``dweight`` / ``dbias``
(``[num_programs, features]`` float32) that the caller reduces with one small sum.

Backends: :mod:`kernels_pallas.normalization.mosaic_gpu` (Hopper, TMA pipeline) and
:mod:`kernels_pallas.normalization.triton` (any CUDA GPU). The functions below are the
element-wise formulas both kernel bodies call on float32 values that are already
broadcast to the block shape.
"""

from __future__ import annotations

import jax


def normalize(x: jax.Array, mean: jax.Array | None, rstd: jax.Array) -> jax.Array:
  """``xhat = (x - mean) * rstd`` (RMSNorm when ``mean`` is None); float32 in and out."""
  return (x if mean is None else x - mean) * rstd


def scale_shift(xhat: jax.Array, weight: jax.Array | None, bias: jax.Array | None) -> jax.Array:
  """``y = xhat * weight + bias``, skipping the parts that are None."""
  y = xhat if weight is None else xhat * weight
  return y if bias is None else y + bias


def input_grad(g: jax.Array, xhat: jax.Array, rstd: jax.Array, mean_g_xhat: jax.Array,
               mean_g: jax.Array | None) -> jax.Array:
  """``dx = rstd * (g - xhat * mean(g * xhat) - mean(g))`` with ``g = dy * weight``.

  ``mean_g`` is None for RMSNorm (no mean subtraction in the forward).
  """
  inner = g - xhat * mean_g_xhat
  if mean_g is not None:
    inner = inner - mean_g
  return rstd * inner
