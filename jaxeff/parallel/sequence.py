"""Sequence (context) parallel attention inside ``jax.shard_map``.

**Ring attention** (Liu et al., 2023, "Ring Attention with Blockwise Transformers"): the
sequence is split over a mesh axis; every device keeps its query block and the key/value
blocks travel around a ``ppermute`` ring. Each step runs jaxeff's attention op on the block
it holds (:func:`jaxeff.ops.dot_product_attention_with_lse`, i.e. the flash kernels on
GPU/TPU) and merges the partial outputs exactly by their log-sum-exp
(``lse = logaddexp(lse_a, lse_b)``, ``o = o_a e^{lse_a - lse} + o_b e^{lse_b - lse}``). The
next block's transfer is issued before the current block's compute so the two overlap.
Forward and backward are one ``jax.custom_vjp``: the residuals are the local q/k/v, the
merged output and log-sum-exp only (no per-step activations), and the backward rings the
key/value blocks again together with their gradient accumulators, which return to their
owners after the last hop. With a flash kernel named (``implementation="mosaic_gpu"``,
``"triton"``, ...) each backward block step runs the kernel's backward on the merged output
and log-sum-exp directly (FlashAttention-2's ``dS = P (dP - rowsum(dO o))`` with
``P = exp(S - lse)`` is exactly the block's share). Otherwise (``None``, ``"xla"``) the
block's partial output is recomputed and its gradient pulled out of the op's own VJP with
the merge's cotangents (``do_j = w_j do``, ``dlse_j = w_j <do, o_j - o>``,
``w_j = e^{lse_j - lse}``), which works with every implementation at the cost of one
block forward more.

Causal load balancing: with the sequence cut into ``n`` contiguous blocks the last device
does ``n`` block products and the first one. The **zig-zag** layout (Brandon et al.'s
striped idea as used by Megatron-CP / ring-flash-attention) cuts the sequence into ``2n``
chunks and gives device ``i`` chunks ``i`` and ``2n - 1 - i``; then each ring step costs
every device the same half block: from an earlier device it attends all its queries to
the first (earlier) kv chunk, from a later device only its second (later) query chunk to
both kv chunks, and the diagonal step is a plain causal block. Callers lay tokens out with
:func:`sequence_permutation` (and compute positions from it) before sharding.

**Bidirectional ring** (in the spirit of TokenRing, Wang et al., 2024): key/value blocks
travel both ways at once (half of the remote blocks clockwise, half counter-clockwise),
using both directions of every link and halving the number of serial steps.

**Ulysses** (Jacobs et al., 2023, "DeepSpeed Ulysses"): an ``all_to_all`` turns the
sequence split into a head split, attention runs on whole sequences for ``heads / n``
heads, and a second ``all_to_all`` turns it back. Needs ``n`` to divide the (kv) heads.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxeff.ops.attention import (dot_product_attention, dot_product_attention_with_lse,
                                  flash_attention_backward)
from jaxeff.parallel.mesh import pvary_like

LAYOUTS = ("contiguous", "zigzag")


def sequence_permutation(seq_len: int, num_shards: int, layout: str = "zigzag") -> np.ndarray:
  """Token order that puts each shard's tokens in one contiguous slice.

  Returns an int ``[seq_len]`` array ``perm``; ``x[:, perm]`` split into ``num_shards``
  equal slices gives device ``i`` its tokens (``"zigzag"``: chunks ``i`` and
  ``2 * num_shards - 1 - i`` of ``2 * num_shards``; ``"contiguous"``: the identity).
  ``np.argsort(perm)`` undoes it.
  """
  if layout not in LAYOUTS:
    raise ValueError(f"sequence_permutation: layout must be one of {LAYOUTS}, got {layout!r}")
  if not isinstance(num_shards, int) or num_shards < 1:
    raise ValueError(f"sequence_permutation: num_shards must be a positive int, got "
                     f"{num_shards!r}")
  parts = num_shards if layout == "contiguous" else 2 * num_shards
  if seq_len % parts:
    raise ValueError(f"sequence_permutation: seq_len {seq_len} must be divisible by "
                     f"{parts} for the {layout!r} layout over {num_shards} shards")
  if layout == "contiguous" or num_shards == 1:
    return np.arange(seq_len)
  chunks = np.arange(seq_len).reshape(parts, -1)
  order = [c for i in range(num_shards) for c in (i, parts - 1 - i)]
  return chunks[order].reshape(-1)


# ----------------------------------------------------------------------------- ring


def _attn(q, k, v, q_ids, kv_ids, causal, st):
  seg = None if q_ids is None else (q_ids, kv_ids)
  return dot_product_attention_with_lse(q, k, v, is_causal=causal, segment_ids=seg,
                                        logits_soft_cap=st["soft_cap"], scale=st["scale"],
                                        implementation=st["implementation"])


def _halves(a, axis, which):
  if which == "all":
    return a
  n = a.shape[axis] // 2
  return lax.slice_in_dim(a, 0, n, axis=axis) if which == "first" else lax.slice_in_dim(
      a, n, 2 * n, axis=axis)


def _pad_half(a, axis, which, fill):
  """Puts a half-length ``a`` back into the ``which`` half of a full-length array."""
  if which == "all":
    return a
  pad = jnp.full_like(a, fill)
  return jnp.concatenate([a, pad] if which == "first" else [pad, a], axis=axis)


def _branches(is_causal: bool, layout: str):
  """(q part, kv part, causal) per branch: 0 = own block, 1 = earlier device, 2 = later."""
  if not is_causal:
    return [("all", "all", False)]
  if layout == "zigzag":
    return [("all", "all", True), ("all", "first", False), ("second", "all", False)]
  return [("all", "all", True), ("all", "all", False), None]


def _branch_index(is_causal: bool, src, me):
  if not is_causal:
    return jnp.int32(0)
  return jnp.where(src == me, 0, jnp.where(src < me, 1, 2)).astype(jnp.int32)


def _merge(o, lse, o_j, lse_j):
  """Exact merge of two partial attentions over disjoint key sets (o float32)."""
  new = jnp.logaddexp(lse, lse_j)
  safe = jnp.where(jnp.isfinite(new), new, 0.0)
  w = jnp.moveaxis(jnp.exp(lse - safe), 1, 2)[..., None]      # [b, t, n, 1]
  w_j = jnp.moveaxis(jnp.exp(lse_j - safe), 1, 2)[..., None]
  return o * w + o_j.astype(jnp.float32) * w_j, new


def _block_fwd(branch, q, k, v, q_ids, kv_ids, st):
  """Partial (o float32 [b, t, n, h], lse [b, n, t]) of the local queries on one kv block."""
  b, t, n, h = q.shape
  if branch is None:
    return (pvary_like(q, jnp.zeros((b, t, n, h), jnp.float32)),
            pvary_like(q, jnp.full((b, n, t), -jnp.inf, jnp.float32)))
  qp, kp, causal = branch
  o, lse = _attn(_halves(q, 1, qp), _halves(k, 1, kp), _halves(v, 1, kp),
                 None if q_ids is None else _halves(q_ids, 1, qp),
                 None if kv_ids is None else _halves(kv_ids, 1, kp), causal, st)
  return (_pad_half(o.astype(jnp.float32), 1, qp, 0.0), _pad_half(lse, 2, qp, -jnp.inf))


_KERNEL_BACKENDS = ("mosaic_gpu", "triton", "mosaic_tpu")


def _kernel_backend(implementation) -> tuple[str, bool] | None:
  """``(backend, interpret)`` when one flash kernel is named explicitly, else None."""
  if not isinstance(implementation, str):
    return None
  name, _, suffix = implementation.partition(":")
  if name in _KERNEL_BACKENDS and suffix in ("", "interpret"):
    return name, suffix == "interpret"
  return None


def _block_bwd(branch, q, k, v, q_ids, kv_ids, out, lse, d_out, st):
  """(dq, dk, dv) of one block given the merged ``out``/``lse`` and ``d_out``.

  With a flash kernel named explicitly its backward runs directly on the merged
  ``(out, lse)`` (FlashAttention's block gradient needs nothing else); otherwise the
  block's partial output is recomputed and pulled back through the op's VJP with the
  merge's cotangents (works for every implementation).
  """
  if branch is None:
    return jnp.zeros_like(q), jnp.zeros_like(k), jnp.zeros_like(v)
  qp, kp, causal = branch
  qs, ks, vs = _halves(q, 1, qp), _halves(k, 1, kp), _halves(v, 1, kp)
  qi = None if q_ids is None else _halves(q_ids, 1, qp)
  ki = None if kv_ids is None else _halves(kv_ids, 1, kp)
  out_s, lse_s, do_s = _halves(out, 1, qp), _halves(lse, 2, qp), _halves(d_out, 1, qp)
  kernel = _kernel_backend(st["implementation"])
  if kernel is not None:
    dq, dk, dv = flash_attention_backward(
        qs, ks, vs, out_s, lse_s, do_s, q_segment_ids=qi, kv_segment_ids=ki, is_causal=causal,
        scale=st["scale"], logits_soft_cap=st["soft_cap"], implementation=st["implementation"])
  else:
    (o_j, lse_j), vjp = jax.vjp(lambda a, b_, c: _attn(a, b_, c, qi, ki, causal, st),
                                qs, ks, vs)
    safe = jnp.where(jnp.isfinite(lse_s), lse_s, 0.0)
    w = jnp.where(jnp.isfinite(lse_j), jnp.exp(lse_j - safe), 0.0)  # [b, n, t]
    wt = jnp.moveaxis(w, 1, 2)[..., None]
    do_j = (do_s * wt).astype(o_j.dtype)
    inner = jnp.sum(do_s * (o_j.astype(jnp.float32) - out_s), axis=-1)  # [b, t, n]
    dlse_j = w * jnp.moveaxis(inner, 2, 1)
    dq, dk, dv = vjp((do_j, dlse_j))
  return (_pad_half(dq, 1, qp, 0), _pad_half(dk, 1, kp, 0), _pad_half(dv, 1, kp, 0))


def _streams(n: int, bidirectional: bool) -> list[tuple[int, int]]:
  """(direction, hops) of the kv streams that cover the ``n - 1`` remote blocks."""
  if n == 1:
    return []
  if not bidirectional or n == 2:
    return [(+1, n - 1)]
  return [(+1, n // 2), (-1, (n - 1) // 2)]


def _ring_fwd_impl(q, k, v, q_ids, kv_ids, st):
  axis, n = st["axis_name"], lax.axis_size(st["axis_name"])
  me = lax.axis_index(axis)
  branches = _branches(st["is_causal"], st["layout"])

  def block(src, kk, vv, ki):
    fns = [functools.partial(_block_fwd, br) for br in branches]
    if len(fns) == 1:
      return fns[0](q, kk, vv, q_ids, ki, st)
    return lax.switch(_branch_index(st["is_causal"], src, me),
                      [lambda a, b_, c, d, e, f=f: f(a, b_, c, d, e, st) for f in fns],
                      q, kk, vv, q_ids, ki)

  o, lse = _block_fwd(branches[0], q, k, v, q_ids, kv_ids, st)  # own block (diagonal)
  streams = _streams(n, st["bidirectional"])
  held = [(k, v, kv_ids) for _ in streams]
  for hop in range(1, max((h for _, h in streams), default=0) + 1):
    for s, (direction, hops) in enumerate(streams):
      if hop > hops:
        continue
      perm = [(j, (j + direction) % n) for j in range(n)]
      held[s] = jax.tree.map(lambda a: lax.ppermute(a, axis, perm), held[s])
      src = (me - direction * hop) % n
      o_j, lse_j = block(src, *held[s])
      o, lse = _merge(o, lse, o_j, lse_j)
  return o, lse


def _ring_bwd_impl(q, k, v, q_ids, kv_ids, out, lse, d_out, st):
  axis, n = st["axis_name"], lax.axis_size(st["axis_name"])
  me = lax.axis_index(axis)
  branches = _branches(st["is_causal"], st["layout"])

  def block(src, kk, vv, ki):
    fns = [functools.partial(_block_bwd, br) for br in branches]
    args = (q, kk, vv, q_ids, ki, out, lse, d_out)
    if len(fns) == 1:
      return fns[0](*args, st)
    return lax.switch(_branch_index(st["is_causal"], src, me),
                      [lambda *a, f=f: f(*a, st) for f in fns], *args)

  dq, dk, dv = _block_bwd(branches[0], q, k, v, q_ids, kv_ids, out, lse, d_out, st)
  dq = dq.astype(jnp.float32)
  dk, dv = dk.astype(jnp.float32), dv.astype(jnp.float32)
  for direction, hops in _streams(n, st["bidirectional"]):
    perm = [(j, (j + direction) % n) for j in range(n)]
    held = (k, v, kv_ids)
    acc = None
    for hop in range(1, hops + 1):
      held = jax.tree.map(lambda a: lax.ppermute(a, axis, perm), held)
      if acc is not None:  # the gradient accumulators travel with their kv block
        acc = jax.tree.map(lambda a: lax.ppermute(a, axis, perm), acc)
      dq_j, dk_j, dv_j = block((me - direction * hop) % n, *held)
      dq = dq + dq_j.astype(jnp.float32)
      part = (dk_j.astype(jnp.float32), dv_j.astype(jnp.float32))
      acc = part if acc is None else (acc[0] + part[0], acc[1] + part[1])
    home = [(j, (j - direction * hops) % n) for j in range(n)]  # back to the owners
    acc = jax.tree.map(lambda a: lax.ppermute(a, axis, home), acc)
    dk, dv = dk + acc[0], dv + acc[1]
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _ring(q, k, v, q_ids, kv_ids, st):
  o, _ = _ring_fwd_impl(q, k, v, q_ids, kv_ids, dict(st))
  return o.astype(q.dtype)


def _ring_fwd(q, k, v, q_ids, kv_ids, st):
  o, lse = _ring_fwd_impl(q, k, v, q_ids, kv_ids, dict(st))
  return o.astype(q.dtype), (q, k, v, q_ids, kv_ids, o, lse)


def _ring_bwd(st, res, d_out):
  q, k, v, q_ids, kv_ids, o, lse = res
  dq, dk, dv = _ring_bwd_impl(q, k, v, q_ids, kv_ids, o, lse, d_out.astype(jnp.float32),
                              dict(st))
  return dq, dk, dv, None, None


_ring.defvjp(_ring_fwd, _ring_bwd)


def _check_local(name, q, k, v, segment_ids):
  for arg, a in (("query", q), ("key", k), ("value", v)):
    if not hasattr(a, "ndim") or a.ndim != 4:
      raise ValueError(f"{name}: {arg} must be [batch, seq, heads, head_dim] (the local "
                       f"shard), got {getattr(a, 'shape', type(a))}")
  if k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
    raise ValueError(f"{name}: key/value {k.shape}/{v.shape} must match query {q.shape} in "
                     "batch, seq and head_dim (self-attention shards)")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"{name}: query heads ({q.shape[2]}) must be a multiple of key/value "
                     f"heads ({k.shape[2]})")
  if segment_ids is not None and getattr(segment_ids, "shape", None) != q.shape[:2]:
    raise ValueError(f"{name}: segment_ids must be [batch, seq] = {q.shape[:2]} (local), "
                     f"got {getattr(segment_ids, 'shape', type(segment_ids))}")


def ring_attention(query: jax.Array, key: jax.Array, value: jax.Array, *, axis_name: str,
                   is_causal: bool = False, segment_ids: jax.Array | None = None,
                   layout: str = "zigzag", bidirectional: bool = False,
                   logits_soft_cap: float | None = None, scale: float | None = None,
                   implementation: str | Sequence[str] | None = None) -> jax.Array:
  """Self-attention over a sequence split across ``axis_name`` (call inside shard_map).

  Args:
    query: local ``[batch, seq_local, q_heads, head_dim]``.
    key / value: local ``[batch, seq_local, kv_heads, head_dim]`` (GQA: kv_heads divides
      q_heads).
    axis_name: the mesh axis the sequence is split over (``n`` devices).
    is_causal: causal masking in the *global* token order given by ``layout``.
    segment_ids: local int ``[batch, seq_local]`` (packed sequences; travel with K/V).
    layout: how global tokens were laid out over the devices
      (:func:`sequence_permutation`): ``"zigzag"`` (balanced causal work; ``seq_local``
      even) or ``"contiguous"``. Irrelevant when not causal.
    bidirectional: send K/V both ways around the ring (half the serial steps).
    logits_soft_cap / scale: as in :func:`jaxeff.ops.dot_product_attention`.
    implementation: the attention implementation run on each block.

  Returns:
    local ``[batch, seq_local, q_heads, head_dim]`` in the query dtype.
  """
  _check_local("ring_attention", query, key, value, segment_ids)
  if layout not in LAYOUTS:
    raise ValueError(f"ring_attention: layout must be one of {LAYOUTS}, got {layout!r}")
  if is_causal and layout == "zigzag" and query.shape[1] % 2:
    raise ValueError(f"ring_attention: the zigzag layout needs an even local sequence "
                     f"length (two chunks per device), got {query.shape[1]}")
  if implementation is not None and not isinstance(implementation, str):
    implementation = tuple(implementation)
  st = (("axis_name", axis_name), ("is_causal", bool(is_causal)), ("layout", layout),
        ("bidirectional", bool(bidirectional)), ("soft_cap", logits_soft_cap),
        ("scale", query.shape[-1] ** -0.5 if scale is None else float(scale)),
        ("implementation", implementation))
  if segment_ids is not None:
    segment_ids = segment_ids.astype(jnp.int32)
  return _ring(query, key, value, segment_ids, segment_ids, st)


def ulysses_attention(query: jax.Array, key: jax.Array, value: jax.Array, *, axis_name: str,
                      is_causal: bool = False, segment_ids: jax.Array | None = None,
                      logits_soft_cap: float | None = None, scale: float | None = None,
                      implementation: str | Sequence[str] | None = None) -> jax.Array:
  """All-to-all (DeepSpeed-Ulysses) sequence-parallel self-attention (inside shard_map).

  Tokens must be in the ``"contiguous"`` layout (device ``i`` holds the ``i``-th slice).

  Args:
    query: local ``[batch, seq_local, q_heads, head_dim]``; the axis size divides q_heads.
    key / value: local ``[batch, seq_local, kv_heads, head_dim]``; the axis size divides
      kv_heads.
    segment_ids: local int ``[batch, seq_local]``.

  Returns:
    local ``[batch, seq_local, q_heads, head_dim]``.
  """
  _check_local("ulysses_attention", query, key, value, segment_ids)
  n = lax.axis_size(axis_name)
  for arg, heads in (("query", query.shape[2]), ("key/value", key.shape[2])):
    if heads % n:
      raise ValueError(f"ulysses_attention: {arg} heads ({heads}) must be divisible by the "
                       f"size of axis {axis_name!r} ({n}); use ring_attention instead")
  to_heads = lambda a: lax.all_to_all(a, axis_name, 2, 1, tiled=True)  # noqa: E731
  seg = None
  if segment_ids is not None:
    seg = lax.all_gather(segment_ids.astype(jnp.int32), axis_name, axis=1, tiled=True)
  out = dot_product_attention(to_heads(query), to_heads(key), to_heads(value),
                              is_causal=is_causal, segment_ids=seg,
                              logits_soft_cap=logits_soft_cap, scale=scale,
                              implementation=implementation)
  return lax.all_to_all(out, axis_name, 1, 2, tiled=True)
