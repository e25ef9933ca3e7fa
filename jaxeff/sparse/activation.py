"""CATS activation sparsity (Lee et al., 2024, "CATS: Contextually-Aware Thresholding for
Sparsity in Large Language Models"): in a SwiGLU MLP, zero ``silu(x @ w_gate)`` entries of
magnitude at most a threshold ``t``; ``t`` is the ``target_sparsity`` quantile of
``|silu(gate)|`` over calibration tokens, so that fraction of neurons is inactive on
average. The op is :func:`jaxeff.ops.sparse_matmul.cats_mlp`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def calibrate_cats_threshold(gate_preactivations: jax.Array, target_sparsity: float
                             ) -> jax.Array:
  """Threshold ``t`` with ``mean(|silu(gate)| <= t) ~= target_sparsity``.

  Args:
    gate_preactivations: ``[..., H]`` values of ``x @ w_gate`` on calibration tokens.
    target_sparsity: in ``[0, 1)``.

  Returns:
    float32 scalar.
  """
  if not isinstance(target_sparsity, (int, float)) or not 0.0 <= target_sparsity < 1.0:
    raise ValueError(f"calibrate_cats_threshold: target_sparsity must be in [0, 1), got "
                     f"{target_sparsity!r}")
  a = jnp.abs(jax.nn.silu(gate_preactivations.astype(jnp.float32))).reshape(-1)
  if a.size == 0:
    raise ValueError("calibrate_cats_threshold: gate_preactivations is empty")
  return jnp.quantile(a, target_sparsity)


def activation_sparsity(gate_preactivations: jax.Array, threshold) -> jax.Array:
  """Fraction of ``|silu(gate)|`` entries at or under ``threshold``."""
  a = jnp.abs(jax.nn.silu(gate_preactivations.astype(jnp.float32)))
  return jnp.mean(a <= threshold)


__all__ = ["activation_sparsity", "calibrate_cats_threshold"]
