"""Mosaic GPU flash-attention forward with the intra-warpgroup pipeline
(``Config.fwd_pipeline_softmax``, FlashAttention-3 Algorithm 2).

Iteration ``i`` issues ``S_i = Q K_i^T`` and ``O += P_{i-1} V_{i-1}`` and runs the softmax
of ``S_i`` while the second matmul is in flight, so the block whose scores are masked and
the block whose values are multiplied differ by one; a prologue computes ``S_0`` and an
epilogue the last ``P V``. Interpret mode runs that bookkeeping (prologue, the full then
partial block loops, the epilogue, a single key block, a query tile with no key block to
visit) on CPU, with ``P`` through shared memory and ``O`` as a loop value; the GPU form
(``O`` in a wgmma accumulator across the loops, ``P`` as a register operand still in flight
during the next softmax) is checked by cross-lowering for CUDA here and against the
reference on GPU (``gpu`` marker). The interpret cases fail if the in-flight iteration uses
the wrong block (checked: masking S_i with block i - 1's positions gives o rel err 0.5-1.2,
multiplying P_{i-1} by the current slot's V 0.9-1.2; the epilogue on the wrong slot waits on
a barrier that never completes).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.ops.attention import dot_product_attention_with_lse
from kernels_pallas.attention import mosaic_gpu
from tests.helpers import assert_close


def _inputs(key, b, t, s, n, kh, d, seg=False):
  ks = jax.random.split(key, 5)
  q = jax.random.normal(ks[0], (b, t, n, d), jnp.float32).astype(jnp.bfloat16)
  k = jax.random.normal(ks[1], (b, s, kh, d), jnp.float32).astype(jnp.bfloat16)
  v = jax.random.normal(ks[2], (b, s, kh, d), jnp.float32).astype(jnp.bfloat16)
  ids = None
  if seg:
    ids = (jnp.sort(jax.random.randint(ks[3], (b, t), 0, 3), axis=1),
           jnp.sort(jax.random.randint(ks[4], (b, s), 0, 3), axis=1))
  return q, k, v, ids


def _forward(q, k, v, ids, *, is_causal, interpret, window=None, soft_cap=None, cfg=None):
  d = q.shape[-1]
  cfg = cfg or mosaic_gpu.fwd_pipeline_config(d, is_causal)
  qs, ks = ids if ids is not None else (None, None)
  return mosaic_gpu.forward(q, k, v, qs, ks, is_causal=is_causal, window=window,
                            scale=d ** -0.5, soft_cap=soft_cap, config=cfg,
                            interpret=interpret)


def _check_against_reference(q, k, v, ids, out, lse, *, is_causal, window=None,
                             soft_cap=None):
  up = lambda x: x.astype(jnp.float32)
  want_out, want_lse = dot_product_attention_with_lse(
      up(q), up(k), up(v), is_causal=is_causal, segment_ids=ids, local_window_size=window,
      logits_soft_cap=soft_cap, implementation="xla")
  assert out.dtype == q.dtype and lse.dtype == jnp.float32
  assert not np.isnan(np.asarray(out, np.float32)).any()
  assert_close(out, want_out.astype(out.dtype), name="out")
  got_lse, want_lse = np.asarray(lse), np.asarray(want_lse)
  finite = np.isfinite(want_lse)
  np.testing.assert_array_equal(np.isfinite(got_lse), finite)  # -inf exactly where empty
  np.testing.assert_allclose(got_lse[finite], want_lse[finite], atol=2e-3, rtol=0)
  return finite


def test_pipeline_is_off_by_default():
  for d in (64, 128, 256):
    for causal in (False, True):
      assert not mosaic_gpu.default_config(d, causal).fwd_pipeline_softmax
      cfg = mosaic_gpu.fwd_pipeline_config(d, causal)
      assert cfg.fwd_pipeline_softmax and cfg.block_kv <= 128
  assert not mosaic_gpu.THREE_WG.fwd_pipeline_softmax


def test_pipeline_refuses_tiles_that_do_not_fit_the_registers(key):
  q, k, v, _ = _inputs(key, 1, 64, 256, 1, 1, 64)
  # head_dim 64 with 256-key tiles (the default's non-causal tile): two 64 x 256 float32
  # score blocks and two bf16 probability blocks alone are 256 registers a thread.
  wide = dataclasses.replace(mosaic_gpu.default_config(64, False), fwd_pipeline_softmax=True)
  with pytest.raises(ValueError, match=r"head_dim 64 with block_kv 256 keeps about 320 "
                                       r"registers.*compute_registers=232"):
    _forward(q, k, v, None, is_causal=False, interpret=True, cfg=wide)
  # Three compute warpgroups have 160 registers a thread: 128-key tiles do not fit.
  three = dataclasses.replace(mosaic_gpu.THREE_WG, fwd_pipeline_softmax=True)
  with pytest.raises(ValueError, match=r"block_kv 128 keeps about 192 registers.*"
                                       r"compute_registers=160 \(with compute_wgs=3\)"):
    _forward(q, k, v, None, is_causal=True, interpret=True, cfg=three)
  assert mosaic_gpu.fwd_pipeline_registers(128, 128) <= mosaic_gpu.Config().compute_registers
  assert mosaic_gpu.fwd_pipeline_registers(64, 64) <= mosaic_gpu.THREE_WG.compute_registers


# (head_dim, causal, q_len, kv_len, heads, kv_heads, segments, window, soft cap)
INTERPRET_CASES = {
    # three key blocks: the first query tile visits one full then two partial blocks, the
    # second two full then one partial (prologue, one unmasked and one masked iteration,
    # epilogue); GQA 2; soft cap
    "causal_gqa_softcap": (64, True, 150, 300, 4, 2, False, None, 5.0),
    # data-dependent block lists (segment ids) intersected with a local window; GQA 2
    "segments_window": (128, False, 150, 300, 2, 1, True, (40, 10), None),
    # full attention over three blocks, the last with the padded key tail
    "full_key_tail": (64, False, 70, 300, 1, 1, False, None, None),
    # no mask at all (dense layout: static trip counts, no block lists), three blocks
    "dense": (128, False, 100, 384, 2, 2, False, None, None),
    # a single key block: prologue and epilogue only, no loop iteration
    "one_key_block": (128, False, 100, 50, 2, 1, False, None, None),
    # end-aligned causal with q_len > kv_len: the first two query tiles have an empty
    # block list (rows attend to nothing: out 0, lse -inf), the third one block
    "empty_lists": (64, True, 300, 40, 2, 2, False, None, None),
}


@pytest.mark.parametrize("case", list(INTERPRET_CASES))
def test_pipeline_matches_reference_interpret(key, case):
  d, causal, t, s, n, kh, seg, window, cap = INTERPRET_CASES[case]
  q, k, v, ids = _inputs(key, 1, t, s, n, kh, d, seg=seg)
  out, lse = jax.jit(lambda q, k, v: _forward(q, k, v, ids, is_causal=causal, interpret=True,
                                              window=window, soft_cap=cap))(q, k, v)
  finite = _check_against_reference(q, k, v, ids, out, lse, is_causal=causal, window=window,
                                    soft_cap=cap)
  if case == "empty_lists":
    assert not finite[0, :, :256].any() and finite[0, :, 260:].all()
    assert not np.asarray(out[0, :256], np.float32).any()  # zeros, not NaN


def test_pipeline_lowers_for_cuda(key):
  """The GPU form passes Mosaic GPU's lowering for CUDA (shared memory included) at
  head_dim 64 and 128, causal and full, with GQA, and changes the kernel; the
  three-warpgroup form lowers with 64-key tiles."""
  q, k, v, _ = _inputs(key, 1, 300, 300, 4, 2, 128)
  modules = {}

  def lower(d, causal, cfg):
    fn = jax.jit(lambda q, k, v: _forward(q, k, v, None, is_causal=causal, interpret=False,
                                          cfg=cfg))
    text = jax.export.export(fn, platforms=["cuda"])(
        q[..., :d], k[..., :d], v[..., :d]).mlir_module()
    assert text.count("mosaic_gpu") >= 1
    return text

  for d in (64, 128):
    for causal in (False, True):
      modules[d, causal] = lower(d, causal, mosaic_gpu.fwd_pipeline_config(d, causal))
  assert modules[128, True] != lower(128, True, mosaic_gpu.default_config(128, True))
  three = dataclasses.replace(mosaic_gpu.THREE_WG, fwd_pipeline_softmax=True, block_kv=64)
  lower(64, True, three)


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("is_causal,seg", [(False, False), (True, False), (True, True)])
def test_gpu_pipeline_matches_reference(key, d, is_causal, seg):
  q, k, v, ids = _inputs(key, 2, 1000, 1000, 8, 2, d, seg=seg)
  out, lse = jax.jit(lambda q, k, v: _forward(q, k, v, ids, is_causal=is_causal,
                                              interpret=False))(q, k, v)
  _check_against_reference(q, k, v, ids, out, lse, is_causal=is_causal)
  default = jax.jit(lambda q, k, v: _forward(
      q, k, v, ids, is_causal=is_causal, interpret=False,
      cfg=mosaic_gpu.default_config(d, is_causal)))(q, k, v)
  assert_close(out, default[0], name="out vs default")


@pytest.mark.gpu
def test_gpu_pipeline_three_warpgroups_and_empty_tiles(key):
  """Three compute warpgroups with 64-key tiles; q_len > kv_len causal, so whole query
  tiles have nothing to visit; a window leaves a single key block to some tiles."""
  q, k, v, _ = _inputs(key, 1, 2000, 700, 4, 1, 64)
  three = dataclasses.replace(mosaic_gpu.THREE_WG, fwd_pipeline_softmax=True, block_kv=64)
  out, lse = jax.jit(lambda q, k, v: _forward(q, k, v, None, is_causal=True, interpret=False,
                                              cfg=three))(q, k, v)
  _check_against_reference(q, k, v, None, out, lse, is_causal=True)
  out, lse = jax.jit(lambda q, k, v: _forward(q, k, v, None, is_causal=True, interpret=False,
                                              window=(50, 0)))(q, k, v)
  _check_against_reference(q, k, v, None, out, lse, is_causal=True, window=(50, 0))
