"""generate_bench: the weights / KV combinations it serves and its argument errors (the
timed run itself is a GPU step; `--quick` runs it on CPU in ~50 s, too slow for CI)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import generate_bench as gb
from jaxeff.models import gpt
from jaxeff.nn.quant import quantized_inference
from jaxeff.ops.quantized_matmul import PackedWeight
from jaxeff.quant import QArray


def test_combos_product_pairs_and_errors():
  cfg = dataclasses.replace(gb.QUICK, weights=("bf16", "int4"), kv=("bf16", "int8"))
  assert gb.combos(cfg) == [("bf16", "bf16"), ("bf16", "int8"), ("int4", "bf16"),
                            ("int4", "int8")]
  pairs = (("bf16", "bf16"), ("int4", "int8"))
  assert gb.combos(dataclasses.replace(cfg, combos=pairs)) == list(pairs)
  with pytest.raises(ValueError, match="weights must be one of .*got 'int3'"):
    gb.combos(dataclasses.replace(cfg, combos=(("int3", "bf16"),)))
  with pytest.raises(ValueError, match="kv must be one of .*got 'int2'"):
    gb.combos(dataclasses.replace(cfg, kv=("int2",)))


@pytest.mark.parametrize("weights,bound", [("int8", 2e-2), ("int4", 1.5e-1)])
def test_serving_params_quantize_every_projection(key, weights, bound):
  config = gb.model_config(gb.QUICK)
  params = gpt.init_params(config, key)
  served = gb.serving_params(config, params, weights)
  leaves = jax.tree.leaves_with_path(served, is_leaf=lambda l: isinstance(l, (QArray,
                                                                              PackedWeight)))
  quantized = [jax.tree_util.keystr(p) for p, l in leaves if isinstance(l, (QArray, PackedWeight))]
  # q, k, v, o and the three MLP projections of each layer; embeddings and head stay float
  assert len(quantized) == 7 * config.num_layers
  assert not any("embed" in p or "lm_head" in p for p in quantized)
  tokens = jax.random.randint(key, (2, 16), 0, config.vocab_size)
  ref = gpt.GPT(config).apply({"params": params}, tokens)
  with quantized_inference():
    out = gpt.GPT(config).apply({"params": served}, tokens)
  err = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
  assert 0 < err < bound, err
  assert gb.serving_params(config, params, "bf16") is params


def test_cli_errors(capsys):
  for argv, msg in ((["--combos", "bf16"], "--combos: expected weights/kv pairs"),
                    (["--combos", "int3/bf16"], "weights must be one of"),
                    (["--preset", "gpt-9b"], "--preset: unknown 'gpt-9b'")):
    with pytest.raises(SystemExit) as e:
      gb.main(argv)
    assert e.value.code == 2
    assert msg in capsys.readouterr().err


def test_gpt_1b_preset_size():
  config = gpt.PRESETS["gpt-1b"]
  n = gpt.num_params(config)
  assert 1.3e9 < n < 1.4e9, n
  np.testing.assert_equal(config.d_model // config.num_heads, 128)
