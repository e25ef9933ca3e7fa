"""Fused RMSNorm and LayerNorm (forward and backward).

RMSNorm (Zhang & Sennrich, 2019): ``y = x / sqrt(mean(x**2) + eps) * weight``.
LayerNorm (Ba et al., 2016): ``y = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias``.
Both normalise over the last axis with float32 statistics and return ``x.dtype``.

Implementations (``implementation=``): ``"xla"``, the pure-jnp reference below.
Kernel implementations register themselves in ``RMS_NORM_IMPLS`` / ``LAYER_NORM_IMPLS``
ahead of the reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jaxeff.ops import _registry

_FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _validate(op: str, x, weight, bias, eps) -> None:
  if not hasattr(x, "shape") or x.ndim < 1:
    raise ValueError(f"{op}: x must be an array with at least one axis [..., features], "
                     f"got {getattr(x, 'shape', type(x))}")
  if x.dtype not in [jnp.dtype(d) for d in _FLOAT_DTYPES]:
    raise TypeError(f"{op}: x.dtype must be float32, bfloat16 or float16, got {x.dtype}")
  d = x.shape[-1]
  for name, p in (("weight", weight), ("bias", bias)):
    if p is None:
      continue
    if p.shape != (d,):
      raise ValueError(f"{op}: {name} must have shape [features] = ({d},) to match "
                       f"x.shape {x.shape}, got {p.shape}")
    if not jnp.issubdtype(p.dtype, jnp.floating):
      raise TypeError(f"{op}: {name}.dtype must be floating, got {p.dtype}")
  if not isinstance(eps, (int, float)) or not eps > 0:
    raise ValueError(f"{op}: eps must be a positive Python number, got {eps!r}")


def rms_norm_reference(x: jax.Array, weight: jax.Array | None, *, eps: float) -> jax.Array:
  """Pure-jnp RMSNorm: x [..., d], weight [d] -> [..., d] in x.dtype."""
  xf = x.astype(jnp.float32)
  y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  if weight is not None:
    y = y * weight.astype(jnp.float32)
  return y.astype(x.dtype)


def layer_norm_reference(x: jax.Array, weight: jax.Array | None, bias: jax.Array | None, *,
                         eps: float) -> jax.Array:
  """Pure-jnp LayerNorm: x [..., d], weight/bias [d] -> [..., d] in x.dtype."""
  xf = x.astype(jnp.float32)
  mean = jnp.mean(xf, axis=-1, keepdims=True)
  xc = xf - mean
  y = xc * jax.lax.rsqrt(jnp.mean(xc * xc, axis=-1, keepdims=True) + eps)
  if weight is not None:
    y = y * weight.astype(jnp.float32)
  if bias is not None:
    y = y + bias.astype(jnp.float32)
  return y.astype(x.dtype)


RMS_NORM_IMPLS: list[_registry.Implementation] = [
    _registry.Implementation("xla", lambda x, weight, *, eps: rms_norm_reference(x, weight, eps=eps)),
]
LAYER_NORM_IMPLS: list[_registry.Implementation] = [
    _registry.Implementation(
        "xla", lambda x, weight, bias, *, eps: layer_norm_reference(x, weight, bias, eps=eps)),
]


def rms_norm(x: jax.Array, weight: jax.Array | None = None, *, eps: float = 1e-6,
             implementation: str | Sequence[str] | None = None) -> jax.Array:
  """RMSNorm over the last axis.

  Args:
    x: ``[..., features]`` float32/bfloat16/float16.
    weight: ``[features]`` scale, or None.
    eps: added to the mean square before the reciprocal square root.
    implementation: None (fastest available), a name, or a sequence of names
      (see :mod:`jaxeff.ops._registry`).

  Returns:
    ``[..., features]`` in ``x.dtype``.
  """
  _validate("rms_norm", x, weight, None, eps)
  return _registry.dispatch("rms_norm", RMS_NORM_IMPLS, implementation, x, weight, eps=float(eps))


def layer_norm(x: jax.Array, weight: jax.Array | None = None, bias: jax.Array | None = None, *,
               eps: float = 1e-5,
               implementation: str | Sequence[str] | None = None) -> jax.Array:
  """LayerNorm over the last axis.

  Args:
    x: ``[..., features]`` float32/bfloat16/float16.
    weight: ``[features]`` scale, or None.
    bias: ``[features]`` shift, or None.
    eps: added to the variance before the reciprocal square root.
    implementation: None (fastest available), a name, or a sequence of names.

  Returns:
    ``[..., features]`` in ``x.dtype``.
  """
  _validate("layer_norm", x, weight, bias, eps)
  return _registry.dispatch("layer_norm", LAYER_NORM_IMPLS, implementation, x, weight, bias,
                            eps=float(eps))
