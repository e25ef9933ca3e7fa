"""Mosaic GPU flash-attention backward at head_dim 128: deferred dQ (``Config.bwd_dq_deferred``)
and the dQ writer (``Config.bwd_dq_writer``).

The deferred form issues a step's ``dQ = dS K`` last and stages/reduce-adds it in the next
step, so the dQ of the previous step (query block, query head) is the one written. Interpret
mode runs that bookkeeping (previous-step indices across the GQA head loop and the
full/partial block loops, the first step with nothing staged, the last step's flush) on
CPU; the register-resident accumulators of the GPU form are checked by cross-lowering the
kernel for CUDA here and against the reference on GPU (``gpu`` marker).

The dQ writer moves the reduce-adds to the memory warpgroup: it maps step ``u`` back to
(query head, query block) itself and hands the staging buffers back through mbarriers; the
interpret tests run that handshake and fail if the step index is off by one.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from jaxeff.ops.attention import dot_product_attention
from kernels_pallas.attention import mosaic_gpu
from tests.helpers import assert_close


def _inputs(key, b, t, s, n, kh, d, seg=False):
  ks = jax.random.split(key, 6)
  q = jax.random.normal(ks[0], (b, t, n, d), jnp.float32).astype(jnp.bfloat16)
  k = jax.random.normal(ks[1], (b, s, kh, d), jnp.float32).astype(jnp.bfloat16)
  v = jax.random.normal(ks[2], (b, s, kh, d), jnp.float32).astype(jnp.bfloat16)
  do = jax.random.normal(ks[3], (b, t, n, d), jnp.float32).astype(jnp.bfloat16)
  ids = None
  if seg:
    ids = (jnp.sort(jax.random.randint(ks[4], (b, t), 0, 3), axis=1),
           jnp.sort(jax.random.randint(ks[5], (b, s), 0, 3), axis=1))
  return q, k, v, do, ids


def _kernel_grads(q, k, v, do, ids, *, is_causal, interpret, window=None, **changes):
  d = q.shape[-1]
  cfg = dataclasses.replace(mosaic_gpu.default_config(d, is_causal), **changes)
  qs, ks = ids if ids is not None else (None, None)
  kw = dict(is_causal=is_causal, window=window, scale=d ** -0.5, config=cfg,
            interpret=interpret)
  out, lse = mosaic_gpu.forward(q, k, v, qs, ks, **kw)
  return mosaic_gpu.backward(q, k, v, out, lse, do, qs, ks, **kw)


def _reference_grads(q, k, v, do, ids, *, is_causal, window=None):
  up = lambda x: x.astype(jnp.float32)
  fn = lambda q, k, v: dot_product_attention(q, k, v, is_causal=is_causal, segment_ids=ids,
                                             local_window_size=window, implementation="xla")
  return jax.vjp(fn, up(q), up(k), up(v))[1](up(do))


def test_deferred_dq_is_off_by_default():
  for d in (64, 128):
    for causal in (False, True):
      assert not mosaic_gpu.default_config(d, causal).bwd_dq_deferred


@pytest.mark.parametrize("is_causal,seg,window,s", [(True, False, None, 200),
                                                    (False, True, None, 200),
                                                    (False, False, (20, 0), 300)])
def test_deferred_dq_matches_reference_interpret(key, is_causal, seg, window, s):
  # head_dim 128, GQA 2 (the CTA loops over two query heads, so the previous step's dQ
  # crosses the head loop), odd lengths: two or three key tiles, several query blocks,
  # full then partial blocks. The window case has a key tile that no query sees (nothing
  # to flush) next to tiles with one or two visible query blocks.
  q, k, v, do, ids = _inputs(key, 1, 150, s, 2, 1, 128, seg=seg)
  got = jax.jit(lambda *a: _kernel_grads(*a, ids, is_causal=is_causal, interpret=True,
                                         window=window, bwd_dq_deferred=True))(q, k, v, do)
  want = _reference_grads(q, k, v, do, ids, is_causal=is_causal, window=window)
  for name, g, w in zip(("dq", "dk", "dv"), got, want):
    assert g.dtype == jnp.bfloat16
    assert_close(g, w.astype(g.dtype), name=name)


def test_deferred_dq_lowers_for_cuda(key):
  """The GPU form (accumulators carried through the loops, dQ left in flight; previous dQ
  staged before or after dP^T is issued) passes Mosaic GPU's lowering for CUDA, with and
  without a causal mask, with GQA."""
  q, k, v, do, _ = _inputs(key, 1, 300, 300, 4, 2, 128)
  modules = {}
  for causal, deferred, before_dp in ((False, True, True), (True, True, True),
                                      (True, True, False), (True, False, True)):
    fn = jax.jit(lambda q, k, v, do, c=causal, f=deferred, e=before_dp: _kernel_grads(
        q, k, v, do, None, is_causal=c, interpret=False, bwd_dq_deferred=f,
        bwd_dq_store_before_dp=e))
    text = jax.export.export(fn, platforms=["cuda"])(q, k, v, do).mlir_module()
    assert text.count("mosaic_gpu") >= 2  # forward and backward kernels
    modules[causal, deferred, before_dp] = text
  assert modules[True, True, True] != modules[True, False, True]  # the flag reaches the kernel
  assert modules[True, True, True] != modules[True, True, False]


@pytest.mark.gpu
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("seg", [False, True])
def test_gpu_deferred_dq_matches_reference(key, is_causal, seg):
  q, k, v, do, ids = _inputs(key, 2, 1000, 1000, 8, 2, 128, seg=seg)
  got = jax.jit(lambda *a: _kernel_grads(*a, ids, is_causal=is_causal, interpret=False,
                                         bwd_dq_deferred=True))(q, k, v, do)
  want = _reference_grads(q, k, v, do, ids, is_causal=is_causal)
  for name, g, w in zip(("dq", "dk", "dv"), got, want):
    assert_close(g, w.astype(g.dtype), name=name)


def test_dq_writer_is_off_by_default():
  for d in (64, 128):
    for causal in (False, True):
      assert not mosaic_gpu.default_config(d, causal).bwd_dq_writer


@pytest.mark.parametrize("deferred,is_causal,seg,window,s", [
    (False, True, False, None, 200),
    (True, False, True, None, 200),
    (True, False, False, (20, 0), 300)])
def test_dq_writer_matches_reference_interpret(key, deferred, is_causal, seg, window, s):
  # As the deferred test: head_dim 128, GQA 2 (the writer's step -> (head, block) map
  # crosses the head loop), odd lengths, full then partial blocks, and a key tile with no
  # visible query (the memory warpgroup writes nothing, the compute ones stage nothing).
  q, k, v, do, ids = _inputs(key, 1, 150, s, 2, 1, 128, seg=seg)
  got = jax.jit(lambda *a: _kernel_grads(*a, ids, is_causal=is_causal, interpret=True,
                                         window=window, bwd_dq_writer=True,
                                         bwd_dq_deferred=deferred))(q, k, v, do)
  want = _reference_grads(q, k, v, do, ids, is_causal=is_causal, window=window)
  for name, g, w in zip(("dq", "dk", "dv"), got, want):
    assert g.dtype == jnp.bfloat16
    assert_close(g, w.astype(g.dtype), name=name)


def test_dq_writer_lowers_for_cuda(key):
  """The writer (alone and with deferred dQ) passes Mosaic GPU's lowering for CUDA with and
  without a causal mask, with GQA and with segment ids (shared memory fits: the staging
  buffers are the default's), and changes the kernel."""
  q, k, v, do, _ = _inputs(key, 1, 300, 300, 4, 2, 128)
  ids = jnp.zeros((1, 300), jnp.int32)
  modules = {}
  for causal, writer, deferred, seg in ((False, True, False, False), (True, True, True, False),
                                        (False, True, True, True), (True, False, False, False),
                                        (True, False, True, False)):
    fn = jax.jit(lambda q, k, v, do, c=causal, w=writer, f=deferred, g=seg: _kernel_grads(
        q, k, v, do, (ids, ids) if g else None, is_causal=c, interpret=False,
        bwd_dq_writer=w, bwd_dq_deferred=f))
    text = jax.export.export(fn, platforms=["cuda"])(q, k, v, do).mlir_module()
    assert text.count("mosaic_gpu") >= 2  # forward and backward kernels
    modules[causal, writer, deferred] = text
  assert modules[True, True, True] != modules[True, False, True]
  assert modules[True, True, True] != modules[True, False, False]


@pytest.mark.gpu
@pytest.mark.parametrize("deferred", [False, True])
@pytest.mark.parametrize("is_causal,seg", [(False, False), (True, False), (True, True)])
def test_gpu_dq_writer_matches_reference(key, deferred, is_causal, seg):
  q, k, v, do, ids = _inputs(key, 2, 1000, 1000, 8, 2, 128, seg=seg)
  got = jax.jit(lambda *a: _kernel_grads(*a, ids, is_causal=is_causal, interpret=False,
                                         bwd_dq_writer=True, bwd_dq_deferred=deferred))(
                                             q, k, v, do)
  want = _reference_grads(q, k, v, do, ids, is_causal=is_causal)
  for name, g, w in zip(("dq", "dk", "dv"), got, want):
    assert_close(g, w.astype(g.dtype), name=name)
