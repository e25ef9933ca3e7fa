"""Expert-parallel MoE (shard_map + all-to-all over an expert axis) equals the
single-device layer, forward, auxiliary losses and gradients, on 8 fake CPU devices."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from jaxeff.nn.moe import MoE, MoEConfig
from jaxeff.nn.moe_parallel import expert_parallel_experts
from tests.helpers import assert_close


def _mesh(shape, names):
  return Mesh(np.array(jax.devices()[:int(np.prod(shape))]).reshape(shape), names)


@pytest.mark.parametrize("shape,names", [((8,), ("expert",)), ((2, 4), ("data", "expert"))])
def test_expert_parallel_equals_single_device(key, shape, names):
  mesh = _mesh(shape, names)
  kw = dict(num_experts=8, experts_per_token=2, hidden_dim=8,
            kernel_init=nn.initializers.normal(0.3), out_init=nn.initializers.normal(0.3))
  single, parallel = MoE(**kw), MoE(**kw, mesh=mesh)
  x = jax.random.normal(key, (4, 8, 6))  # 32 tokens: 4 per device
  params = single.init(jax.random.fold_in(key, 1), x)

  def loss(layer):
    def f(params, x):
      y, aux = layer.apply(params, x)
      return jnp.sum(jnp.sin(y)) + aux["load_balancing_loss"] + aux["router_z_loss"], (y, aux)
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))

  (l1, (y1, aux1)), g1 = loss(single)(params, x)
  (l2, (y2, aux2)), g2 = loss(parallel)(params, x)
  assert_close(y2, y1)
  for name in aux1:
    assert_close(aux2[name], aux1[name], name=name)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g2), jax.tree.leaves(g1)):
    assert_close(a, b, name=jax.tree_util.keystr(path))


def test_expert_parallel_without_vma_checks_equals_single_device(key):
  # GPUs run the map with check_vma=False (the Pallas kernels inside carry no
  # varying-axes types): output, losses and every gradient must still match.
  from jaxeff.nn.moe import load_balancing_loss, routed_experts, router_z_loss
  mesh = _mesh((2, 4), ("data", "expert"))
  kx, kr, kg, kd = jax.random.split(key, 4)
  x = jax.random.normal(kx, (32, 6))
  router, wgu = jax.random.normal(kr, (6, 8)), 0.3 * jax.random.normal(kg, (8, 6, 16))
  wd = 0.3 * jax.random.normal(kd, (8, 8, 6))
  cfg = MoEConfig(num_experts=8, k=2)

  def single(x, router, wgu, wd):
    y, routing, logits = routed_experts(x, router, wgu, wd, cfg)
    return jnp.sum(jnp.sin(y)) + load_balancing_loss(routing, 8) + router_z_loss(logits)

  def parallel(x, router, wgu, wd):
    y, aux = expert_parallel_experts(x, router, wgu, wd, cfg, mesh=mesh, check_vma=False)
    return jnp.sum(jnp.sin(y)) + aux["load_balancing_loss"] + aux["router_z_loss"]

  args = (x, router, wgu, wd)
  l1, g1 = jax.jit(jax.value_and_grad(single, argnums=(0, 1, 2, 3)))(*args)
  l2, g2 = jax.jit(jax.value_and_grad(parallel, argnums=(0, 1, 2, 3)))(*args)
  assert_close(l2, l1, name="loss")
  for name, a, b in zip(("dx", "drouter", "dw_gate_up", "dw_down"), g2, g1):
    assert_close(a, b, name=name)


def test_expert_parallel_bad_inputs(key):
  mesh = _mesh((2, 4), ("data", "expert"))
  x = jax.random.normal(key, (16, 4))
  w = lambda *s: jnp.ones(s)
  cfg = MoEConfig(num_experts=6, k=1)
  with pytest.raises(ValueError, match="num_experts=6 is not divisible by the 'expert' axis size 4"):
    expert_parallel_experts(x, w(4, 6), w(6, 4, 8), w(6, 4, 4), cfg, mesh=mesh)
  cfg = MoEConfig(num_experts=4, k=1)
  with pytest.raises(ValueError, match="10 tokens are not divisible by the 8 token shards"):
    expert_parallel_experts(x[:10], w(4, 4), w(4, 4, 8), w(4, 4, 4), cfg, mesh=mesh)
  with pytest.raises(ValueError, match="expert_axis 'e' is not a mesh axis"):
    expert_parallel_experts(x, w(4, 4), w(4, 4, 8), w(4, 4, 4), cfg, mesh=mesh, expert_axis="e")
  with pytest.raises(ValueError, match="capacity_factor must be None"):
    expert_parallel_experts(x, w(4, 4), w(4, 4, 8), w(4, 4, 4),
                            MoEConfig(num_experts=4, k=1, capacity_factor=1.0), mesh=mesh)
