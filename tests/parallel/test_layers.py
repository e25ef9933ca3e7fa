"""Tensor-parallel layers, collective matmul, vocabulary parallelism, ring / Ulysses
attention and pipeline schedules equal their unsharded computations (8 CPU devices)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from jaxeff.ops.attention import dot_product_attention
from jaxeff.parallel import pipeline as pl
from jaxeff.parallel import sequence as sq
from jaxeff.parallel import tensor as tp
from jaxeff.parallel.mesh import make_mesh
from tests.helpers import assert_close
from tests.parallel._compile import jit


def _value_and_grads(f, args, ct_key):
  """f(*args) and the gradient of <f(*args), random cotangent> w.r.t. the float args."""
  out = f(*args)
  ct = jax.random.normal(ct_key, out.shape, out.dtype)
  idx = tuple(i for i, a in enumerate(args) if jnp.issubdtype(a.dtype, jnp.floating))
  grads = jax.grad(lambda *a: jnp.sum(f(*a) * ct), argnums=idx)(*args)
  return out, grads


def test_tensor_parallel_mlp_and_vocab_parallel_head(key):
  """Column -> row parallel (plain, sequence-parallel, collective matmul) and the
  vocabulary-parallel embedding + cross-entropy, forward and gradients."""
  mesh = make_mesh("tensor=4,data=2")
  k = jax.random.split(key, 5)
  b, s, d, f, vocab = 2, 12, 6, 20, 24
  x = jax.random.normal(k[0], (b, s, d))
  w1, w2 = jax.random.normal(k[1], (d, f)), jax.random.normal(k[2], (f, d))
  table = jax.random.normal(k[3], (vocab, d))
  tok = jax.random.randint(k[4], (b, s), 0, vocab)

  def ref(x, w1, w2, table):
    h = jnp.tanh(x @ w1) @ w2 + table[tok]
    return optax.softmax_cross_entropy_with_integer_labels(h @ table.T, tok)

  def sharded(x, w1, w2, table, tok):
    out = []
    for sp, cm in ((False, False), (True, True)):
      xs = x if not sp else jax.lax.dynamic_slice_in_dim(
          x, jax.lax.axis_index("tensor") * (s // 4), s // 4, 1)
      h = tp.column_parallel_dense(xs, w1, sequence_parallel=sp, collective_matmul=cm)
      h = tp.row_parallel_dense(jnp.tanh(h), w2, sequence_parallel=sp, collective_matmul=cm)
      h = h + tp.vocab_parallel_embed(tok, table, sequence_parallel=sp)
      if sp:
        h = jax.lax.all_gather(h, "tensor", axis=1, tiled=True)
      out.append(tp.vocab_parallel_cross_entropy(h @ table.T, tok))
    return jnp.stack(out)

  f = jax.shard_map(sharded, mesh=mesh, in_specs=(P(), P(None, "tensor"), P("tensor"),
                                                  P("tensor"), P()), out_specs=P())
  got, g_got = jit(lambda *a: _value_and_grads(lambda *b: f(*b, tok), a, k[4]))(
      x, w1, w2, table)
  want = ref(x, w1, w2, table)
  ct = jax.random.normal(k[4], got.shape)
  for i in range(2):
    assert_close(got[i], want, name=f"variant {i}")
  g_want = jit(jax.grad(lambda *a: sum(jnp.sum(ref(*a) * ct[i]) for i in range(2)),
                        argnums=(0, 1, 2, 3)))(x, w1, w2, table)
  for name, a, e in zip(("x", "w1", "w2", "table"), g_got, g_want):
    assert_close(a, e, name=f"grad {name}")


@pytest.mark.parametrize("causal, layout, bidirectional, segments, n", [
    (True, "zigzag", False, True, 2),
    (False, "contiguous", True, False, 4),
])
def test_ring_attention_equals_full_attention(key, causal, layout, bidirectional, segments, n):
  """GQA (4 q heads, 2 kv heads), forward and the ringing custom_vjp backward."""
  mesh = make_mesh(f"sequence={n},data={8 // n}")
  k = jax.random.split(key, 4)
  b, s, h = 8 // n, 16, 8
  q = jax.random.normal(k[0], (b, s, 4, h))
  kk, v = (jax.random.normal(k[i], (b, s, 2, h)) for i in (1, 2))
  seg = jnp.sort(jax.random.randint(k[3], (b, s), 0, 3), axis=1) if segments else None
  perm = sq.sequence_permutation(s, n, layout)
  inv = np.argsort(perm)

  def ring(q, kk, v):
    g = jax.shard_map(
        lambda q, kk, v, sg: sq.ring_attention(
            q, kk, v, axis_name="sequence", is_causal=causal, layout=layout,
            bidirectional=bidirectional, segment_ids=sg if segments else None,
            implementation="xla"),
        mesh=mesh, in_specs=(P("data", "sequence"),) * 4, out_specs=P("data", "sequence"))
    sg = seg if segments else jnp.zeros((b, s), jnp.int32)
    return g(q[:, perm], kk[:, perm], v[:, perm], sg[:, perm])[:, inv]

  def full(q, kk, v):
    return dot_product_attention(q, kk, v, is_causal=causal, segment_ids=seg,
                                 implementation="xla")

  got, g_got = jit(lambda *a: _value_and_grads(ring, a, k[3]))(q, kk, v)
  want, g_want = jit(lambda *a: _value_and_grads(full, a, k[3]))(q, kk, v)
  assert_close(got, want)
  for name, a, e in zip("qkv", g_got, g_want):
    assert_close(a, e, name=f"d{name}")


def test_ring_attention_with_the_flash_kernel_interpreted(key):
  """The Pallas-Triton kernel (interpret mode) on each block and its own backward on the
  merged (out, lse); check_vma=False as on GPU."""
  mesh = make_mesh("sequence=2,data=4")
  k = jax.random.split(key, 4)
  q = jax.random.normal(k[0], (4, 32, 2, 16), jnp.bfloat16)
  kk, v = (jax.random.normal(k[i], (4, 32, 1, 16), jnp.bfloat16) for i in (1, 2))
  perm = sq.sequence_permutation(32, 2)
  inv = np.argsort(perm)
  spec = P("data", "sequence")

  def ring(q, kk, v):
    g = jax.shard_map(lambda *a: sq.ring_attention(*a, axis_name="sequence", is_causal=True,
                                                   implementation="triton:interpret"),
                      mesh=mesh, in_specs=(spec,) * 3, out_specs=spec, check_vma=False)
    return g(q[:, perm], kk[:, perm], v[:, perm])[:, inv].astype(jnp.float32)

  def full(q, kk, v):
    return dot_product_attention(q.astype(jnp.float32), kk.astype(jnp.float32),
                                 v.astype(jnp.float32), is_causal=True, implementation="xla")

  got, g_got = jit(lambda *a: _value_and_grads(ring, a, k[3]))(q, kk, v)
  want, g_want = jit(lambda *a: _value_and_grads(full, a, k[3]))(q, kk, v)
  assert_close(got, want, rtol=1.5e-2)
  for name, a, e in zip("qkv", g_got, g_want):
    assert_close(a.astype(jnp.float32), e.astype(jnp.float32), rtol=1.5e-2, name=f"d{name}")


def test_ulysses_attention_and_errors(key):
  mesh = make_mesh("sequence=2,tensor=2,data=2")
  k = jax.random.split(key, 3)
  q = jax.random.normal(k[0], (2, 12, 4, 8))
  kk, v = (jax.random.normal(k[i], (2, 12, 2, 8)) for i in (1, 2))
  spec = P("data", "sequence")
  f = jax.shard_map(lambda *a: sq.ulysses_attention(*a, axis_name="sequence", is_causal=True,
                                                    implementation="xla"),
                    mesh=mesh, in_specs=(spec,) * 3, out_specs=spec)
  got, g_got = jit(lambda *a: _value_and_grads(f, a, k[0]))(q, kk, v)
  want, g_want = jit(lambda *a: _value_and_grads(
      lambda *b: dot_product_attention(*b, is_causal=True, implementation="xla"), a, k[0]))(
          q, kk, v)
  assert_close(got, want)
  for a, e in zip(g_got, g_want):
    assert_close(a, e)
  bad = jax.shard_map(lambda *a: sq.ulysses_attention(*a, axis_name="sequence"), mesh=mesh,
                      in_specs=(spec,) * 3, out_specs=spec)
  with pytest.raises(ValueError, match=r"key/value heads \(1\) must be divisible by the size "
                                       r"of axis 'sequence' \(2\)"):
    bad(q, kk[:, :, :1], v[:, :, :1])
  with pytest.raises(ValueError, match="zigzag layout needs an even local sequence length"):
    jax.shard_map(lambda *a: sq.ring_attention(*a, axis_name="sequence", is_causal=True),
                  mesh=mesh, in_specs=(spec,) * 3, out_specs=spec)(
                      q[:, :6], kk[:, :6], v[:, :6])
  with pytest.raises(ValueError, match=r"seq_len 12 must be divisible by 8 for the 'zigzag'"):
    sq.sequence_permutation(12, 4, "zigzag")
  np.testing.assert_array_equal(sq.sequence_permutation(8, 2), [0, 1, 6, 7, 2, 3, 4, 5])


def test_pipeline_schedules_equal_sequential(key):
  """GPipe (jax.grad through the schedule), 1F1B (manual schedule) and the interleaved
  schedule (2 chunks per device) over 4 stages."""
  mesh = make_mesh("pipeline=4,data=2")
  k = jax.random.split(key, 3)
  layers, d, m, mb = 8, 6, 5, 3
  w = jax.random.normal(k[0], (layers, d, d)) * 0.5
  xs, tg = jax.random.normal(k[1], (m, mb, d)), jax.random.normal(k[2], (m, mb, d))

  def stage(w, x):
    return jax.lax.scan(lambda x, wi: (jnp.tanh(x @ wi), None), x, w)[0]

  def loss_fn(y, t):
    return jnp.mean((y - t) ** 2)

  def sequential(w):
    return jnp.mean(jax.vmap(lambda x, t: loss_fn(stage(w, x), t))(xs, tg))

  loss, grads = jit(jax.value_and_grad(sequential))(w)

  def gpipe_loss(w):
    ys = jax.shard_map(lambda w, xs: pl.gpipe(stage, w, xs, axis_name="pipeline"),
                       mesh=mesh, in_specs=(P("pipeline"), P()), out_specs=P())(w, xs)
    return jnp.mean(jax.vmap(loss_fn)(ys, tg))

  def ofob(w, xs, tg):
    l, g = pl.one_f_one_b(stage, loss_fn, w, xs, tg, axis_name="pipeline")
    return l, jax.lax.pmean(g, "data")

  def interleaved_loss(w):
    chunks = w.reshape(2, 4, layers // 8, d, d)  # chunk r of stage s: layer group 4 r + s
    ys = jax.shard_map(lambda c, xs: pl.interleaved(stage, c[:, 0], xs, axis_name="pipeline"),
                       mesh=mesh, in_specs=(P(None, "pipeline"), P()), out_specs=P())(chunks, xs)
    return jnp.mean(jax.vmap(loss_fn)(ys, tg))

  l3, g3 = jit(jax.value_and_grad(interleaved_loss))(w)
  l1, g1 = jit(jax.value_and_grad(gpipe_loss))(w)
  l2, g2 = jit(jax.shard_map(ofob, mesh=mesh, in_specs=(P("pipeline"), P(), P()),
                                 out_specs=(P(), P("pipeline"))))(w, xs, tg)
  for got_l, got_g in ((l1, g1), (l2, g2), (l3, g3)):
    assert_close(got_l, loss)
    assert_close(got_g, grads)
  assert pl.bubble_fraction("1f1b", 4, 5) == pytest.approx(3 / 8)
  assert pl.bubble_fraction("interleaved", 4, 8, num_chunks=2) == pytest.approx(3 / 19)
  table = pl.schedule_table("1f1b", 4, 5)
  assert table[-1].split()[3] == "B0" and len(table[0].split()) == 5 + 2 * 3
  with pytest.raises(ValueError, match="schedule must be one of"):
    pl.bubble_fraction("zero-bubble", 4, 8)
