"""Flax RMSNorm / LayerNorm modules: parameters, init/apply, and agreement with the ops."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from jaxeff import nn, ops
from tests.helpers import assert_close


def _x(key, shape=(2, 5, 256), dtype=jnp.float32):
  return (2.0 * jax.random.normal(key, shape, jnp.float32) + 0.5).astype(dtype)


def test_rms_norm_params_and_output(key):
  x = _x(key, dtype=jnp.bfloat16)
  module = nn.RMSNorm(eps=1e-5)
  params = module.init(jax.random.key(0), x)
  assert jax.tree.map(lambda p: (p.shape, p.dtype), params) == {
      "params": {"scale": ((256,), jnp.float32)}}
  scale = 1.0 + 0.1 * jax.random.normal(jax.random.key(1), (256,))
  y = module.apply({"params": {"scale": scale}}, x)
  assert y.shape == x.shape and y.dtype == x.dtype
  assert_close(y, ops.rms_norm(x, scale, eps=1e-5, implementation="xla"))


def test_layer_norm_params_and_output(key):
  x = _x(key)
  module = nn.LayerNorm(param_dtype=jnp.bfloat16)
  params = module.init(jax.random.key(0), x)
  assert jax.tree.map(lambda p: (p.shape, p.dtype), params) == {
      "params": {"scale": ((256,), jnp.bfloat16), "bias": ((256,), jnp.bfloat16)}}
  assert (params["params"]["scale"] == 1).all() and (params["params"]["bias"] == 0).all()
  k1, k2 = jax.random.split(jax.random.key(1))
  p = {"scale": jax.random.normal(k1, (256,), jnp.bfloat16),
       "bias": jax.random.normal(k2, (256,), jnp.bfloat16)}
  assert_close(module.apply({"params": p}, x),
               ops.layer_norm(x, p["scale"], p["bias"], implementation="xla"))


@pytest.mark.parametrize("module", [nn.RMSNorm(use_scale=False),
                                    nn.LayerNorm(use_scale=False, use_bias=False)])
def test_without_parameters(module, key):
  x = _x(key)
  params = module.init(jax.random.key(0), x)
  assert jax.tree.leaves(params) == []
  ref = (ops.rms_norm(x, implementation="xla") if isinstance(module, nn.RMSNorm)
         else ops.layer_norm(x, implementation="xla"))
  assert_close(module.apply(params, x), ref)


def test_kernel_gradients_match_reference(key):
  # The module passes `implementation` through; the ops tests cover every kernel.
  implementation = "mosaic_gpu:interpret"
  x = _x(key, (3, 7, 128))
  fused = nn.LayerNorm(implementation=implementation)
  reference = nn.LayerNorm(implementation="xla")
  params = reference.init(jax.random.key(0), x)
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(2), p.shape), params)

  def loss(module, params, x):
    return jnp.sum(jnp.sin(module.apply(params, x)))

  got = jax.jit(jax.grad(lambda p, x: loss(fused, p, x), argnums=(0, 1)))(params, x)
  want = jax.grad(lambda p, x: loss(reference, p, x), argnums=(0, 1))(params, x)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert_close(g, w, rtol=1e-4)
