"""A functional paged KV cache for generation, with quantize-on-write and eviction policies.

The cache follows vLLM's PagedAttention (Kwon et al., 2023): K/V live in fixed-size pages
shared by every sequence of a batch; a page table maps each sequence's logical pages to
physical ones, so sequences of very different lengths share one pool without padding to
the longest. Everything is a pytree of fixed-shape arrays and every function is pure and
jittable: allocation pops pages off a free-page stack, release pushes them back.

Layout (one pool for all layers; the page table is shared by the layers):

* ``keys, values``: ``[num_layers, num_pages, page_size, kv_heads, head_dim]`` in the cache
  dtype, or quantized (formats and formulas in :mod:`kernels_pallas.decode.common`, the
  same ones the decode kernels and the op's reference use): int8 / float8_e4m3fn with
  ``k_scale, v_scale [num_layers, num_pages, page_size, kv_heads]``, or int4 packed to
  ``head_dim // 2`` uint8 with ``[..., kv_heads, head_dim // group_size]`` scales;
* ``page_table [max_seqs, pages_per_seq]`` int32 (-1 = no page), ``lengths [max_seqs]``;
* ``free_pages [num_pages]``: entries ``[0, num_free)`` are the free page ids.

Generation step (what a ``generate()`` loop does):

1. ``cache, ok = reserve(cache, num_new)`` grows each sequence by ``num_new[s]`` tokens,
   allocating pages (prefill: the prompt lengths; decode: 1 per active sequence);
2. per layer, ``cache = write(cache, layer, k, v, num_new)`` stores the new tokens'
   K/V (already RoPE-rotated), quantizing them on the way in;
3. ``jaxeff.ops.decode_attention(q, **layer_kv(cache, layer))`` attends over them;
4. ``cache = release(cache, finished)`` returns finished sequences' pages.

Eviction (a fixed token budget per sequence, :class:`EvictionPolicy`): once a sequence
holds ``budget`` tokens, ``reserve_slots`` asks the policy for a *victim slot* that the new
token overwrites, and records the token's absolute position per slot. Decode attention
over kept tokens needs no positions (keys are stored after RoPE), so ``q_len = 1`` decode
over ``min(length, budget)`` slots is unchanged. Policies:

* :class:`SlidingWindowWithSinks` (StreamingLLM, Xiao et al., 2023): the first
  ``num_sinks`` tokens and the last ``window`` tokens;
* :class:`HeavyHitter` (H2O, Zhang et al., 2023): the last ``num_recent`` tokens plus the
  tokens with the largest *accumulated* attention probability;
* :class:`Scissorhands` (Liu et al., 2023): the last ``num_recent`` tokens plus the tokens
  that were most often *important* (probability above the uniform ``1 / kept``) — the
  persistence-of-importance hypothesis.

Score-based policies observe the attention probabilities of each decoded token over the
kept slots (:func:`slot_attention_probs`, exact from the op's log-sum-exp).

Mixed precision (ZipVL, He et al., 2024): :func:`reserve_mixed` / :func:`write_mixed` keep
the policy's budget of important tokens in a high-precision cache and *demote* evicted
tokens to a second, low-precision cache (e.g. int4) instead of dropping them;
:func:`attend_mixed` attends over both and merges exactly by log-sum-exp.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from jaxeff import ops
from kernels_pallas.decode import common


@dataclasses.dataclass(frozen=True)
class PagedKVCache:
  """The cache state (module docstring). ``fmt``: ``"none"``, ``"int8"``, ``"fp8"``,
  ``"int4"``; ``head_dim``: the unpacked head size."""

  keys: jax.Array
  values: jax.Array
  k_scale: jax.Array | None
  v_scale: jax.Array | None
  page_table: jax.Array
  lengths: jax.Array
  free_pages: jax.Array
  num_free: jax.Array
  fmt: str = "none"
  head_dim: int = 0

  @property
  def num_layers(self) -> int:
    return self.keys.shape[0]

  @property
  def num_pages(self) -> int:
    return self.keys.shape[1]

  @property
  def page_size(self) -> int:
    return self.keys.shape[2]

  @property
  def kv_heads(self) -> int:
    return self.keys.shape[3]

  @property
  def max_seqs(self) -> int:
    return self.page_table.shape[0]

  @property
  def pages_per_seq(self) -> int:
    return self.page_table.shape[1]

  @property
  def capacity(self) -> int:
    """Tokens one sequence can hold."""
    return self.pages_per_seq * self.page_size


jax.tree_util.register_dataclass(
    PagedKVCache,
    data_fields=["keys", "values", "k_scale", "v_scale", "page_table", "lengths",
                 "free_pages", "num_free"],
    meta_fields=["fmt", "head_dim"])


def create(*, num_layers: int, num_pages: int, page_size: int, kv_heads: int, head_dim: int,
           max_seqs: int, pages_per_seq: int, dtype=jnp.bfloat16, quant: str | None = None,
           group_size: int | None = None) -> PagedKVCache:
  """An empty cache: every page free, every sequence of length 0.

  Args:
    quant: None (store ``dtype``), ``"int8"``, ``"fp8"`` or ``"int4"``.
    group_size: int4 scale group along head_dim (default ``head_dim``: one scale per token
      and head); must divide ``head_dim / 2`` or equal ``head_dim``.
  """
  fmt = quant or "none"
  if fmt not in ("none",) + common.QUANT_FORMATS:
    raise ValueError(f"create: quant must be None or one of {common.QUANT_FORMATS}, got "
                     f"{quant!r}")
  for name, v in (("num_layers", num_layers), ("num_pages", num_pages),
                  ("page_size", page_size), ("kv_heads", kv_heads), ("head_dim", head_dim),
                  ("max_seqs", max_seqs), ("pages_per_seq", pages_per_seq)):
    if not isinstance(v, int) or v < 1:
      raise ValueError(f"create: {name} must be a positive int, got {v!r}")
  if fmt == "none" and jnp.dtype(dtype) not in common.FLOAT_DTYPES:
    raise TypeError(f"create: dtype must be bfloat16, float16 or float32, got {dtype}")
  pages = (num_layers, num_pages, page_size, kv_heads)
  k_scale = v_scale = None
  if fmt == "none":
    store, last = jnp.dtype(dtype), head_dim
  elif fmt == "int8":
    store, last = jnp.dtype(jnp.int8), head_dim
  elif fmt == "fp8":
    store, last = common.FP8_DTYPE, head_dim
  else:
    group_size = head_dim if group_size is None else group_size
    if head_dim % group_size or not common.valid_int4_groups(head_dim, head_dim // group_size):
      raise ValueError(f"create: int4 group_size must divide head_dim / 2 or equal head_dim "
                       f"({head_dim}), got {group_size}")
    store, last = jnp.dtype(jnp.uint8), head_dim // 2
  if fmt != "none":
    scale_shape = pages + ((head_dim // group_size,) if fmt == "int4" else ())
    k_scale = jnp.zeros(scale_shape, jnp.float32)
    v_scale = jnp.zeros(scale_shape, jnp.float32)
  zeros = jnp.zeros(pages + (last,), store)
  if fmt == "int4":
    zeros = jnp.full(pages + (last,), common.INT4_OFFSET * 17, store)  # both nibbles = 0
  return PagedKVCache(
      keys=zeros, values=zeros, k_scale=k_scale, v_scale=v_scale,
      page_table=jnp.full((max_seqs, pages_per_seq), -1, jnp.int32),
      lengths=jnp.zeros((max_seqs,), jnp.int32),
      free_pages=jnp.arange(num_pages, dtype=jnp.int32)[::-1],
      num_free=jnp.asarray(num_pages, jnp.int32), fmt=fmt, head_dim=head_dim)


def _pages_for(tokens, page_size: int):
  return (tokens + page_size - 1) // page_size


def reserve(cache: PagedKVCache, num_new: jax.Array) -> tuple[PagedKVCache, jax.Array]:
  """Grows sequence ``s`` by ``num_new[s] >= 0`` tokens, allocating the pages it needs.

  Sequences are served in order while pages last; one that would exceed its capacity or
  find too few free pages is left unchanged and reported in ``ok``. Returns
  ``(cache, ok [max_seqs] bool)``.
  """
  num_new = jnp.asarray(num_new, jnp.int32)
  if num_new.shape != (cache.max_seqs,):
    raise ValueError(f"reserve: num_new must have shape [max_seqs] = ({cache.max_seqs},), "
                     f"got {num_new.shape}")
  ps = cache.page_size
  old = cache.lengths
  new = old + num_new
  fits = (num_new >= 0) & (new <= cache.capacity)
  need = jnp.where(fits, _pages_for(new, ps) - _pages_for(old, ps), 0)
  ok = fits & ((jnp.cumsum(need) <= cache.num_free) | (need == 0))
  need = jnp.where(ok, need, 0)
  end = jnp.cumsum(need)  # sequence s takes stack entries [num_free - end_s, ... + need_s)
  k = jnp.arange(cache.pages_per_seq, dtype=jnp.int32)[None, :]
  take = k < need[:, None]
  stack_idx = cache.num_free - end[:, None] + k
  pages = jnp.where(take, cache.free_pages[jnp.clip(stack_idx, 0, cache.num_pages - 1)], 0)
  col = _pages_for(old, ps)[:, None] + k
  col = jnp.where(take, col, cache.pages_per_seq)  # dropped
  rows = jnp.broadcast_to(jnp.arange(cache.max_seqs)[:, None], col.shape)
  table = cache.page_table.at[rows, col].set(pages, mode="drop")
  return dataclasses.replace(
      cache, page_table=table, lengths=jnp.where(ok, new, old),
      num_free=cache.num_free - end[-1]), ok


def release(cache: PagedKVCache, seqs: jax.Array) -> PagedKVCache:
  """Frees every page of the sequences where ``seqs [max_seqs]`` (bool) is True and resets
  them to length 0."""
  seqs = jnp.asarray(seqs, jnp.bool_)
  used = jnp.where(seqs, _pages_for(cache.lengths, cache.page_size), 0)
  start = cache.num_free + jnp.cumsum(used) - used
  k = jnp.arange(cache.pages_per_seq, dtype=jnp.int32)[None, :]
  give = k < used[:, None]
  dest = jnp.where(give, start[:, None] + k, cache.num_pages)  # dropped
  free = cache.free_pages.at[dest].set(cache.page_table, mode="drop")
  table = jnp.where(seqs[:, None], -1, cache.page_table)
  return dataclasses.replace(cache, page_table=table, free_pages=free,
                             lengths=jnp.where(seqs, 0, cache.lengths),
                             num_free=cache.num_free + jnp.sum(used))


def quantize_kv(x: jax.Array, fmt: str, head_dim: int, groups: int = 1):
  """``x [..., head_dim]`` -> ``(stored, scale or None)`` in the cache's format."""
  if fmt == "none":
    return x, None
  return common.quantize(x, fmt, group_size=head_dim // groups if fmt == "int4" else None)


def _check_kv(cache: PagedKVCache, name: str, x, expected_tokens_axis: bool):
  want = (cache.max_seqs,) + ((None,) if expected_tokens_axis else ()) + (cache.kv_heads,
                                                                          cache.head_dim)
  ok = hasattr(x, "shape") and x.ndim == len(want) and all(
      w is None or w == s for w, s in zip(want, x.shape))
  if not ok:
    shape = "[max_seqs, tokens, kv_heads, head_dim]" if expected_tokens_axis else \
        "[max_seqs, kv_heads, head_dim]"
    raise ValueError(f"{name}: expected {shape} with max_seqs={cache.max_seqs}, kv_heads="
                     f"{cache.kv_heads}, head_dim={cache.head_dim}, got {getattr(x, 'shape', x)}")


def _store(cache: PagedKVCache, layer, page, row, k, v) -> PagedKVCache:
  """Writes ``k, v [..., kv_heads, head_dim]`` at (page, row) (page == num_pages: dropped)."""
  groups = cache.k_scale.shape[-1] if cache.fmt == "int4" else 1
  kq, ks = quantize_kv(k, cache.fmt, cache.head_dim, groups)
  vq, vs = quantize_kv(v, cache.fmt, cache.head_dim, groups)
  upd = dict(keys=cache.keys.at[layer, page, row].set(kq.astype(cache.keys.dtype), mode="drop"),
             values=cache.values.at[layer, page, row].set(vq.astype(cache.values.dtype),
                                                          mode="drop"))
  if ks is not None:
    upd["k_scale"] = cache.k_scale.at[layer, page, row].set(ks, mode="drop")
    upd["v_scale"] = cache.v_scale.at[layer, page, row].set(vs, mode="drop")
  return dataclasses.replace(cache, **upd)


def _page_row(cache: PagedKVCache, pos, valid):
  """Physical (page, row) of logical positions ``pos [max_seqs, n]``; dropped if invalid."""
  ps = cache.page_size
  col = jnp.clip(pos // ps, 0, cache.pages_per_seq - 1)
  page = jnp.take_along_axis(cache.page_table, col, axis=1)
  valid = valid & (pos >= 0) & (pos < cache.capacity) & (page >= 0)
  return jnp.where(valid, page, cache.num_pages), pos % ps


def write(cache: PagedKVCache, layer, k: jax.Array, v: jax.Array,
          num_new: jax.Array) -> PagedKVCache:
  """Stores the newest tokens of every sequence in ``layer`` (after :func:`reserve`).

  Args:
    k, v: ``[max_seqs, tokens, kv_heads, head_dim]``; token ``t < num_new[s]`` of sequence
      ``s`` goes to position ``lengths[s] - num_new[s] + t`` (right-padded prompts: the
      padding is dropped).
    num_new: ``[max_seqs]`` int32, as passed to :func:`reserve`.
  """
  _check_kv(cache, "write: k", k, True)
  _check_kv(cache, "write: v", v, True)
  t = k.shape[1]
  num_new = jnp.asarray(num_new, jnp.int32)
  tok = jnp.arange(t, dtype=jnp.int32)[None, :]
  pos = cache.lengths[:, None] - num_new[:, None] + tok
  page, row = _page_row(cache, pos, tok < num_new[:, None])
  return _store(cache, layer, page, row, k, v)


def append(cache: PagedKVCache, layer, k: jax.Array, v: jax.Array,
           active: jax.Array | None = None) -> PagedKVCache:
  """Decode write: one token ``k, v [max_seqs, kv_heads, head_dim]`` per active sequence at
  position ``lengths - 1`` (call ``reserve(cache, active)`` first)."""
  _check_kv(cache, "append: k", k, False)
  _check_kv(cache, "append: v", v, False)
  active = jnp.ones((cache.max_seqs,), jnp.int32) if active is None else jnp.asarray(
      active, jnp.int32)
  return write(cache, layer, k[:, None], v[:, None], active)


def write_slots(cache: PagedKVCache, layer, k: jax.Array, v: jax.Array, slots: jax.Array,
                active: jax.Array | None = None) -> PagedKVCache:
  """Stores one token ``k, v [max_seqs, kv_heads, head_dim]`` per sequence at logical slot
  ``slots [max_seqs]`` (eviction: the slot a policy chose, see :func:`reserve_slots`)."""
  _check_kv(cache, "write_slots: k", k, False)
  _check_kv(cache, "write_slots: v", v, False)
  valid = jnp.ones((cache.max_seqs, 1), jnp.bool_) if active is None else jnp.asarray(
      active, jnp.bool_)[:, None]
  page, row = _page_row(cache, jnp.asarray(slots, jnp.int32)[:, None], valid)
  return _store(cache, layer, page[:, 0], row[:, 0], k, v)


def layer_kv(cache: PagedKVCache, layer) -> dict[str, Any]:
  """Keyword arguments of :func:`jaxeff.ops.decode_attention` for ``layer``."""
  kw = dict(key_cache=cache.keys[layer], value_cache=cache.values[layer],
            lengths=cache.lengths, page_table=cache.page_table)
  if cache.fmt != "none":
    kw.update(k_scale=cache.k_scale[layer], v_scale=cache.v_scale[layer])
  return kw


def gather_kv(cache: PagedKVCache, layer) -> tuple[jax.Array, jax.Array]:
  """Dequantized contiguous K/V ``[max_seqs, capacity, kv_heads, head_dim]`` float32 (tests,
  debugging; a decode step never materialises this)."""
  table = jnp.clip(cache.page_table, 0, cache.num_pages - 1)

  def logical(x):
    p = jnp.take(x[layer], table, axis=0)
    return p.reshape(p.shape[0], -1, *p.shape[3:])

  ks = vs = None
  if cache.fmt != "none":
    ks, vs = logical(cache.k_scale), logical(cache.v_scale)
  return (common.dequantize(logical(cache.keys), ks, cache.fmt),
          common.dequantize(logical(cache.values), vs, cache.fmt))


def slot_attention_probs(query: jax.Array, cache: PagedKVCache, layer, lse: jax.Array, *,
                         scale: float | None = None) -> jax.Array:
  """Attention probabilities of ``query [max_seqs, q_len, q_heads, head_dim]`` over the
  cache slots of ``layer``, summed over query heads and tokens: ``[max_seqs, capacity]``.

  ``lse [max_seqs, q_heads, q_len]`` comes from ``decode_attention_with_lse`` on the same
  cache (no soft cap or window), so ``p = exp(scale q.k - lse)`` is exact; it costs one more
  read of K.
  """
  keys, _ = gather_kv(cache, layer)
  b, t, n, d = query.shape
  kh = cache.kv_heads
  scale = d ** -0.5 if scale is None else scale
  qf = query.astype(jnp.float32).reshape(b, t, kh, n // kh, d)
  logits = jnp.einsum("btkgd,bskd->bkgts", qf, keys) * scale
  lse = lse.reshape(b, kh, n // kh, t)[..., None]
  p = jnp.where(jnp.isfinite(lse), jnp.exp(logits - lse), 0.0)
  valid = jnp.arange(cache.capacity)[None, :] < cache.lengths[:, None]
  return jnp.where(valid, p.sum(axis=(1, 2, 3)), 0.0)


# ------------------------------------------------------------------------------ eviction


class EvictionPolicy(Protocol):
  """Chooses which cached token a new one replaces once a sequence holds ``budget`` tokens.

  A policy is a static (hashable) object; its mutable part is a pytree ``state`` threaded
  through the generation loop. Slots are a sequence's logical token indices
  ``[0, budget)``; ``positions [max_seqs, budget]`` holds each slot's absolute token
  position (-1 = empty).
  """

  budget: int

  def init(self, max_seqs: int) -> Any:
    """The initial state."""

  def victim(self, state, positions: jax.Array, new_pos: jax.Array) -> jax.Array:
    """``[max_seqs]`` the slot that the token at ``new_pos`` replaces (sequences are full)."""

  def on_write(self, state, slots: jax.Array, written: jax.Array) -> Any:
    """Resets per-slot statistics of the slots just (over)written (where ``written``)."""

  def observe(self, state, probs: jax.Array, kept: jax.Array) -> Any:
    """Updates statistics with attention probabilities ``probs [max_seqs, budget]`` of the
    latest query over the ``kept`` (count ``[max_seqs]``) slots."""


@dataclasses.dataclass(frozen=True)
class SlidingWindowWithSinks:
  """StreamingLLM: keep the first ``num_sinks`` tokens and the latest ``window`` ones."""

  num_sinks: int
  window: int

  @property
  def budget(self) -> int:
    return self.num_sinks + self.window

  def init(self, max_seqs: int):
    return ()

  def victim(self, state, positions, new_pos):
    del state, positions
    return self.num_sinks + (new_pos - self.num_sinks) % self.window

  def on_write(self, state, slots, written):
    return state

  def observe(self, state, probs, kept):
    return state


def _oldest_protected(positions, new_pos, num_recent: int, num_sinks: int):
  """Slots that must survive the write of ``new_pos``: the ``num_sinks`` first positions
  and the ``num_recent - 1`` latest ones (the new token is the latest of the ``num_recent``
  recent ones), and empty slots (a full sequence has none)."""
  recent = positions > (new_pos[:, None] - num_recent)
  sinks = (positions >= 0) & (positions < num_sinks)
  return recent | sinks | (positions < 0)


@dataclasses.dataclass(frozen=True)
class _ScorePolicy:
  """Keeps recent tokens and sinks; evicts the lowest-scoring other slot."""

  num_recent: int
  num_heavy: int
  num_sinks: int = 0

  @property
  def budget(self) -> int:
    return self.num_sinks + self.num_recent + self.num_heavy

  def init(self, max_seqs: int):
    return jnp.zeros((max_seqs, self.budget), jnp.float32)

  def victim(self, state, positions, new_pos):
    protected = _oldest_protected(positions, new_pos, self.num_recent, self.num_sinks)
    score = jnp.where(protected, jnp.inf, state)
    # Among the lowest scores, evict the oldest token.
    lowest = score == jnp.min(score, axis=1, keepdims=True)
    age_key = jnp.where(lowest, positions, jnp.iinfo(jnp.int32).max)
    return jnp.argmin(age_key, axis=1).astype(jnp.int32)

  def on_write(self, state, slots, written):
    hit = (jnp.arange(self.budget)[None, :] == slots[:, None]) & written[:, None]
    return jnp.where(hit, 0.0, state)


@dataclasses.dataclass(frozen=True)
class HeavyHitter(_ScorePolicy):
  """H2O: the score of a slot is its attention probability accumulated over decode steps."""

  def observe(self, state, probs, kept):
    del kept
    return state + probs


@dataclasses.dataclass(frozen=True)
class Scissorhands(_ScorePolicy):
  """Scissorhands: the score counts the steps in which a slot was *important* (probability
  above the uniform ``1 / kept``): persistence of importance."""

  def observe(self, state, probs, kept):
    uniform = 1.0 / jnp.maximum(kept, 1).astype(jnp.float32)
    valid = jnp.arange(self.budget)[None, :] < kept[:, None]
    return state + ((probs > uniform[:, None]) & valid).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class EvictionState:
  """Per-sequence bookkeeping of an evicting cache: slot positions, next token position and
  the policy's own state."""

  positions: jax.Array  # [max_seqs, budget] absolute position per slot, -1 = empty
  next_pos: jax.Array  # [max_seqs] position of the next token
  policy_state: Any


jax.tree_util.register_dataclass(EvictionState,
                                 data_fields=["positions", "next_pos", "policy_state"],
                                 meta_fields=[])


def init_eviction(policy: EvictionPolicy, cache: PagedKVCache) -> EvictionState:
  if policy.budget > cache.capacity:
    raise ValueError(f"init_eviction: the policy budget {policy.budget} exceeds the cache "
                     f"capacity per sequence {cache.capacity}")
  return EvictionState(positions=jnp.full((cache.max_seqs, policy.budget), -1, jnp.int32),
                       next_pos=jnp.zeros((cache.max_seqs,), jnp.int32),
                       policy_state=policy.init(cache.max_seqs))


def reserve_slots(cache: PagedKVCache, ev: EvictionState, policy: EvictionPolicy,
                  active: jax.Array | None = None):
  """One decode token per active sequence under the policy's budget.

  A sequence below the budget grows by one slot (pages allocated as in :func:`reserve`);
  a full one keeps its length and the policy picks the slot to overwrite. Returns
  ``(cache, ev, slots [max_seqs], ok [max_seqs])``; write the token with
  :func:`write_slots` in every layer, then attend with ``lengths = cache.lengths``.
  """
  active = jnp.ones((cache.max_seqs,), jnp.bool_) if active is None else jnp.asarray(
      active, jnp.bool_)
  full = cache.lengths >= policy.budget
  grow = active & ~full
  cache, ok = reserve(cache, grow.astype(jnp.int32))
  victim = policy.victim(ev.policy_state, ev.positions, ev.next_pos)
  slots = jnp.where(full, victim, cache.lengths - 1).astype(jnp.int32)
  written = active & (full | ok)
  hit = (jnp.arange(policy.budget)[None, :] == slots[:, None]) & written[:, None]
  ev = EvictionState(
      positions=jnp.where(hit, ev.next_pos[:, None], ev.positions),
      next_pos=ev.next_pos + written.astype(jnp.int32),
      policy_state=policy.on_write(ev.policy_state, slots, written))
  return cache, ev, slots, written


def observe(ev: EvictionState, policy: EvictionPolicy, probs: jax.Array,
            cache: PagedKVCache) -> EvictionState:
  """Feeds ``probs [max_seqs, capacity]`` (:func:`slot_attention_probs`) to the policy."""
  kept = jnp.minimum(cache.lengths, policy.budget)
  return dataclasses.replace(
      ev, policy_state=policy.observe(ev.policy_state, probs[:, : policy.budget], kept))


# ------------------------------------------------------------------ mixed precision (ZipVL)


def read_slots(cache: PagedKVCache, layer, slots: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Dequantized K/V ``[max_seqs, kv_heads, head_dim]`` float32 at logical ``slots``."""
  ps = cache.page_size
  slots = jnp.asarray(slots, jnp.int32)
  col = jnp.clip(slots // ps, 0, cache.pages_per_seq - 1)
  page = jnp.clip(jnp.take_along_axis(cache.page_table, col[:, None], axis=1)[:, 0], 0,
                  cache.num_pages - 1)
  row = slots % ps

  def one(x, s):
    return common.dequantize(x[layer, page, row], None if s is None else s[layer, page, row],
                             cache.fmt)

  return one(cache.keys, cache.k_scale), one(cache.values, cache.v_scale)


def reserve_mixed(hi: PagedKVCache, lo: PagedKVCache, ev: EvictionState,
                  policy: EvictionPolicy, active: jax.Array | None = None):
  """One decode token per active sequence with mixed-precision KV (ZipVL, He et al., 2024).

  The high-precision cache ``hi`` keeps at most ``policy.budget`` tokens per sequence,
  chosen by a score policy (:class:`HeavyHitter`, :class:`Scissorhands`); the token the
  policy evicts is *demoted* to the low-precision cache ``lo`` (e.g. int4) rather than
  dropped. Returns ``(hi, lo, ev, slots, demote, ok)``; then :func:`write_mixed` in every
  layer and :func:`attend_mixed`. (ZipVL picks the high-precision share adaptively from
  the attention distribution; here it is the policy's fixed budget.)
  """
  active = jnp.ones((hi.max_seqs,), jnp.bool_) if active is None else jnp.asarray(
      active, jnp.bool_)
  demote = active & (hi.lengths >= policy.budget)
  lo, lo_ok = reserve(lo, demote.astype(jnp.int32))
  # A sequence whose demotion finds no room in ``lo`` does not advance this step.
  go = active & (~demote | lo_ok)
  hi, ev, slots, written = reserve_slots(hi, ev, policy, go)
  return hi, lo, ev, slots, demote & written, written


def write_mixed(hi: PagedKVCache, lo: PagedKVCache, layer, k: jax.Array, v: jax.Array,
                slots: jax.Array, demote: jax.Array, written: jax.Array | None = None):
  """Moves the victims of ``slots`` (where ``demote``) from ``hi`` to ``lo`` (quantized on
  write), then stores the new token ``k, v [max_seqs, kv_heads, head_dim]`` in ``hi``."""
  old_k, old_v = read_slots(hi, layer, slots)
  lo = write(lo, layer, old_k[:, None], old_v[:, None], jnp.asarray(demote, jnp.int32))
  hi = write_slots(hi, layer, k, v, slots, written)
  return hi, lo


def merge_attention(out_a, lse_a, out_b, lse_b):
  """Exact merge of attention over two disjoint key sets from their outputs
  ``[b, t, n, d]`` and log-sum-exps ``[b, n, t]`` (``decode_attention_with_lse``)."""
  m = jnp.maximum(lse_a, lse_b)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  wa, wb = jnp.exp(lse_a - m), jnp.exp(lse_b - m)  # 0 where a side saw nothing
  total = wa + wb
  wa, wb = (jnp.transpose(x / jnp.where(total == 0, 1.0, total), (0, 2, 1))[..., None]
            for x in (wa, wb))
  out = wa * out_a.astype(jnp.float32) + wb * out_b.astype(jnp.float32)
  lse = jnp.where(total == 0, -jnp.inf, m + jnp.log(jnp.where(total == 0, 1.0, total)))
  return out.astype(out_a.dtype), lse


def ops_lse(query: jax.Array, cache: PagedKVCache, layer, **kwargs) -> jax.Array:
  """The log-sum-exp ``[max_seqs, q_heads, q_len]`` of decode attention over ``layer``."""
  return ops.decode_attention_with_lse(query, **layer_kv(cache, layer), **kwargs)[1]


def attend_mixed(query: jax.Array, hi: PagedKVCache, lo: PagedKVCache, layer, **kwargs):
  """Decode attention over the union of ``hi`` and ``lo`` for ``layer``: two
  ``decode_attention_with_lse`` calls merged by :func:`merge_attention`. Returns
  ``(out, lse)``; ``kwargs`` go to both calls (``implementation``, ``scale``, ...)."""
  out_hi, lse_hi = ops.decode_attention_with_lse(query, **layer_kv(hi, layer), **kwargs)
  out_lo, lse_lo = ops.decode_attention_with_lse(query, **layer_kv(lo, layer), **kwargs)
  return merge_attention(out_hi, lse_hi, out_lo, lse_lo)
