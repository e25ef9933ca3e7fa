"""The op path around the Mosaic GPU weight-only kernels launches no XLA glue.

``prepack`` stores the scales in the kernels' ``[G, N]`` layout (``PackedWeight.scales_t``),
the kernels read the true M rows of x (TMA zero fill, no pad) and, with
``WeightOnlyConfig.wg_split_k``, sum the split-K halves, cast and store ``[M, N]`` in the
kernel. Checked here: results vs dequantize-then-dot in interpret mode (odd m, K, N, every
split-K form), the prepack round trip (bit-identical dequantized weights), PackedWeights
made without ``scales_t`` (old checkpoints), the ops around the kernel in the lowered
StableHLO for an abstract H100, and real sizes under the ``gpu`` marker.
"""

from __future__ import annotations

import dataclasses
import importlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.quant.formats import quantize_tensor
from kernels_pallas.matmul import mosaic_gpu as mg
from tests.helpers import assert_close

qm = importlib.import_module("jaxeff.ops.quantized_matmul")


def _weight(key, k, n, fmt, group=None, symmetric=True):
  return quantize_tensor(jax.random.normal(key, (k, n), jnp.float32), fmt, group_size=group,
                         symmetric=symmetric)


def _expected(x, w):
  return jnp.dot(x.astype(jnp.float32), w.dequantize(jnp.float32),
                 precision=jax.lax.Precision.HIGHEST)


OLD = mg.WeightOnlyConfig(num_stages=2, split_k=2)
CASES = [
    # (m, k, n, fmt, group, layout, config): odd K / N padded by the op, m not a multiple
    # of 8 (TMA zero fill of the x tile), both split-K forms.
    (1, 384, 72, "int4", 128, "native", mg.WeightOnlyConfig(num_stages=2, split_k=1,
                                                            wg_split_k=True)),
    (17, 256, 130, "int4", 128, "uint8", mg.WeightOnlyConfig(num_stages=2, split_k=2,
                                                             wg_split_k=True)),
    (3, 300, 72, "int8", None, "scales_t", mg.WeightOnlyConfig(
        num_stages=2, split_k=1, wg_split_k=True, pipeline_upcast=True)),
    (16, 512, 64, "int8", 128, "scales_t", OLD),
    (33, 256, 72, "int4", None, "native", mg.WeightOnlyConfig(num_stages=2, split_k=1)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"m{c[0]}-{c[3]}-g{c[4]}-{c[5]}-"
                         f"s{c[6].split_k}{'w' if c[6].wg_split_k else ''}")
def test_mosaic_weight_only_through_op_layer(case, key):
  m, k, n, fmt, group, layout, cfg = case
  kx, kw = jax.random.split(key)
  w = _weight(kw, k, n, fmt, group)
  x = jax.random.normal(kx, (m, k), jnp.float32).astype(jnp.bfloat16)
  pw = qm.prepack(w, native_int4=layout == "native", scales_t=layout != "uint8")
  assert (pw.scales_t is not None) == (layout != "uint8")
  out = qm.weight_only_matmul(x, pw, variant="mosaic", config=cfg, interpret=True,
                              out_dtype=jnp.bfloat16)
  assert out.shape == (m, n) and out.dtype == jnp.bfloat16
  assert_close(out, _expected(x, w).astype(jnp.bfloat16))


def test_dispatch_default_glue_free_form(monkeypatch, key):
  # quantized_matmul on a prepacked weight with MOSAIC_WG_SPLIT_K: float16 in and out.
  monkeypatch.setattr(qm, "MOSAIC_WG_SPLIT_K", True)
  kx, kw = jax.random.split(key)
  w = _weight(kw, 256, 64, "int4", 128)
  pw = qm.prepack(w, native_int4=True)
  x = jax.random.normal(kx, (2, 5, 256), jnp.float32).astype(jnp.float16)
  assert qm._weight_only_choice(10, pw, interpret=True) == ("mosaic", None)
  out = qm.quantized_matmul(x, pw, implementation="triton:interpret")
  assert out.shape == (2, 5, 64) and out.dtype == jnp.float16
  assert_close(out, _expected(x.reshape(10, 256), w).reshape(2, 5, 64).astype(jnp.float16))


@pytest.mark.parametrize("fmt,group,sym", [("int4", 128, True), ("int4", None, True),
                                           ("int4", 64, False), ("int8", None, True),
                                           ("int8", 128, True), ("fp8_e4m3", None, True)])
def test_prepack_round_trip_is_bit_identical(fmt, group, sym, key):
  w = _weight(key, 256, 96, fmt, group, sym)
  ref = np.asarray(w.dequantize(jnp.float32))
  forms = [qm.prepack(w), qm.prepack(w, scales_t=True)]
  if fmt == "int4" and sym:
    forms += [qm.prepack(w, native_int4=True), qm.prepack(forms[0], native_int4=True),
              qm.prepack(qm.prepack(w, native_int4=True), native_int4=False)]
  for pw in forms:
    np.testing.assert_array_equal(np.asarray(pw.dequantize(jnp.float32)), ref)
    if pw.scales_t is not None:
      np.testing.assert_array_equal(np.asarray(pw.scales_t), np.asarray(pw.scales).T)
    # the default stores scales_t for symmetric int4 / int8 (any platform), never for the
    # others; a PackedWeight that already has its form comes back as the same object
    assert (pw.scales_t is not None) == (sym and fmt in ("int4", "int8")) or pw is forms[1]
    assert qm.prepack(pw) is pw
  assert forms[1].scales_t is not None
  assert qm.prepack(forms[1], scales_t=False).scales_t is None
  with pytest.raises(TypeError, match="prepack: scales_t must be None or a bool, got 'yes'"):
    qm.prepack(w, scales_t="yes")


def test_packed_weight_orbax_round_trip_and_old_layout(key, tmp_path):
  # The new layout round-trips through Orbax; a checkpoint of the layout before
  # ``scales_t`` (three data fields) restores into it with partial_restore=True (the
  # docstring's advice) and not without it.
  import orbax.checkpoint as ocp  # a pinned dependency

  @dataclasses.dataclass(frozen=True)
  class OldPackedWeight:
    values: jax.Array
    scales: jax.Array
    zeros: jax.Array | None
    fmt: str
    shape: tuple[int, int]

  jax.tree_util.register_dataclass(OldPackedWeight, data_fields=["values", "scales", "zeros"],
                                   meta_fields=["fmt", "shape"])
  new = qm.prepack(_weight(key, 256, 64, "int8", 128, True))
  assert new.scales_t is not None
  ckpt = ocp.PyTreeCheckpointer()
  ckpt.save(tmp_path / "new", {"w": new})
  back = ckpt.restore(tmp_path / "new", args=ocp.args.PyTreeRestore(item={"w": new}))["w"]
  for f in ("values", "scales", "scales_t"):
    np.testing.assert_array_equal(np.asarray(getattr(back, f)), np.asarray(getattr(new, f)))
  ckpt.save(tmp_path / "old", {"w": OldPackedWeight(new.values, new.scales, None, "int8",
                                                      (256, 64))})
  target = {"w": dataclasses.replace(new, scales_t=None)}
  with pytest.raises(ValueError, match="partial_restore"):
    ckpt.restore(tmp_path / "old", args=ocp.args.PyTreeRestore(item=target))
  old = ckpt.restore(tmp_path / "old", args=ocp.args.PyTreeRestore(item=target,
                                                                     partial_restore=True))["w"]
  assert isinstance(old, qm.PackedWeight) and old.scales_t is None
  np.testing.assert_array_equal(np.asarray(old.dequantize()), np.asarray(new.dequantize()))
  np.testing.assert_array_equal(np.asarray(qm.prepack(old).scales_t), np.asarray(new.scales_t))


def test_packed_weight_without_scales_t(key):
  # A PackedWeight built as before this field existed (5 positional fields; the default
  # None adds no pytree leaf) runs the kernels, which then transpose the scales per call;
  # prepack() adds the stored copy.
  kx, kw = jax.random.split(key)
  w = _weight(kw, 256, 64, "int4", 128)
  new = qm.prepack(w, native_int4=True)
  old = qm.PackedWeight(new.values, new.scales, None, "int4", (256, 64))
  assert old.scales_t is None and len(jax.tree.leaves(old)) == 2
  leaves, treedef = jax.tree.flatten(old)
  restored = jax.tree.unflatten(treedef, [np.asarray(l) for l in leaves])
  assert restored.scales_t is None
  unpickled = object.__new__(qm.PackedWeight)  # pickled before the field: no attribute
  for f in ("values", "scales", "zeros", "fmt", "shape"):
    object.__setattr__(unpickled, f, getattr(old, f))
  assert unpickled.scales_t is None
  x = jax.random.normal(kx, (3, 256), jnp.float32).astype(jnp.bfloat16)
  cfg = mg.WeightOnlyConfig(num_stages=2, split_k=1, wg_split_k=True)
  out = qm.weight_only_matmul(x, unpickled, variant="mosaic", config=cfg, interpret=True)
  assert_close(out, _expected(x, w), rtol=4e-3)
  upgraded = qm.prepack(old)
  np.testing.assert_array_equal(np.asarray(upgraded.scales_t), np.asarray(old.scales).T)
  with pytest.raises(ValueError, match=r"scales_t must be scales transposed, \[G, N\] = "
                                       r"\(2, 64\), got \(64, 2\)"):
    qm.quantized_matmul(x, dataclasses.replace(old, scales_t=old.scales))
  with pytest.raises(ValueError, match=r"scales must be \[G, N\] = \(2, 64\), got \(64, 2\)"):
    mg.weight_only_matmul_t(x, new.values, new.scales, group_size=128, scales_t=True,
                            config=cfg, interpret=True)


def _ops_around_kernel(fmt, group, m, cfg, k=1024, n=1024):
  """StableHLO ops of the jitted op path for an abstract H100, besides the kernel."""
  sds = jax.ShapeDtypeStruct
  w = jax.eval_shape(lambda: quantize_tensor(jnp.ones((k, n)), fmt, group_size=group))
  pw = jax.eval_shape(lambda w: qm.prepack(w, native_int4=True, scales_t=True), w)
  f = lambda x, w: qm.weight_only_matmul(x.reshape(-1, k), w, variant="mosaic", config=cfg,
                                         out_dtype=jnp.bfloat16)
  device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132,
                                       platform="cuda")
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",),
                                                                abstract_device=device)):
    text = jax.jit(f).trace(sds((m, k), jnp.bfloat16), pw).lower(
        lowering_platforms=("cuda",)).as_text()
  assert text.count("@mosaic_gpu") == 1
  main = text[text.index("func.func public @main"):]
  return [op for op in re.findall(r"stablehlo\.([a-z_]+)", main)
          if op not in ("return", "constant", "custom_call")]


@pytest.mark.parametrize("fmt,group", [("int4", 128), ("int8", None)])
@pytest.mark.parametrize("m", [1, 16])
def test_op_path_ops_around_kernel(fmt, group, m):
  # wg_split_k with split_k = 1: the Pallas call alone. The two-CTA split-K form: one
  # reduce fusion after it, nothing before it (no scale transpose, no x pad).
  fused = mg.WeightOnlyConfig(split_k=1, wg_split_k=True)
  assert _ops_around_kernel(fmt, group, m, fused) == []
  assert _ops_around_kernel(fmt, group, m, dataclasses.replace(fused, pipeline_upcast=True)
                            ) == []
  ops = _ops_around_kernel(fmt, group, m, mg.WeightOnlyConfig())
  assert "pad" not in ops and ops[0] == "reduce", ops
  assert ops.count("transpose") == 1  # the output's, fused with the sum


@pytest.mark.parametrize("variant", ["wgsplit_f32_out", "wgsplit_split2", "wgsplit_m64"])
def test_wg_split_forms_lower_for_cuda(variant):
  # The forms test_op_path_ops_around_kernel does not lower: float32 output (partial-sum
  # store + XLA transpose), split over CTAs too, the widest x (64 rows).
  sds = jax.ShapeDtypeStruct
  k, n = 2048, 512
  m = 64 if variant == "wgsplit_m64" else 5
  cfg = mg.WeightOnlyConfig(split_k=2 if variant == "wgsplit_split2" else 1, wg_split_k=True)
  out_dtype = jnp.float32 if variant == "wgsplit_f32_out" else jnp.bfloat16
  fn = lambda x, v, s: mg.weight_only_matmul_t(x, v, s, group_size=128, config=cfg,
                                               scales_t=True, out_dtype=out_dtype)
  device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132,
                                       platform="cuda")
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",),
                                                                abstract_device=device)):
    out = jax.jit(fn).trace(sds((m, k), jnp.bfloat16), sds((n, k), jnp.int4),
                            sds((k // 128, n), jnp.float32))
    text = out.lower(lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text and out.out_info.shape == (m, n)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 5, 16, 33])
@pytest.mark.parametrize("fmt,group", [("int4", 128), ("int8", None)])
@pytest.mark.parametrize("form", ["old_split2", "wgsplit", "wgsplit_pipe", "wgsplit_split2"])
def test_glue_free_forms_gpu(form, m, fmt, group, key):
  # Real size (8192^2): every form of the small-m kernel through the op layer on a
  # prepacked weight with stored scales_t, x read with TMA zero fill.
  cfg = {"old_split2": mg.WeightOnlyConfig(),
         "wgsplit": mg.WeightOnlyConfig(split_k=1, wg_split_k=True),
         "wgsplit_pipe": mg.WeightOnlyConfig(split_k=1, wg_split_k=True, pipeline_upcast=True),
         "wgsplit_split2": mg.WeightOnlyConfig(split_k=2, wg_split_k=True)}[form]
  kx, kw = jax.random.split(key)
  w = _weight(kw, 8192, 8192, fmt, group)
  pw = qm.prepack(w, native_int4=True, scales_t=True)
  x = jax.random.normal(kx, (m, 8192), jnp.float32).astype(jnp.bfloat16)
  out = jax.jit(lambda x, w: qm.weight_only_matmul(x, w, variant="mosaic", config=cfg,
                                                   out_dtype=jnp.bfloat16))(x, pw)
  assert out.shape == (m, 8192) and out.dtype == jnp.bfloat16
  assert_close(out, _expected(x, w).astype(jnp.bfloat16))
