"""Quantization-aware training: fake quantization with straight-through gradients.

The forward pass rounds weights (or activations) to the quantization grid and back
(``dequantize(quantize(w))``); the backward pass treats the rounding as the identity —
the straight-through estimator (Bengio et al., 2013; used for QAT by Jacob et al., 2018,
and LLM-QAT, Liu et al., 2023). The scales are computed from the current weights and
receive no gradient. :func:`fake_quant_params` applies it to the leaves of a parameter tree
selected by the same regex rules as :func:`jaxeff.quant.quantize`, so a training loss can
be written as ``loss(fake_quant_params(params, rules), batch)``.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jaxeff.quant import formats


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def fake_quant_ste(w: jax.Array, fmt: str = "int4", axis: int = 0,
                   group_size: int | None = None, symmetric: bool = True) -> jax.Array:
  """``dequantize(quantize_tensor(w, ...))`` in ``w``'s dtype with identity gradient.

  Args:
    w: ``[K, N]`` (any rank) float weight; groups run along ``axis``.
  """
  return formats.fake_quantize(w, fmt, axis=axis, group_size=group_size, symmetric=symmetric)


def _fq_fwd(w, fmt, axis, group_size, symmetric):
  return fake_quant_ste(w, fmt, axis, group_size, symmetric), None


def _fq_bwd(fmt, axis, group_size, symmetric, _, g):
  return (g,)


fake_quant_ste.defvjp(_fq_fwd, _fq_bwd)


def _path_str(path) -> str:
  return "/".join(str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p))))
                  for p in path)


def fake_quant_params(params, rules: Sequence) -> object:
  """Fake-quantizes (straight-through) every float leaf of ndim >= 2 whose ``/``-joined path
  matches a rule (first match wins; see :class:`jaxeff.quant.model.QuantRule`; the weight
  is viewed as ``[K, N]`` with ``K`` its first ``in_dims`` dims, default 1)."""
  from jaxeff.quant.model import as_rule

  rules = [as_rule(r) for r in rules]

  def visit(path, leaf):
    name = _path_str(path)
    if getattr(leaf, "ndim", 0) < 2 or not jnp.issubdtype(leaf.dtype, jnp.floating):
      return leaf
    for r in rules:
      if re.search(r.pattern, name):
        if r.method == "none":
          return leaf
        k = math.prod(leaf.shape[:r.in_dims or 1])
        w2 = leaf.reshape(k, -1)
        return fake_quant_ste(w2, r.fmt, 0, r.group_size, r.symmetric).reshape(leaf.shape)
    return leaf

  return jax.tree_util.tree_map_with_path(visit, params)


__all__ = ["fake_quant_params", "fake_quant_ste"]
