"""Decode attention: a few query tokens per sequence against a (paged, quantized) KV cache.

Computes, per sequence ``b`` and query head ``n``,
``softmax(mask(softcap(scale * q k^T))) v`` over the ``lengths[b]`` cached tokens, where
the ``q_len`` query tokens are the *last* ``q_len`` positions of the sequence
(``lengths[b] - q_len + t``; decode is ``q_len == 1``, speculative verification and chunked
prefill use a few) and are causal among themselves. Grouped-query attention: the query
heads of one KV head read that head's K/V once. Rows with no allowed key (a sequence of
length 0, or query tokens before the start) produce zeros and ``lse = -inf``.

Caches:

* contiguous: ``key_cache, value_cache [batch, capacity, kv_heads, head_dim]``;
* paged (vLLM's PagedAttention layout): ``[num_pages, page_size, kv_heads, head_dim]`` with
  ``page_table [batch, pages_per_seq]`` int32; token ``j`` of sequence ``b`` lives in page
  ``page_table[b, j // page_size]``, row ``j % page_size``. Entries past a sequence's
  length are never read (they may hold anything, e.g. -1);
* quantized (formats in :mod:`kernels_pallas.decode.common`): int8 or float8_e4m3fn with
  per-token-per-head float32 scales ``k_scale, v_scale [<cache axes>, kv_heads]``, or int4
  packed two per byte along head_dim (``[..., head_dim // 2]`` uint8) with per-group scales
  ``[<cache axes>, kv_heads, head_dim // group_size]``. :mod:`jaxeff.kv_cache` writes them.

Implementations (``implementation=``, see :mod:`jaxeff.ops._registry`):

* ``"mosaic_gpu"``: Hopper kernel (``kernels_pallas/decode/mosaic_gpu.py``): a persistent
  grid with a stream-K (Lean Attention) partition of all KV blocks over the SMs, TMA page
  copies into a shared-memory ring filled by a producer warpgroup, wgmma, in-kernel
  dequantization; partial results merged by log-sum-exp.
* ``"triton"``: the portable Pallas-Triton kernel with the same partition and features
  (any CUDA GPU; interpretable on CPU).
* ``"xla"``: the pure-jnp reference below (gathers the pages, dequantizes, materialises
  the logits in float32). Serves every valid call.

Both kernels run in Pallas interpret mode on CPU (``"mosaic_gpu:interpret"``,
``"triton:interpret"``). The op is inference-only: kernels have no VJP (the reference is
differentiable).

Validation happens at trace time. ``lengths`` beyond the capacity and page-table entries
out of range are reported when the arrays are concrete (outside ``jit``); under ``jit``
the kernels clamp lengths to the capacity and page indices into the cache, so a bad value
reads wrong but in-bounds memory rather than faulting.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxeff.ops import _registry
from jaxeff.ops.attention import AttentionSpec, position_mask, soft_cap
from kernels_pallas.decode import common
from kernels_pallas.decode import mosaic_gpu as _mosaic_gpu_kernels
from kernels_pallas.decode import triton as _triton_kernels

_OP = "decode_attention"
_FLOAT = common.FLOAT_DTYPES


@dataclasses.dataclass(frozen=True)
class DecodeSpec:
  """Static description of one decode-attention call (everything but the arrays)."""

  batch: int
  q_len: int
  q_heads: int
  kv_heads: int
  head_dim: int
  dtype: jnp.dtype
  cache_dtype: jnp.dtype
  fmt: str  # "none", "int8", "fp8", "int4"
  int4_groups: int  # scales per head_dim (int4), else 0
  paged: bool
  capacity: int  # tokens a sequence can hold
  page_size: int  # paged: the cache's; contiguous: 0
  num_pages: int  # paged: the cache's; contiguous: 0
  local_window_size: tuple[int, int] | None
  logits_soft_cap: float | None
  scale: float

  @property
  def group(self) -> int:
    return self.q_heads // self.kv_heads

  def mask_spec(self) -> AttentionSpec:
    """The attention mask spec (causal + window) shared with :mod:`jaxeff.ops.attention`."""
    return AttentionSpec(
        batch=self.batch, q_len=self.q_len, kv_len=self.capacity, q_heads=self.q_heads,
        kv_heads=self.kv_heads, head_dim=self.head_dim, dtype=self.dtype, is_causal=True,
        local_window_size=self.local_window_size, logits_soft_cap=self.logits_soft_cap,
        scale=self.scale, has_bias=False, has_mask=False, has_segment_ids=False)


def _shape(a):
  return getattr(a, "shape", type(a))


def _concrete(a) -> np.ndarray | None:
  """The value of ``a`` when it is known at trace time, else None."""
  if isinstance(a, jax.core.Tracer):
    return None
  try:
    return np.asarray(a)
  except Exception:  # pragma: no cover - abstract values
    return None


def _check_scale(name: str, s, expected: tuple[int, ...]):
  if s is None:
    raise ValueError(f"{_OP}: {name} is required for a quantized cache; expected float32 "
                     f"of shape {expected}")
  if not hasattr(s, "shape") or tuple(s.shape) != expected:
    raise ValueError(f"{_OP}: {name} must have shape {expected}, got {_shape(s)}")
  if s.dtype != jnp.float32:
    raise TypeError(f"{_OP}: {name} must be float32, got {s.dtype}")


def validate(query, key_cache, value_cache, lengths, page_table, k_scale, v_scale, *,
             logits_soft_cap, local_window_size, scale) -> DecodeSpec:
  """Checks shapes, dtypes and (when concrete) values; returns the static spec."""
  if not hasattr(query, "ndim") or query.ndim != 4:
    raise ValueError(f"{_OP}: query must be 4-D [batch, q_len, q_heads, head_dim], got "
                     f"shape {_shape(query)}")
  b, t, n, d = query.shape
  if query.dtype not in _FLOAT:
    raise TypeError(f"{_OP}: query dtype must be bfloat16, float16 or float32, got "
                    f"{query.dtype}")
  if t < 1:
    raise ValueError(f"{_OP}: q_len must be >= 1, got query shape {query.shape}")
  paged = page_table is not None
  layout = ("[num_pages, page_size, kv_heads, head_dim]" if paged else
            "[batch, capacity, kv_heads, head_dim]")
  for name, c in (("key_cache", key_cache), ("value_cache", value_cache)):
    if not hasattr(c, "ndim") or c.ndim != 4:
      raise ValueError(f"{_OP}: {name} must be 4-D {layout}, got shape {_shape(c)}")
  if key_cache.shape != value_cache.shape or key_cache.dtype != value_cache.dtype:
    raise ValueError(f"{_OP}: key_cache and value_cache must have the same shape and dtype, "
                     f"got {key_cache.shape} {key_cache.dtype} and {value_cache.shape} "
                     f"{value_cache.dtype}")
  kh = key_cache.shape[2]
  if n % kh:
    raise ValueError(f"{_OP}: the number of query heads ({n}) must be a multiple of the "
                     f"number of KV heads ({kh})")
  fmt = common.cache_format(key_cache.dtype, key_cache.shape[3], d)
  if fmt is None:
    raise TypeError(
        f"{_OP}: key_cache of dtype {key_cache.dtype} and last dim {key_cache.shape[3]} "
        f"matches no cache format for query head_dim {d}: expected a float cache of "
        f"head_dim {d}, int8/float8_e4m3fn of head_dim {d}, or int4 packed as uint8/int8 "
        f"of head_dim {d // 2}")
  if fmt == "none" and key_cache.dtype != query.dtype:
    raise TypeError(f"{_OP}: an unquantized cache must have the query dtype {query.dtype}, "
                    f"got {key_cache.dtype}")
  if paged:
    if not hasattr(page_table, "ndim") or page_table.ndim != 2 or page_table.shape[0] != b:
      raise ValueError(f"{_OP}: page_table must be 2-D [batch, pages_per_seq] with batch "
                       f"{b}, got shape {_shape(page_table)}")
    if not jnp.issubdtype(page_table.dtype, jnp.integer):
      raise TypeError(f"{_OP}: page_table must be int32, got {page_table.dtype}")
    num_pages, page_size = key_cache.shape[:2]
    capacity = page_table.shape[1] * page_size
  else:
    if key_cache.shape[0] != b:
      raise ValueError(f"{_OP}: contiguous key_cache batch {key_cache.shape[0]} != query "
                       f"batch {b} (pass page_table for a paged cache)")
    num_pages, page_size = 0, 0
    capacity = key_cache.shape[1]
  groups = 0
  if fmt == "none":
    for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
      if s is not None:
        raise ValueError(f"{_OP}: {name} given for an unquantized {key_cache.dtype} cache")
  else:
    expected = tuple(key_cache.shape[:3])
    if fmt == "int4":
      groups = k_scale.shape[-1] if getattr(k_scale, "ndim", 0) == 4 else 0
      if not common.valid_int4_groups(d, groups):
        raise ValueError(
            f"{_OP}: int4 k_scale must be [{', '.join(map(str, expected))}, groups] with "
            f"head_dim ({d}) divisible by groups and groups 1 or even, got shape "
            f"{_shape(k_scale)}")
      expected = expected + (groups,)
    _check_scale("k_scale", k_scale, expected)
    _check_scale("v_scale", v_scale, expected)
  if not hasattr(lengths, "shape") or tuple(lengths.shape) != (b,):
    raise ValueError(f"{_OP}: lengths must have shape [batch] = ({b},), got {_shape(lengths)}")
  if not jnp.issubdtype(lengths.dtype, jnp.integer):
    raise TypeError(f"{_OP}: lengths must be int32, got {lengths.dtype}")
  lens = _concrete(lengths)
  if lens is not None:
    if lens.min(initial=0) < 0 or lens.max(initial=0) > capacity:
      raise ValueError(f"{_OP}: lengths must be in [0, capacity = {capacity}], got min "
                       f"{lens.min()} max {lens.max()}")
  if paged:
    table = _concrete(page_table)
    if table is not None and lens is not None:
      used = np.arange(table.shape[1])[None, :] * page_size < lens[:, None]
      bad = used & ((table < 0) | (table >= num_pages))
      if bad.any():
        bi, pi = np.argwhere(bad)[0]
        raise ValueError(f"{_OP}: page_table[{bi}, {pi}] = {table[bi, pi]} is out of range "
                         f"[0, num_pages = {num_pages}) for a page in use")
  window = None
  if local_window_size is not None:
    if isinstance(local_window_size, int) and not isinstance(local_window_size, bool):
      window = (local_window_size, local_window_size)
    elif (isinstance(local_window_size, (tuple, list)) and len(local_window_size) == 2
          and all(isinstance(w, int) for w in local_window_size)):
      window = tuple(local_window_size)
    else:
      raise ValueError(f"{_OP}: local_window_size must be an int or a pair (left, right) of "
                       f"ints, got {local_window_size!r}")
    if min(window) < 0:
      raise ValueError(f"{_OP}: local_window_size entries must be >= 0, got {window}")
  if logits_soft_cap is not None and not (isinstance(logits_soft_cap, (int, float))
                                          and logits_soft_cap > 0):
    raise ValueError(f"{_OP}: logits_soft_cap must be a positive number, got "
                     f"{logits_soft_cap!r}")
  if scale is None:
    scale = d ** -0.5
  elif not isinstance(scale, (int, float)):
    raise TypeError(f"{_OP}: scale must be a Python number (static), got {type(scale)}")
  return DecodeSpec(
      batch=b, q_len=t, q_heads=n, kv_heads=kh, head_dim=d, dtype=query.dtype,
      cache_dtype=key_cache.dtype, fmt=fmt, int4_groups=groups, paged=paged,
      capacity=capacity, page_size=page_size, num_pages=num_pages,
      local_window_size=window,
      logits_soft_cap=None if logits_soft_cap is None else float(logits_soft_cap),
      scale=float(scale))


# ---------------------------------------------------------------------------- reference


def logical_cache(cache: jax.Array, page_table: jax.Array | None) -> jax.Array:
  """A cache (or its scales) as ``[batch, capacity, ...]``: pages gathered in table order."""
  if page_table is None:
    return cache
  num_pages = cache.shape[0]
  pages = jnp.take(cache, jnp.clip(page_table, 0, num_pages - 1), axis=0)  # [b, pps, ps, ...]
  return pages.reshape(pages.shape[0], -1, *cache.shape[2:])


def reference(query, key_cache, value_cache, lengths, page_table=None, k_scale=None,
              v_scale=None, *, spec: DecodeSpec):
  """Pure-jnp decode attention. Returns ``(out [b, t, n, d] in query.dtype,
  lse [b, n, t] float32)``."""
  b, t, n, d = query.shape
  kh, g = spec.kv_heads, spec.group
  keys = common.dequantize(logical_cache(key_cache, page_table),
                           None if k_scale is None else logical_cache(k_scale, page_table),
                           spec.fmt)
  values = common.dequantize(logical_cache(value_cache, page_table),
                             None if v_scale is None else logical_cache(v_scale, page_table),
                             spec.fmt)
  s = keys.shape[1]
  qf = query.astype(jnp.float32).reshape(b, t, kh, g, d)
  logits = jnp.einsum("btkgd,bskd->bkgts", qf, keys,
                      precision=jax.lax.Precision.HIGHEST) * spec.scale
  logits = soft_cap(logits, spec.logits_soft_cap)
  lengths = jnp.clip(lengths.astype(jnp.int32), 0, spec.capacity)
  q_pos = lengths[:, None] - t + jnp.arange(t)[None, :]  # [b, t]
  kv_pos = jnp.arange(s)
  allowed = position_mask(spec.mask_spec(), q_pos[:, :, None], kv_pos[None, None, :])
  allowed = allowed & (kv_pos[None, None, :] < lengths[:, None, None]) & (
      kv_pos[None, None, :] >= 0)  # [b, t, s]
  logits = jnp.where(allowed[:, None, None], logits, -jnp.inf)
  m = jnp.max(logits, axis=-1, keepdims=True)
  m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.exp(logits - m_safe)
  l = jnp.sum(p, axis=-1, keepdims=True)
  l_safe = jnp.where(l == 0, 1.0, l)
  out = jnp.einsum("bkgts,bskd->btkgd", p / l_safe, values,
                   precision=jax.lax.Precision.HIGHEST)
  lse = jnp.where(l[..., 0] == 0, -jnp.inf, m_safe[..., 0] + jnp.log(l_safe[..., 0]))
  return out.reshape(b, t, n, d).astype(query.dtype), lse.reshape(b, n, t)


def _xla(query, key_cache, value_cache, lengths, page_table, k_scale, v_scale, *, spec,
         return_lse):
  out, lse = reference(query, key_cache, value_cache, lengths, page_table, k_scale, v_scale,
                       spec=spec)
  return (out, lse) if return_lse else out


# ------------------------------------------------------------------------------ kernels


def _paged_view(key_cache, value_cache, page_table, k_scale, v_scale, spec: DecodeSpec,
                page_size: int):
  """Contiguous caches (and scales) as pages with an identity page table; paged as is."""
  if spec.paged:
    return key_cache, value_cache, page_table.astype(jnp.int32), k_scale, v_scale
  kp, table = common.contiguous_as_paged(key_cache, page_size)
  vp, _ = common.contiguous_as_paged(value_cache, page_size)
  ks = vs = None
  if k_scale is not None:
    ks, _ = common.contiguous_as_paged(k_scale, page_size)
    vs, _ = common.contiguous_as_paged(v_scale, page_size)
  return kp, vp, table, ks, vs


def _kernel_impl(backend: str):
  mod = _mosaic_gpu_kernels if backend == "mosaic_gpu" else _triton_kernels

  def fn(query, key_cache, value_cache, lengths, page_table, k_scale, v_scale, *, spec,
         return_lse, interpret):
    page_size = spec.page_size if spec.paged else mod.contiguous_page_size(spec.capacity)
    kp, vp, table, ks, vs = _paged_view(key_cache, value_cache, page_table, k_scale,
                                        v_scale, spec, page_size)
    out, lse = mod.decode_attention(
        query, kp, vp, table, lengths.astype(jnp.int32), ks, vs, fmt=spec.fmt,
        window=spec.local_window_size, scale=spec.scale, soft_cap=spec.logits_soft_cap,
        interpret=interpret)
    return (out, lse) if return_lse else out

  fn.__name__ = f"_{backend}"
  return fn


def _supports(mod):
  def supports(query, key_cache, value_cache, lengths, page_table, k_scale, v_scale, *, spec,
               return_lse):
    del return_lse
    page_size = spec.page_size if spec.paged else mod.contiguous_page_size(spec.capacity)
    return mod.supports(head_dim=spec.head_dim, dtype=spec.dtype, fmt=spec.fmt,
                        int4_groups=spec.int4_groups, page_size=page_size,
                        rows=spec.q_len * spec.group)
  return supports


# Order by measured speed on an H100 (notes/decode.md, session 2 sweep): the Mosaic GPU
# kernel reads the bf16 GQA cache at 2.55 TB/s; it serves Hopper only, Triton the rest.
DECODE_ATTENTION_IMPLS: list[_registry.Implementation] = [
    _registry.Implementation("mosaic_gpu", _kernel_impl("mosaic_gpu"), platforms=("gpu",),
                             supports=_supports(_mosaic_gpu_kernels), interpretable=True,
                             device_kinds=_registry.HOPPER_KINDS),
    _registry.Implementation("triton", _kernel_impl("triton"), platforms=("gpu",),
                             supports=_supports(_triton_kernels), interpretable=True),
    _registry.Implementation("xla", _xla),
]


def _decode(query, key_cache, value_cache, *, lengths, page_table, k_scale, v_scale,
            logits_soft_cap, local_window_size, scale, implementation, return_lse):
  spec = validate(query, key_cache, value_cache, lengths, page_table, k_scale, v_scale,
                  logits_soft_cap=logits_soft_cap, local_window_size=local_window_size,
                  scale=scale)
  return _registry.dispatch(_OP, DECODE_ATTENTION_IMPLS, implementation, query, key_cache,
                            value_cache, lengths, page_table, k_scale, v_scale, spec=spec,
                            return_lse=return_lse)


def decode_attention(
    query: jax.Array, key_cache: jax.Array, value_cache: jax.Array, *,
    lengths: jax.Array, page_table: jax.Array | None = None,
    k_scale: jax.Array | None = None, v_scale: jax.Array | None = None,
    logits_soft_cap: float | None = None,
    local_window_size: int | tuple[int, int] | None = None, scale: float | None = None,
    implementation: str | Sequence[str] | None = None) -> jax.Array:
  """Attention of a few new query tokens per sequence over a KV cache.

  Args:
    query: ``[batch, q_len, q_heads, head_dim]``; token ``t`` sits at position
      ``lengths - q_len + t`` and attends cached keys at positions ``<=`` its own.
    key_cache, value_cache: contiguous ``[batch, capacity, kv_heads, head_dim]`` or paged
      ``[num_pages, page_size, kv_heads, head_dim]`` (int4: last dim ``head_dim // 2``);
      ``q_heads % kv_heads == 0``.
    lengths: ``[batch]`` int32 cached tokens per sequence, the query tokens included.
    page_table: ``[batch, pages_per_seq]`` int32 for a paged cache, else None.
    k_scale, v_scale: float32 scales of a quantized cache: ``[<cache axes>, kv_heads]``
      (int8, float8_e4m3fn) or ``[<cache axes>, kv_heads, head_dim // group_size]`` (int4).
    logits_soft_cap: ``cap`` for ``cap * tanh(logits / cap)``.
    local_window_size: ``(left, right)`` or one int: attend keys within
      ``[pos - left, pos + right]`` (and never past ``pos``).
    scale: logits scale; default ``head_dim ** -0.5``.
    implementation: None (fastest available), a name or a sequence of names.

  Returns:
    ``[batch, q_len, q_heads, head_dim]`` in the query dtype.
  """
  return _decode(query, key_cache, value_cache, lengths=lengths, page_table=page_table,
                 k_scale=k_scale, v_scale=v_scale, logits_soft_cap=logits_soft_cap,
                 local_window_size=local_window_size, scale=scale,
                 implementation=implementation, return_lse=False)


def decode_attention_with_lse(
    query: jax.Array, key_cache: jax.Array, value_cache: jax.Array, *,
    lengths: jax.Array, page_table: jax.Array | None = None,
    k_scale: jax.Array | None = None, v_scale: jax.Array | None = None,
    logits_soft_cap: float | None = None,
    local_window_size: int | tuple[int, int] | None = None, scale: float | None = None,
    implementation: str | Sequence[str] | None = None) -> tuple[jax.Array, jax.Array]:
  """Like :func:`decode_attention`, also returning the log-sum-exp of the logits.

  Returns:
    ``(out [batch, q_len, q_heads, head_dim], lse [batch, q_heads, q_len] float32)``;
    ``lse`` is ``-inf`` for rows with no allowed key. Results over disjoint caches (e.g.
    a shared prefix and a per-sequence suffix) merge exactly by ``lse``.
  """
  return _decode(query, key_cache, value_cache, lengths=lengths, page_table=page_table,
                 k_scale=k_scale, v_scale=v_scale, logits_soft_cap=logits_soft_cap,
                 local_window_size=local_window_size, scale=scale,
                 implementation=implementation, return_lse=True)
