"""Mixture-of-experts feed-forward layer: top-k routing, token permutation, grouped experts.

Follows the dropless MoE of MegaBlocks (Gale et al. 2023) with the routing choices of
Switch Transformer (Fedus et al. 2021), GShard (Lepikhin et al. 2020), ST-MoE (Zoph et al.
2022), Mixtral and DeepSeek-V3:

1. Router: ``logits = x @ router [d, E]`` in float32; scores ``softmax(logits)`` (or
   ``sigmoid(logits)``), the top ``k`` experts per token, combine weights = their scores,
   optionally renormalised to sum to 1 (:func:`route`).
2. Permutation: the ``T * k`` (token, slot) assignments are sorted by expert with one
   stable ``argsort`` and gathered, giving rows grouped by expert and ``group_sizes [E]``
   (:func:`permute`); the inverse is a gather by the inverse permutation, weighted and
   summed over the ``k`` slots (:func:`unpermute`). No scatter-add anywhere.
3. Experts: SwiGLU with stacked weights ``w_gate_up [E, d, 2 * hidden]`` and
   ``w_down [E, hidden, d]`` applied by :func:`jaxeff.ops.grouped_matmul.grouped_matmul`.

Modes: dropless (``capacity_factor=None``, every assignment is computed) or capacity
(``capacity_factor=c``): each expert keeps at most ``C = ceil(c * T * k / E)``
assignments, the earliest in token order (the stable sort keeps token order within an
expert; slot j of token t ranks before slot j' of token t' iff ``(t, j) < (t', j')``);
dropped assignments contribute zero and the remaining weights are not renormalised (the
residual connection carries a fully dropped token), as in Switch Transformer.

Auxiliary losses (:func:`load_balancing_loss`, :func:`router_z_loss`), unweighted:

* load balancing (Switch / GShard, top-k form): ``E * sum_e f_e * P_e``, ``f_e`` = fraction
  of the ``T * k`` assignments routed to expert ``e`` (before capacity drops), ``P_e`` =
  mean router probability of ``e`` over tokens (softmax scores; for sigmoid routing the
  scores normalised per token). Equal to 1 when routing is uniform.
* router z-loss (ST-MoE): ``mean_t logsumexp(logits_t)^2``.

:class:`MoE` returns ``(y, aux)`` with ``aux = {"load_balancing_loss", "router_z_loss"}``
and also sows both into the ``"intermediates"`` collection (``mutable=["intermediates"]``
to collect them from a whole model). Expert parallelism: :mod:`jaxeff.nn.moe_parallel`.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxeff.ops.grouped_matmul import grouped_matmul

SCORE_FUNCTIONS = ("softmax", "sigmoid")


# ------------------------------------------------------------------------------- routing


@dataclasses.dataclass(frozen=True)
class Routing:
  """Top-k routing of ``T`` tokens to ``E`` experts.

  Fields:
    weights: float32 ``[T, k]`` combine weights.
    experts: int32 ``[T, k]`` expert of each slot (distinct within a token).
    probs: float32 ``[T, E]`` router probabilities (rows sum to 1) for the balancing loss.
  """

  weights: jax.Array
  experts: jax.Array
  probs: jax.Array


jax.tree_util.register_dataclass(Routing, data_fields=["weights", "experts", "probs"],
                                 meta_fields=[])


def route(logits: jax.Array, k: int, *, score: str = "softmax",
          normalize: bool = True) -> Routing:
  """Top-``k`` routing from router logits ``[T, E]`` (module docstring, step 1).

  Args:
    logits: ``[T, E]`` router logits.
    k: experts per token, ``1 <= k <= E``.
    score: ``"softmax"`` (Switch / Mixtral) or ``"sigmoid"`` (DeepSeek-V3).
    normalize: renormalise the ``k`` selected scores to sum to 1.
  """
  if logits.ndim != 2:
    raise ValueError(f"route: logits must be [tokens, experts], got shape {logits.shape}")
  num_experts = logits.shape[1]
  if not 1 <= k <= num_experts:
    raise ValueError(f"route: k={k} experts per token must be in [1, experts={num_experts}]")
  if score not in SCORE_FUNCTIONS:
    raise ValueError(f"route: score must be one of {SCORE_FUNCTIONS}, got {score!r}")
  logits = logits.astype(jnp.float32)
  scores = jax.nn.softmax(logits, -1) if score == "softmax" else jax.nn.sigmoid(logits)
  weights, experts = jax.lax.top_k(scores, k)
  if normalize:
    weights = weights / jnp.sum(weights, -1, keepdims=True)
  probs = scores if score == "softmax" else scores / jnp.sum(scores, -1, keepdims=True)
  return Routing(weights, experts.astype(jnp.int32), probs)


def balance_statistics(routing: Routing, num_experts: int) -> tuple[jax.Array, jax.Array]:
  """``(f [E], P [E])``: fraction of assignments and mean probability per expert."""
  counts = jnp.zeros((num_experts,), jnp.float32).at[routing.experts.reshape(-1)].add(1.0)
  return counts / routing.experts.size, jnp.mean(routing.probs, 0)


def load_balancing_loss(routing: Routing, num_experts: int) -> jax.Array:
  """Switch / GShard auxiliary loss ``E * sum_e f_e * P_e`` (module docstring)."""
  f, p = balance_statistics(routing, num_experts)
  return num_experts * jnp.sum(jax.lax.stop_gradient(f) * p)


def router_z_loss(logits: jax.Array) -> jax.Array:
  """ST-MoE router z-loss ``mean_t logsumexp(logits_t)^2`` of ``logits [T, E]``."""
  return jnp.mean(jnp.square(jax.nn.logsumexp(logits.astype(jnp.float32), -1)))


# ---------------------------------------------------------------------------- permutation


def permute(x: jax.Array, experts: jax.Array, num_experts: int
            ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Rows grouped by expert: ``x [T, d]``, ``experts [T, k]`` ->
  ``(x_sorted [T * k, d], order [T * k], group_sizes [E])``.

  ``order[j]`` is the flat assignment ``t * k + slot`` placed at row ``j``;
  ``x_sorted[j] = x[order[j] // k]``.
  """
  k = experts.shape[1]
  flat = experts.reshape(-1)
  order = jnp.argsort(flat, stable=True).astype(jnp.int32)
  group_sizes = jnp.zeros((num_experts,), jnp.int32).at[flat].add(1)
  return x[order // k], order, group_sizes


def inverse_permutation(order: jax.Array) -> jax.Array:
  return jnp.argsort(order).astype(jnp.int32)


def unpermute(y_sorted: jax.Array, order: jax.Array, weights: jax.Array) -> jax.Array:
  """``y [T, d] = sum_slot weights[t, slot] * y_sorted[row of (t, slot)]`` (a gather)."""
  t, k = weights.shape
  y = y_sorted[inverse_permutation(order)].reshape(t, k, -1)
  return jnp.einsum("tkd,tk->td", y.astype(jnp.float32), weights).astype(y_sorted.dtype)


def expert_capacity(tokens: int, k: int, num_experts: int, capacity_factor: float) -> int:
  """``C = ceil(capacity_factor * tokens * k / E)`` assignments per expert (at least 1)."""
  if capacity_factor <= 0:
    raise ValueError(f"capacity_factor must be positive, got {capacity_factor}")
  return max(1, math.ceil(capacity_factor * tokens * k / num_experts))


def capacity_slots(group_sizes: jax.Array, capacity: int) -> tuple[jax.Array, jax.Array]:
  """Gather map of the capacity buffer ``[E * C]`` from expert-sorted rows.

  Returns ``(rows [E * C], valid [E * C])``: slot ``e * C + c`` holds sorted row
  ``start_e + c`` when ``c < min(size_e, C)``.
  """
  ends = jnp.cumsum(group_sizes)
  starts = ends - group_sizes
  c = jnp.arange(capacity, dtype=jnp.int32)
  rows = starts[:, None] + c[None, :]
  valid = c[None, :] < jnp.minimum(group_sizes, capacity)[:, None]
  return rows.reshape(-1), valid.reshape(-1)


def kept_rows(group_sizes: jax.Array, capacity: int, num_rows: int
              ) -> tuple[jax.Array, jax.Array]:
  """Inverse map: sorted row ``j`` -> ``(slot [rows], kept [rows])`` in the capacity buffer."""
  ends = jnp.cumsum(group_sizes)
  starts = ends - group_sizes
  j = jnp.arange(num_rows, dtype=jnp.int32)
  e = jnp.searchsorted(ends, j, side="right").astype(jnp.int32)
  e = jnp.minimum(e, group_sizes.shape[0] - 1)
  pos = j - starts[e]
  return e * capacity + jnp.minimum(pos, capacity - 1), pos < capacity


# -------------------------------------------------------------------------------- experts


def swiglu_experts(x_sorted: jax.Array, group_sizes: jax.Array, w_gate_up: jax.Array,
                   w_down: jax.Array, *, implementation=None) -> jax.Array:
  """SwiGLU of each row with its expert's weights.

  ``x_sorted [R, d]`` grouped by ``group_sizes [E]``, ``w_gate_up [E, d, 2h]``,
  ``w_down [E, h, d]`` -> ``[R, d]`` (rows past ``sum(group_sizes)`` give zeros).
  """
  h = grouped_matmul(x_sorted, w_gate_up, group_sizes, implementation=implementation)
  gate, up = jnp.split(h, 2, axis=-1)
  a = (jax.nn.silu(gate.astype(jnp.float32)) * up.astype(jnp.float32)).astype(x_sorted.dtype)
  return grouped_matmul(a, w_down, group_sizes, implementation=implementation)


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """Static routing options shared by the single-device and expert-parallel paths."""

  num_experts: int
  k: int
  score: str = "softmax"
  normalize: bool = True
  capacity_factor: float | None = None
  implementation: str | None = None


def routed_experts(x: jax.Array, router: jax.Array, w_gate_up: jax.Array, w_down: jax.Array,
                   cfg: MoEConfig) -> tuple[jax.Array, Routing, jax.Array]:
  """The routed part of the layer on one device: ``x [T, d]`` -> ``(y [T, d], routing, logits)``."""
  logits = jnp.dot(x.astype(jnp.float32), router.astype(jnp.float32))
  r = route(logits, cfg.k, score=cfg.score, normalize=cfg.normalize)
  xs, order, sizes = permute(x, r.experts, cfg.num_experts)
  if cfg.capacity_factor is None:
    ys = swiglu_experts(xs, sizes, w_gate_up, w_down, implementation=cfg.implementation)
  else:
    cap = expert_capacity(x.shape[0], cfg.k, cfg.num_experts, cfg.capacity_factor)
    rows, valid = capacity_slots(sizes, cap)
    buf = jnp.where(valid[:, None], xs[jnp.minimum(rows, xs.shape[0] - 1)], 0)
    full = jnp.full((cfg.num_experts,), cap, jnp.int32)
    ybuf = swiglu_experts(buf, full, w_gate_up, w_down, implementation=cfg.implementation)
    slot, kept = kept_rows(sizes, cap, xs.shape[0])
    ys = jnp.where(kept[:, None], ybuf[slot], 0)
  return unpermute(ys, order, r.weights), r, logits


# ---------------------------------------------------------------------------------- layer


class MoE(nn.Module):
  """Mixture-of-experts SwiGLU layer: ``x [..., d] -> (y [..., d], aux)``.

  Attributes:
    num_experts: ``E``.
    experts_per_token: ``k``.
    hidden_dim: SwiGLU width of each expert.
    shared_hidden_dim: width of an always-on shared SwiGLU expert (DeepSeek-MoE); 0 = none.
    score: ``"softmax"`` or ``"sigmoid"`` router scores.
    normalize_weights: renormalise the top-k weights to sum to 1.
    capacity_factor: None for dropless, else the capacity factor (module docstring).
    dtype / param_dtype: compute / parameter dtypes (the router runs in float32).
    implementation: passed to ``grouped_matmul``.
    mesh / expert_axis / token_axes: when ``mesh`` is set, the experts run expert-parallel
      over ``expert_axis`` with tokens split over ``token_axes`` (default: every mesh
      axis); see :mod:`jaxeff.nn.moe_parallel`. Same parameters, same results.

  Parameters: ``router [d, E]``, ``w_gate_up [E, d, 2 * hidden]`` (gate then up),
  ``w_down [E, hidden, d]`` and, with a shared expert, ``shared`` (a ``SwiGLU``).
  ``aux``: ``{"load_balancing_loss", "router_z_loss"}`` float32 scalars (unweighted),
  also sown into ``"intermediates"``.
  """

  num_experts: int
  experts_per_token: int
  hidden_dim: int
  shared_hidden_dim: int = 0
  score: str = "softmax"
  normalize_weights: bool = True
  capacity_factor: float | None = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  kernel_init: nn.initializers.Initializer = nn.initializers.normal(0.02)
  out_init: nn.initializers.Initializer = nn.initializers.normal(0.02)
  implementation: str | None = None
  mesh: jax.sharding.Mesh | None = None
  expert_axis: str = "expert"
  token_axes: tuple[str, ...] | None = None

  def config(self) -> MoEConfig:
    return MoEConfig(self.num_experts, self.experts_per_token, self.score,
                     self.normalize_weights, self.capacity_factor, self.implementation)

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    e, k = self.num_experts, self.experts_per_token
    if e < 1 or not 1 <= k <= e:
      raise ValueError(f"MoE: experts_per_token={k} must be in [1, num_experts={e}]")
    if self.hidden_dim <= 0:
      raise ValueError(f"MoE: hidden_dim must be positive, got {self.hidden_dim}")
    d = x.shape[-1]
    router = self.param("router", self.kernel_init, (d, e), self.param_dtype)
    w_gate_up = self.param("w_gate_up", self.kernel_init, (e, d, 2 * self.hidden_dim),
                           self.param_dtype)
    w_down = self.param("w_down", self.out_init, (e, self.hidden_dim, d), self.param_dtype)
    x2 = x.reshape(-1, d).astype(self.dtype)
    args = (x2, router, w_gate_up.astype(self.dtype), w_down.astype(self.dtype))
    if self.mesh is None:
      y2, routing, logits = routed_experts(*args, self.config())
      aux = {"load_balancing_loss": load_balancing_loss(routing, e),
             "router_z_loss": router_z_loss(logits)}
    else:
      from jaxeff.nn import moe_parallel
      y2, aux = moe_parallel.expert_parallel_experts(
          *args, self.config(), mesh=self.mesh, expert_axis=self.expert_axis,
          token_axes=self.token_axes)
    y = y2.reshape(x.shape).astype(self.dtype)
    if self.shared_hidden_dim:
      from jaxeff.nn.mlp import SwiGLU
      y = y + SwiGLU(self.shared_hidden_dim, dtype=self.dtype, param_dtype=self.param_dtype,
                     kernel_init=self.kernel_init, out_init=self.out_init, name="shared")(x)
    for name, v in aux.items():
      self.sow("intermediates", name, v)
    return y, aux


__all__ = ["MoE", "MoEConfig", "Routing", "balance_statistics", "capacity_slots",
           "expert_capacity", "kept_rows", "load_balancing_loss", "permute", "route",
           "routed_experts", "router_z_loss", "swiglu_experts", "unpermute"]
