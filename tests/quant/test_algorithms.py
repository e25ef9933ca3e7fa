"""AWQ, GPTQ, SmoothQuant, AdaDim, mixed precision and QAT fake-quant on single layers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.quant import awq, formats, gptq, mixed_precision, qat, rtn, smoothquant


def _outlier_inputs(key, tokens, k, channels=(3, 17, 40), gain=40.0):
  x = jax.random.normal(key, (tokens, k))
  return x.at[:, list(channels)].multiply(gain)


def _rel(y_hat, y):
  return float(jnp.linalg.norm(y_hat - y) / jnp.linalg.norm(y))


def test_awq_beats_rtn_on_planted_outliers(key):
  kx, kt, kw = jax.random.split(key, 3)
  w = jax.random.normal(kw, (128, 48)) * 0.05
  x_cal, x_test = _outlier_inputs(kx, 256, 128), _outlier_inputs(kt, 256, 128)
  qa, act = awq.awq_quantize(w, x_cal, "int4", group_size=64, n_grid=6, n_clip=3)
  assert act.input_scale.shape == (128,) and act.fmt is None
  y = x_test @ w
  e_awq = _rel((x_test * act.input_scale) @ formats.dequantize(qa), y)
  e_rtn = _rel(x_test @ formats.dequantize(formats.quantize_tensor(w, "int4", group_size=64)), y)
  assert e_awq < 0.8 * e_rtn, (e_awq, e_rtn)


def test_awq_scales_normalised():
  s = awq.awq_scales(jnp.array([0.1, 1.0, 10.0]), 1.0)
  np.testing.assert_allclose(float(jnp.sqrt(s.max() * s.min())), 1.0, rtol=1e-6)
  np.testing.assert_allclose(awq.awq_scales(jnp.array([0.1, 1.0, 10.0]), 0.0), 1.0)


@pytest.mark.parametrize("act_order,group_size,symmetric", [(False, 32, True),
                                                            (True, 32, False)])
def test_gptq_layer_error_at_most_rtn(act_order, group_size, symmetric, key):
  kx, kw, km = jax.random.split(key, 3)
  x = _outlier_inputs(kx, 384, 96, gain=8.0) @ (jnp.eye(96) + 0.2 * jax.random.normal(km, (96, 96)))
  w = jax.random.normal(kw, (96, 40)) * 0.05
  h = gptq.hessian(x)
  qa = gptq.gptq_quantize(w, h, "int4", group_size=group_size, symmetric=symmetric,
                          act_order=act_order, block_size=32)
  assert qa.scales.shape == (1 if group_size is None else 96 // group_size, 40)
  e_gptq = float(gptq.layer_error(w, formats.dequantize(qa), h))
  rt = formats.quantize_tensor(w, "int4", group_size=group_size, symmetric=symmetric)
  e_rtn = float(gptq.layer_error(w, formats.dequantize(rt), h))
  assert e_gptq <= 0.7 * e_rtn, (e_gptq, e_rtn)
  # the result lies on the format's grid: re-quantizing it changes nothing
  d = formats.dequantize(qa)
  again = formats.quantize_with_scales(d, qa.scales, qa.zeros, "int4", group_size=group_size)
  np.testing.assert_array_equal(np.asarray(again.values), np.asarray(qa.values))


def test_gptq_bad_inputs(key):
  w = jax.random.normal(key, (64, 8))
  with pytest.raises(ValueError, match=r"h: expected the \[K, K\] = \(64, 64\) input Hessian"):
    gptq.gptq_quantize(w, jnp.eye(32), "int4", group_size=32)
  with pytest.raises(ValueError, match="group_size: 48 does not divide the length 64"):
    gptq.gptq_quantize(w, jnp.eye(64), "int4", group_size=48)


def test_smoothquant_preserves_product_before_rounding(key):
  kx, kw = jax.random.split(key)
  x = _outlier_inputs(kx, 64, 80, gain=60.0)
  w = jax.random.normal(kw, (80, 24))
  s = smoothquant.smoothquant_scales(jnp.max(jnp.abs(x), axis=0), w, alpha=0.5)
  xs, ws = smoothquant.smooth(x, w, s)
  np.testing.assert_allclose(xs @ ws, x @ w, rtol=2e-5, atol=2e-5 * float(jnp.abs(x @ w).max()))
  # outliers moved: activation channel ranges flatter, weights absorbed them
  spread = lambda a: np.ptp(np.log(np.abs(np.asarray(a)).max(0)))  # noqa: E731
  assert spread(xs) < 0.6 * spread(x)
  qa, act = smoothquant.smoothquant_quantize(w, jnp.max(jnp.abs(x), axis=0))
  assert act.fmt == "int8" and qa.fmt == "int8" and qa.scales.shape == (1, 24)
  np.testing.assert_allclose(act.input_scale, 1.0 / s, rtol=1e-6)
  with pytest.raises(ValueError, match=r"alpha: expected a migration strength in \[0, 1\]"):
    smoothquant.smoothquant_scales(jnp.ones(80), w, alpha=1.5)
  with pytest.raises(ValueError, match="act_fmt: activations are quantized to int8 or fp8"):
    smoothquant.smoothquant_quantize(w, jnp.ones(80), act_fmt="int4")


def test_adadim_picks_the_grouping_dimension(key):
  kw, kr = jax.random.split(key)
  w = jax.random.normal(kw, (64, 64)) * 0.02
  spread = 10.0 ** jax.random.uniform(kr, (64,), minval=-1.0, maxval=1.0)
  # input-channel (row) magnitudes differ: per-IC groups (axis=1) give each row its scale
  assert rtn.adadim_quantize(w * spread[:, None], "int4", group_size=32).axis == 1
  # output-channel (column) magnitudes differ: per-OC groups along K (axis=0) win
  assert rtn.adadim_quantize(w * spread[None, :], "int4", group_size=32).axis == 0
  # a group size dividing only N forces per-IC
  assert rtn.adadim_quantize(w[:48], "int4", group_size=32).axis == 1


def test_allocate_bits_respects_budget_and_prefers_sensitive_layers():
  sizes = {"a": 100, "b": 100, "c": 200}
  errors = {"a": {"int4": 10.0, "int8": 0.1}, "b": {"int4": 1.0, "int8": 0.5},
            "c": {"int4": 2.0, "int8": 0.2}}
  bits = {"int4": 4, "int8": 8}
  choice = mixed_precision.allocate_bits(sizes, errors, bits, budget_bits=5.0)
  assert choice == {"a": "int8", "b": "int4", "c": "int4"}
  avg = sum(bits[f] * sizes[l] for l, f in choice.items()) / sum(sizes.values())
  assert avg <= 5.0
  assert set(mixed_precision.allocate_bits(sizes, errors, bits, 8.0).values()) == {"int8"}
  with pytest.raises(ValueError, match="budget_bits: 3.0 is below the cheapest format's 4 bits"):
    mixed_precision.allocate_bits(sizes, errors, bits, 3.0)


def test_qat_fake_quant_straight_through(key):
  w = jax.random.normal(key, (64, 16))
  fq = qat.fake_quant_ste(w, "int4", 0, 32, True)
  np.testing.assert_array_equal(fq, formats.fake_quantize(w, "int4", group_size=32))
  assert float(jnp.max(jnp.abs(fq - w))) > 0
  ct = jax.random.normal(jax.random.fold_in(key, 1), w.shape)
  g = jax.grad(lambda v: jnp.sum(qat.fake_quant_ste(v, "int4", 0, 32, True) * ct))(w)
  np.testing.assert_array_equal(g, ct)  # identity: straight through the rounding
  params = {"dense": {"kernel": w, "bias": w[0]}, "head": {"kernel": w}}
  out = qat.fake_quant_params(params, [(r"dense/kernel", "rtn", "int8", None)])
  np.testing.assert_array_equal(out["dense"]["kernel"], formats.fake_quantize(w, "int8"))
  np.testing.assert_array_equal(out["head"]["kernel"], w)
  np.testing.assert_array_equal(out["dense"]["bias"], w[0])
  grads = jax.grad(lambda p: jnp.sum(qat.fake_quant_params(
      p, [(r"kernel", "rtn", "int4", 32)])["head"]["kernel"] * ct))(params)
  np.testing.assert_array_equal(grads["head"]["kernel"], ct)
