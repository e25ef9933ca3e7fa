"""Pipeline parallelism over a ``pipeline`` mesh axis inside ``jax.shard_map``.

The layers are cut into ``p`` consecutive stages, stage ``s`` on device ``s`` of the axis,
and the batch into ``M`` microbatches. Both schedules run in lock-step *ticks*: in every
tick each stage runs its work and hands its activation to the next stage (and, in the
backward, its input gradient to the previous one) with one ``ppermute``.

* :func:`gpipe` (Huang et al., 2019, "GPipe"): all forwards, then all backwards. The
  forward is ``M + p - 1`` ticks (microbatch ``m`` on stage ``s`` at tick ``m + s``); the
  backward is what ``jax.grad`` derives from it (the same ticks reversed), so any
  ``jax.grad``-based train step can use it. It keeps the activations of all ``M``
  microbatches (use ``jax.checkpoint`` in the stage to keep only stage inputs).
* :func:`one_f_one_b` (Narayanan et al., 2021, PipeDream-Flush / Megatron 1F1B): each tick
  has one forward slot and one backward slot, backward of microbatch ``m`` on stage ``s``
  at tick ``m + 2(p - 1) - s`` (right after its forward on the last stage), so a stage
  holds at most ``2(p - s) - 1`` stashed stage inputs however large ``M`` is. It returns
  the loss and the parameter gradients itself (a manual VJP per microbatch, recomputing
  the stage forward from the stashed input). Idle slots are skipped with ``lax.cond``.

* :func:`interleaved` (the circular / interleaved schedule of Narayanan et al., 2021, as
  in MaxText's ``num_pipeline_repeats``): each device holds ``v`` model chunks (chunk
  ``r`` of stage ``s`` is layer group ``r p + s``) and every microbatch goes around the ring
  ``v`` times; a tick runs one chunk, microbatch ``m`` in round ``r`` reaches stage ``s``
  at tick ``r M + m + s`` (``M >= p``: the wrap-around output waits in a buffer on stage
  0). Differentiable like :func:`gpipe`.

Bubble (idle) fraction: ``(p - 1) / (M + p - 1)`` of the ideal time for GPipe and 1F1B,
``(p - 1) / (v M + p - 1)`` for the interleaved schedule (:func:`bubble_fraction`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxeff.parallel.mesh import pvary_to, union_varying_axes

SCHEDULES = ("gpipe", "1f1b", "interleaved")


def bubble_fraction(schedule: str, num_stages: int, num_microbatches: int,
                    num_chunks: int = 1) -> float:
  """Theoretical idle fraction of a pipeline schedule (module docstring)."""
  if schedule not in SCHEDULES:
    raise ValueError(f"bubble_fraction: schedule must be one of {SCHEDULES}, got {schedule!r}")
  for name, v in (("num_stages", num_stages), ("num_microbatches", num_microbatches),
                  ("num_chunks", num_chunks)):
    if not isinstance(v, int) or v < 1:
      raise ValueError(f"bubble_fraction: {name} must be a positive int, got {v!r}")
  v = num_chunks if schedule == "interleaved" else 1
  return (num_stages - 1) / (v * num_microbatches + num_stages - 1)


def schedule_table(schedule: str, num_stages: int, num_microbatches: int) -> list[str]:
  """One text row per stage: ``F3`` / ``B3`` / ``.`` per tick (for docs and reports)."""
  p, m = num_stages, num_microbatches
  rows = []
  for s in range(p):
    if schedule == "gpipe":
      f = [f"F{t - s}" if 0 <= t - s < m else "." for t in range(m + p - 1)]
      b = [f"B{m - 1 - (t - (p - 1 - s))}" if 0 <= t - (p - 1 - s) < m else "."
           for t in range(m + p - 1)]
      rows.append(" ".join(f + b))
    elif schedule == "1f1b":
      cells = []
      for t in range(m + 2 * p - 2):
        mf, mb = t - s, t - (2 * p - 2 - s)
        c = (f"F{mf}" if 0 <= mf < m and s != p - 1 else "") + (f"B{mb}" if 0 <= mb < m else "")
        cells.append(c or ".")
      rows.append(" ".join(cells))
    else:
      raise ValueError(f"schedule_table: schedule must be 'gpipe' or '1f1b', got {schedule!r}")
  return rows


def _check(name, microbatches, axis_name):
  leaves = jax.tree.leaves(microbatches)
  if not leaves or any(getattr(a, "ndim", 0) < 1 for a in leaves):
    raise ValueError(f"{name}: microbatches must be arrays with a leading [num_microbatches] "
                     "axis")
  m = leaves[0].shape[0]
  if any(a.shape[0] != m for a in leaves):
    raise ValueError(f"{name}: all microbatch arrays need the same leading size, got "
                     f"{[a.shape[0] for a in leaves]}")
  return m, lax.axis_size(axis_name), lax.axis_index(axis_name)


def _take(tree, i):
  return jax.tree.map(lambda a: lax.dynamic_index_in_dim(a, i, 0, keepdims=False), tree)


def gpipe(stage_fn: Callable[[Any, jax.Array], jax.Array], stage_params: Any,
          microbatches: jax.Array, *, axis_name: str = "pipeline") -> jax.Array:
  """Runs ``M`` microbatches through ``p`` stages with the GPipe schedule (differentiable).

  Args:
    stage_fn: ``(stage_params, x [mb, ...]) -> y [mb, ...]`` (same shape and dtype), the
      computation of this device's stage.
    stage_params: this stage's parameters (e.g. its slice of the stacked layers).
    microbatches: ``[M, mb, ...]``, the same on every stage (only stage 0 reads it).

  Returns:
    ``[M, mb, ...]``: the last stage's outputs, on every stage of the axis.
  """
  m, p, s = _check("gpipe", microbatches, axis_name)
  if p == 1:
    return lax.map(lambda x: stage_fn(stage_params, x), microbatches)
  nxt = [(j, (j + 1) % p) for j in range(p)]
  axes = union_varying_axes(stage_params, microbatches) | {axis_name}
  pvary_all = lambda tree: pvary_to(tree, axes)  # noqa: E731  (equal scan carry types)

  def tick(carry, t):
    state, outputs = carry
    x = jnp.where(s == 0, lax.dynamic_index_in_dim(microbatches, jnp.minimum(t, m - 1), 0,
                                                   keepdims=False), state)
    y = stage_fn(stage_params, x)
    done = t - (p - 1)  # the microbatch leaving the last stage in this tick
    put = lax.dynamic_update_index_in_dim(outputs, y, jnp.clip(done, 0, m - 1), 0)
    outputs = jnp.where((s == p - 1) & (done >= 0), put, outputs)
    return pvary_all((lax.ppermute(y, axis_name, nxt), outputs)), None

  init = pvary_all((jnp.zeros_like(microbatches[0]), jnp.zeros_like(microbatches)))
  (_, outputs), _ = lax.scan(tick, init, jnp.arange(m + p - 1))
  return lax.psum(jnp.where(s == p - 1, outputs, jnp.zeros_like(outputs)), axis_name)


def one_f_one_b(stage_fn: Callable[[Any, jax.Array], jax.Array],
                loss_fn: Callable[[jax.Array, Any], jax.Array], stage_params: Any,
                microbatches: jax.Array, targets: Any, *,
                axis_name: str = "pipeline") -> tuple[jax.Array, Any]:
  """Loss and parameter gradients with the 1F1B (PipeDream-Flush) schedule.

  Args:
    stage_fn: ``(stage_params, x [mb, ...]) -> y [mb, ...]`` (same shape and dtype).
    loss_fn: ``(y_last [mb, ...], targets_m) -> scalar`` on the last stage's output.
    stage_params: this stage's parameters.
    microbatches: ``[M, mb, ...]`` (read by stage 0).
    targets: pytree of ``[M, ...]`` (read by the last stage).

  Returns:
    ``(loss, grads)``: the mean of ``loss_fn`` over the microbatches (on every stage) and
    the gradient of that mean with respect to this stage's ``stage_params`` (float32),
    equal to ``jax.grad`` of the sequential computation.
  """
  m, p, s = _check("one_f_one_b", microbatches, axis_name)
  k = min(m, 2 * p - 1)  # stash slots: microbatches in flight on stage 0
  nxt = [(j, (j + 1) % p) for j in range(p)]
  prv = [(j, (j - 1) % p) for j in range(p)]
  last = s == p - 1
  axes = union_varying_axes(stage_params, microbatches, targets) | {axis_name}
  pvary_all = lambda tree: pvary_to(tree, axes)  # noqa: E731  (equal cond/scan types)
  x0 = jnp.zeros_like(microbatches[0])
  zero_grads = jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), stage_params)

  def fwd(x):
    return pvary_all(stage_fn(stage_params, x))

  def bwd(xb, g_in, tgt):
    y, vjp = jax.vjp(stage_fn, stage_params, xb)
    loss, dy = jax.value_and_grad(loss_fn)(y, tgt)
    g = jnp.where(last, (dy / m).astype(y.dtype), g_in)
    dparams, dx = vjp(g)
    dparams = jax.tree.map(lambda a: a.astype(jnp.float32), dparams)
    return pvary_all((dparams, dx, jnp.where(last, loss, 0.0).astype(jnp.float32)))

  def idle_bwd(xb, g_in, tgt):
    return pvary_all((zero_grads, jnp.zeros_like(xb), jnp.float32(0.0)))

  def tick(carry, t):
    fwd_in, bwd_in, stash, grads, loss_sum = carry
    mf = t - s
    do_f = (mf >= 0) & (mf < m)
    x = jnp.where(s == 0, _take(microbatches, jnp.clip(mf, 0, m - 1)), fwd_in)
    # The last stage's forward is recomputed by its backward slot in the same tick.
    y = lax.cond(do_f & ~last, fwd, lambda x: pvary_all(jnp.zeros_like(x)), x)
    stash = jnp.where(do_f, lax.dynamic_update_index_in_dim(
        stash, x, jnp.clip(mf, 0, m - 1) % k, 0), stash)
    mb = t - (2 * p - 2 - s)
    do_b = (mb >= 0) & (mb < m)
    mbc = jnp.clip(mb, 0, m - 1)
    xb = lax.dynamic_index_in_dim(stash, mbc % k, 0, keepdims=False)
    dparams, dx, loss = lax.cond(do_b, bwd, idle_bwd, xb, bwd_in, _take(targets, mbc))
    grads = jax.tree.map(jnp.add, grads, dparams)
    carry = (lax.ppermute(y, axis_name, nxt), lax.ppermute(dx, axis_name, prv), stash, grads,
             loss_sum + loss)
    return pvary_all(carry), None

  init = pvary_all((x0, x0, jnp.zeros((k, *x0.shape), x0.dtype), zero_grads, jnp.float32(0.0)))
  carry, _ = lax.scan(tick, init, jnp.arange(m + 2 * p - 2))
  _, _, _, grads, loss_sum = carry
  return lax.psum(loss_sum, axis_name) / m, grads


def interleaved(stage_fn: Callable[[Any, jax.Array], jax.Array], chunk_params: Any,
                microbatches: jax.Array, *, axis_name: str = "pipeline") -> jax.Array:
  """The interleaved (circular) pipeline schedule (module docstring); differentiable.

  Args:
    stage_fn: ``(params_of_one_chunk, x [mb, ...]) -> y [mb, ...]``.
    chunk_params: this device's ``v`` chunks, every leaf with a leading ``[v]`` axis (chunk
      ``r`` on device ``s`` is the ``r * p + s``-th group of layers).
    microbatches: ``[M, mb, ...]`` with ``M >= p`` (stage 0 reads it).

  Returns:
    ``[M, mb, ...]``: the outputs after all ``v * p`` chunks, on every stage.
  """
  m, p, s = _check("interleaved", microbatches, axis_name)
  v = jax.tree.leaves(chunk_params)[0].shape[0]
  if p > 1 and m < p:
    raise ValueError(f"interleaved: needs at least as many microbatches ({m}) as pipeline "
                     f"stages ({p})")
  nxt = [(j, (j + 1) % p) for j in range(p)]
  axes = union_varying_axes(chunk_params, microbatches) | {axis_name}
  pvary_all = lambda tree: pvary_to(tree, axes)  # noqa: E731

  def tick(carry, t):
    state, loop, outputs = carry
    # Stage 0 parks what wrapped around from the last stage (microbatch (t - p) mod M).
    arrived = t - p
    loop = jnp.where((s == 0) & (arrived >= 0) & (p > 1),
                     lax.dynamic_update_index_in_dim(loop, state, jnp.maximum(arrived, 0) % m, 0),
                     loop)
    fresh = lax.dynamic_index_in_dim(microbatches, jnp.minimum(t, m - 1), 0, keepdims=False)
    again = lax.dynamic_index_in_dim(loop, t % m, 0, keepdims=False)
    x = state if p > 1 else jnp.where(t < m, fresh, outputs[t % m])
    if p > 1:
      x = jnp.where(s == 0, jnp.where(t < m, fresh, again), state)
    r = jnp.clip((t - s) // m, 0, v - 1)
    y = stage_fn(jax.tree.map(lambda a: lax.dynamic_index_in_dim(a, r, 0, keepdims=False),
                              chunk_params), x)
    done = t - ((v - 1) * m + p - 1)  # microbatch finishing its last round now
    put = lax.dynamic_update_index_in_dim(outputs, y, jnp.clip(done, 0, m - 1), 0)
    if p == 1:
      outputs = lax.dynamic_update_index_in_dim(outputs, y, t % m, 0)
    else:
      outputs = jnp.where((s == p - 1) & (done >= 0), put, outputs)
      y = lax.ppermute(y, axis_name, nxt)
    return pvary_all((y, loop, outputs)), None

  init = pvary_all((jnp.zeros_like(microbatches[0]), jnp.zeros_like(microbatches),
                    jnp.zeros_like(microbatches)))
  (_, _, outputs), _ = lax.scan(tick, init, jnp.arange(v * m + p - 1))
  if p == 1:
    return outputs
  return lax.psum(jnp.where(s == p - 1, outputs, jnp.zeros_like(outputs)), axis_name)
