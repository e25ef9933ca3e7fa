"""Model-level quantize(): regex rules over parameter paths, calibration, mixed precision."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff import quant
from jaxeff.models import gpt
from jaxeff.nn.quant import quantized_inference
from jaxeff.quant import formats

CONFIG = gpt.GPTConfig(vocab_size=64, num_layers=1, d_model=32, num_heads=2, num_kv_heads=1,
                       mlp_hidden=64, max_seq_len=32)


@pytest.fixture(scope="module")
def tiny():
  params = jax.jit(lambda k: gpt.init_params(CONFIG, k))(jax.random.key(3))
  tokens = jax.random.randint(jax.random.key(4), (2, 16), 0, CONFIG.vocab_size)
  return gpt.GPT(CONFIG), params, tokens


def test_rules_match_paths_first_rule_wins(tiny):
  model, params, tokens = tiny
  rules = [(r"attn/v_proj", "none"), (r"attn/", "rtn", "int8", None),
           (r"mlp/down_proj", "rtn", "int4", 32, False), (r"mlp/", "rtn", "int4", 16)]
  qp = quant.quantize(params, rules, model=model, example_input=tokens)
  b = qp["block_0"]
  assert not isinstance(b["attn"]["v_proj"]["kernel"], formats.QArray)
  for name, heads in (("q_proj", 2), ("k_proj", 1)):
    qa = b["attn"][name]["kernel"]
    assert qa.fmt == "int8" and qa.shape == (32, heads * 16) and qa.group_size is None
  assert b["mlp"]["down_proj"]["kernel"].group_size == 32
  assert not b["mlp"]["down_proj"]["kernel"].symmetric
  assert b["mlp"]["gate_proj"]["kernel"].group_size == 16
  assert not isinstance(qp["embed"]["embedding"], formats.QArray)  # only kernels
  np.testing.assert_array_equal(b["attn_norm"]["scale"], params["block_0"]["attn_norm"]["scale"])
  # DenseGeneral o_proj [heads, head_dim, d] contracts two dims: K = 2 * 16
  assert b["attn"]["o_proj"]["kernel"].shape == (32, 32)
  apply = jax.jit(lambda p: model.apply({"params": p}, tokens))
  with quantized_inference():
    out = apply(qp)
  ref = apply(params)
  assert float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref)) < 0.05


def test_calibrated_methods_and_w8a8(tiny):
  model, params, tokens = tiny
  calib = [tokens, tokens[::-1]]
  ref = jax.jit(lambda p: model.apply({"params": p}, tokens))(params)
  for rule in [("mlp/down_proj", "gptq", "int4", 32), ("mlp/up_proj", "smoothquant", "int8", None)]:
    qp = quant.quantize(params, [rule], calib, model=model, max_calib_tokens=32)
    layer = rule[0].split("/")[1]
    assert isinstance(qp["block_0"]["mlp"][layer]["kernel"], formats.QArray)
    act = qp["block_0"]["mlp"][layer].get("act_quant")
    if rule[1] == "gptq":
      assert act is None
    else:
      assert act.input_scale.shape == (32,)
      assert act.fmt == "int8"
    with quantized_inference():
      out = jax.jit(lambda p: model.apply({"params": p}, tokens))(qp)
    assert float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref)) < 0.05, rule


def test_mixed_precision_rules(tiny):
  model, params, tokens = tiny
  rules, report = quant.mixed_precision_rules(params, model, [tokens], pattern="mlp/.*kernel",
                                              budget_bits=6.0,
                                              candidates=(("int4", 16), ("int8", None)))
  assert sorted(report["bits"]) == ["block_0/mlp/down_proj/kernel",
                                    "block_0/mlp/gate_proj/kernel", "block_0/mlp/up_proj/kernel"]
  assert 4.0 <= report["average_bits"] <= 6.0 and "int8" in report["bits"].values()
  qp = quant.quantize(params, rules)
  for path, fmt in report["bits"].items():
    _, _, layer, _ = path.split("/")
    assert qp["block_0"]["mlp"][layer]["kernel"].fmt == fmt


def test_model_bytes(tiny):
  _, params, _ = tiny
  qp = quant.quantize(params, [("mlp/", "rtn", "int4", 32)])
  # three 2048-weight kernels: float32 8192 B -> 1024 B of int4 codes + 256 B of scales
  saved = 3 * (8192 - 1024 - 256)
  assert quant.model_bytes(params) - quant.model_bytes(qp) == saved


def test_bad_rules_and_missing_calibration(tiny):
  model, params, tokens = tiny
  with pytest.raises(ValueError, match="method: unsupported quantization method 'hqq'"):
    quant.quantize(params, [("kernel", "hqq", "int4")])
  with pytest.raises(ValueError, match="unsupported quantization format 'int5'"):
    quant.QuantRule("kernel", "rtn", "int5")
  with pytest.raises(ValueError, match="pattern: invalid regex"):
    quant.QuantRule("(kernel", "rtn")
  with pytest.raises(TypeError, match="rules: expected QuantRule"):
    quant.quantize(params, [42])
  with pytest.raises(ValueError, match="calibration_batches: method 'gptq' for "
                     "block_0/attn/[qkv]_proj/kernel needs calibration data"):
    quant.quantize(params, [("kernel", "gptq", "int4", 16)], model=model, example_input=tokens)
  with pytest.raises(ValueError, match="group_size: 24 does not divide K = 32 of "
                     "block_0/attn/[qkv]_proj/kernel"):
    quant.quantize(params, [("kernel", "rtn", "int4", 24)], model=model, example_input=tokens)
