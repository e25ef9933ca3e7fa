"""Megatron-style tensor parallelism inside ``jax.shard_map`` (Shoeybi et al., 2019).

Column-parallel dense layers split the output features over a mesh axis (``tensor``) and
row-parallel dense layers split the input features and sum the partial products; an MLP
or attention block is one column-parallel layer followed by one row-parallel layer, so it
needs one all-reduce forward and one backward. With *sequence parallelism* (Korthikanti
et al., 2022) the activations between blocks (norms, residuals, dropout) are split along
the sequence over the same axis: the entry all-gathers the sequence and the exit
reduce-scatters it, the same bytes as the all-reduce but no replicated norm work or
activation memory.

*Collective matmul* (Wang et al., 2023, "Overlap communication with dependent computation
via decomposition"; the JAX shard_map collective-matmul example) hides that all-gather /
reduce-scatter behind the matmul: the sequence chunks travel around a ``ppermute`` ring
while each device multiplies the chunk it holds (:func:`all_gather_matmul`) or adds its
partial product to the accumulator passing by (:func:`matmul_reduce_scatter`).

Vocabulary parallelism (Megatron): the embedding table and the output head are split over
the vocabulary; a lookup masks the ids outside the local slice and sums over the axis, and
the cross-entropy of :func:`vocab_parallel_cross_entropy` combines per-slice max, sum of
exponentials and target logit with three small collectives: logits are never gathered.

Every function here runs inside ``shard_map`` with the named axis manual; on an axis of
size 1 each reduces to the plain single-device computation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def _axis_size(axis_name: str) -> int:
  return lax.axis_size(axis_name)


def _mm(x: jax.Array, w: jax.Array, dtype) -> jax.Array:
  """``x [..., k] @ w [k, ...]`` in ``dtype`` (flax Dense numerics: both cast, then dot)."""
  if dtype is not None:
    x, w = x.astype(dtype), w.astype(dtype)
  return lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


def _ring_perm(n: int, shift: int) -> list[tuple[int, int]]:
  return [(j, (j + shift) % n) for j in range(n)]


def all_gather_matmul(x: jax.Array, w: jax.Array, *, axis_name: str, gather_axis: int = 1,
                      dtype=None) -> jax.Array:
  """``all_gather(x, gather_axis) @ w`` with the gather overlapped by a ppermute ring.

  Args:
    x: local ``[..., chunk, ..., k]``: this device's chunk of ``gather_axis``.
    w: ``[k, n]`` (the local column shard of a column-parallel layer).
    axis_name: the mesh axis the chunks are split over (``n_dev`` devices).
    gather_axis: the axis of ``x`` split over ``axis_name`` (not the last).
    dtype: computation dtype (None: as given).

  Returns:
    ``[..., n_dev * chunk, ..., n]``: rows in global order, as the unsplit matmul.
  """
  n = _axis_size(axis_name)
  gather_axis = gather_axis % x.ndim
  if gather_axis == x.ndim - 1:
    raise ValueError(f"all_gather_matmul: gather_axis must not be the contracted last axis, "
                     f"got {gather_axis} for x of shape {x.shape}")
  if n == 1:
    return _mm(x, w, dtype)
  idx = lax.axis_index(axis_name)
  c = x.shape[gather_axis]
  left = _ring_perm(n, -1)  # after i hops a device holds the chunk of device idx + i
  chunk = x
  out = None
  for i in range(n):
    nxt = lax.ppermute(chunk, axis_name, left) if i < n - 1 else None  # in flight during the dot
    y = _mm(chunk, w, dtype)
    if out is None:
      shape = list(y.shape)
      shape[gather_axis] = n * c
      out = jnp.zeros(shape, y.dtype)
    out = lax.dynamic_update_slice_in_dim(out, y, ((idx + i) % n) * c, gather_axis)
    chunk = nxt
  return out


def matmul_reduce_scatter(x: jax.Array, w: jax.Array, *, axis_name: str, scatter_axis: int = 1,
                          dtype=None) -> jax.Array:
  """``psum_scatter(x @ w, scatter_axis)`` with the reduce-scatter overlapped by a ring.

  Args:
    x: local ``[..., rows, ..., k_local]`` (the input of a row-parallel layer, its features
      split over ``axis_name``).
    w: ``[k_local, n]``, the local row shard.
    scatter_axis: the axis of the product to scatter (``rows`` divisible by the axis size).

  Returns:
    ``[..., rows / n_dev, ..., n]``: this device's chunk of the summed product. Partial
    sums are accumulated in float32 and cast to the product dtype at the end.
  """
  n = _axis_size(axis_name)
  scatter_axis = scatter_axis % x.ndim
  if n == 1:
    return _mm(x, w, dtype)
  rows = x.shape[scatter_axis]
  if rows % n:
    raise ValueError(f"matmul_reduce_scatter: axis {scatter_axis} of x {x.shape} has {rows} "
                     f"rows, not divisible by the {n} devices of {axis_name!r}")
  c = rows // n
  idx = lax.axis_index(axis_name)
  right = _ring_perm(n, +1)
  acc = None
  out_dtype = None
  for i in range(n):
    # Step i adds this device's partial product for chunk idx + n - 1 - i to the sum that
    # arrived from the left; after n - 1 hops the chunk idx sum is complete here.
    part = _mm(lax.dynamic_slice_in_dim(x, ((idx + n - 1 - i) % n) * c, c, scatter_axis), w,
               dtype)
    out_dtype = part.dtype
    part = part.astype(jnp.float32)
    acc = part if acc is None else lax.ppermute(acc, axis_name, right) + part
  return acc.astype(out_dtype)


def column_parallel_dense(x: jax.Array, kernel: jax.Array, *, axis_name: str = "tensor",
                          sequence_parallel: bool = False, collective_matmul: bool = False,
                          seq_axis: int = 1, dtype=None) -> jax.Array:
  """Column-parallel dense layer (output features split over ``axis_name``).

  Args:
    x: ``[batch, seq, in]`` replicated over ``axis_name``, or with ``sequence_parallel``
      ``[batch, seq / n_dev, in]`` (this device's sequence chunk).
    kernel: local ``[in, out / n_dev]`` (or ``[in, ...]``: trailing axes are kept).
    collective_matmul: overlap the sequence all-gather with the matmul
      (:func:`all_gather_matmul`; needs ``sequence_parallel``).

  Returns:
    ``[batch, seq, out / n_dev]`` (full sequence), the local output features.
  """
  lead = kernel.shape[1:]
  k2 = kernel.reshape(kernel.shape[0], -1)
  if sequence_parallel:
    if collective_matmul:
      y = all_gather_matmul(x, k2, axis_name=axis_name, gather_axis=seq_axis, dtype=dtype)
    else:
      y = _mm(lax.all_gather(x, axis_name, axis=seq_axis, tiled=True), k2, dtype)
  else:
    y = _mm(x, k2, dtype)
  return y.reshape(*y.shape[:-1], *lead)


def row_parallel_dense(x: jax.Array, kernel: jax.Array, *, axis_name: str = "tensor",
                       sequence_parallel: bool = False, collective_matmul: bool = False,
                       seq_axis: int = 1, dtype=None) -> jax.Array:
  """Row-parallel dense layer (input features split over ``axis_name``), summed.

  Args:
    x: ``[batch, seq, in / n_dev]`` (or ``[batch, seq, *in_axes]`` matching ``kernel``).
    kernel: local ``[in / n_dev, out]`` (or ``[*in_axes, out]``: leading axes contracted).

  Returns:
    ``[batch, seq, out]`` summed over ``axis_name`` (all-reduce), or with
    ``sequence_parallel`` ``[batch, seq / n_dev, out]`` (reduce-scatter; overlapped with the
    matmul by :func:`matmul_reduce_scatter` when ``collective_matmul``).
  """
  nin = kernel.ndim - 1
  x2 = x.reshape(*x.shape[:x.ndim - nin], -1)
  k2 = kernel.reshape(-1, kernel.shape[-1])
  if sequence_parallel:
    if collective_matmul:
      return matmul_reduce_scatter(x2, k2, axis_name=axis_name, scatter_axis=seq_axis,
                                   dtype=dtype)
    return lax.psum_scatter(_mm(x2, k2, dtype), axis_name, scatter_dimension=seq_axis,
                            tiled=True)
  return lax.psum(_mm(x2, k2, dtype), axis_name)


def vocab_parallel_embed(tokens: jax.Array, table: jax.Array, *, axis_name: str = "tensor",
                         sequence_parallel: bool = False, seq_axis: int = 1,
                         dtype=None) -> jax.Array:
  """Embedding lookup with the table split over the vocabulary.

  Args:
    tokens: int ``[batch, seq]`` (global ids, replicated over ``axis_name``).
    table: local ``[vocab / n_dev, embed]``, rows ``[i * vocab / n_dev, (i + 1) * ...)``
      on device ``i``.

  Returns:
    ``[batch, seq, embed]`` (or ``[batch, seq / n_dev, embed]`` with
    ``sequence_parallel``, reduce-scattered along the sequence).
  """
  if dtype is not None:
    table = table.astype(dtype)
  if _axis_size(axis_name) == 1:  # no masking work on an unsplit table
    return jnp.take(table, tokens, axis=0)
  rows = table.shape[0]
  local = tokens - lax.axis_index(axis_name) * rows
  inside = (local >= 0) & (local < rows)
  emb = jnp.take(table, jnp.where(inside, local, 0), axis=0)
  emb = jnp.where(inside[..., None], emb, jnp.zeros((), emb.dtype))
  if sequence_parallel:
    return lax.psum_scatter(emb, axis_name, scatter_dimension=seq_axis, tiled=True)
  return lax.psum(emb, axis_name)


def vocab_parallel_cross_entropy(logits: jax.Array, targets: jax.Array, *,
                                 axis_name: str = "tensor") -> jax.Array:
  """Per-token softmax cross-entropy of logits split over the vocabulary.

  Args:
    logits: local ``[..., vocab / n_dev]`` (device ``i`` holds the ``i``-th slice).
    targets: int ``[...]`` global target ids (replicated over ``axis_name``).

  Returns:
    float32 ``[...]``: ``logsumexp(logits) - logits[target]`` over the whole vocabulary,
    computed from a max, a sum and a target-logit collective; the full logits are never
    formed on one device.
  """
  logits = logits.astype(jnp.float32)
  if _axis_size(axis_name) == 1:
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - picked
  v = logits.shape[-1]
  m = lax.pmax(lax.stop_gradient(jnp.max(logits, axis=-1)), axis_name)
  sum_exp = lax.psum(jnp.sum(jnp.exp(logits - m[..., None]), axis=-1), axis_name)
  local = targets - lax.axis_index(axis_name) * v
  inside = (local >= 0) & (local < v)
  picked = jnp.take_along_axis(logits, jnp.where(inside, local, 0)[..., None], axis=-1)[..., 0]
  target_logit = lax.psum(jnp.where(inside, picked, 0.0), axis_name)
  return jnp.log(sum_exp) + m - target_logit
