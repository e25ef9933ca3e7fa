"""Pruning masks (magnitude, Wanda, N:M, structured), one-shot pruning of a GPT tree,
sparse-training schedules (SR-STE, mask decay, gradual magnitude pruning), SparseDense."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.nn.sparse import SparseDense, magnitude_mask_traced, update_masks
from jaxeff.sparse import pruning as P
from jaxeff.sparse import training as T
from jaxeff.sparse.activation import activation_sparsity, calibrate_cats_threshold


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "2:8"])
def test_nm_mask_exactly_n_per_group(pattern, key):
  n, m = map(int, pattern.split(":"))
  w = jax.random.normal(key, (8 * m, 12))
  mask = np.asarray(P.nm_mask(jnp.abs(w), pattern))
  groups = mask.reshape(8, m, 12)
  assert (groups.sum(axis=1) == n).all()
  a = np.abs(np.asarray(w)).reshape(8, m, 12)  # kept ones are the n largest of each group
  kept_min = np.where(groups, a, np.inf).min(axis=1)
  dropped_max = np.where(groups, -np.inf, a).max(axis=1)
  assert (kept_min >= dropped_max).all()


def test_nm_mask_ties_keep_lower_rows():
  mask = P.nm_mask(jnp.ones((4, 1)), "2:4")
  np.testing.assert_array_equal(np.asarray(mask[:, 0]), [True, True, False, False])


def test_magnitude_picks_smallest_globally():
  w = jnp.array([[0.1, -5.0], [3.0, -0.2], [0.05, 1.0]])
  pruned = P.magnitude_prune(w, 0.5)
  np.testing.assert_array_equal(np.asarray(pruned), [[0.0, -5.0], [3.0, 0.0], [0.0, 1.0]])


def test_wanda_uses_input_norms_per_output():
  # |w| alone would drop row 0 of each column; a large input norm on feature 0 saves it.
  w = jnp.array([[0.1, 0.2], [1.0, 2.0], [0.5, 0.4]])
  norm = jnp.array([100.0, 1.0, 1.0])
  s = P.scores(w, "wanda", norm)
  np.testing.assert_allclose(np.asarray(s), np.abs(np.asarray(w)) * np.array([[100.0], [1], [1]]))
  mask = np.asarray(P.unstructured_mask(s, 1 / 3, per_output=True))
  np.testing.assert_array_equal(mask, [[True, True], [True, True], [False, False]])
  assert (mask.sum(axis=0) == 2).all()  # same count in every output column


@pytest.mark.parametrize("sparsity", [0.9])
def test_unstructured_mask_count(sparsity, key):
  s = jax.random.uniform(key, (40, 30))
  mask = P.unstructured_mask(s, sparsity)
  assert int((~mask).sum()) == round(sparsity * 1200)
  assert float(s[~mask].max()) <= float(s[mask].min())


def test_pruning_errors():
  with pytest.raises(ValueError, match=r"sparsity must be a number in \[0, 1\), got 1.0"):
    P.unstructured_mask(jnp.ones((4, 4)), 1.0)
  with pytest.raises(ValueError, match=r"sparsity must be a number in \[0, 1\), got -0.1"):
    P.magnitude_prune(jnp.ones((4, 4)), -0.1)
  with pytest.raises(ValueError, match="K = 6 .* must be divisible by M = 4"):
    P.nm_mask(jnp.ones((6, 4)), "2:4")
  with pytest.raises(ValueError, match="wanda needs input_norm of shape"):
    P.scores(jnp.ones((4, 4)), "wanda")
  with pytest.raises(ValueError, match="method must be one of"):
    P.scores(jnp.ones((4, 4)), "random")
  with pytest.raises(ValueError, match="give exactly one of sparsity"):
    P.PruneRule("kernel", sparsity=0.5, nm="2:4")
  with pytest.raises(ValueError, match="w must be 2-D"):
    P.scores(jnp.ones((4,)))


@pytest.fixture(scope="module")
def tiny_gpt():
  from jaxeff.models import gpt
  config = gpt.get_config("tiny")
  return gpt.GPT(config), jax.jit(lambda k: gpt.init_params(config, k))(jax.random.key(3))


def test_prune_gpt_tree_magnitude_wanda_nm(tiny_gpt, key):
  model, params = tiny_gpt
  tokens = jax.random.randint(key, (2, 16), 0, 256)
  linear = r"(attn|mlp)/[^/]+_proj/kernel$"
  norms = P.collect_input_norms(model, params, [tokens], linear)
  assert norms["block_0/attn/o_proj/kernel"].shape == (64,)  # heads * head_dim inputs
  pruned, report = P.prune(params, [P.PruneRule(linear, "wanda", sparsity=0.5)], norms)
  assert all(abs(v - 0.5) < 1e-6 for v in report.values()) and len(report) == 14
  assert P.sparsity_of(pruned, linear) == pytest.approx(0.5)
  assert pruned["embed"]["embedding"] is params["embed"]["embedding"] or np.array_equal(
      pruned["embed"]["embedding"], params["embed"]["embedding"])
  nm, _ = P.prune(params, [P.PruneRule(r"mlp/[^/]+_proj/kernel$", nm="2:4")])
  g = np.asarray(nm["block_1"]["mlp"]["up_proj"]["kernel"]).reshape(16, 4, -1)
  assert ((g != 0).sum(axis=1) == 2).all()
  with pytest.raises(ValueError, match="needs input norms"):
    P.prune(params, [P.PruneRule(linear, "wanda", sparsity=0.5)])


def test_structured_channel_and_head_pruning(tiny_gpt):
  _, params = tiny_gpt
  p = P.prune_mlp_channels(params, 0.25)
  up = np.asarray(p["block_0"]["mlp"]["up_proj"]["kernel"])
  down = np.asarray(p["block_0"]["mlp"]["down_proj"]["kernel"])
  dead = (up == 0).all(axis=0)
  assert dead.sum() == 40 and ((down == 0).all(axis=1) == dead).all()
  h = P.prune_heads(params, 0.5)
  q = np.asarray(h["block_1"]["attn"]["q_proj"]["kernel"])  # [d, heads, hd]
  assert (q == 0).all(axis=(0, 2)).sum() == 2


def test_srste_gradient_definition(key):
  w = jax.random.normal(key, (8, 4))
  mask = P.nm_mask(jnp.abs(w), "2:4")
  g = jax.random.normal(jax.random.fold_in(key, 1), (8, 4))
  y, vjp = jax.vjp(lambda w: T.srste_weight(w, mask, 0.1), w)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(jnp.where(mask, w, 0)))
  (dw,) = vjp(g)
  np.testing.assert_allclose(np.asarray(dw), np.asarray(g + 0.1 * jnp.where(mask, 0, w)),
                             rtol=1e-6)


def test_mask_decay_schedule_and_gradient():
  beta = lambda t: float(T.mask_decay_factor(t, decay_steps=100, intervals=4))  # noqa: E731
  assert [beta(t) for t in (0, 24, 25, 50, 99, 100, 500)] == [1.0, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
  w = jnp.array([1.0, 2.0])
  mask = jnp.array([True, False])
  dw = jax.grad(lambda w: jnp.sum(T.decayed_mask_weight(w, mask, 0.25)))(w)
  np.testing.assert_allclose(np.asarray(dw), [1.0, 0.25])
  with pytest.raises(ValueError, match="decay_steps must be a positive int"):
    T.mask_decay_factor(1, decay_steps=0)


def test_gmp_cubic_schedule():
  def s(t):
    return float(T.gmp_sparsity(t, final_sparsity=0.8, begin_step=10, end_step=110,
                                initial_sparsity=0.0, frequency=10))

  assert s(0) == 0.0 and s(10) == 0.0
  assert s(110) == pytest.approx(0.8) and s(1000) == pytest.approx(0.8)
  assert s(60) == pytest.approx(0.8 + (0.0 - 0.8) * 0.5**3)
  assert s(65) == s(60)  # held between updates
  with pytest.raises(ValueError, match=r"final_sparsity must be in \[0, 1\)"):
    T.gmp_sparsity(0, final_sparsity=1.2, begin_step=0, end_step=10)
  with pytest.raises(ValueError, match="end_step .* must be > begin_step"):
    T.gmp_sparsity(0, final_sparsity=0.5, begin_step=10, end_step=10)


def test_sparse_dense_nm_srste_and_unstructured(key):
  x = jax.random.normal(key, (3, 16))
  layer = SparseDense(8, mode="nm", nm="2:4", srste_decay=0.01)
  v = layer.init(key, x)
  w = v["params"]["kernel"]
  mask = P.nm_mask(jnp.abs(w), "2:4")
  np.testing.assert_allclose(np.asarray(layer.apply(v, x)), np.asarray(x @ jnp.where(mask, w, 0)),
                             rtol=1e-5, atol=1e-6)
  dw = jax.grad(lambda p: jnp.sum(layer.apply({"params": p}, x)))(v["params"])["kernel"]
  expected = jnp.sum(x, axis=0)[:, None] * jnp.ones((16, 8)) + 0.01 * jnp.where(mask, 0, w)
  np.testing.assert_allclose(np.asarray(dw), np.asarray(expected), rtol=1e-5, atol=1e-6)
  # unstructured: masks in the "sparsity" collection, updated on the GMP schedule
  ul = SparseDense(8)
  uv = ul.init(key, x)
  s = T.gmp_sparsity(50, final_sparsity=0.75, begin_step=0, end_step=100)
  masks = jax.jit(update_masks)(uv["params"], uv["sparsity"], s)
  frac = 1 - float(jnp.mean(masks["mask"]))
  assert frac == pytest.approx(round(float(s) * 128) / 128)
  y = ul.apply({"params": uv["params"], "sparsity": masks}, x)
  masked = jnp.where(masks["mask"], uv["params"]["kernel"], 0)
  np.testing.assert_allclose(np.asarray(y), np.asarray(x @ masked), rtol=1e-5, atol=1e-6)
  tiny = magnitude_mask_traced(jnp.array([3.0, -1.0, 2.0]), 1 / 3)
  np.testing.assert_array_equal(np.asarray(tiny), [True, False, True])
  with pytest.raises(ValueError, match="needs step="):
    SparseDense(8, mode="nm", nm_method="mask_decay").init(key, x)


def test_cats_threshold_calibration(key):
  g = jax.random.normal(key, (4096,)) * 2
  for target in (0.3, 0.5, 0.7):
    t = calibrate_cats_threshold(g, target)
    assert abs(float(activation_sparsity(g, t)) - target) < 0.01
  with pytest.raises(ValueError, match=r"target_sparsity must be in \[0, 1\)"):
    calibrate_cats_threshold(g, 1.0)


def test_sparse_inference_matches_pruned_dense(tiny_gpt, key):
  from jaxeff.nn.sparse import compress_params, sparse_inference
  from jaxeff.sparse.formats import NMSparse, TiledSparse

  model, params = tiny_gpt
  tokens = jax.random.randint(key, (2, 8), 0, 256)
  attn, mlp = r"attn/[^/]+_proj/kernel$", r"mlp/[^/]+_proj/kernel$"
  pruned, _ = P.prune(params, [P.PruneRule(attn, sparsity=0.8), P.PruneRule(mlp, nm="2:4")])
  served = compress_params(compress_params(pruned, attn, fmt="tiled"), mlp, fmt="nm",
                           pattern="2:4")
  assert isinstance(served["block_0"]["attn"]["o_proj"]["kernel"], TiledSparse)
  assert isinstance(served["block_1"]["mlp"]["down_proj"]["kernel"], NMSparse)

  @jax.jit
  def logits(p, t):
    with sparse_inference():
      return model.apply({"params": p}, t)

  expected = jax.jit(model.apply)({"params": pruned}, tokens)
  np.testing.assert_allclose(np.asarray(logits(served, tokens)), np.asarray(expected),
                             rtol=2e-4, atol=2e-4)


def test_sparse_inference_ell_and_nm_words(tiny_gpt, key):
  # the decode formats (bf16 storage) through stock Dense layers, kernels in interpret mode
  from jaxeff.nn.sparse import compress_params, sparse_inference
  from jaxeff.sparse.formats import EllSparse, NMSparse

  model, params = tiny_gpt
  tokens = jax.random.randint(key, (1, 8), 0, 256)
  attn, mlp = r"attn/[^/]+_proj/kernel$", r"mlp/[^/]+_proj/kernel$"
  pruned, _ = P.prune(params, [P.PruneRule(attn, sparsity=0.8), P.PruneRule(mlp, nm="2:4")])
  pruned = jax.tree.map(lambda a: a.astype(jnp.bfloat16).astype(jnp.float32), pruned)
  served = compress_params(compress_params(pruned, attn, fmt="ell"), mlp, fmt="nm",
                           pattern="2:4", words=True)
  assert isinstance(served["block_0"]["attn"]["q_proj"]["kernel"], EllSparse)
  down = served["block_1"]["mlp"]["down_proj"]["kernel"]
  assert isinstance(down, NMSparse) and down.words

  @jax.jit
  def logits(p, t):
    with sparse_inference(implementation="triton:interpret"):
      return model.apply({"params": p}, t)

  expected = jax.jit(model.apply)({"params": pruned}, tokens)
  np.testing.assert_allclose(np.asarray(logits(served, tokens)), np.asarray(expected),
                             rtol=2e-4, atol=2e-4)
