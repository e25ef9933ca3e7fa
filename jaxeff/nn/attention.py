"""Multi-head / grouped-query self-attention module with RoPE and a static-shape KV cache.

Projections ``q_proj``/``k_proj``/``v_proj``/``o_proj`` as in "Attention Is All You Need"
(Vaswani et al., 2017) with grouped-query attention (GQA; Ainslie et al., 2023): ``num_heads``
query heads share ``num_kv_heads`` key/value heads, and K/V are never repeated in memory
(:func:`jaxeff.ops.dot_product_attention` handles the grouping). Rotary embeddings
(:mod:`jaxeff.nn.rope`) are applied to queries and keys.

Generation uses :class:`KVCache`, a preallocated ``[batch, max_len, kv_heads, head_dim]``
pair written in place at each sequence's own position: a call with ``kv_cache`` writes the
new keys/values at ``positions[:, 0]`` onwards and attends to every cached key at a
position ``<=`` the query's (a causal mask built from absolute positions, so the same code
serves prefill and one-token decode, and sequences of a batch may sit at different
positions). Shapes stay static, so one compiled decode step serves every step.

Paged generation (vLLM's PagedAttention, Kwon et al., 2023) passes a
:class:`jaxeff.kv_cache.PagedKVCache` (all layers in one pool) as ``paged_cache`` with the
layer index and ``num_new``, after ``kv_cache.reserve(cache, num_new)``:

* prefill (``seq > 1``, sequences empty before the reserve, right-padded prompts at
  positions ``0..seq-1``): causal attention over the prompt block through
  :func:`jaxeff.ops.dot_product_attention`, then ``kv_cache.write`` stores the first
  ``num_new[b]`` keys/values of each sequence (quantized on write if the cache is);
* decode (``seq == 1``, the token at position ``lengths - 1``): ``kv_cache.append`` stores
  the token of each active sequence (``num_new[b] == 1``) and
  :func:`jaxeff.ops.decode_attention` attends over the cached pages.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxeff import kv_cache as paged
from jaxeff import ops
from jaxeff.nn.rope import apply_rope


@flax.struct.dataclass
class KVCache:
  """Preallocated keys and values of one attention layer.

  Attributes:
    key: ``[batch, max_len, kv_heads, head_dim]``.
    value: ``[batch, max_len, kv_heads, head_dim]``.
  """

  key: jax.Array
  value: jax.Array

  @classmethod
  def zeros(cls, batch: int, max_len: int, kv_heads: int, head_dim: int,
            dtype=jnp.float32) -> KVCache:
    """An empty cache; entries past a sequence's position are never attended to."""
    shape = (batch, max_len, kv_heads, head_dim)
    return cls(key=jnp.zeros(shape, dtype), value=jnp.zeros(shape, dtype))

  @property
  def max_len(self) -> int:
    return self.key.shape[1]


def _write_cache(cache: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
  """Writes ``new [b, t, k, h]`` into ``cache [b, S, k, h]`` at rows ``start[b]`` onwards."""
  def one(c, n, s):
    return jax.lax.dynamic_update_slice(c, n.astype(c.dtype), (s, 0, 0))
  return jax.vmap(one)(cache, new, start)


def _window(local_window_size) -> tuple[int, int] | None:
  if local_window_size is None:
    return None
  if isinstance(local_window_size, int):
    return (local_window_size, local_window_size)
  return tuple(local_window_size)


class MultiHeadAttention(nn.Module):
  """Self-attention ``[batch, seq, features] -> [batch, seq, out_features]``.

  Attributes:
    num_heads: query heads.
    head_dim: features per head.
    num_kv_heads: key/value heads (divides ``num_heads``); None means ``num_heads`` (MHA).
    out_features: output width; None means the input width.
    is_causal: causal mask (query ``i`` sees keys ``<= i``).
    use_rope: rotate queries and keys by their positions (RoPE).
    rope_base: RoPE frequency base.
    local_window_size: ``(left, right)`` or one int: attend only within that window.
    logits_soft_cap: ``cap * tanh(logits / cap)`` on the attention logits.
    use_bias: biases on the projections.
    dtype: computation dtype; ``param_dtype``: weight dtype.
    kernel_init / out_init: initializers of the q/k/v and the output projections.
    implementation: passed to :func:`jaxeff.ops.dot_product_attention` (training/prefill
      without a cache).
    decode_implementation: the same, for calls with a contiguous KV cache (which pass a
      mask); with a paged cache it is passed to :func:`jaxeff.ops.decode_attention`.
    fused_qkv: one ``qkv_proj`` of ``[features, heads + 2 * kv_heads, head_dim]`` instead of
      separate ``q_proj`` / ``k_proj`` / ``v_proj`` (one wider matmul; a different
      parameter tree).
  """

  num_heads: int
  head_dim: int
  num_kv_heads: int | None = None
  out_features: int | None = None
  is_causal: bool = True
  use_rope: bool = True
  rope_base: float = 10000.0
  local_window_size: int | tuple[int, int] | None = None
  logits_soft_cap: float | None = None
  use_bias: bool = False
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  kernel_init: nn.initializers.Initializer = nn.initializers.normal(0.02)
  out_init: nn.initializers.Initializer = nn.initializers.normal(0.02)
  implementation: str | Sequence[str] | None = None
  decode_implementation: str | Sequence[str] | None = None
  fused_qkv: bool = False

  @property
  def kv_heads(self) -> int:
    return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

  def _check_paged(self, x, positions, segment_ids, mask, kv_cache, paged_cache, layer,
                   num_new):
    name = "MultiHeadAttention"
    if not isinstance(paged_cache, paged.PagedKVCache):
      raise TypeError(f"{name}: paged_cache must be a jaxeff.kv_cache.PagedKVCache, got "
                      f"{type(paged_cache).__name__}")
    if kv_cache is not None:
      raise ValueError(f"{name}: pass either kv_cache or paged_cache, not both")
    b, t, _ = x.shape
    want = (b, self.kv_heads, self.head_dim)
    got = (paged_cache.max_seqs, paged_cache.kv_heads, paged_cache.head_dim)
    if got != want:
      raise ValueError(f"{name}: paged_cache must have (max_seqs, kv_heads, head_dim) = {want}, "
                       f"got {got}")
    if isinstance(layer, int) and not 0 <= layer < paged_cache.num_layers:
      raise ValueError(f"{name}: layer must be in [0, {paged_cache.num_layers}), got {layer}")
    if num_new is None or jnp.shape(num_new) != (b,):
      raise ValueError(f"{name}: a call with paged_cache needs num_new [batch] = ({b},) (the "
                       f"count passed to kv_cache.reserve), got "
                       f"{None if num_new is None else jnp.shape(num_new)}")
    if positions is None or jnp.shape(positions) != (b, t):
      raise ValueError(f"{name}: a call with paged_cache needs positions [batch, seq] = "
                       f"({b}, {t}), got {None if positions is None else jnp.shape(positions)}")
    if not self.is_causal:
      raise ValueError(f"{name}: paged_cache needs is_causal=True")
    if segment_ids is not None or mask is not None:
      raise ValueError(f"{name}: segment_ids and mask are not supported with paged_cache")

  def _check(self, x, positions, segment_ids, kv_cache):
    name = "MultiHeadAttention"
    if self.num_heads <= 0 or self.kv_heads <= 0 or self.num_heads % self.kv_heads:
      raise ValueError(f"{name}: num_heads ({self.num_heads}) must be a positive multiple of "
                       f"num_kv_heads ({self.kv_heads})")
    if not hasattr(x, "ndim") or x.ndim != 3:
      raise ValueError(f"{name}: x must be [batch, seq, features], got shape "
                       f"{getattr(x, 'shape', type(x))}")
    b, t, _ = x.shape
    if positions is not None and jnp.shape(positions) not in ((t,), (b, t)):
      raise ValueError(f"{name}: positions must be [seq] = ({t},) or [batch, seq] = ({b}, {t}), "
                       f"got {jnp.shape(positions)}")
    if kv_cache is None:
      return
    want = (b, kv_cache.max_len, self.kv_heads, self.head_dim)
    if kv_cache.key.shape != want or kv_cache.value.shape != want:
      raise ValueError(f"{name}: kv_cache must be [batch, max_len, kv_heads, head_dim] = {want}, "
                       f"got key {kv_cache.key.shape} and value {kv_cache.value.shape}")
    if positions is None:
      raise ValueError(f"{name}: a call with kv_cache needs positions [batch, seq] (where to "
                       "write the new keys/values)")
    if not self.is_causal:
      raise ValueError(f"{name}: kv_cache needs is_causal=True")
    if segment_ids is not None:
      raise ValueError(f"{name}: segment_ids are not supported together with kv_cache")
    if t > kv_cache.max_len:
      raise ValueError(f"{name}: {t} new tokens do not fit a cache of max_len "
                       f"{kv_cache.max_len}")

  @nn.compact
  def __call__(self, x: jax.Array, *, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None, mask: jax.Array | None = None,
               kv_cache: KVCache | None = None,
               paged_cache: paged.PagedKVCache | None = None, layer: int | jax.Array = 0,
               num_new: jax.Array | None = None):
    """Attends ``x`` to itself (and to the cached past when ``kv_cache`` is given).

    Args:
      x: ``[batch, seq, features]``.
      positions: int ``[batch, seq]`` or ``[seq]`` absolute positions (RoPE angles and,
        with a cache, write offsets); default ``arange(seq)``.
      segment_ids: int ``[batch, seq]``; attend only within equal ids (packed sequences).
      mask: boolean broadcastable to ``[batch, heads, seq, kv_len]`` (True = attend), where
        ``kv_len`` is ``seq`` without a cache and ``max_len`` with one.
      kv_cache: a :class:`KVCache`; the new keys/values are written at
        ``positions[b, 0] ..`` (which must stay below ``max_len``).
      paged_cache: a :class:`jaxeff.kv_cache.PagedKVCache` with ``max_seqs == batch``,
        already grown by ``kv_cache.reserve(paged_cache, num_new)`` (module docstring:
        ``seq > 1`` is a prefill of empty sequences, ``seq == 1`` a decode step).
      layer: this layer's index in ``paged_cache``.
      num_new: int ``[batch]``, as passed to ``reserve`` (prefill: prompt lengths; decode:
        1 for active sequences, 0 for finished ones).

    Returns:
      ``[batch, seq, out_features]``, or ``(out, new_cache)`` when ``kv_cache`` or
      ``paged_cache`` is given.
    """
    if paged_cache is not None:
      if not hasattr(x, "ndim") or x.ndim != 3:
        raise ValueError(f"MultiHeadAttention: x must be [batch, seq, features], got shape "
                         f"{getattr(x, 'shape', type(x))}")
      self._check_paged(x, positions, segment_ids, mask, kv_cache, paged_cache, layer, num_new)
    self._check(x, positions, segment_ids, kv_cache)
    b, t, d = x.shape
    dense = lambda heads, name: nn.DenseGeneral(  # noqa: E731
        (heads, self.head_dim), use_bias=self.use_bias, dtype=self.dtype,
        param_dtype=self.param_dtype, kernel_init=self.kernel_init, name=name)
    if self.fused_qkv:
      qkv = dense(self.num_heads + 2 * self.kv_heads, "qkv_proj")(x)  # [b, t, n + 2k, h]
      q, k, v = jnp.split(qkv, [self.num_heads, self.num_heads + self.kv_heads], axis=2)
    else:
      q = dense(self.num_heads, "q_proj")(x)  # [b, t, n, h]
      k = dense(self.kv_heads, "k_proj")(x)   # [b, t, k, h]
      v = dense(self.kv_heads, "v_proj")(x)
    if positions is None:
      positions = jnp.arange(t, dtype=jnp.int32)
    positions = jnp.broadcast_to(jnp.asarray(positions, jnp.int32), (b, t))
    if self.use_rope:
      q = apply_rope(q, positions, base=self.rope_base)
      k = apply_rope(k, positions, base=self.rope_base)

    new_cache = None
    if paged_cache is not None:
      num_new = jnp.asarray(num_new, jnp.int32)
      if t == 1:
        new_cache = paged.append(paged_cache, layer, k[:, 0], v[:, 0], num_new)
        out = ops.decode_attention(
            q, **paged.layer_kv(new_cache, layer), logits_soft_cap=self.logits_soft_cap,
            local_window_size=_window(self.local_window_size),
            implementation=self.decode_implementation)
      else:
        new_cache = paged.write(paged_cache, layer, k, v, num_new)
        out = ops.dot_product_attention(
            q, k, v, is_causal=True, local_window_size=self.local_window_size,
            logits_soft_cap=self.logits_soft_cap, implementation=self.implementation)
    elif kv_cache is None:
      out = ops.dot_product_attention(
          q, k, v, mask=mask, is_causal=self.is_causal, segment_ids=segment_ids,
          local_window_size=self.local_window_size, logits_soft_cap=self.logits_soft_cap,
          implementation=self.implementation)
    else:
      new_cache = KVCache(key=_write_cache(kv_cache.key, k, positions[:, 0]),
                          value=_write_cache(kv_cache.value, v, positions[:, 0]))
      kv_pos = jnp.arange(kv_cache.max_len, dtype=jnp.int32)[None, None, :]
      q_pos = positions[:, :, None]
      allowed = kv_pos <= q_pos  # [b, t, max_len]
      window = _window(self.local_window_size)
      if window is not None:
        allowed = allowed & (kv_pos >= q_pos - window[0])
      allowed = allowed[:, None]  # [b, 1, t, max_len]
      if mask is not None:
        allowed = allowed & mask
      out = ops.dot_product_attention(
          q, new_cache.key.astype(q.dtype), new_cache.value.astype(q.dtype), mask=allowed,
          logits_soft_cap=self.logits_soft_cap, implementation=self.decode_implementation)

    out = nn.DenseGeneral(
        self.out_features or d, axis=(-2, -1), use_bias=self.use_bias, dtype=self.dtype,
        param_dtype=self.param_dtype, kernel_init=self.out_init, name="o_proj")(out)
    return out if new_cache is None else (out, new_cache)
