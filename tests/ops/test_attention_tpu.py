"""dot_product_attention's Mosaic TPU flash-attention kernel in TPU interpret mode on CPU.

Forward, log-sum-exp and all gradients (with an lse cotangent) against the reference,
through the op's custom_vjp (``implementation="mosaic_tpu:interpret"``), using the shared
test body of ``test_attention.py``. Tiles are shrunk to 16 x 32 so the tiny shapes span
several query and key blocks (full, partial and skipped ones); one case runs the default
tiles. Interpret mode is slow: the shapes are small. Real-size forward/backward calls are
also cross-lowered to TPU (Pallas' Mosaic lowering, no TPU needed).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from jaxeff.ops import attention as attn_ops
from jaxeff.ops import dot_product_attention
from kernels_pallas.attention import mosaic_tpu
from tests.ops.test_attention import _check, _rand

IMPL = "mosaic_tpu:interpret"


@pytest.fixture
def small_tiles(monkeypatch):
  monkeypatch.setattr(mosaic_tpu, "default_config",
                      lambda q_len, kv_len: mosaic_tpu.Config(block_q=16, block_kv=32))


@pytest.mark.parametrize("case", [
    # end-aligned causal, GQA 4, q_len < kv_len (skipped upper-right blocks)
    dict(b=1, t=33, s=70, n=4, kh=1, d=64, causal=True),
    # one query token, GQA 1, batch 2, head_dim 128
    dict(b=2, t=1, s=17, n=2, kh=2, d=128, causal=True),
    # causal with q_len > kv_len: the first 23 rows attend nothing (zeros, lse = -inf); fp16
    dict(b=1, t=40, s=17, n=2, kh=2, d=128, causal=True, dtype=jnp.float16),
    # non-causal: segment ids with fully masked rows, a (left, right) window, a soft cap
    dict(b=1, t=50, s=50, n=2, kh=1, d=64, window=(17, 4), segments=True, missing=9,
         cap=5.0),
])
def test_kernel_matches_reference(small_tiles, key, case):
  _check(IMPL, key, **case)


def test_default_tiles_unmasked_forward(key):
  """Default (whole-sequence) tiles, no mask at all, q_len != kv_len, GQA 2."""
  _check(IMPL, key, b=1, t=100, s=128, n=4, kh=2, d=128, grads=False)


@pytest.mark.parametrize("case", [
    dict(shape=(1, 1024, 1000, 8, 2, 128), is_causal=True),
    dict(shape=(2, 300, 500, 4, 4, 64), window=(100, 10), soft_cap=20.0, segments=True),
])
def test_cross_lowers_to_tpu(case):
  """Forward and backward lower through Pallas' Mosaic TPU lowering (block-shape and
  layout rules of a TPU v5e) on CPU; the Mosaic compiler itself only runs on a TPU."""
  case = dict(case)
  b, t, s, n, kh, d = case.pop("shape")
  segments = case.pop("segments", False)
  q = jax.ShapeDtypeStruct((b, t, n, d), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((b, s, kh, d), jnp.bfloat16)
  ids = ((jax.ShapeDtypeStruct((b, t), jnp.int32), jax.ShapeDtypeStruct((b, s), jnp.int32))
         if segments else (None, None))

  def fwd_bwd(q, k, v, ids):
    out, lse = mosaic_tpu.forward(q, k, v, *ids, scale=0.1, **case)
    return out, lse, mosaic_tpu.backward(q, k, v, out, lse, out, *ids, lse, scale=0.1, **case)

  device = jax.sharding.AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu")
  mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
  with jax.sharding.use_abstract_mesh(mesh):
    exported = jax.export.export(jax.jit(fwd_bwd), platforms=["tpu"])(q, kv, kv, ids)
  assert exported.mlir_module().count("tpu_custom_call") == 3  # fwd, dK/dV, dQ


def test_unsupported_inputs_and_bad_config_raise(key):
  q, k, v, _ = _rand(key, 1, 8, 8, 2, 2, 64)
  with pytest.raises(NotImplementedError, match="mosaic_tpu needs bfloat16/float16"):
    dot_product_attention(q, k, v, implementation=IMPL)
  qb = q.astype(jnp.bfloat16)
  with pytest.raises(NotImplementedError, match="additive bias is not supported by mosaic_tpu"):
    dot_product_attention(qb, qb, qb, bias=jnp.zeros((1, 1, 8, 8)), implementation=IMPL)
  if jax.default_backend() != "tpu":
    with pytest.raises(NotImplementedError, match="tpu"):
      dot_product_attention(qb, qb, qb, implementation="mosaic_tpu")
  with pytest.raises(ValueError, match="block_kv must be a positive multiple of 8, got 12"):
    mosaic_tpu.Config(block_q=16, block_kv=12)


def test_registered_for_tpu_and_interpretable():
  impl = {i.name: i for i in attn_ops.ATTENTION_IMPLS}["mosaic_tpu"]
  assert impl.platforms == ("tpu",) and impl.interpretable
  assert attn_ops.ATTENTION_IMPLS[-1].name == "xla"
