"""MultiHeadAttention: vs a direct computation, GQA shapes, masks, KV cache, errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.nn import KVCache, MultiHeadAttention, apply_rope
from tests.helpers import assert_close


def _direct(params, x, *, heads, kv_heads, head_dim, positions, causal=True, window=None,
            soft_cap=None, segment_ids=None):
  """Plain-jnp attention with K/V explicitly repeated per query head."""
  b, t, _ = x.shape
  q = jnp.einsum("btd,dnh->btnh", x, params["q_proj"]["kernel"])
  k = jnp.einsum("btd,dnh->btnh", x, params["k_proj"]["kernel"])
  v = jnp.einsum("btd,dnh->btnh", x, params["v_proj"]["kernel"])
  q, k = apply_rope(q, positions), apply_rope(k, positions)
  g = heads // kv_heads
  k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
  s = jnp.einsum("bqnh,bknh->bnqk", q, k) / np.sqrt(head_dim)
  if soft_cap is not None:
    s = soft_cap * jnp.tanh(s / soft_cap)
  i, j = np.arange(t)[:, None], np.arange(t)[None, :]
  allowed = np.ones((t, t), bool)
  if causal:
    allowed &= j <= i
  if window is not None:
    allowed &= (j >= i - window) & (j <= i + window)
  allowed = jnp.asarray(allowed)[None, None]
  if segment_ids is not None:
    allowed = allowed & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
  s = jnp.where(allowed, s, -jnp.inf)
  o = jnp.einsum("bnqk,bknh->bqnh", jax.nn.softmax(s, axis=-1), v)
  return jnp.einsum("bqnh,nhd->bqd", o, params["o_proj"]["kernel"])


@pytest.mark.parametrize("heads, kv_heads, kw", [
    (4, 4, {}),                                    # MHA
    (6, 2, {}),                                    # GQA 3:1
    (4, 1, dict(logits_soft_cap=5.0)),             # MQA + soft cap
    (4, 2, dict(local_window_size=3)),             # sliding window
    (2, 2, dict(is_causal=False)),                 # bidirectional
])
def test_matches_direct_computation(key, heads, kv_heads, kw):
  kx, kp = jax.random.split(key)
  b, t, d, h = 2, 11, 24, 16
  x = jax.random.normal(kx, (b, t, d))
  attn = MultiHeadAttention(num_heads=heads, num_kv_heads=kv_heads, head_dim=h, **kw)
  params = jax.jit(attn.init)(kp, x)["params"]
  assert params["q_proj"]["kernel"].shape == (d, heads, h)
  assert params["k_proj"]["kernel"].shape == (d, kv_heads, h)
  assert params["v_proj"]["kernel"].shape == (d, kv_heads, h)
  assert params["o_proj"]["kernel"].shape == (heads, h, d)
  pos = jnp.arange(t)
  y = jax.jit(attn.apply)({"params": params}, x)
  assert y.shape == (b, t, d)
  expected = jax.jit(_direct, static_argnames=("heads", "kv_heads", "head_dim", "causal", "window",
                                               "soft_cap"))(params, x, heads=heads, kv_heads=kv_heads, head_dim=h, positions=pos,
                     causal=kw.get("is_causal", True), window=kw.get("local_window_size"),
                     soft_cap=kw.get("logits_soft_cap"))
  assert_close(y, expected)


def test_segment_ids_and_positions(key):
  kx, kp = jax.random.split(key)
  x = jax.random.normal(kx, (2, 9, 16))
  seg = jnp.array([[0, 0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0, 0, 0]])
  pos = jnp.array([[0, 1, 2, 3, 0, 1, 2, 3, 4], list(range(9))])
  attn = MultiHeadAttention(num_heads=2, num_kv_heads=1, head_dim=8, out_features=10)
  params = jax.jit(attn.init)(kp, x)["params"]
  apply = jax.jit(attn.apply)
  y = apply({"params": params}, x, positions=pos, segment_ids=seg)
  assert y.shape == (2, 9, 10)
  expected = jax.jit(_direct, static_argnames=("heads", "kv_heads", "head_dim"))(
      params, x, heads=2, kv_heads=1, head_dim=8, positions=pos, segment_ids=seg)
  assert_close(y, expected)
  # A packed second document equals running it alone.
  alone = apply({"params": params}, x[:1, 4:])
  assert_close(y[:1, 4:], alone)


def test_causal_future_token_does_not_change_the_past(key):
  kx, kp, kz = jax.random.split(key, 3)
  x = jax.random.normal(kx, (1, 10, 16))
  attn = MultiHeadAttention(num_heads=4, num_kv_heads=2, head_dim=8)
  params = jax.jit(attn.init)(kp, x)["params"]
  apply = jax.jit(attn.apply)
  y = apply({"params": params}, x)
  x2 = x.at[:, 6].set(jax.random.normal(kz, (16,)))
  y2 = apply({"params": params}, x2)
  np.testing.assert_array_equal(np.asarray(y[:, :6]), np.asarray(y2[:, :6]))
  assert not np.allclose(y[:, 6:], y2[:, 6:])


@pytest.mark.parametrize("window", [None, 4])
def test_kv_cache_decode_matches_full_forward(key, window):
  kx, kp = jax.random.split(key)
  b, t, d = 2, 13, 32
  x = jax.random.normal(kx, (b, t, d))
  attn = MultiHeadAttention(num_heads=4, num_kv_heads=2, head_dim=8, local_window_size=window)
  params = jax.jit(attn.init)(kp, x)["params"]
  apply = jax.jit(attn.apply)
  full = apply({"params": params}, x)
  cache = KVCache.zeros(b, 16, 2, 8)
  # Prefill 5 tokens, then decode one at a time.
  p = 5
  pos = jnp.broadcast_to(jnp.arange(p), (b, p))
  out, cache = apply({"params": params}, x[:, :p], positions=pos, kv_cache=cache)
  outs = [out]
  for i in range(p, t):
    out, cache = apply({"params": params}, x[:, i:i + 1], positions=jnp.full((b, 1), i),
                       kv_cache=cache)
    outs.append(out)
  assert_close(jnp.concatenate(outs, axis=1), full)
  assert cache.key.shape == (b, 16, 2, 8)


@pytest.mark.parametrize("window, cap", [(None, None), (3, 20.0)])
def test_paged_cache_ragged_prefill_and_decode_match_full_forward(key, window, cap):
  from jaxeff import kv_cache as paged
  kx, kp = jax.random.split(key)
  b, t, d = 3, 11, 24
  lengths = jnp.array([4, 7, 1], jnp.int32)
  x = jax.random.normal(kx, (b, t, d))
  attn = MultiHeadAttention(num_heads=6, num_kv_heads=2, head_dim=8, local_window_size=window,
                            logits_soft_cap=cap)
  params = jax.jit(attn.init)(kp, x)["params"]
  full = jax.jit(attn.apply)({"params": params}, x)

  @jax.jit
  def prefill(cache, xs):
    cache, _ = paged.reserve(cache, lengths)
    return attn.apply({"params": params}, xs, positions=jnp.broadcast_to(jnp.arange(7), (b, 7)),
                      paged_cache=cache, layer=1, num_new=lengths)

  @jax.jit
  def step(cache, xs, active):
    cache, _ = paged.reserve(cache, active)
    return attn.apply({"params": params}, xs, positions=(cache.lengths - 1)[:, None],
                      paged_cache=cache, layer=1, num_new=active)

  cache = paged.create(num_layers=2, num_pages=12, page_size=4, kv_heads=2, head_dim=8,
                       max_seqs=b, pages_per_seq=4, dtype=jnp.float32)
  out, cache = prefill(cache, x[:, :7])  # right-padded: rows past lengths[b] are padding
  for i in range(b):
    assert_close(out[i, :lengths[i]], full[i, :lengths[i]])
  assert np.asarray(cache.lengths).tolist() == [4, 7, 1]
  assert float(jnp.abs(cache.keys[0]).max()) == 0  # layer 0 untouched
  # Decode: sequence i feeds x[i, lengths[i] + s]; sequence 1 sits out step 1.
  pos = np.asarray(lengths).copy()
  for s in range(3):
    active = jnp.array([1, int(s != 1), 1], jnp.int32)
    xs = x[jnp.arange(b), jnp.asarray(pos)][:, None]
    out, cache = step(cache, xs, active)
    for i in range(b):
      if active[i]:
        assert_close(out[i, 0], full[i, pos[i]])
        pos[i] += 1
  assert np.asarray(cache.lengths).tolist() == pos.tolist() == [7, 9, 4]


def test_paged_cache_bad_inputs():
  from jaxeff import kv_cache as paged
  attn = MultiHeadAttention(num_heads=4, num_kv_heads=2, head_dim=8)
  x = jnp.ones((2, 1, 16))
  pos = jnp.zeros((2, 1), jnp.int32)
  one = jnp.ones((2,), jnp.int32)
  params = jax.jit(attn.init)(jax.random.key(0), x)["params"]
  mk = lambda **kw: paged.create(**{**dict(num_layers=2, num_pages=4, page_size=4,  # noqa: E731
                                           kv_heads=2, head_dim=8, max_seqs=2,
                                           pages_per_seq=2), **kw})
  call = lambda **kw: attn.apply({"params": params}, x, **{  # noqa: E731
      **dict(positions=pos, paged_cache=mk(), num_new=one), **kw})
  with pytest.raises(ValueError, match=r"\(max_seqs, kv_heads, head_dim\) = \(2, 2, 8\), got "
                     r"\(2, 1, 8\)"):
    call(paged_cache=mk(kv_heads=1))
  with pytest.raises(ValueError, match="layer must be in \\[0, 2\\), got 2"):
    call(layer=2)
  with pytest.raises(ValueError, match=r"needs num_new \[batch\] = \(2,\).*got \(3,\)"):
    call(num_new=jnp.ones((3,), jnp.int32))
  with pytest.raises(ValueError, match="needs positions"):
    call(positions=None)
  with pytest.raises(ValueError, match="either kv_cache or paged_cache"):
    call(kv_cache=KVCache.zeros(2, 8, 2, 8))
  with pytest.raises(ValueError, match="segment_ids and mask are not supported"):
    call(mask=jnp.ones((2, 1, 1, 1), bool))
  with pytest.raises(TypeError, match="paged_cache must be a jaxeff.kv_cache.PagedKVCache"):
    call(paged_cache=KVCache.zeros(2, 8, 2, 8))
  with pytest.raises(ValueError, match="paged_cache needs is_causal=True"):
    MultiHeadAttention(num_heads=4, num_kv_heads=2, head_dim=8, is_causal=False).apply(
        {"params": params}, x, positions=pos, paged_cache=mk(), num_new=one)


def test_kv_cache_sequences_at_different_positions(key):
  # Row 0 decodes at position 7 while row 1 decodes at position 3.
  kx, kp = jax.random.split(key)
  x = jax.random.normal(kx, (2, 8, 16))
  attn = MultiHeadAttention(num_heads=2, head_dim=8)
  params = jax.jit(attn.init)(kp, x)["params"]
  apply = jax.jit(attn.apply)
  cache = KVCache.zeros(2, 8, 2, 8)
  _, cache = apply({"params": params}, x[:, :7], positions=jnp.broadcast_to(jnp.arange(7), (2, 7)),
                   kv_cache=cache)
  step_x = jnp.stack([x[0, 7], x[1, 3]])[:, None]
  out, _ = apply({"params": params}, step_x, positions=jnp.array([[7], [3]]), kv_cache=cache)
  full0 = apply({"params": params}, x[:1])
  full1 = apply({"params": params}, x[1:, :4])
  assert_close(out[0, 0], full0[0, 7])
  assert_close(out[1, 0], full1[0, 3])


def test_bf16_compute(key):
  x = jax.random.normal(key, (2, 8, 16))
  attn = MultiHeadAttention(num_heads=2, head_dim=8, dtype=jnp.bfloat16)
  params = jax.jit(attn.init)(key, x)["params"]
  y = jax.jit(attn.apply)({"params": params}, x)
  assert y.dtype == jnp.bfloat16
  y32 = jax.jit(MultiHeadAttention(num_heads=2, head_dim=8).apply)({"params": params}, x)
  assert_close(y.astype(jnp.float32), y32, rtol=3e-2)


def test_implementation_is_passed_through(key):
  x = jax.random.normal(key, (1, 4, 16))
  attn = MultiHeadAttention(num_heads=2, head_dim=8, implementation="no-such-kernel")
  with pytest.raises(ValueError, match="unknown implementation 'no-such-kernel'"):
    jax.eval_shape(lambda: attn.init(key, x))
  ok = MultiHeadAttention(num_heads=2, head_dim=8, implementation="xla")
  params = jax.jit(ok.init)(key, x)["params"]
  assert_close(jax.jit(ok.apply)({"params": params}, x),
               jax.jit(MultiHeadAttention(num_heads=2, head_dim=8).apply)({"params": params}, x))


@pytest.mark.parametrize("kw, call, match", [
    (dict(num_heads=3, num_kv_heads=2, head_dim=8), {}, "must be a positive multiple"),
    (dict(num_heads=2, head_dim=8), dict(x=(2, 4)), "x must be"),
    (dict(num_heads=2, head_dim=8), dict(positions=jnp.arange(5)), "positions must be"),
    (dict(num_heads=2, head_dim=8), dict(cache=(2, 8, 1, 8)), "kv_cache must be"),
    (dict(num_heads=2, head_dim=8), dict(cache=(2, 8, 2, 8), positions=None), "needs positions"),
    (dict(num_heads=2, head_dim=8, is_causal=False), dict(cache=(2, 8, 2, 8)), "is_causal=True"),
    (dict(num_heads=2, head_dim=8), dict(cache=(2, 3, 2, 8)), "do not fit"),
])
def test_bad_inputs(kw, call, match):
  x = jnp.ones(call.get("x", (2, 4, 16)))
  kwargs = {}
  if "positions" in call:
    kwargs["positions"] = call["positions"]
  if "cache" in call:
    kwargs["kv_cache"] = KVCache.zeros(*call["cache"])
    kwargs.setdefault("positions", jnp.zeros((2, 4), jnp.int32))
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(lambda: MultiHeadAttention(**kw).init(jax.random.key(0), x, **kwargs))
