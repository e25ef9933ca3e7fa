"""Expert parallelism for :class:`jaxeff.nn.moe.MoE`: ``shard_map`` with all-to-all dispatch.

GShard / Tutel-style layout (Lepikhin et al. 2020; Hwang et al. 2023): tokens are split
over ``token_axes`` (which include ``expert_axis``), the ``E`` experts over ``expert_axis``
(``P`` devices, ``E / P`` experts each, contiguous), so any expert / data split of the
mesh works (data-parallel replicas along the other axes exchange nothing). On each device:

1. route the local ``T_l`` tokens and sort their ``T_l * k`` assignments by expert
   (:func:`jaxeff.nn.moe.permute`): rows for device ``p`` are then contiguous;
2. pack them into a send buffer ``[P, C, d]`` (``C = T_l * k``, the dropless worst case,
   zero rows past each device's count) plus per-expert counts ``[P, E / P]``;
   ``all_to_all`` both;
3. sort the received rows by local expert (padding rows last), run the SwiGLU experts
   with ``grouped_matmul``, unsort;
4. ``all_to_all`` the results back, gather each assignment's result and combine with the
   routing weights (:func:`jaxeff.nn.moe.unpermute`).

The auxiliary losses use ``pmean`` over ``token_axes`` of the per-device statistics, so
they equal the single-device losses over all tokens. Dropless only: a capacity factor
would drop different tokens than the single-device layer and is refused. Buffers are
sized for the worst case (``P`` times the average traffic); a bounded buffer (or
``ragged_all_to_all``) is the next step for large ``P``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxeff.nn import moe as _moe
from jaxeff.parallel.mesh import default_check_vma


def _device_of_rows(ends: jax.Array, num_rows: int) -> jax.Array:
  return jnp.searchsorted(ends, jnp.arange(num_rows, dtype=jnp.int32), side="right")


def expert_parallel_experts(x: jax.Array, router: jax.Array, w_gate_up: jax.Array,
                            w_down: jax.Array, cfg: _moe.MoEConfig, *, mesh: Mesh,
                            expert_axis: str = "expert",
                            token_axes: tuple[str, ...] | None = None,
                            check_vma: bool | None = None
                            ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The routed experts of :class:`MoE` run expert-parallel (module docstring).

  Args:
    x: ``[T, d]`` tokens (T divisible by the product of the ``token_axes`` sizes).
    router: ``[d, E]``; w_gate_up: ``[E, d, 2h]``; w_down: ``[E, h, d]`` (E divisible by
      the ``expert_axis`` size).
    cfg: routing options (``capacity_factor`` must be None).
    mesh: the device mesh; expert_axis: its axis the experts are split over;
    token_axes: axes the tokens are split over (default: all of the mesh's axes).
    check_vma: ``jax.shard_map``'s varying-axes type checking; None =
      :func:`jaxeff.parallel.mesh.default_check_vma` (off where the grouped-matmul
      kernels run inside the map); the gradients are the same.

  Returns:
    ``(y [T, d], {"load_balancing_loss", "router_z_loss"})``.
  """
  if cfg.capacity_factor is not None:
    raise ValueError("expert_parallel_experts: capacity_factor must be None (dropless); got "
                     f"{cfg.capacity_factor}")
  if expert_axis not in mesh.axis_names:
    raise ValueError(f"expert_parallel_experts: expert_axis {expert_axis!r} is not a mesh axis "
                     f"{mesh.axis_names}")
  token_axes = tuple(mesh.axis_names) if token_axes is None else tuple(token_axes)
  if expert_axis not in token_axes:
    raise ValueError(f"expert_parallel_experts: token_axes {token_axes} must include the "
                     f"expert axis {expert_axis!r}")
  p = mesh.shape[expert_axis]
  e, k = cfg.num_experts, cfg.k
  if e % p:
    raise ValueError(f"expert_parallel_experts: num_experts={e} is not divisible by the "
                     f"{expert_axis!r} axis size {p}")
  shards = math.prod(mesh.shape[a] for a in token_axes)
  if x.shape[0] % shards:
    raise ValueError(f"expert_parallel_experts: {x.shape[0]} tokens are not divisible by the "
                     f"{shards} token shards of axes {token_axes}")
  e_local = e // p
  t_local = x.shape[0] // shards
  cap = t_local * k
  d = x.shape[1]

  def local(x, router, w_gate_up, w_down):
    logits = jnp.dot(x.astype(jnp.float32), router.astype(jnp.float32))
    r = _moe.route(logits, k, score=cfg.score, normalize=cfg.normalize)
    xs, order, sizes = _moe.permute(x, r.experts, e)
    rows = xs.shape[0]
    # 1-2: rows for device q are [dev_start[q], dev_end[q]) of the expert-sorted rows.
    dev_sizes = sizes.reshape(p, e_local).sum(1)
    dev_ends = jnp.cumsum(dev_sizes)
    dev_starts = dev_ends - dev_sizes
    c = jnp.arange(cap, dtype=jnp.int32)
    src = jnp.minimum(dev_starts[:, None] + c[None, :], rows - 1)
    send = jnp.where((c[None, :] < dev_sizes[:, None])[..., None], xs[src], 0)
    recv = jax.lax.all_to_all(send, expert_axis, 0, 0, tiled=True)
    recv_counts = jax.lax.all_to_all(sizes.reshape(p, e_local), expert_axis, 0, 0, tiled=True)
    # 3: local expert of received row (q, c); e_local marks padding, sorted last.
    local_expert = jax.vmap(lambda ends: jnp.searchsorted(ends, c, side="right"))(
        jnp.cumsum(recv_counts, axis=1)).reshape(-1)
    order2 = jnp.argsort(local_expert, stable=True)
    ys2 = _moe.swiglu_experts(recv.reshape(p * cap, d)[order2], recv_counts.sum(0),
                              w_gate_up, w_down, implementation=cfg.implementation)
    back = ys2[_moe.inverse_permutation(order2)].reshape(p, cap, d)
    # 4: results return to the rows' sources, in the order they were sent.
    ret = jax.lax.all_to_all(back, expert_axis, 0, 0, tiled=True)
    dest = _device_of_rows(dev_ends, rows)
    ys = ret[dest, jnp.arange(rows, dtype=jnp.int32) - dev_starts[dest]]
    y = _moe.unpermute(ys, order, r.weights)
    f, pr = _moe.balance_statistics(r, e)
    f, pr = jax.lax.pmean((f, pr), token_axes)
    lb = e * jnp.sum(jax.lax.stop_gradient(f) * pr)
    z = jax.lax.pmean(_moe.router_z_loss(logits), token_axes)
    return y, lb, z

  tokens = P(token_axes, None)
  experts = P(expert_axis, None, None)
  if check_vma is None:
    check_vma = default_check_vma()
  y, lb, z = jax.shard_map(local, mesh=mesh, in_specs=(tokens, P(), experts, experts),
                           out_specs=(tokens, P(), P()), check_vma=check_vma)(
                               x, router, w_gate_up, w_down)
  return y, {"load_balancing_loss": lb, "router_z_loss": z}


__all__ = ["expert_parallel_experts"]
