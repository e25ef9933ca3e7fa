"""Flax Linen RMSNorm and LayerNorm modules backed by :mod:`jaxeff.ops.normalization`."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxeff import ops


class RMSNorm(nn.Module):
  """RMSNorm over the last axis: ``[..., features] -> [..., features]``.

  Attributes:
    eps: added to the mean square.
    use_scale: learn a ``[features]`` scale (initialised to ones).
    param_dtype: dtype of the scale parameter.
    implementation: passed to :func:`jaxeff.ops.rms_norm`.
  """

  eps: float = 1e-6
  use_scale: bool = True
  param_dtype: jnp.dtype = jnp.float32
  implementation: str | Sequence[str] | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    weight = None
    if self.use_scale:
      weight = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
    return ops.rms_norm(x, weight, eps=self.eps, implementation=self.implementation)


class LayerNorm(nn.Module):
  """LayerNorm over the last axis: ``[..., features] -> [..., features]``.

  Attributes:
    eps: added to the variance.
    use_scale / use_bias: learn ``[features]`` scale (ones) / bias (zeros).
    param_dtype: dtype of the parameters.
    implementation: passed to :func:`jaxeff.ops.layer_norm`.
  """

  eps: float = 1e-5
  use_scale: bool = True
  use_bias: bool = True
  param_dtype: jnp.dtype = jnp.float32
  implementation: str | Sequence[str] | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    weight = self.param("scale", nn.initializers.ones, (d,), self.param_dtype) if self.use_scale else None
    bias = self.param("bias", nn.initializers.zeros, (d,), self.param_dtype) if self.use_bias else None
    return ops.layer_norm(x, weight, bias, eps=self.eps, implementation=self.implementation)
