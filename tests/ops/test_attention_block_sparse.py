"""Mosaic GPU flash attention driven by a general block-sparse mask (``block_classes``).

A block mask ``[batch or 1, q_blocks, kv_blocks]`` of ``common.EMPTY/PARTIAL/FULL`` is
given at a granularity that both kernel tilings refine (query blocks of 128 rows, key
blocks of 256), expanded to the forward tiling (query tiles x key blocks) and to the
backward tiling (key tiles x query blocks, transposed). The kernels must then equal the
reference with the same mask as a dense boolean ``mask`` (EMPTY blocks masked out, the
rest attended), forward, log-sum-exp and all gradients, including query rows whose
every block is EMPTY (zeros, ``lse = -inf``, zero gradients). Runs in Mosaic GPU
interpret mode on CPU and for real under the ``gpu`` marker.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.ops.attention import dot_product_attention_with_lse
from kernels_pallas.attention import common
from kernels_pallas.attention import mosaic_gpu
from tests.helpers import assert_close

USER_BQ, USER_BKV = 128, 256  # block-mask granularity (a multiple of every kernel tile)


def _expand(user_classes, rows: int, cols: int):
  """Repeats a [b, q_blocks, kv_blocks] block mask to finer [b, rows, cols] tiles."""
  b, nq, nk = user_classes.shape
  return np.repeat(np.repeat(user_classes, rows // nq, axis=1), cols // nk, axis=2)


def _sparse_attention(user_classes, *, is_causal, interpret):
  """custom_vjp around the Mosaic GPU kernels with a block-sparse mask."""
  def layouts(q, k):
    cfg = mosaic_gpu.default_config(q.shape[-1], is_causal)
    tp = common.round_up(q.shape[1], cfg.fwd_q_tile)
    sp = common.round_up(k.shape[1], max(cfg.block_kv, cfg.bwd_kv_tile))
    assert tp % USER_BQ == 0 and sp % USER_BKV == 0
    fwd = _expand(user_classes, tp // cfg.fwd_q_tile, sp // cfg.block_kv)
    bwd = common.transpose_classes(_expand(user_classes, tp // cfg.bwd_block_q,
                                           sp // cfg.bwd_kv_tile))
    return fwd, bwd

  kw = dict(is_causal=is_causal, interpret=interpret)

  @jax.custom_vjp
  def attn(q, k, v):
    return fwd_rule(q, k, v)[0]

  def fwd_rule(q, k, v):
    scale = q.shape[-1] ** -0.5
    out, lse = mosaic_gpu.forward(q, k, v, scale=scale, block_classes=layouts(q, k)[0], **kw)
    return (out, lse), (q, k, v, out, lse)

  def bwd_rule(res, cts):
    q, k, v, out, lse = res
    d_out, d_lse = cts
    return mosaic_gpu.backward(q, k, v, out, lse, d_out, d_lse=d_lse, scale=q.shape[-1] ** -0.5,
                               block_classes=layouts(q, k)[1], **kw)

  attn.defvjp(fwd_rule, bwd_rule)
  return attn


def _dense_mask(user_classes, t: int, s: int):
  """The block mask as a dense boolean mask [b or 1, 1, t, s] (EMPTY blocks masked)."""
  allowed = np.repeat(np.repeat(user_classes != common.EMPTY, USER_BQ, axis=1), USER_BKV,
                      axis=2)
  return jnp.asarray(allowed[:, None, :t, :s])


def _check_block_sparse(key, *, b, t, s, n, kh, d, is_causal, interpret, user_classes):
  ks = jax.random.split(key, 6)
  q = jax.random.normal(ks[0], (b, t, n, d), jnp.float32).astype(jnp.bfloat16)
  k = jax.random.normal(ks[1], (b, s, kh, d), jnp.float32).astype(jnp.bfloat16)
  v = jax.random.normal(ks[2], (b, s, kh, d), jnp.float32).astype(jnp.bfloat16)
  d_out = jax.random.normal(ks[3], (b, t, n, d), jnp.float32).astype(jnp.bfloat16)
  d_lse = jax.random.normal(ks[4], (b, n, t), jnp.float32)
  mask = _dense_mask(user_classes, t, s)
  attn = _sparse_attention(user_classes, is_causal=is_causal, interpret=interpret)
  up = lambda x: x.astype(jnp.float32)

  @jax.jit
  def run(q, k, v, d_out, d_lse):
    (out, lse), vjp = jax.vjp(attn, q, k, v)
    ref = lambda q, k, v: dot_product_attention_with_lse(q, k, v, mask=mask, is_causal=is_causal,
                                                         implementation="xla")
    (r_out, r_lse), r_vjp = jax.vjp(ref, up(q), up(k), up(v))
    d_lse = jnp.where(jnp.isfinite(r_lse), d_lse, 0.0)
    return out, lse, r_out, r_lse, vjp((d_out, d_lse)), r_vjp((up(d_out), d_lse))

  out, lse, r_out, r_lse, got, want = run(q, k, v, d_out, d_lse)
  assert_close(out, r_out.astype(jnp.bfloat16), name="out")
  fin = np.isfinite(np.asarray(r_lse))
  assert not fin.all(), "the block mask should leave some query rows with nothing to attend"
  np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), fin)
  np.testing.assert_allclose(np.asarray(lse)[fin], np.asarray(r_lse)[fin], atol=2e-2)
  assert (np.asarray(out, np.float32).transpose(0, 2, 1, 3)[~fin] == 0).all()
  for name, g, w in zip(("dq", "dk", "dv"), got, want):
    assert_close(g, w.astype(jnp.bfloat16), name=name)


def _user_classes(seed: int, b: int, nq: int, nk: int):
  """Random EMPTY/PARTIAL/FULL blocks; query block 1 of every batch row is all EMPTY."""
  rng = np.random.default_rng(seed)
  classes = rng.choice([common.EMPTY, common.PARTIAL, common.FULL], size=(b, nq, nk),
                       p=[0.4, 0.2, 0.4]).astype(np.int32)
  classes[:, 0, 0] = common.FULL  # something to attend in the first block row
  classes[:, 1, :] = common.EMPTY
  return classes


def test_block_sparse_mask_interpret(key):
  # Two query blocks of 128 x two key blocks of 256 per batch row; GQA 2; a per-batch
  # layout (batch 2) with an odd key length (the padded tail is masked on top).
  classes = _user_classes(0, 2, 2, 2)
  _check_block_sparse(key, b=2, t=256, s=300, n=2, kh=1, d=64, is_causal=False,
                      interpret=True, user_classes=classes)


def test_block_classes_of_the_wrong_tiling_raise(key):
  q = jnp.ones((1, 128, 2, 64), jnp.bfloat16)
  with pytest.raises(ValueError, match=r"block_classes must have shape \[batch or 1, 1, 1\].*got \(1, 2, 2\)"):
    mosaic_gpu.forward(q, q, q, scale=0.125, block_classes=np.ones((1, 2, 2), np.int32),
                       interpret=True)


@pytest.mark.gpu
@pytest.mark.parametrize("is_causal", [False, True])
def test_gpu_block_sparse_mask(key, is_causal):
  classes = _user_classes(1, 1, 8, 4)
  _check_block_sparse(key, b=1, t=1024, s=1000, n=4, kh=2, d=128, is_causal=is_causal,
                      interpret=False, user_classes=classes)
