"""QuantDense and the quantized_inference interceptor vs Dense on dequantized weights."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from jaxeff import quant
from jaxeff.nn.quant import QuantDense, quantized_inference
from jaxeff.quant import formats
from tests.helpers import assert_close


def _dequantized_params(qparams, kernel_shape):
  out = dict(qparams)
  out["kernel"] = formats.dequantize(qparams["kernel"]).reshape(kernel_shape)
  return out


@pytest.mark.parametrize("fmt,group_size,symmetric", [("int4", 32, True), ("int4", 16, False),
                                                      ("fp8_e4m3", None, True)])
def test_quant_dense_equals_dense_on_dequantized(fmt, group_size, symmetric, key):
  kx, ki = jax.random.split(key)
  x = jax.random.normal(kx, (3, 5, 64))
  layer = QuantDense(24, fmt=fmt, group_size=group_size, symmetric=symmetric)
  params = jax.jit(layer.init)(ki, x)["params"]
  params = {**params, "bias": jax.random.normal(ki, (24,))}
  assert isinstance(params["kernel"], formats.QArray) and params["kernel"].shape == (64, 24)
  y = jax.jit(layer.apply)({"params": params}, x)
  ref = jax.jit(nn.Dense(24).apply)({"params": _dequantized_params(params, (64, 24))}, x)
  assert_close(y, ref, rtol=1e-5)


def test_quant_dense_general_multi_axis(key):
  kx, ki = jax.random.split(key)
  x = jax.random.normal(kx, (2, 7, 4, 16))  # [batch, seq, heads, head_dim]
  layer = QuantDense((3, 8), axis=(-2, -1), fmt="int8")
  params = jax.jit(layer.init)(ki, x)["params"]
  y = jax.jit(layer.apply)({"params": params}, x)
  assert y.shape == (2, 7, 3, 8)
  ref = jax.jit(nn.DenseGeneral((3, 8), axis=(-2, -1)).apply)(
      {"params": _dequantized_params(params, (4, 16, 3, 8))}, x)
  assert_close(y, ref, rtol=1e-5)


def test_w8a8_act_quant_matches_per_token_reference(key):
  kx, ki = jax.random.split(key)
  x = jax.random.normal(kx, (6, 32))
  layer = QuantDense(16, use_bias=False, fmt="int8", act_fmt="int8")
  params = jax.jit(layer.init)(ki, x)["params"]
  y = jax.jit(layer.apply)({"params": params}, x)
  amax = jnp.max(jnp.abs(x), -1, keepdims=True)
  xq = jnp.round(x / (amax / 127)) * (amax / 127)
  assert_close(y, xq @ formats.dequantize(params["kernel"]), rtol=1e-5)
  # an act_quant leaf with input scales (SmoothQuant) multiplies x first
  s = jnp.abs(jax.random.normal(ki, (32,))) + 0.5
  y2 = jax.jit(layer.apply)({"params": {**params, "act_quant": formats.ActQuant(s, "int8")}}, x)
  xs = x * s
  amax = jnp.max(jnp.abs(xs), -1, keepdims=True)
  xq = jnp.round(xs / (amax / 127)) * (amax / 127)
  assert_close(y2, xq @ formats.dequantize(params["kernel"]), rtol=1e-5)


def test_interceptor_runs_stock_dense_on_quantized_params(key):
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.Dense(32, name="up")(x)
      h = nn.DenseGeneral((2, 8), name="split")(jax.nn.relu(h))
      return nn.DenseGeneral(8, axis=(-2, -1), use_bias=False, name="merge")(h)

  kx, ki = jax.random.split(key)
  x = jax.random.normal(kx, (4, 16))
  net = Net()
  params = jax.jit(net.init)(ki, x)["params"]
  qp = quant.quantize(params, [("up|merge", "rtn", "int8", None)], model=net, example_input=x)
  assert isinstance(qp["up"]["kernel"], formats.QArray)
  assert qp["merge"]["kernel"].shape == (16, 8)
  assert not isinstance(qp["split"]["kernel"], formats.QArray)
  deq = jax.tree.map(lambda a: a, params)
  deq["up"]["kernel"] = formats.dequantize(qp["up"]["kernel"])
  deq["merge"]["kernel"] = formats.dequantize(qp["merge"]["kernel"]).reshape(2, 8, 8)
  with quantized_inference():
    y = jax.jit(lambda p: net.apply({"params": p}, x))(qp)
  assert_close(y, jax.jit(net.apply)({"params": deq}, x), rtol=1e-5)
  with pytest.raises(Exception):  # outside the context a QArray kernel is not a Dense kernel
    net.apply({"params": qp}, x)


def test_quant_dense_bad_inputs(key):
  x = jax.random.normal(key, (2, 48))
  with pytest.raises(ValueError, match="group_size: 32 does not divide the length 48"):
    QuantDense(8, fmt="int4", group_size=32).init(key, x)
  params = QuantDense(8, fmt="int8").init(key, x)["params"]
  with pytest.raises(Exception, match=r"expected to generate shape \(48, 16\)"):
    QuantDense(16, fmt="int8").apply({"params": params}, x)
  with pytest.raises(TypeError, match="QuantDense: params 'kernel' must be a QArray"):
    QuantDense(8).apply({"params": {"kernel": jnp.ones((48, 8))}}, x)
  with pytest.raises(ValueError, match="quantized layers contract trailing input axes"):
    QuantDense(8, axis=0).init(key, x)
