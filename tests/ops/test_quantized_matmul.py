"""quantized_matmul / fp8_dot: every kernel vs the dequantize-then-dot reference.

One test body per case, run by the reference, each kernel in interpret mode (CPU) and each
kernel for real under the ``gpu`` marker (tiny shapes on CPU, real sizes on GPU).
"""

from __future__ import annotations

import dataclasses
import importlib
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.quant.formats import quantize_tensor
from tests.helpers import assert_close, rel_err

# The module (jaxeff.ops exports the function of the same name).
qm = importlib.import_module("jaxeff.ops.quantized_matmul")

INTERPRET = ["triton:interpret", "mosaic_gpu:interpret"]


def _weight(key, k, n, fmt, group_size=None, symmetric=True, per_tensor=False):
  w = jax.random.normal(key, (k, n), jnp.float32)
  return quantize_tensor(w, fmt, group_size=group_size, symmetric=symmetric,
                         per_tensor=per_tensor)


def _expected(x, w, x_scale=None):
  """Float32 reference: dequantized operands, one exact dot."""
  xd = qm._dequantize_x(x.reshape(-1, x.shape[-1]),
                        None if x_scale is None else jnp.broadcast_to(
                            x_scale.reshape(-1, x_scale.shape[-1]) if x_scale.ndim
                            else x_scale.reshape(1, 1),
                            (x.reshape(-1, x.shape[-1]).shape[0],
                             x_scale.shape[-1] if x_scale.ndim else 1)))
  out = jnp.dot(xd, w.dequantize(jnp.float32), precision=jax.lax.Precision.HIGHEST)
  return out.reshape(x.shape[:-1] + (w.shape[1],))


# ------------------------------------------------------------------------ weight-only

WEIGHT_ONLY_CASES = [
    # (m, k, n, fmt, group_size, symmetric)
    (3, 256, 72, "int4", 128, True),
    (1, 200, 130, "int4", None, False),
    (16, 192, 64, "int4", 64, False),
    (5, 130, 96, "int8", None, True),
    (2, 256, 40, "int8", 128, False),
]


@pytest.mark.parametrize("case", WEIGHT_ONLY_CASES, ids=str)
@pytest.mark.parametrize("implementation", ["triton:interpret"])
def test_weight_only(case, implementation, key):
  m, k, n, fmt, group, sym = case
  kx, kw = jax.random.split(key)
  w = _weight(kw, k, n, fmt, group, sym)
  x = jax.random.normal(kx, (m, k), jnp.float32).astype(jnp.bfloat16)
  out = qm.quantized_matmul(x, w, implementation=implementation)
  assert out.shape == (m, n) and out.dtype == jnp.bfloat16
  assert_close(out, _expected(x, w).astype(jnp.bfloat16))


def _variant_config(variant):
  from kernels_pallas.matmul import mosaic_gpu as mg
  from kernels_pallas.matmul import triton as tr
  return {"triton_magic": tr.WeightOnlyConfig(16, 64, 64, 2, dequant="magic"),
          "gemv": tr.GemvConfig(block_n=32, group_bytes=64, groups_per_step=2, split_k=2),
          "mosaic": mg.WeightOnlyConfig(block_k=128, num_stages=2, split_k=2),
          "mosaic_pipelined": mg.WeightOnlyConfig(block_k=128, num_stages=2, split_k=2,
                                                  pipeline_upcast=True)}[variant]


@pytest.mark.parametrize("variant,case", [
    ("triton_magic", (3, 384, 130, "int4", 128)), ("gemv", (5, 300, 72, "int8", None)),
    ("mosaic", (16, 384, 130, "int4", 128)), ("mosaic", (1, 300, 72, "int8", None)),
    # pipelined upcast: 2 steps a split (= stages), 5 (> stages), 1 (no loop iteration)
    ("mosaic_pipelined", (16, 384, 130, "int4", 128)),
    ("mosaic_pipelined", (3, 1100, 72, "int8", None)),
    ("mosaic_pipelined", (1, 200, 72, "int4", None))], ids=str)
def test_weight_only_variants(variant, case, key):
  # K not a multiple of the tiles, N odd, prepacked (int4 typed for mosaic) and QArray.
  m, k, n, fmt, group = case
  kx, kw = jax.random.split(key)
  w = _weight(kw, k, n, fmt, group)
  x = jax.random.normal(kx, (m, k), jnp.float32).astype(jnp.bfloat16)
  weight = qm.prepack(w, native_int4=variant == "mosaic") if variant != "triton_magic" else w
  out = qm.weight_only_matmul(x, weight, variant=variant.split("_")[0],
                              config=_variant_config(variant), interpret=True)
  assert out.shape == (m, n) and out.dtype == jnp.float32
  assert_close(out, _expected(x, w), rtol=1.5e-2)


def test_weight_only_batched_float16_and_other_formats(key):
  kx, kw = jax.random.split(key)
  x = jax.random.normal(kx, (2, 3, 64), jnp.float32).astype(jnp.float16)
  w = _weight(kw, 64, 48, "int4", 32)
  out = qm.quantized_matmul(x, w, implementation="triton:interpret", out_dtype=jnp.float32)
  assert out.shape == (2, 3, 48) and out.dtype == jnp.float32
  assert_close(out, _expected(x, w), rtol=4e-3)
  for fmt in ("int3", "fp8_e4m3"):  # reference-only formats fall back
    w = _weight(kw, 96, 24, fmt, 32 if fmt != "fp8_e4m3" else None)
    x32 = jax.random.normal(kx, (4, 96), jnp.float32)
    assert_close(qm.quantized_matmul(x32, w), _expected(x32, w), rtol=1e-5)


def test_weight_only_default_by_weight_layout(monkeypatch, key):
  # K-major weights the Mosaic kernel reads in place (native int4, int8 PackedWeight) run
  # it on Hopper; QArrays and uint8-packed int4 PackedWeights run the Triton kernel.
  from jaxeff.ops import _registry
  kx, kw = jax.random.split(key)
  w = _weight(kw, 256, 72, "int4", 128)
  w8 = _weight(kw, 256, 72, "int8")
  native = qm.prepack(w, native_int4=True)
  for kmajor in (native, qm.prepack(w8)):
    assert qm._weight_only_choice(2, kmajor, interpret=True) == ("mosaic", None)
  for other in (w, w8, qm.prepack(w, native_int4=False)):
    assert qm._weight_only_choice(2, other, interpret=True) == ("triton", None)
  # wider x on K-major weights: the medium-m kernel from m = 33 up to 256, then none
  for m in (qm.MOSAIC_MAX_M + 1, 128, 256):
    assert qm._weight_only_choice(m, native, interpret=True) == ("medium", None)
  assert qm._weight_only_choice(qm.MOSAIC_MAX_M, native, interpret=True) == ("mosaic", None)
  assert qm._weight_only_choice(257, native, interpret=True) == ("triton", None)  # m > max
  assert qm._weight_only_choice(128, w, interpret=True) == ("triton", None)  # QArray
  assert qm._weight_only_choice(2, native, interpret=False) == ("triton", None)  # CPU: no Hopper
  assert "dequantize-then-dot" in qm._triton_supports(
      jnp.zeros((128, 256), jnp.bfloat16), native, None, out_dtype=jnp.float32)
  monkeypatch.setattr(_registry, "_device_kind", lambda: "NVIDIA H100 80GB HBM3")
  assert qm._weight_only_choice(2, native, interpret=False) == ("mosaic", None)
  assert qm._weight_only_choice(128, native, interpret=False) == ("medium", None)
  assert qm._triton_supports(jnp.zeros((128, 256), jnp.bfloat16), native, None,
                             out_dtype=jnp.float32) is None
  assert qm._weight_only_choice(300, native, interpret=False) == ("triton", None)
  g64 = qm.prepack(_weight(kw, 256, 72, "int4", 64), native_int4=True)  # groups < block_k
  assert qm._weight_only_choice(2, g64, interpret=False) == ("triton", None)
  # prepack's default layout: uint8 nibbles off Hopper, jnp.int4 on a Hopper GPU
  assert not qm.prepack(w).native_int4
  monkeypatch.setattr(_registry, "current_platform", lambda: "gpu")
  assert qm.prepack(w).native_int4 and qm.prepack(w8).fmt == "int8"
  assert not qm.prepack(w, native_int4=False).native_int4
  assert not qm.prepack(_weight(kw, 256, 72, "int4", 64)).native_int4  # g64: Triton's layout
  x = jax.random.normal(kx, (2, 256), jnp.float32).astype(jnp.bfloat16)
  out = qm.quantized_matmul(x, native, implementation="triton:interpret")
  assert_close(out, _expected(x, w).astype(jnp.bfloat16))


def test_weight_only_picks_triton_interpreted_and_rejects_mosaic(key):
  w = _weight(key, 128, 64, "int4", 128)
  x = jnp.ones((2, 128), jnp.bfloat16)
  with pytest.raises(NotImplementedError, match="mosaic_gpu serves 8-bit activations"):
    qm.quantized_matmul(x, w, implementation="mosaic_gpu:interpret")


# ------------------------------------------------------------------------ W8A8 and fp8


@pytest.mark.parametrize("implementation,per_tensor", [("mosaic_gpu:interpret", False),
                                                       ("xla", True)])
def test_w8a8_int8(implementation, per_tensor, key):
  kx, kw = jax.random.split(key)
  w = _weight(kw, 200, 136, "int8", per_tensor=per_tensor)
  x = jax.random.normal(kx, (7, 200), jnp.float32).astype(jnp.bfloat16)
  xq, xs = qm.quantize_activations(x, "int8")
  assert xq.dtype == jnp.int8 and xs.shape == (7, 1)
  out = qm.quantized_matmul(xq, w, x_scale=xs, implementation=implementation)
  assert out.dtype == jnp.bfloat16
  assert_close(out, _expected(xq, w, xs).astype(jnp.bfloat16))
  # the quantized product stays close to the float one
  assert rel_err(out, x.astype(jnp.float32) @ w.dequantize()) < 2e-2


@pytest.mark.parametrize("scales", ["tensor", "row", "block"])
def test_fp8(scales, key):
  kx, kw = jax.random.split(key)
  m, k, n = 9, 256, 200
  x = jax.random.normal(kx, (m, k), jnp.float32)
  if scales == "block":  # 1 x 128 activation tiles, 128 x 128 weight tiles
    wf = jax.random.normal(kw, (k, n), jnp.float32)
    from jaxeff.quant.formats import quantize_with_scales
    wpad = jnp.pad(jnp.abs(wf), ((0, 0), (0, -n % 128)))
    amax = wpad.reshape(k // 128, 128, -1, 128).max(axis=(1, 3))
    s = jnp.repeat(amax / 448.0, 128, axis=1)[:, :n]
    w = quantize_with_scales(wf, s, None, "fp8_e4m3", group_size=128)
    xq, xs = qm.quantize_activations(x, "fp8_e4m3", block_size=128)
  else:
    w = _weight(kw, k, n, "fp8_e4m3", per_tensor=scales == "tensor")
    xq, xs = qm.quantize_activations(x, "fp8_e4m3")
    if scales == "tensor":
      xs = jnp.max(xs)
      xq = (x / xs).astype(jnp.float8_e4m3fn)
  expected = _expected(xq, w, xs)
  out = qm.quantized_matmul(xq, w, x_scale=xs, out_dtype=jnp.float32, implementation="xla")
  assert_close(out, expected, rtol=1e-5)
  for weight in (w, qm.prepack(w)):  # compact 128 x 128 tile scales / per-column scales
    out = qm.quantized_matmul(xq, weight, x_scale=xs, out_dtype=jnp.float32,
                              implementation="mosaic_gpu:interpret")
    assert_close(out, expected, rtol=1e-5)
  assert rel_err(expected, x @ w.dequantize()) < 8e-2


@pytest.mark.parametrize("dtype", [jnp.float8_e4m3fn, jnp.float8_e5m2])
def test_fp8_to_float32_is_exact(dtype):
  q = jax.lax.bitcast_convert_type(jnp.arange(256, dtype=jnp.uint8), dtype)
  got = np.asarray(jax.jit(qm.fp8_to_float32)(q))
  want = np.asarray(q.astype(jnp.float32))
  np.testing.assert_array_equal(got, want)  # NaNs compare equal here


def _block_case(key, m, n, k, scales, cfg, interpret):
  """fp8 operands with per-K-block scales in [0.25, 4): a wrong block's scale shows up.

  ``scales``: "columns" (one weight scale per column and K block) or a
  ``scaled_matmul_nt(tile_scales=...)`` form of 128 x 128 tile scales.
  """
  ka, kb, ksa, ksb = jax.random.split(key, 4)
  steps = k // 128
  a = jax.random.normal(ka, (m, k), jnp.float32).astype(jnp.float8_e4m3fn)
  b = jax.random.normal(kb, (n, k), jnp.float32).astype(jnp.float8_e4m3fn)
  sa = 2.0 ** jax.random.uniform(ksa, (steps, m), minval=-2, maxval=2)
  if scales == "columns":
    sb = sb_cols = 2.0 ** jax.random.uniform(ksb, (steps, n), minval=-2, maxval=2)
    form = "columns"
  else:
    sb = 2.0 ** jax.random.uniform(ksb, (steps, -(-n // 128)), minval=-2, maxval=2)
    sb_cols = np.repeat(np.asarray(sb), 128, axis=1)[:, :n]
    form = scales
  af = np.asarray(a.astype(jnp.float32), np.float64) * np.repeat(np.asarray(sa).T, 128, axis=1)
  bf = np.asarray(b.astype(jnp.float32), np.float64) * np.repeat(np.asarray(sb_cols).T, 128,
                                                                   axis=1)
  out = qm.scaled_matmul_nt(a, b, sa, sb, scale_mode="block", out_dtype=jnp.float32,
                            config=cfg, interpret=interpret, tile_scales=form)
  return out, af @ bf.T


@pytest.mark.parametrize("overlap,scales,k", [(False, "columns", 384), (True, "tile_copy", 512),
                                              (False, "column_scalar", 256)])
def test_block_scaled_kernel_interpret(overlap, scales, k, key):
  # More K blocks than pipeline stages (the slot ring wraps), odd and even block counts.
  from kernels_pallas.matmul import mosaic_gpu as mg
  cfg = mg.MatmulConfig(block_m=64, block_n=128, block_k=128, num_stages=2, overlap=overlap)
  out, ref = _block_case(key, 100, 200, k, scales, cfg, True)
  assert rel_err(out, ref) < 1e-6


def test_block_scaling_refused_on_gpu_until_validated(monkeypatch, key):
  # With BLOCK_SCALED_KERNEL off, the dispatcher on a GPU leaves block scaling to the
  # reference (and refuses the kernel by name); per-tile scale copies (which crashed the
  # H100) are refused outside interpret mode either way.
  from jaxeff.ops import _registry
  from kernels_pallas.matmul import mosaic_gpu as mg
  assert qm.BLOCK_SCALED_KERNEL  # validated on the H100: on by default
  monkeypatch.setattr(qm, "BLOCK_SCALED_KERNEL", False)
  monkeypatch.setattr(_registry, "current_platform", lambda: "gpu")
  monkeypatch.setattr(_registry, "_device_kind", lambda: "NVIDIA H100 80GB HBM3")
  x = jax.random.normal(key, (4, 256), jnp.float32)
  xq, xs = qm.quantize_activations(x, "fp8_e4m3", block_size=128)
  w = _weight(key, 256, 128, "fp8_e4m3", group_size=128)
  assert "XLA reference" in qm._mosaic_supports(xq, w, xs, out_dtype=jnp.bfloat16)
  with pytest.raises(NotImplementedError, match="block-scaled fp8 is served by the XLA"):
    qm.quantized_matmul(xq, w, x_scale=xs, implementation="mosaic_gpu")
  with pytest.raises(NotImplementedError, match="BLOCK_SCALED_KERNEL"):
    qm.fp8_dot(x, jnp.ones((256, 128)), scaling="block", implementation="mosaic_gpu")
  # per-row scaling is still the kernel's
  xr, sr = qm.quantize_activations(x, "fp8_e4m3")
  assert qm._mosaic_supports(xr, _weight(key, 256, 128, "fp8_e4m3"), sr,
                             out_dtype=jnp.bfloat16) is None
  monkeypatch.setattr(qm, "BLOCK_SCALED_KERNEL", True)
  assert qm._mosaic_supports(xq, w, xs, out_dtype=jnp.bfloat16) is None
  cfg = mg.MatmulConfig(block_m=64, block_n=128, block_k=128)
  a = jnp.ones((128, 256), jnp.float8_e4m3fn)
  with pytest.raises(ValueError, match="per-tile weight scales .* crashed the H100"):
    mg.scaled_matmul(a, a, jnp.ones((2, 128)), jnp.ones((2, mg.tile_scale_columns(128, cfg))),
                     scale_mode="block", config=cfg)
  with pytest.raises(ValueError, match="tile_scales must be one of"):
    qm.scaled_matmul_nt(a, a, jnp.ones((2, 128)), jnp.ones((2, 1)), scale_mode="block",
                        out_dtype=jnp.float32, tile_scales="tiles")


@pytest.mark.parametrize("fmt,group,sym", [("int4", 64, False), ("int8", None, True)])
def test_prepacked_weight_only(fmt, group, sym, key):
  kx, kw = jax.random.split(key)
  w = _weight(kw, 192, 80, fmt, group, sym)
  pw = qm.prepack(w)
  assert pw.values.shape == (80, 96 if fmt == "int4" else 192)
  assert pw.scales.shape == (80, 192 // (group or 192))
  assert_close(pw.dequantize(), w.dequantize(), rtol=0)
  x = jax.random.normal(kx, (5, 192), jnp.float32).astype(jnp.bfloat16)
  out = qm.quantized_matmul(x, pw, implementation="triton:interpret")
  assert_close(out, _expected(x, w).astype(jnp.bfloat16))


def test_prepack_matches_qarray(key):
  w = _weight(key, 128, 64, "int8")
  pw = qm.prepack(w)
  assert pw.values.shape == (64, 128) and pw.scales.shape == (64, 1)
  assert_close(pw.dequantize(), w.dequantize(), rtol=0)
  x = jax.random.normal(key, (3, 128), jnp.float32)
  xq, xs = qm.quantize_activations(x)
  out = qm.quantized_matmul(xq, pw, x_scale=xs, implementation="mosaic_gpu:interpret")
  assert_close(out, _expected(xq, w, xs).astype(jnp.bfloat16))
  assert jax.tree.leaves(pw)  # a pytree: jit-able
  jax.jit(lambda p: qm.quantized_matmul(xq, p, x_scale=xs))(pw)


# ------------------------------------------------------------------------ fp8 training


@pytest.mark.parametrize("scaling", ["row"])  # "block" kernel: test_fp8
def test_fp8_dot_gradients(scaling, key):
  kx, kw, kd = jax.random.split(key, 3)
  x = jax.random.normal(kx, (2, 5, 130), jnp.float32).astype(jnp.bfloat16)
  w = (jax.random.normal(kw, (130, 40), jnp.float32) / 10).astype(jnp.bfloat16)
  dy = jax.random.normal(kd, (2, 5, 40), jnp.float32).astype(jnp.bfloat16)

  def vjp(backend):  # the custom_vjp directly: dispatch refuses mosaic_gpu for "block"
    call = qm._Fp8Call(scaling, backend, True)
    y, f = jax.vjp(lambda a, b: qm._fp8_dot(a.reshape(-1, 130), b, call).reshape(2, 5, -1),
                   x, w)
    return (y, *f(dy))

  got, twin = vjp("mosaic_gpu"), vjp("xla")
  _, f_exact = jax.vjp(lambda a, b: a.astype(jnp.float32) @ b.astype(jnp.float32), x, w)
  exact = (x.astype(jnp.float32) @ w.astype(jnp.float32), *f_exact(dy.astype(jnp.float32)))
  for name, g, t, e in zip(("y", "dx", "dw"), got, twin, exact):
    assert g.dtype == jnp.bfloat16, name
    assert_close(g, t, name=name)  # same quantization, kernel vs XLA dot
    assert rel_err(g, e) < 8e-2, name  # fp8 vs exact


def test_fp8_dot_tensor_scaling_xla(key):
  x = jax.random.normal(key, (4, 64), jnp.float32)
  w = jax.random.normal(key, (64, 8), jnp.float32)
  g = jax.grad(lambda w: qm.fp8_dot(x, w, scaling="tensor").sum())(w)
  assert rel_err(g, jax.grad(lambda w: (x @ w).sum())(w)) < 8e-2


# ------------------------------------------------------------------------ bad inputs


def test_bad_inputs(key):
  w4 = _weight(key, 128, 64, "int4", 128)
  w8 = _weight(key, 128, 64, "int8")
  x = jnp.ones((2, 128), jnp.bfloat16)
  with pytest.raises(ValueError, match=r"x.shape\[-1\] = 100 must equal K = 128"):
    qm.quantized_matmul(jnp.ones((2, 100), jnp.bfloat16), w4)
  with pytest.raises(TypeError, match="w must be a jaxeff.quant.QArray or a PackedWeight"):
    qm.quantized_matmul(x, jnp.ones((128, 64)))
  with pytest.raises(TypeError, match="x.dtype must be"):
    qm.quantized_matmul(jnp.ones((2, 128), jnp.int32), w8)
  with pytest.raises(ValueError, match="needs x_scale"):
    qm.quantized_matmul(jnp.ones((2, 128), jnp.int8), w8)
  with pytest.raises(ValueError, match="x_scale is only for int8 / float8 x"):
    qm.quantized_matmul(x, w8, x_scale=jnp.ones((2, 1)))
  with pytest.raises(ValueError, match="x_scale shape"):
    qm.quantized_matmul(jnp.ones((2, 128), jnp.int8), w8, x_scale=jnp.ones((2, 2)))
  with pytest.raises(ValueError, match="int8 x \\(W8A8\\) needs a symmetric int8 w"):
    qm.quantized_matmul(jnp.ones((2, 128), jnp.int8), w4, x_scale=jnp.ones((2, 1)))
  with pytest.raises(ValueError, match="float8 x needs an fp8 w"):
    qm.quantized_matmul(jnp.ones((2, 128), jnp.float8_e4m3fn), w8, x_scale=jnp.ones((2, 1)))
  with pytest.raises(TypeError, match="out_dtype must be"):
    qm.quantized_matmul(x, w4, out_dtype=jnp.int32)
  with pytest.raises(NotImplementedError, match="triton serves weight-only calls"):
    qm.quantized_matmul(jnp.ones((2, 128), jnp.int8), w8, x_scale=jnp.ones((2, 1)),
                        implementation="triton:interpret")
  with pytest.raises(NotImplementedError, match="W8A8 needs per-channel weight scales"):
    qm.quantized_matmul(jnp.ones((2, 128), jnp.int8), _weight(key, 128, 64, "int8", 64),
                        x_scale=jnp.ones((2, 1)), implementation="mosaic_gpu:interpret")
  with pytest.raises(ValueError, match="prepack: w.fmt must be one of"):
    qm.prepack(_weight(key, 128, 64, "int2", 32))
  with pytest.raises(NotImplementedError, match="m=100 > 64: dequantize-then-dot"):
    qm.quantized_matmul(jnp.ones((100, 128), jnp.bfloat16), w4, implementation="triton:interpret")
  with pytest.raises(NotImplementedError, match="block-scaled fp8 needs K=192"):
    qm.quantized_matmul(jnp.ones((2, 192), jnp.float8_e4m3fn),
                        _weight(key, 192, 64, "fp8_e4m3", 64), x_scale=jnp.ones((2, 1)),
                        implementation="mosaic_gpu:interpret")
  with pytest.raises(ValueError, match="fmt must be one of"):
    qm.quantize_activations(x, "int4")
  with pytest.raises(ValueError, match="block_size=100 must divide K=128"):
    qm.quantize_activations(x, "fp8_e4m3", block_size=100)
  with pytest.raises(ValueError, match="scaling must be one of"):
    qm.fp8_dot(x, jnp.ones((128, 4)), scaling="col")
  with pytest.raises(ValueError, match="must share K"):
    qm.fp8_dot(x, jnp.ones((100, 4)))


# ------------------------------------------------------------------------ cross-lowering


@pytest.mark.parametrize("kernel", ["block_overlap", "triton_magic", "gemv", "mosaic_int4",
                                    "mosaic_int4_pipelined"])
def test_kernels_lower_for_cuda(kernel):
  # Interpret mode never builds a Mosaic GPU module or Triton IR (and takes the mosaic
  # weight-only A operand from shared memory); lowering for an abstract H100 does.
  from kernels_pallas.matmul import mosaic_gpu as mg
  from kernels_pallas.matmul import triton as tr
  sds = jax.ShapeDtypeStruct
  k, n = 1024, 256
  if kernel == "block_overlap":
    cfg = mg.MatmulConfig(block_m=64, block_n=128, block_k=128, overlap=True)
    fn = lambda a, b, sa, sb: mg.scaled_matmul(a, b, sa, sb, scale_mode="block", config=cfg,
                                               b_tile_scalar=True)
    args = (sds((128, k), jnp.float8_e4m3fn), sds((n, k), jnp.float8_e4m3fn),
            sds((k // 128, 128), jnp.float32), sds((k // 128, n), jnp.float32))
  elif kernel.startswith("mosaic_int4"):
    cfg = mg.WeightOnlyConfig(pipeline_upcast=kernel.endswith("pipelined"))
    fn = lambda x, v, s: mg.weight_only_matmul_t(x, v, s, group_size=128, config=cfg)
    args = (sds((16, k), jnp.bfloat16), sds((n, k), jnp.int4), sds((n, k // 128), jnp.float32))
  elif kernel == "gemv":
    fn = lambda x, v, s: tr.gemv_weight_only(x, v, s, bits=4, group_size=128)
    args = (sds((2, k), jnp.bfloat16), sds((n, k // 2), jnp.uint8),
            sds((n, k // 128), jnp.float32))
  else:
    cfg = tr.WeightOnlyConfig(16, 128, 128, 2, dequant="magic")
    fn = lambda x, v, s: tr.weight_only_matmul(x, v, s, None, bits=8, group_size=None,
                                               signed=True, config=cfg)
    args = (sds((16, k), jnp.bfloat16), sds((k, n), jnp.int8), sds((1, n), jnp.float32))
  device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132,
                                       platform="cuda")
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",),
                                                                abstract_device=device)):
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert ("xla.gpu.triton" in text) if kernel in ("gemv", "triton_magic") else (
      "mosaic_gpu" in text)


# ------------------------------------------------------------------------ GPU, real sizes


def test_medium_variant_through_weight_only_matmul_interpret(key):
  # The dispatch's "medium" row (m = 33..256 on K-major weights) in interpret mode, odd m
  # and N, against dequantize-then-dot.
  kx, kw = jax.random.split(key)
  for fmt, group in (("int4", 128), ("int8", None)):
    w = _weight(kw, 256, 72, fmt, group)
    x = jax.random.normal(kx, (40, 256), jnp.float32).astype(jnp.bfloat16)
    weight = qm.prepack(w, native_int4=True)
    variant, config = qm._weight_only_choice(40, weight, interpret=True)
    assert variant == "medium"
    out = qm.weight_only_matmul(x, weight, variant=variant, config=config, interpret=True)
    assert out.shape == (40, 72)
    assert_close(out, _expected(x, w), rtol=4e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 40, 128, 256])
@pytest.mark.parametrize("fmt,group", [("int4", 128), ("int4", None), ("int8", None)])
def test_weight_only_gpu(m, fmt, group, key):
  kx, kw = jax.random.split(key)
  w = _weight(kw, 4096, 2048 + 64, fmt, group)
  x = jax.random.normal(kx, (m, 4096), jnp.float32).astype(jnp.bfloat16)
  expected = _expected(x, w).astype(jnp.bfloat16)
  impl = "triton" if m <= qm.TRITON_MAX_M else None  # wide x: medium kernel or XLA
  weights = [w, qm.prepack(w)] + ([qm.prepack(w, native_int4=True)] if fmt == "int4" else [])
  for weight in weights:  # native int4: the Mosaic kernel through WEIGHT_ONLY_DEFAULT
    out = jax.jit(lambda x, w: qm.quantized_matmul(x, w, implementation=impl))(x, weight)
    assert_close(out, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("fmt,group", [("int4", 128), ("int8", None)])
@pytest.mark.parametrize("variant", ["triton_magic", "gemv", "mosaic", "mosaic_pipelined"])
def test_weight_only_variants_gpu(variant, m, fmt, group, key):
  from kernels_pallas.matmul import mosaic_gpu as mg
  from kernels_pallas.matmul import triton as tr
  kx, kw = jax.random.split(key)
  w = _weight(kw, 4096, 2048 + 64, fmt, group)
  x = jax.random.normal(kx, (m, 4096), jnp.float32).astype(jnp.bfloat16)
  expected = _expected(x, w).astype(jnp.bfloat16)
  cfg = {"triton_magic": dataclasses.replace(tr.default_config(m, 2112, 4096, bits=8,
                                                               group_size=group),
                                             dequant="magic"),
         "gemv": None, "mosaic": None,
         "mosaic_pipelined": mg.WeightOnlyConfig(pipeline_upcast=True)}[variant]
  weights = [w, qm.prepack(w)] if variant == "triton_magic" else [
      qm.prepack(w, native_int4=variant.startswith("mosaic"))]
  for weight in weights:
    out = jax.jit(lambda x, w: qm.weight_only_matmul(
        x, w, variant=variant.split("_")[0], config=cfg).astype(jnp.bfloat16))(x, weight)
    assert_close(out, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [16, 1000])
def test_w8a8_gpu(m, key):
  kx, kw = jax.random.split(key)
  w = qm.prepack(_weight(kw, 2048 + 128, 1024 + 64, "int8"))
  x = jax.random.normal(kx, (m, 2048 + 128), jnp.float32).astype(jnp.bfloat16)
  xq, xs = qm.quantize_activations(x)
  out = jax.jit(lambda a, s, w: qm.quantized_matmul(a, w, x_scale=s,
                                                    implementation="mosaic_gpu"))(xq, xs, w)
  assert_close(out, qm.quantized_matmul(xq, w, x_scale=xs, implementation="xla"))


# Hopper's fp8 wgmma adds products with ~13 fraction bits (truncated), not float32: an
# emulation of the test's case gives 1.22e-4 (float32 sums: 6e-8) and the H100 measured
# 1.26e-4 for both promotion orders. A scale of the wrong K block, row, column or
# warpgroup, a partial product read before its wgmma retired or a slot released early
# each give errors > 1e-2 (scales span 2^-2..2^2 per block).
FP8_WGMMA_BOUND = 5e-4


@pytest.mark.gpu
@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlap"])
def test_block_scaled_kernel_gpu(overlap, key):
  # 12 K blocks (> 4 stages, even) with scales varying per block, row and column. The
  # serial form is the one validated in session 2 (per-column weight scales).
  from kernels_pallas.matmul import mosaic_gpu as mg
  cfg = mg.MatmulConfig(block_m=64, block_n=128, block_k=128, num_stages=4, overlap=overlap)
  out, ref = _block_case(key, 1000, 1000, 1536, "columns", cfg, False)
  err = rel_err(out, ref)
  print(f"rel_err={err:.3e}")  # shown by quant_dev.py --block-tests (pytest -s)
  assert err < FP8_WGMMA_BOUND


@pytest.mark.gpu
@pytest.mark.skipif(os.environ.get("JAXEFF_TILE_SCALES_GPU") != "1",
                    reason="tile-scale forms crashed the H100: run alone, one process each, "
                           "with JAXEFF_TILE_SCALES_GPU=1 (experiments/quant_dev.py --block-tests)")
@pytest.mark.parametrize("scales", ["tile_copy", "column_scalar"])
def test_block_tile_scales_gpu(scales, monkeypatch, key):
  # "tile_copy" crashed (CUDA_ERROR_ILLEGAL_INSTRUCTION); "column_scalar" keeps the
  # validated per-column copy and only reads one scalar per tile: which half is at fault.
  from kernels_pallas.matmul import mosaic_gpu as mg
  monkeypatch.setattr(mg, "TILE_SCALES_ON_GPU", True)
  cfg = mg.MatmulConfig(block_m=64, block_n=128, block_k=128, num_stages=4)
  out, ref = _block_case(key, 1000, 1000, 1536, scales, cfg, False)
  err = rel_err(out, ref)
  print(f"rel_err={err:.3e}")
  assert err < FP8_WGMMA_BOUND


@pytest.mark.gpu
def test_fp8_reference_keeps_rounding_gpu(key):
  # XLA on GPU drops f32 -> fp8 -> f32 convert pairs in one program (excess precision);
  # the references decode fp8 bits instead, so quantize-then-reference in one jit rounds.
  x = jax.random.normal(key, (64, 256), jnp.float32)
  q = jax.jit(lambda x: qm.fp8_to_float32(x.astype(jnp.float8_e4m3fn)))(x)
  np.testing.assert_array_equal(np.asarray(q), np.asarray(x.astype(jnp.float8_e4m3fn)
                                                           .astype(jnp.float32)))


@pytest.mark.gpu
@pytest.mark.parametrize("scaling", ["row", "block"])
def test_fp8_dot_gpu(scaling, monkeypatch, key):
  monkeypatch.setattr(qm, "BLOCK_SCALED_KERNEL", True)  # run the kernel, not the fallback
  kx, kw, kd = jax.random.split(key, 3)
  x = jax.random.normal(kx, (1000, 1024), jnp.float32).astype(jnp.bfloat16)
  w = (jax.random.normal(kw, (1024, 768), jnp.float32) / 30).astype(jnp.bfloat16)
  dy = jax.random.normal(kd, (1000, 768), jnp.float32).astype(jnp.bfloat16)

  def vjp(impl):
    y, f = jax.vjp(lambda a, b: qm.fp8_dot(a, b, scaling=scaling, implementation=impl), x, w)
    return (y, *f(dy))

  for name, g, t in zip(("y", "dx", "dw"), jax.jit(lambda: vjp("mosaic_gpu"))(),
                        jax.jit(lambda: vjp("xla"))()):
    assert_close(g, t, name=name)
