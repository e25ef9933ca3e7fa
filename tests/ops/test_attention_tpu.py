"""dot_product_attention's Mosaic TPU flash-attention kernel in TPU interpret mode on CPU.

Forward, log-sum-exp and all gradients (with an lse cotangent) against the reference,
through the op's custom_vjp (``implementation="mosaic_tpu:interpret"``), using the shared
test body of ``test_attention.py``. Tiles are shrunk to 16 x 32 so the tiny shapes span
several query and key blocks (full, partial and skipped ones); one case runs the default
tiles. Interpret mode is slow: the shapes are small.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from jaxeff.ops import attention as attn_ops
from jaxeff.ops import dot_product_attention, dot_product_attention_with_lse
from kernels_pallas.attention import mosaic_tpu
from tests.helpers import assert_close
from tests.ops.test_attention import _check, _rand

IMPL = "mosaic_tpu:interpret"


@pytest.fixture
def small_tiles(monkeypatch):
  monkeypatch.setattr(mosaic_tpu, "default_config",
                      lambda q_len, kv_len: mosaic_tpu.Config(block_q=16, block_kv=32))


@pytest.mark.parametrize("case", [
    # end-aligned causal, GQA 4, q_len != kv_len (skipped upper blocks)
    dict(b=1, t=33, s=70, n=4, kh=1, d=64, causal=True),
    # one query token, GQA 1, head_dim 128
    dict(b=2, t=1, s=17, n=2, kh=2, d=128, causal=True),
    # non-causal, q_len > kv_len, odd lengths, fp16
    dict(b=1, t=70, s=17, n=2, kh=2, d=128, dtype=jnp.float16),
    # causal with q_len > kv_len: the first 23 rows attend nothing (zeros, lse = -inf)
    dict(b=1, t=40, s=17, n=4, kh=1, d=64, causal=True),
    # segments with fully masked rows, a (left, right) window and a soft cap
    dict(b=1, t=70, s=70, n=2, kh=1, d=64, window=(25, 4), segments=True, missing=9,
         cap=5.0),
])
def test_kernel_matches_reference(small_tiles, key, case):
  _check(IMPL, key, **case)


def test_default_tiles_causal_gqa(key):
  _check(IMPL, key, b=1, t=128, s=128, n=4, kh=2, d=128, causal=True)


def test_kernel_functions_direct_with_explicit_config(key):
  """forward/backward called as the op's custom_vjp calls them, dense layout (no mask)."""
  q, k, v, _ = _rand(key, 1, 24, 40, 2, 1, 64, jnp.bfloat16)
  cfg = mosaic_tpu.Config(block_q=8, block_kv=8)
  kw = dict(scale=0.125, config=cfg, interpret=True)
  out, lse = jax.jit(lambda q, k, v: mosaic_tpu.forward(q, k, v, **kw))(q, k, v)
  ref_out, ref_lse = dot_product_attention_with_lse(
      *(x.astype(jnp.float32) for x in (q, k, v)), implementation="xla", scale=0.125)
  assert out.shape == q.shape and lse.shape == (1, 2, 24)
  assert_close(out, ref_out.astype(jnp.bfloat16), dtype=jnp.bfloat16, name="out")
  assert float(jnp.abs(lse - ref_lse).max()) < 2e-2
  dq, dk, dv = jax.jit(lambda *a: mosaic_tpu.backward(*a, **kw))(q, k, v, out, lse, out)
  assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)
  assert dk.dtype == jnp.bfloat16 and bool(jnp.isfinite(dk.astype(jnp.float32)).all())


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
