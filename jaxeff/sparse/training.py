"""Sparse training: SR-STE for N:M, mask-decay gradient flow, gradual magnitude pruning.

* SR-STE (Zhou et al., 2021, "Learning N:M Fine-grained Structured Sparse Neural
  Networks From Scratch"): the forward uses ``w * mask`` (mask recomputed from ``|w|``
  every step); the backward passes the gradient straight through to all of ``w`` and adds
  the sparse-refined term: ``dL/dw = g + lambda_w * (1 - mask) * w`` with
  ``g = dL/d(w * mask)``. :func:`srste_weight` implements it with a ``custom_vjp``.
* Mask-decay gradient flow (Bambhaniya et al., 2024, "Progressive Gradient Flow for
  Robust N:M Sparsity Training"): pruned weights are not cut at once; the forward uses
  ``w * (mask + beta_t * (1 - mask))`` so that pruned weights (and the gradient reaching
  them) are scaled by ``beta_t``, which decays from 1 to 0 over ``decay_steps`` in
  ``intervals`` equal steps: ``beta_t = 1 - min(1, floor(t * intervals / decay_steps)
  / intervals)`` (:func:`mask_decay_factor`). :func:`decayed_mask_weight`.
* Gradual magnitude pruning (Zhu & Gupta, 2017, "To prune, or not to prune"): target
  sparsity ``s_t = s_f + (s_i - s_f) * (1 - (t - t_0) / (n * dt))^3`` for
  ``t_0 <= t <= t_0 + n * dt``, updated every ``dt`` steps (:func:`gmp_sparsity`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _check_steps(name: str, value) -> None:
  if not isinstance(value, int) or value <= 0:
    raise ValueError(f"{name} must be a positive int, got {value!r}")


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def srste_weight(w: jax.Array, mask: jax.Array, decay: float) -> jax.Array:
  """``w * mask`` with the SR-STE backward ``g * 1 + decay * (1 - mask) * w``.

  Args:
    w: dense weight (any shape); mask: bool / 0-1 of the same shape (not differentiated);
    decay: ``lambda_w`` (the paper uses 2e-4).
  """
  return jnp.where(mask, w, 0).astype(w.dtype)


def _srste_fwd(w, mask, decay):
  return srste_weight(w, mask, decay), (w, mask)


def _srste_bwd(decay, res, g):
  w, mask = res
  refine = decay * jnp.where(mask, 0, w)
  return (g + refine).astype(w.dtype), None


srste_weight.defvjp(_srste_fwd, _srste_bwd)


def mask_decay_factor(step, *, decay_steps: int, intervals: int = 10) -> jax.Array:
  """``beta_t`` of mask-decay gradient flow (module docstring): 1 at step 0, 0 from
  ``decay_steps`` on, constant on each of ``intervals`` equal steps."""
  _check_steps("mask_decay_factor: decay_steps", decay_steps)
  _check_steps("mask_decay_factor: intervals", intervals)
  t = jnp.asarray(step, jnp.float32)
  done = jnp.floor(t * intervals / decay_steps) / intervals
  return 1.0 - jnp.clip(done, 0.0, 1.0)


def decayed_mask_weight(w: jax.Array, mask: jax.Array, beta) -> jax.Array:
  """``w * (mask + beta * (1 - mask))``: pruned weights (and their gradients) scaled by
  ``beta`` (plain autodiff gives exactly that gradient)."""
  m = jnp.asarray(mask, w.dtype)
  return w * (m + jnp.asarray(beta, w.dtype) * (1 - m))


def gmp_sparsity(step, *, final_sparsity: float, begin_step: int, end_step: int,
                 initial_sparsity: float = 0.0, frequency: int = 1) -> jax.Array:
  """Zhu & Gupta's cubic schedule (module docstring): ``initial_sparsity`` before
  ``begin_step``, ``final_sparsity`` from ``end_step``, held constant between updates
  every ``frequency`` steps."""
  for name, s in (("initial_sparsity", initial_sparsity), ("final_sparsity", final_sparsity)):
    if not 0.0 <= s < 1.0:
      raise ValueError(f"gmp_sparsity: {name} must be in [0, 1), got {s}")
  if end_step <= begin_step:
    raise ValueError(f"gmp_sparsity: end_step ({end_step}) must be > begin_step ({begin_step})")
  _check_steps("gmp_sparsity: frequency", frequency)
  t = jnp.asarray(step, jnp.int32)
  t = begin_step + ((jnp.clip(t, begin_step, end_step) - begin_step) // frequency) * frequency
  frac = (t - begin_step).astype(jnp.float32) / (end_step - begin_step)
  frac = jnp.where(jnp.asarray(step) >= end_step, 1.0, frac)
  return final_sparsity + (initial_sparsity - final_sparsity) * (1.0 - frac) ** 3


__all__ = ["decayed_mask_weight", "gmp_sparsity", "mask_decay_factor", "srste_weight"]
