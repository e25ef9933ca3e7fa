"""The paged KV cache: page bookkeeping invariants, quantize-on-write, eviction policies.

Invariants checked after every operation of random reserve/release sequences: the pages
in use (table entries of pages a sequence's length reaches) are distinct, disjoint from the
free stack, and together with it are exactly all pages. Writes are checked by reading the
cache back (dequantized) and by decode attention over it; eviction policies by the
positions they keep under their budget.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff import kv_cache as kvc
from jaxeff import ops
from kernels_pallas.decode import common
from tests.helpers import assert_close, rel_err

QUANT_ERROR_BOUND = {"none": 1.5e-2, "int8": 2e-2, "fp8": 5e-2, "int4": 2e-1}


def _small(quant=None, **kw):
  args = dict(num_layers=2, num_pages=12, page_size=4, kv_heads=2, head_dim=16, max_seqs=3,
              pages_per_seq=5, dtype=jnp.float32, quant=quant)
  args.update(kw)
  return kvc.create(**args)


def _check_pages(cache: kvc.PagedKVCache):
  table = np.asarray(cache.page_table)
  lengths = np.asarray(cache.lengths)
  n_used = -(-lengths // cache.page_size)
  used = np.concatenate([table[s, : n_used[s]] for s in range(cache.max_seqs)])
  free = np.asarray(cache.free_pages)[: int(cache.num_free)]
  assert (lengths >= 0).all() and (lengths <= cache.capacity).all()
  assert len(set(used.tolist())) == len(used), f"a page is owned twice: {table}"
  assert not set(used.tolist()) & set(free.tolist()), "a page is both used and free"
  assert sorted(used.tolist() + free.tolist()) == list(range(cache.num_pages))
  for s in range(cache.max_seqs):  # pages past a sequence's length are unassigned
    assert (table[s, n_used[s]:] == -1).all()


def test_create_formats():
  for quant, store, last in ((None, jnp.float32, 16), ("int8", jnp.int8, 16),
                             ("fp8", jnp.float8_e4m3fn, 16), ("int4", jnp.uint8, 8)):
    c = _small(quant)
    assert c.keys.shape == (2, 12, 4, 2, last) and c.keys.dtype == store
    assert c.capacity == 20 and int(c.num_free) == 12
    if quant is None:
      assert c.k_scale is None
    else:
      assert c.k_scale.shape == (2, 12, 4, 2) + ((1,) if quant == "int4" else ())
    _check_pages(c)
  assert _small("int4", group_size=8).k_scale.shape == (2, 12, 4, 2, 2)


def test_random_reserve_release_keep_invariants(key):
  cache = _small()
  reserve, release = jax.jit(kvc.reserve), jax.jit(kvc.release)
  rng = np.random.default_rng(0)
  for _ in range(25):
    if rng.random() < 0.7:
      num_new = rng.integers(0, 7, size=3).astype(np.int32)
      before = np.asarray(cache.lengths)
      cache, ok = reserve(cache, jnp.asarray(num_new))
      after = np.asarray(cache.lengths)
      ok = np.asarray(ok)
      np.testing.assert_array_equal(after, np.where(ok, before + num_new, before))
    else:
      cache = release(cache, jnp.asarray(rng.random(3) < 0.5))
    _check_pages(cache)


def test_reserve_reports_what_does_not_fit():
  cache = _small()
  cache, ok = kvc.reserve(cache, jnp.array([21, 20, 3], jnp.int32))  # 21 > capacity 20
  np.testing.assert_array_equal(ok, [False, True, True])
  np.testing.assert_array_equal(cache.lengths, [0, 20, 3])
  # 5 + 1 pages used, 6 free: 12 more tokens (3 pages) for seq 0 fit, then 17 more for
  # seq 2 (4 more pages) do not; seq 2 is unchanged.
  cache, ok = kvc.reserve(cache, jnp.array([12, 0, 17], jnp.int32))
  np.testing.assert_array_equal(ok, [True, True, False])
  np.testing.assert_array_equal(cache.lengths, [12, 20, 3])
  assert int(cache.num_free) == 3
  # Growth inside a sequence's last page needs no page and succeeds even after a failure.
  cache, ok = kvc.reserve(cache, jnp.array([0, 0, 1], jnp.int32))
  np.testing.assert_array_equal(ok, [True, True, True])
  _check_pages(cache)
  with pytest.raises(ValueError, match=r"num_new must have shape \[max_seqs\] = \(3,\)"):
    kvc.reserve(cache, jnp.array([1, 1], jnp.int32))


@pytest.mark.parametrize("quant", [None, "int8", "fp8", "int4"])
def test_prefill_and_decode_writes_then_attend(quant, key):
  """Ragged prefill (right-padded prompts), two decode appends, then decode attention over
  the cache equals attention over the raw K/V (within the format's error)."""
  cache = _small(quant, group_size=8 if quant == "int4" else None)
  prompt = jnp.array([5, 0, 9], jnp.int32)
  ks = jax.random.split(key, 8)
  k_pre = jax.random.normal(ks[0], (3, 9, 2, 16))
  v_pre = jax.random.normal(ks[1], (3, 9, 2, 16))

  @jax.jit
  def prefill(cache, k, v):
    cache, ok = kvc.reserve(cache, prompt)
    for layer in range(cache.num_layers):
      cache = kvc.write(cache, layer, k * (layer + 1), v, prompt)
    return cache, ok

  @jax.jit
  def decode(cache, k, v):
    cache, ok = kvc.reserve(cache, jnp.ones((3,), jnp.int32))
    cache = kvc.append(cache, 1, k, v)
    return cache, ok

  cache, ok = prefill(cache, k_pre, v_pre)
  assert bool(ok.all())
  steps = [(jax.random.normal(ks[2 + 2 * i], (3, 2, 16)), jax.random.normal(ks[3 + 2 * i], (3, 2, 16)))
           for i in range(2)]
  for k, v in steps:
    cache, ok = decode(cache, k, v)
    assert bool(ok.all())
  _check_pages(cache)
  np.testing.assert_array_equal(cache.lengths, [7, 2, 11])
  # The logical contents of layer 1: prompt tokens (layer 1 wrote k * 2) then the appends.
  expected_k = np.zeros((3, 20, 2, 16), np.float32)
  expected_v = np.zeros((3, 20, 2, 16), np.float32)
  for s, n in enumerate([5, 0, 9]):
    expected_k[s, :n] = 2 * np.asarray(k_pre[s, :n])
    expected_v[s, :n] = np.asarray(v_pre[s, :n])
    for i, (k, v) in enumerate(steps):
      expected_k[s, n + i], expected_v[s, n + i] = k[s], v[s]
  got_k, got_v = kvc.gather_kv(cache, 1)
  lengths = np.asarray(cache.lengths)
  for s in range(3):
    n = lengths[s]
    if quant is None:
      np.testing.assert_array_equal(got_k[s, :n], expected_k[s, :n])
    else:
      assert rel_err(got_k[s, :n], expected_k[s, :n]) < QUANT_ERROR_BOUND[quant] * 2
      assert rel_err(got_v[s, :n], expected_v[s, :n]) < QUANT_ERROR_BOUND[quant] * 2
  q = jax.random.normal(ks[7], (3, 1, 4, 16))
  out = jax.jit(lambda q, cache: ops.decode_attention(q, **kvc.layer_kv(cache, 1)))(q, cache)
  exact = jax.jit(lambda q, k, v, lengths: ops.decode_attention(q, k, v, lengths=lengths))(
      q, jnp.asarray(expected_k), jnp.asarray(expected_v), cache.lengths)
  assert rel_err(out, exact) <= QUANT_ERROR_BOUND[quant or "none"]


def test_quantize_on_write_uses_the_shared_formulas(key):
  cache = _small("int4", group_size=8)
  k = jax.random.normal(key, (3, 3, 2, 16))

  @jax.jit
  def prefill(cache, k):
    n = jnp.array([3, 0, 0], jnp.int32)
    return kvc.write(kvc.reserve(cache, n)[0], 0, k, k, n)

  cache = prefill(cache, k)
  q, s = common.quantize(k[0], "int4", group_size=8)
  page = int(cache.page_table[0, 0])
  np.testing.assert_array_equal(cache.keys[0, page, :3], q)
  np.testing.assert_array_equal(cache.k_scale[0, page, :3], s)


def test_release_then_reuse_pages(key):
  cache = _small()
  cache, _ = kvc.reserve(cache, jnp.array([20, 20, 0], jnp.int32))
  assert int(cache.num_free) == 2
  cache = kvc.release(cache, jnp.array([True, False, False]))
  assert int(cache.num_free) == 7 and int(cache.lengths[0]) == 0
  cache, ok = kvc.reserve(cache, jnp.array([0, 0, 20], jnp.int32))
  assert bool(ok[2])
  _check_pages(cache)


def test_bad_arguments():
  with pytest.raises(ValueError, match="quant must be None or one of"):
    _small("int3")
  with pytest.raises(ValueError, match="int4 group_size must divide head_dim / 2"):
    _small("int4", group_size=6)
  with pytest.raises(ValueError, match="page_size must be a positive int, got 0"):
    _small(page_size=0)
  cache = _small()
  with pytest.raises(ValueError, match=r"write: k: expected \[max_seqs, tokens, kv_heads, "
                     r"head_dim\] with max_seqs=3, kv_heads=2, head_dim=16"):
    kvc.write(cache, 0, jnp.zeros((3, 2, 2, 8)), jnp.zeros((3, 2, 2, 8)), jnp.ones(3, jnp.int32))
  with pytest.raises(ValueError, match="the policy budget 30 exceeds the cache capacity"):
    kvc.init_eviction(kvc.SlidingWindowWithSinks(num_sinks=10, window=20), cache)


# --- eviction ----------------------------------------------------------------------------


def _run_policy(policy, steps: int, probs_fn=None, max_seqs=2):
  """Decode ``steps`` tokens per sequence under ``policy``; returns the position history."""
  cache = _small(max_seqs=max_seqs, pages_per_seq=5)  # capacity 20
  ev = kvc.init_eviction(policy, cache)

  @jax.jit
  def step(cache, ev, t):
    cache, ev, slots, written = kvc.reserve_slots(cache, ev, policy)
    if probs_fn is not None:
      probs = probs_fn(ev.positions, cache.lengths, t)
      ev = kvc.observe(ev, policy, jnp.pad(probs, ((0, 0), (0, cache.capacity - policy.budget))),
                       cache)
    return cache, ev, slots, written

  history = []
  for t in range(steps):
    cache, ev, slots, written = step(cache, ev, t)
    assert bool(written.all())
    history.append((np.asarray(ev.positions).copy(), np.asarray(slots), np.asarray(cache.lengths)))
    _check_pages(cache)
  return history, ev


def test_sliding_window_with_sinks_keeps_sinks_and_latest():
  policy = kvc.SlidingWindowWithSinks(num_sinks=2, window=5)
  history, _ = _run_policy(policy, 16)
  for t, (positions, _, lengths) in enumerate(history):
    kept = set(positions[0][positions[0] >= 0].tolist())
    n = t + 1
    expected = set(range(n)) if n <= 7 else {0, 1} | set(range(n - 5, n))
    assert kept == expected, (t, kept)
    assert int(lengths[0]) == min(n, 7)


@pytest.mark.parametrize("policy_cls", [kvc.HeavyHitter, kvc.Scissorhands])
def test_score_policies_keep_recent_and_heavy_tokens(policy_cls):
  # Positions 3 and 8 receive most of the attention at every step; the policy must keep
  # them (and the 3 most recent tokens) forever, within a budget of 1 + 3 + 2.
  policy = policy_cls(num_recent=3, num_heavy=2, num_sinks=1)
  heavy = jnp.array([3, 8])

  def probs_fn(positions, lengths, t):
    hit = (positions[..., None] == heavy).any(-1)
    p = jnp.where(positions >= 0, jnp.where(hit, 0.4, 0.2 / policy.budget), 0.0)
    return p / p.sum(axis=1, keepdims=True)

  history, ev = _run_policy(policy, 18, probs_fn)
  for t, (positions, slots, lengths) in enumerate(history):
    n = t + 1
    kept = set(positions[0][positions[0] >= 0].tolist())
    assert len(kept) == min(n, policy.budget) == int(lengths[0])
    assert set(range(max(0, n - 3), n)) <= kept  # recent
    assert 0 in kept  # the sink
    if n > 9:
      assert {3, 8} <= kept
  assert ev.policy_state.shape == (2, policy.budget)


def test_score_policy_evicts_lowest_score_oldest_first():
  policy = kvc.HeavyHitter(num_recent=2, num_heavy=2)
  positions = jnp.array([[0, 1, 2, 3]], jnp.int32)
  scores = jnp.array([[0.5, 0.1, 0.1, 0.9]])
  # New token 4: 3 is recent (protected); 1 and 2 tie at the lowest score; 1 is older.
  assert int(policy.victim(scores, positions, jnp.array([4]))[0]) == 1


def test_eviction_with_decode_attention_end_to_end(key):
  """A jitted decode loop: reserve a slot, write it, attend, observe probabilities. The
  attention over the kept slots equals attention over the kept tokens' K/V."""
  policy = kvc.HeavyHitter(num_recent=4, num_heavy=3, num_sinks=1)
  cache = _small(max_seqs=2, pages_per_seq=2)  # capacity 8 = budget
  ev = kvc.init_eviction(policy, cache)
  ks = jax.random.split(key, 3)
  all_k = jax.random.normal(ks[0], (20, 2, 2, 16))
  all_v = jax.random.normal(ks[1], (20, 2, 2, 16))
  q_all = jax.random.normal(ks[2], (20, 2, 1, 4, 16))

  @jax.jit
  def step(cache, ev, k, v, q):
    cache, ev, slots, _ = kvc.reserve_slots(cache, ev, policy)
    for layer in range(cache.num_layers):
      cache = kvc.write_slots(cache, layer, k, v, slots)
    out, lse = ops.decode_attention_with_lse(q, **kvc.layer_kv(cache, 0))
    ev = kvc.observe(ev, policy, kvc.slot_attention_probs(q, cache, 0, lse), cache)
    return cache, ev, out

  for t in range(20):
    cache, ev, out = step(cache, ev, all_k[t], all_v[t], q_all[t])
  positions = np.asarray(ev.positions)
  assert (positions >= 0).all() and int(cache.lengths.max()) == 8
  kept_k = jnp.take(all_k, positions, axis=0)  # [seq, budget, seq', heads, d]
  kept_k = jnp.stack([kept_k[s, :, s] for s in range(2)])
  kept_v = jnp.stack([jnp.take(all_v, positions, axis=0)[s, :, s] for s in range(2)])
  expected = jax.jit(lambda q, k, v, lengths: ops.decode_attention(q, k, v, lengths=lengths))(
      q_all[19], kept_k, kept_v, cache.lengths)
  assert_close(out, expected, rtol=1e-5)
  # Probabilities over the kept slots sum to one per query head (4 heads).
  @jax.jit
  def probs(q, cache):
    _, lse = ops.decode_attention_with_lse(q, **kvc.layer_kv(cache, 0))
    return kvc.slot_attention_probs(q, cache, 0, lse)

  np.testing.assert_allclose(np.asarray(probs(q_all[19], cache).sum(axis=1)), 4.0, rtol=1e-5)


def test_cache_is_a_pytree():
  cache = _small("int8")
  leaves, treedef = jax.tree.flatten(cache)
  assert len(leaves) == 8
  again = jax.tree.unflatten(treedef, leaves)
  assert dataclasses.replace(again).fmt == "int8"


def test_mixed_precision_demotes_instead_of_dropping(key):
  """ZipVL-style: bf16 keeps the policy's budget, evicted tokens move to an int4 cache;
  no token is lost and attention over both equals attention over all tokens (the demoted
  ones dequantized)."""
  policy = kvc.HeavyHitter(num_recent=3, num_heavy=2, num_sinks=1)
  hi = _small(max_seqs=2, pages_per_seq=2)  # capacity 8 >= budget 6
  lo = _small("int4", max_seqs=2, pages_per_seq=5, num_pages=10)
  ev = kvc.init_eviction(policy, hi)
  steps = 15
  ks = jax.random.split(key, 3)
  all_k = jax.random.normal(ks[0], (steps, 2, 2, 16))
  all_v = jax.random.normal(ks[1], (steps, 2, 2, 16))
  q_all = jax.random.normal(ks[2], (steps, 2, 1, 4, 16))

  @jax.jit
  def step(hi, lo, ev, k, v, q):
    old_positions = ev.positions
    hi, lo, ev, slots, demote, written = kvc.reserve_mixed(hi, lo, ev, policy)
    for layer in range(hi.num_layers):
      hi, lo = kvc.write_mixed(hi, lo, layer, k, v, slots, demote, written)
    out, lse = kvc.attend_mixed(q, hi, lo, 0)
    probs = kvc.slot_attention_probs(q, hi, 0, kvc.ops_lse(q, hi, 0))
    ev = kvc.observe(ev, policy, probs, hi)
    victim_pos = jnp.take_along_axis(old_positions, slots[:, None], axis=1)[:, 0]
    return hi, lo, ev, out, jnp.where(demote, victim_pos, -1)

  demoted = [[], []]
  for t in range(steps):
    hi, lo, ev, out, victim = step(hi, lo, ev, all_k[t], all_v[t], q_all[t])
    for s in range(2):
      if int(victim[s]) >= 0:
        demoted[s].append(int(victim[s]))
  np.testing.assert_array_equal(hi.lengths + lo.lengths, [steps, steps])
  kept = np.asarray(ev.positions)
  for s in range(2):
    assert sorted(kept[s].tolist() + demoted[s]) == list(range(steps))
  # Attention over both caches == attention over all tokens, demoted ones quantized.
  lo_k, lo_v = kvc.gather_kv(lo, 0)
  n_lo = int(lo.lengths[0])
  full_k = jnp.stack([jnp.concatenate([all_k[kept[s], s], lo_k[s, :n_lo]]) for s in range(2)])
  full_v = jnp.stack([jnp.concatenate([all_v[kept[s], s], lo_v[s, :n_lo]]) for s in range(2)])
  expected = jax.jit(lambda q, k, v: ops.decode_attention(
      q, k, v, lengths=jnp.full((2,), k.shape[1], jnp.int32)))(q_all[-1], full_k, full_v)
  assert_close(out, expected, rtol=1e-5)
  # The demoted tokens in lo are the victims' K, quantized.
  for s in range(2):
    assert rel_err(lo_k[s, :n_lo], all_k[np.array(demoted[s]), s]) < 0.2
