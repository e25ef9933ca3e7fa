"""QArray formats: bit-exact pack/unpack, dequantization error bounds, layouts, bad inputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.quant import formats

INT_BITS = (2, 3, 4, 6)


@pytest.mark.parametrize("bits,signed", [(2, True), (3, False), (4, True), (4, False),
                                         (6, True)])
def test_pack_unpack_bit_exact(bits, signed, key):
  c = formats.FORMATS[formats.int_format(bits)].codes_per_word
  lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1)) if signed else (0, 2 ** bits)
  q = jax.random.randint(key, (3 * c, 5), lo, hi)
  p = formats.pack_bits(q, bits)
  assert p.dtype == jnp.uint8
  assert p.shape == formats.packed_shape(q.shape, formats.int_format(bits))
  np.testing.assert_array_equal(formats.unpack_bits(p, bits, signed=signed), q)
  # every byte pattern survives unpack -> pack
  raw = jax.random.randint(jax.random.fold_in(key, 1), p.shape, 0, 256).astype(jnp.uint8)
  np.testing.assert_array_equal(formats.pack_bits(formats.unpack_bits(raw, bits), bits), raw)


def test_int4_layout_low_nibble_is_even_row():
  q = jnp.array([[-8, 3], [7, -1], [0, 5], [-3, 2]], jnp.int32)
  p = np.asarray(formats.pack_int4(q))
  want = (np.asarray(q[0::2]) & 0xF) | ((np.asarray(q[1::2]) & 0xF) << 4)
  np.testing.assert_array_equal(p, want.astype(np.uint8))
  np.testing.assert_array_equal(formats.unpack_int4(formats.pack_int4(q)), q)


def test_int3_int6_int2_word_layout():
  q3 = jnp.arange(8)[:, None] % 8  # codes 0..7 in one 24-bit word
  word = sum(int(v) << (3 * j) for j, v in enumerate(np.asarray(q3[:, 0])))
  np.testing.assert_array_equal(np.asarray(formats.pack_int3(q3))[:, 0],
                                [(word >> (8 * t)) & 0xFF for t in range(3)])
  q6 = jnp.array([[1], [62], [33], [7]])
  word = sum(int(v) << (6 * j) for j, v in enumerate(np.asarray(q6[:, 0])))
  np.testing.assert_array_equal(np.asarray(formats.pack_int6(q6))[:, 0],
                                [(word >> (8 * t)) & 0xFF for t in range(3)])
  q2 = jnp.array([[1], [2], [3], [0]])
  assert int(formats.pack_int2(q2)[0, 0]) == 1 | 2 << 2 | 3 << 4


CASES = [(f, True, 32) for f in sorted(formats.FORMATS)] + [
    ("int8", False, None), ("int4", False, 32), ("int3", False, 32)]


@pytest.mark.parametrize("fmt,symmetric,group_size", CASES)
def test_quantize_dequantize_error_bound(fmt, symmetric, group_size, key):
  spec = formats.FORMATS[fmt]
  w = jax.random.normal(key, (96, 40)) * 0.3 + 0.1
  qa = formats.quantize_tensor(w, fmt, group_size=group_size, symmetric=symmetric)
  groups = 1 if group_size is None else 96 // group_size
  assert qa.scales.shape == (groups, 40) and qa.scales.dtype == jnp.float32
  assert (qa.zeros is None) == symmetric
  assert qa.values.shape == formats.packed_shape((96, 40), fmt)
  d = formats.dequantize(qa)
  assert d.shape == w.shape and d.dtype == jnp.float32
  err = jnp.abs(d - w)
  s = jnp.repeat(qa.scales, 96 // groups, axis=0)
  if spec.kind == "int":  # round to nearest: at most half a step (plus float slack)
    assert float(jnp.max(err / s)) <= 0.5 + 1e-4
  else:  # fp8: relative error of the mantissa (3 bits e4m3, 2 bits e5m2)
    rel = 2.0 ** -(4 if fmt == "fp8_e4m3" else 3)
    assert bool(jnp.all(err <= rel * jnp.abs(w) + s * 2.0 ** -9))
  # codes are re-quantized exactly from the dequantized values (idempotence)
  again = formats.quantize_with_scales(d, qa.scales, qa.zeros, fmt, group_size=group_size)
  np.testing.assert_array_equal(np.asarray(again.values), np.asarray(qa.values))


def test_code_ranges(key):
  w = jax.random.normal(key, (64, 16))
  q = formats.unpack_codes(formats.quantize_tensor(w, "int4", group_size=16))
  assert int(q.min()) >= -8 and int(q.max()) <= 7 and int(jnp.max(jnp.abs(q))) == 7
  qa = formats.quantize_tensor(w, "int4", group_size=16, symmetric=False)
  q = formats.unpack_codes(qa)
  assert q.dtype == jnp.uint8 and int(q.max()) == 15 and int(q.min()) == 0
  q8 = formats.quantize_tensor(w, "int8").values
  assert q8.dtype == jnp.int8 and int(jnp.max(jnp.abs(q8.astype(jnp.int32)))) == 127


def test_per_tensor_block_scales_and_per_input_channel(key):
  w = jax.random.normal(key, (64, 48))
  qa = formats.quantize_tensor(w, "int8", per_tensor=True)
  assert qa.scales.shape == (1, 1)
  np.testing.assert_allclose(qa.scales[0, 0], jnp.max(jnp.abs(w)) / 127, rtol=1e-6)
  ic = formats.quantize_tensor(w, "int4", axis=1, group_size=16)  # AdaDim per-IC
  assert ic.scales.shape == (64, 3) and ic.values.shape == (32, 48)
  assert float(jnp.max(jnp.abs(formats.dequantize(ic) - w) / jnp.repeat(ic.scales, 16, 1))) <= 0.5001
  # DeepGEMM-style 32 x 16 block scales: any scale shape dividing the tensor dequantizes
  s = jnp.abs(jax.random.normal(key, (2, 3))) + 0.1
  blocks = formats.QArray(jnp.ones((64, 48), jnp.int8), s, None, "int8", (64, 48), 0, 32)
  np.testing.assert_allclose(formats.dequantize(blocks), jnp.repeat(jnp.repeat(s, 32, 0), 16, 1))


def test_qarray_is_a_pytree_under_jit(key):
  qa = formats.quantize_tensor(jax.random.normal(key, (64, 8)), "int4", group_size=32,
                               symmetric=False)
  leaves, tree = jax.tree.flatten(qa)
  assert len(leaves) == 3
  back = jax.tree.unflatten(tree, leaves)
  assert back.fmt == "int4" and back.shape == (64, 8) and back.group_size == 32
  np.testing.assert_array_equal(jax.jit(formats.dequantize)(qa), formats.dequantize(qa))
  assert qa.nbytes == 32 * 8 + 2 * 2 * 8 * 4


def test_bad_inputs(key):
  w = jax.random.normal(key, (96, 8))
  with pytest.raises(ValueError, match="group_size: 64 does not divide the length 96"):
    formats.quantize_tensor(w, "int4", group_size=64)
  with pytest.raises(ValueError, match="unsupported quantization format 'int5'"):
    formats.quantize_tensor(w, "int5")
  with pytest.raises(ValueError, match="bits: unsupported bit width 5"):
    formats.pack_bits(jnp.zeros((8, 2), jnp.int32), 5)
  with pytest.raises(ValueError, match="divisible by the packing factor 8 of int3"):
    formats.quantize_tensor(w[:90], "int3", group_size=None)
  with pytest.raises(ValueError, match="divisible by the packing factor 2"):
    formats.pack_int4(jnp.zeros((7, 2), jnp.int32))
  with pytest.raises(ValueError, match="fp8_e4m3 supports symmetric quantization only"):
    formats.quantize_tensor(w, "fp8_e4m3", symmetric=False)
  with pytest.raises(TypeError, match="expected a floating-point tensor"):
    formats.quantize_tensor(jnp.ones((8, 8), jnp.int32), "int8")
  qa = formats.quantize_tensor(w, "int4", group_size=32)
  bad = formats.QArray(qa.values, qa.scales[:2], None, "int4", (96, 8), 0, 32)
  with pytest.raises(ValueError, match=r"qa.scales: shape \(2, 8\) has 2 groups along axis 0, "
                     r"expected 3"):
    formats.dequantize(bad)
  bad = formats.QArray(qa.values, qa.scales[:, :3], None, "int4", (96, 8), 0, 32)
  with pytest.raises(ValueError, match=r"qa.scales: shape \(3, 3\) must have rank 2 with every"):
    formats.dequantize(bad)
  bad = formats.QArray(qa.values[:10], qa.scales, None, "int4", (96, 8), 0, 32)
  with pytest.raises(ValueError, match=r"qa.values: shape \(10, 8\) does not match"):
    formats.dequantize(bad)
  bad = formats.QArray(qa.values, qa.scales, qa.scales, "int4", (96, 8), 0, 32, True)
  with pytest.raises(ValueError, match="symmetric=True requires zeros None"):
    formats.dequantize(bad)
  bad = formats.QArray(qa.values.astype(jnp.int8), qa.scales, None, "int4", (96, 8), 0, 32)
  with pytest.raises(TypeError, match="qa.values: dtype int8 does not match"):
    formats.dequantize(bad)
  with pytest.raises(TypeError, match="qa: expected a QArray"):
    formats.dequantize(w)
