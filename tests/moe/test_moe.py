"""Routing invariants, permutation round trip, auxiliary losses vs their formulas,
capacity drops, the MoE layer vs a per-token reference, and bad inputs."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.nn import moe
from jaxeff.nn.moe import MoE
from tests.helpers import assert_close


def test_route_invariants(key):
  t, e, k = 29, 7, 3
  logits = jax.random.normal(key, (t, e))
  for score in ("softmax", "sigmoid"):
    r = moe.route(logits, k, score=score, normalize=True)
    ex = np.asarray(r.experts)
    assert ex.shape == (t, k) and ((ex >= 0) & (ex < e)).all()
    assert all(len(set(row)) == k for row in ex)  # k distinct experts per token
    np.testing.assert_allclose(np.asarray(r.weights).sum(-1), 1.0, rtol=1e-6)
    scores = jax.nn.softmax(logits) if score == "softmax" else jax.nn.sigmoid(logits)
    # the chosen experts are the k best by score
    kth = np.sort(np.asarray(scores), -1)[:, -k]
    assert (np.take_along_axis(np.asarray(scores), ex, 1) >= kth[:, None]).all()
  r = moe.route(logits, k, normalize=False)
  np.testing.assert_allclose(r.weights, np.take_along_axis(np.asarray(jax.nn.softmax(logits)),
                                                           np.asarray(r.experts), 1), rtol=1e-6)


def test_permutation_round_trip_is_exact(key):
  t, d, e, k = 23, 5, 6, 2
  kx, kl = jax.random.split(key)
  x = jax.random.normal(kx, (t, d))
  r = moe.route(jax.random.normal(kl, (t, e)), k)
  xs, order, sizes = moe.permute(x, r.experts, e)
  assert int(sizes.sum()) == t * k
  # rows are grouped by expert, in token order within an expert
  ex_sorted = np.asarray(r.experts).reshape(-1)[np.asarray(order)]
  assert (np.diff(ex_sorted) >= 0).all()
  np.testing.assert_array_equal(np.bincount(ex_sorted, minlength=e), sizes)
  back = xs[moe.inverse_permutation(order)].reshape(t, k, d)
  np.testing.assert_array_equal(back, jnp.broadcast_to(x[:, None], (t, k, d)))
  ones = jnp.full((t, k), 1.0 / k)
  assert_close(moe.unpermute(xs, order, ones), x)


def test_aux_losses_match_formulas(key):
  t, e, k = 40, 5, 2
  logits = 2.0 * jax.random.normal(key, (t, e))
  r = moe.route(logits, k)
  counts = np.bincount(np.asarray(r.experts).reshape(-1), minlength=e)
  p = np.asarray(jax.nn.softmax(logits)).mean(0)
  expected = e * np.sum(counts / (t * k) * p)
  np.testing.assert_allclose(moe.load_balancing_loss(r, e), expected, rtol=1e-5)
  lse = np.log(np.exp(np.asarray(logits, np.float64)).sum(-1))
  np.testing.assert_allclose(moe.router_z_loss(logits), np.mean(lse ** 2), rtol=1e-5)
  uniform = moe.route(jnp.zeros((e, e)) + jnp.eye(e) * 1e-3, 1)  # each expert once
  np.testing.assert_allclose(moe.load_balancing_loss(uniform, e), 1.0, rtol=1e-3)


def _reference_moe(params, x, k, capacity=None, score="softmax", normalize=True):
  """Per-token loop in float64: y_t = sum over kept slots of w * SwiGLU_e(x_t)."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
  xf = np.asarray(x, np.float64)
  e, h = p["router"].shape[1], p["w_down"].shape[1]
  r = moe.route(x @ params["params"]["router"], k, score=score, normalize=normalize)
  ex, w = np.asarray(r.experts), np.asarray(r.weights, np.float64)
  used = np.zeros(e, int)
  y = np.zeros(xf.shape)
  for t in range(xf.shape[0]):
    for s in range(k):
      ei = ex[t, s]
      used[ei] += 1
      if capacity is not None and used[ei] > capacity:
        continue
      gu = xf[t] @ p["w_gate_up"][ei]
      g, u = gu[:h], gu[h:]
      y[t] += w[t, s] * ((g / (1 + np.exp(-g)) * u) @ p["w_down"][ei])
  return jnp.asarray(y, jnp.float32)


@pytest.mark.parametrize("score,normalize", [("softmax", True), ("sigmoid", False)])
def test_dropless_layer_matches_reference(key, score, normalize):
  layer = MoE(num_experts=6, experts_per_token=2, hidden_dim=12, score=score,
              normalize_weights=normalize, kernel_init=nn.initializers.normal(0.3),
              out_init=nn.initializers.normal(0.3))
  x = jax.random.normal(key, (3, 7, 10))
  params = layer.init(jax.random.fold_in(key, 1), x)
  (y, aux), state = jax.jit(lambda p, x: layer.apply(p, x, mutable=["intermediates"]))(params, x)
  assert_close(y.reshape(-1, 10), _reference_moe(params, x.reshape(-1, 10), 2, score=score,
                                                 normalize=normalize), rtol=1e-5)
  assert set(aux) == {"load_balancing_loss", "router_z_loss"}
  assert float(state["intermediates"]["router_z_loss"][0]) == float(aux["router_z_loss"])


def test_capacity_mode_drops_later_tokens(key):
  e, k, t = 4, 2, 16
  layer = MoE(num_experts=e, experts_per_token=k, hidden_dim=8, capacity_factor=0.5,
              kernel_init=nn.initializers.normal(0.5), out_init=nn.initializers.normal(0.5))
  x = jax.random.normal(key, (t, 6))
  params = layer.init(jax.random.fold_in(key, 1), x)
  y, _ = jax.jit(layer.apply)(params, x)
  cap = moe.expert_capacity(t, k, e, 0.5)
  assert cap == 4
  expected = _reference_moe(params, x, k, capacity=cap)
  assert_close(y, expected, rtol=1e-5)
  dropless = _reference_moe(params, x, k)
  assert float(jnp.abs(expected - dropless).max()) > 1e-3  # some tokens were dropped


def test_shared_expert_and_gradients(key):
  layer = MoE(num_experts=4, experts_per_token=1, hidden_dim=8, shared_hidden_dim=6)
  x = jax.random.normal(key, (9, 6))
  params = layer.init(jax.random.fold_in(key, 1), x)
  assert "shared" in params["params"]

  def loss(params):
    y, aux = layer.apply(params, x)
    return jnp.sum(y ** 2) + 0.01 * aux["load_balancing_loss"] + 0.001 * aux["router_z_loss"]

  grads = jax.jit(jax.grad(loss))(params)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.isfinite(np.asarray(g)).all() and float(jnp.abs(g).max()) > 0, path


def test_bad_inputs(key):
  x = jax.random.normal(key, (4, 6))
  with pytest.raises(ValueError, match=r"k=5 experts per token must be in \[1, experts=4\]"):
    moe.route(jax.random.normal(key, (4, 4)), 5)
  with pytest.raises(ValueError, match="logits must be"):
    moe.route(x[0], 1)
  with pytest.raises(ValueError, match="score must be one of"):
    moe.route(x, 1, score="relu")
  with pytest.raises(ValueError, match=r"experts_per_token=3 must be in \[1, num_experts=2\]"):
    MoE(num_experts=2, experts_per_token=3, hidden_dim=4).init(key, x)
  with pytest.raises(ValueError, match="capacity_factor must be positive"):
    moe.expert_capacity(4, 1, 2, 0.0)
