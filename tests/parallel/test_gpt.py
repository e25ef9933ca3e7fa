"""jaxeff.parallel.gpt: the shard_map GPT loss and gradients equal the single-device
GPT (same parameter tree) on several meshes; bad configs raise clear errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import pytest

from jaxeff.models import gpt
from jaxeff.parallel import gpt as pg
from jaxeff.parallel.mesh import make_mesh
from tests.helpers import assert_close
from tests.parallel._compile import jit

BASE = gpt.GPTConfig(vocab_size=64, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2,
                     mlp_hidden=48, max_seq_len=64, attention_implementation="xla")


def _setup(key, config, batch=4, seq=16):
  k1, k2 = jax.random.split(key)
  params = jit(lambda k: gpt.GPT(config).init(k, jnp.zeros((1, 8), jnp.int32))["params"])(k1)
  tokens = jax.random.randint(k2, (batch, seq + 1), 0, config.vocab_size)
  return params, tokens[:, :-1], tokens[:, 1:]


def _reference(config, params, inputs, targets):
  def loss(p):
    logits = gpt.GPT(config).apply({"params": p}, inputs)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
  return jit(jax.value_and_grad(loss))(params)


# data x tensor x sequence (ring attention) is covered end to end, optimizer included, by
# tests/parallel/test_train_lm_mesh.py; this case covers the other axes and options.
@pytest.mark.parametrize("mesh, options, changes", [
    # check_vma=False: the GPU/TPU setting (Pallas kernels inside the map).
    ("fsdp=2,pipeline=2,tensor=2", dict(sequence_parallel=True, collective_matmul=True,
                                        check_vma=False),
     dict(scan_layers=True, tie_embeddings=False, fused_projections=True)),
])
def test_loss_and_grads_equal_single_device(key, mesh, options, changes):
  config = BASE.replace(**changes)
  params, inputs, targets = _setup(key, config)
  loss_fn = pg.make_loss_fn(config, make_mesh(mesh), pg.ParallelOptions(**options))
  loss, grads = jit(jax.value_and_grad(loss_fn))(params, inputs, targets)
  want_loss, want_grads = _reference(config, params, inputs, targets)
  assert_close(loss, want_loss)
  assert jax.tree.structure(grads) == jax.tree.structure(want_grads)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    want = want_grads
    for k in path:
      want = want[k.key]
    assert_close(g, want, rtol=1e-4, name=jax.tree_util.keystr(path))


def test_parameter_shardings_follow_the_rules(key):
  config = BASE.replace(scan_layers=True)
  shapes = jax.eval_shape(
      lambda: gpt.GPT(config).init(key, jnp.zeros((1, 8), jnp.int32))["params"])
  specs = pg.param_specs(shapes, make_mesh("fsdp=2,pipeline=2,tensor=2"))
  assert specs["blocks"]["attn"]["q_proj"]["kernel"] == jax.P("pipeline", "fsdp", "tensor")
  assert specs["blocks"]["mlp"]["down_proj"]["kernel"] == jax.P("pipeline", "tensor", "fsdp")
  assert specs["embed"]["embedding"] == jax.P("tensor", "fsdp")
  assert specs["final_norm"]["scale"] == jax.P()


def test_bad_configs_raise_clear_errors(key):
  params, inputs, targets = _setup(key, BASE)
  mesh = make_mesh("tensor=4,data=2")
  with pytest.raises(ValueError, match=r"num_kv_heads \(2\) must be divisible by the tensor "
                                       r"axis size \(4\)"):
    pg.make_loss_fn(BASE, mesh)
  seq_mesh = make_mesh("sequence=4,data=2")
  with pytest.raises(ValueError, match=r"sequence length 12 must be divisible by 8 \(sequence "
                                       r"axis 4, two zig-zag chunks per device\)"):
    pg.make_loss_fn(BASE, seq_mesh)(params, inputs[:, :12], targets[:, :12])
  with pytest.raises(ValueError, match=r"batch size 3 must be divisible by the batch axes "
                                       r"\('data',\) of total size 2"):
    pg.make_loss_fn(BASE, seq_mesh)(params, inputs[:3], targets[:3])
  with pytest.raises(ValueError, match="local_window_size is not supported with a sequence"):
    pg.make_loss_fn(BASE.replace(local_window_size=4), seq_mesh)
  with pytest.raises(ValueError, match=r"num_layers \(2\) must be divisible by the pipeline "
                                       r"axis size \(4\)"):
    pg.make_loss_fn(BASE, make_mesh("pipeline=4,data=2"))
  with pytest.raises(ValueError, match="collective_matmul=True needs sequence_parallel=True"):
    pg.ParallelOptions(collective_matmul=True)
  with pytest.raises(ValueError, match="context must be one of"):
    pg.ParallelOptions(context="tree")
