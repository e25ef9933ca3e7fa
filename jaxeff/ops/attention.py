"""Scaled dot-product attention for training and prefill.

Computes ``softmax(mask(softcap(scale * q k^T + bias))) v`` per head, with grouped-query
attention (kv heads divide q heads; K/V are never repeated in memory), causal masking
aligned to the end of the key sequence (prefix caching: query i sits at key position
``i + kv_len - q_len``), sliding windows, packed-sequence segment ids, an additive bias
and a boolean mask. Rows with nothing to attend produce zeros (and ``lse = -inf``).

Implementations (``implementation=``, see :mod:`jaxeff.ops._registry`):

* ``"xla"``: the pure-jnp reference below (exact, materialises the scores; float32
  softmax). Serves every valid call and every dtype.
* ``"cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")`` on NVIDIA GPUs,
  for the subset of features it supports (bf16/fp16, no segment ids or soft cap, causal
  only with q_len == kv_len). Listed so users and benchmarks can compare against it.

Flash-attention kernels (FlashAttention-2 tiling with online softmax; Dao, 2023, with
FlashAttention-3's Hopper techniques; see ``kernels_pallas/attention``):

* ``"mosaic_gpu"``: Pallas Mosaic GPU forward and backward for Hopper (H100/H200): TMA,
  wgmma, warp-specialised producer/consumer warpgroups, block-sparse skipping of masked
  blocks. bf16/fp16, head_dim 64/128/256 (the head_dim-256 backward runs the Triton
  kernel). Listed first: the fastest on Hopper.
* ``"cudnn"`` (above) comes next: on other GPUs it is faster than the portable kernel for
  the features it supports.
* ``"triton"``: the portable Pallas-Triton forward and backward for any CUDA GPU, with the
  same feature set as the Mosaic GPU kernel and any head_dim; serves what cuDNN cannot
  (segment ids, soft cap, end-aligned causal cross attention, the log-sum-exp).

* ``"mosaic_tpu"``: Pallas Mosaic TPU forward and backward (same features; block lists by
  scalar prefetch). Tested only in TPU interpret mode on CPU (``"mosaic_tpu:interpret"``).

The GPU kernels run in Pallas interpret mode on CPU (``"mosaic_gpu:interpret"``,
``"triton:interpret"``). Kernel calls go through one ``jax.custom_vjp`` whose residuals
are the inputs, the output and the float32 log-sum-exp only (``jax.checkpoint``-friendly);
its backward is a kernel too. Additive bias and boolean masks are served by ``"xla"``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jaxeff.ops import _registry
from kernels_pallas.attention import mosaic_gpu as _mosaic_gpu_kernels
from kernels_pallas.attention import mosaic_tpu as _mosaic_tpu_kernels
from kernels_pallas.attention import triton as _triton_kernels

_KERNEL_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
  """Static description of one attention call (everything but the arrays)."""

  batch: int
  q_len: int
  kv_len: int
  q_heads: int
  kv_heads: int
  head_dim: int
  dtype: jnp.dtype
  is_causal: bool
  local_window_size: tuple[int, int] | None
  logits_soft_cap: float | None
  scale: float
  has_bias: bool
  has_mask: bool
  has_segment_ids: bool
  deterministic: bool = False


def _as_segment_ids(segment_ids, b, t, s):
  if segment_ids is None:
    return None, None
  if isinstance(segment_ids, (tuple, list)):
    if len(segment_ids) != 2:
      raise ValueError("dot_product_attention: segment_ids must be an array [batch, seq] or a "
                       f"pair (q_segment_ids [batch, q_len], kv_segment_ids [batch, kv_len]), "
                       f"got a sequence of length {len(segment_ids)}")
    q_ids, kv_ids = segment_ids
  else:
    if t != s:
      raise ValueError(
          "dot_product_attention: a single segment_ids array needs q_len == kv_len; got "
          f"q_len={t}, kv_len={s}. Pass (q_segment_ids, kv_segment_ids) instead")
    q_ids = kv_ids = segment_ids
  for name, ids, n in (("q_segment_ids", q_ids, t), ("kv_segment_ids", kv_ids, s)):
    if getattr(ids, "shape", None) != (b, n):
      raise ValueError(f"dot_product_attention: {name} must have shape [batch, len] = "
                       f"({b}, {n}), got {getattr(ids, 'shape', type(ids))}")
    if not jnp.issubdtype(ids.dtype, jnp.integer):
      raise TypeError(f"dot_product_attention: {name} must be integer, got {ids.dtype}")
  return q_ids, kv_ids


def _broadcastable(shape, target) -> bool:
  if len(shape) != len(target):
    return False
  return all(a in (1, b) for a, b in zip(shape, target))


def validate(query, key, value, *, bias, mask, is_causal, segment_ids, local_window_size,
             logits_soft_cap, scale, deterministic=False):
  """Checks shapes/dtypes; returns (spec, q_segment_ids, kv_segment_ids, window)."""
  op = "dot_product_attention"
  for name, a in (("query", query), ("key", key), ("value", value)):
    if not hasattr(a, "ndim") or a.ndim != 4:
      raise ValueError(f"{op}: {name} must be 4-D [batch, seq, heads, head_dim], got shape "
                       f"{getattr(a, 'shape', type(a))}")
  b, t, n, h = query.shape
  bk, s, k, hk = key.shape
  if key.shape != value.shape:
    raise ValueError(f"{op}: key and value must have the same shape, got {key.shape} and "
                     f"{value.shape}")
  if bk != b:
    raise ValueError(f"{op}: query batch {b} != key batch {bk}")
  if hk != h:
    raise ValueError(f"{op}: query head_dim {h} != key head_dim {hk}")
  if n % k:
    raise ValueError(f"{op}: the number of query heads ({n}) must be a multiple of the number "
                     f"of key/value heads ({k})")
  if h % 8:
    raise ValueError(f"{op}: head_dim must be a multiple of 8, got {h}")
  if not (query.dtype == key.dtype == value.dtype):
    raise TypeError(f"{op}: query, key and value must share a dtype, got {query.dtype}, "
                    f"{key.dtype}, {value.dtype}")
  if query.dtype not in (jnp.dtype(jnp.float32), *_KERNEL_DTYPES):
    raise TypeError(f"{op}: dtype must be bfloat16, float16 or float32, got {query.dtype}")
  target = (b, n, t, s)
  if bias is not None and (not hasattr(bias, "shape") or not _broadcastable(bias.shape, target)):
    raise ValueError(f"{op}: bias must be 4-D and broadcastable to [batch, q_heads, q_len, "
                     f"kv_len] = {target}, got {getattr(bias, 'shape', type(bias))}")
  if mask is not None:
    if not hasattr(mask, "shape") or not _broadcastable(mask.shape, target):
      raise ValueError(f"{op}: mask must be 4-D and broadcastable to [batch, q_heads, q_len, "
                       f"kv_len] = {target}, got {getattr(mask, 'shape', type(mask))}")
    if mask.dtype != jnp.bool_:
      raise TypeError(f"{op}: mask must be boolean (True = attend), got {mask.dtype}")
  q_ids, kv_ids = _as_segment_ids(segment_ids, b, t, s)
  window = None
  if local_window_size is not None:
    if isinstance(local_window_size, int):
      window = (local_window_size, local_window_size)
    elif (isinstance(local_window_size, (tuple, list)) and len(local_window_size) == 2
          and all(isinstance(w, int) for w in local_window_size)):
      window = tuple(local_window_size)
    else:
      raise ValueError(f"{op}: local_window_size must be an int or a pair (left, right) of "
                       f"ints, got {local_window_size!r}")
    if min(window) < 0:
      raise ValueError(f"{op}: local_window_size entries must be >= 0, got {window}")
  if logits_soft_cap is not None and not (isinstance(logits_soft_cap, (int, float))
                                          and logits_soft_cap > 0):
    raise ValueError(f"{op}: logits_soft_cap must be a positive number, got {logits_soft_cap!r}")
  if scale is None:
    scale = h ** -0.5
  elif not isinstance(scale, (int, float)):
    raise TypeError(f"{op}: scale must be a Python number (static), got {type(scale)}")
  if not isinstance(deterministic, bool):
    raise TypeError(f"{op}: deterministic must be a Python bool (static), got "
                    f"{type(deterministic)}")
  spec = AttentionSpec(
      batch=b, q_len=t, kv_len=s, q_heads=n, kv_heads=k, head_dim=h, dtype=query.dtype,
      is_causal=bool(is_causal), local_window_size=window,
      logits_soft_cap=None if logits_soft_cap is None else float(logits_soft_cap),
      scale=float(scale), has_bias=bias is not None, has_mask=mask is not None,
      has_segment_ids=q_ids is not None, deterministic=deterministic)
  return spec, q_ids, kv_ids


def position_mask(spec: AttentionSpec, q_pos: jax.Array, kv_pos: jax.Array) -> jax.Array | None:
  """Causal/window mask from absolute positions (query positions already end-aligned).

  ``q_pos`` and ``kv_pos`` broadcast against each other (e.g. ``[t, 1]`` and ``[1, s]``);
  returns a boolean array (True = attend), or None when neither mask is on.
  """
  allowed = None
  if spec.is_causal:
    allowed = kv_pos <= q_pos
  if spec.local_window_size is not None:
    left, right = spec.local_window_size
    win = (kv_pos >= q_pos - left) & (kv_pos <= q_pos + right)
    allowed = win if allowed is None else allowed & win
  return allowed


def soft_cap(logits: jax.Array, cap: float | None) -> jax.Array:
  """Gemma-style logit soft-capping ``cap * tanh(logits / cap)`` (identity when cap is None)."""
  return logits if cap is None else cap * jnp.tanh(logits / cap)


def _reference(query, key, value, bias, mask, q_ids, kv_ids, *, spec: AttentionSpec):
  """Returns (out [b, t, n, h] in query.dtype, lse [b, n, t] float32)."""
  b, t, n, h = query.shape
  s, k = key.shape[1], key.shape[2]
  g = n // k
  qf = query.astype(jnp.float32).reshape(b, t, k, g, h)
  logits = jnp.einsum("btkgh,bskh->bkgts", qf, key.astype(jnp.float32)) * spec.scale
  logits = logits.reshape(b, n, t, s)
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  logits = soft_cap(logits, spec.logits_soft_cap)
  allowed = jnp.ones((1, 1, t, s), jnp.bool_)
  pos = position_mask(spec, jnp.arange(t)[:, None] + (s - t), jnp.arange(s)[None, :])
  if pos is not None:
    allowed = allowed & pos[None, None]
  if mask is not None:
    allowed = allowed & mask
  if q_ids is not None:
    allowed = allowed & (q_ids[:, None, :, None] == kv_ids[:, None, None, :])
  logits = jnp.where(allowed, logits, -jnp.inf)
  m = jnp.max(logits, axis=-1, keepdims=True)
  m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.exp(logits - m_safe)  # exp(-inf) = 0 for masked entries
  l = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(l == 0, 1.0, l)
  out = jnp.einsum("bkgts,bskh->btkgh", p.reshape(b, k, g, t, s), value.astype(jnp.float32))
  lse = jnp.where(l[..., 0] == 0, -jnp.inf, m_safe[..., 0] + jnp.log(jnp.where(l[..., 0] == 0, 1.0, l[..., 0])))
  return out.reshape(b, t, n, h).astype(query.dtype), lse


def _xla(query, key, value, bias, mask, q_ids, kv_ids, *, spec, return_lse):
  out, lse = _reference(query, key, value, bias, mask, q_ids, kv_ids, spec=spec)
  return (out, lse) if return_lse else out


def _cudnn_supports(query, key, value, bias, mask, q_ids, kv_ids, *, spec, return_lse):
  if return_lse:
    return "cudnn does not return the log-sum-exp"
  if spec.deterministic:
    return "cudnn's backward adds dQ with atomics (not deterministic)"
  if spec.dtype not in _KERNEL_DTYPES:
    return f"cudnn needs bfloat16/float16 inputs, got {spec.dtype}"
  if spec.has_segment_ids:
    return "segment_ids are not supported by cudnn here"
  if spec.logits_soft_cap is not None:
    return "logits_soft_cap is not supported by cudnn"
  if spec.has_mask or spec.has_bias:
    return "mask/bias can fully mask rows, which cudnn does not map to zeros"
  if spec.is_causal and spec.q_len != spec.kv_len:
    return "cudnn aligns causal masks to the start; end-aligned causal needs q_len == kv_len"
  if spec.local_window_size is not None and not spec.is_causal:
    return "cudnn sliding windows are causal only here"
  if spec.head_dim > 128:
    return f"cudnn head_dim <= 128 here, got {spec.head_dim}"
  return None


def _cudnn(query, key, value, bias, mask, q_ids, kv_ids, *, spec, return_lse):
  del bias, mask, q_ids, kv_ids, return_lse
  window = None
  if spec.local_window_size is not None:
    window = (spec.local_window_size[0], 0)
  return jax.nn.dot_product_attention(
      query, key, value, is_causal=spec.is_causal, scale=spec.scale,
      local_window_size=window, implementation="cudnn")


@dataclasses.dataclass(frozen=True)
class _FlashStatic:
  """Static (hashable) arguments of the flash-attention custom_vjp."""

  backend: str  # "mosaic_gpu", "triton" or "mosaic_tpu"
  is_causal: bool
  window: tuple[int, int] | None
  scale: float
  soft_cap: float | None
  interpret: bool
  deterministic: bool = False

  def kernel_kwargs(self):
    return dict(is_causal=self.is_causal, window=self.window, scale=self.scale,
                soft_cap=self.soft_cap, interpret=self.interpret)


def _backward_module(st: _FlashStatic, head_dim: int):
  if st.backend == "mosaic_tpu":
    return _mosaic_tpu_kernels
  if st.backend == "mosaic_gpu" and head_dim in _mosaic_gpu_kernels.BWD_HEAD_DIMS:
    return _mosaic_gpu_kernels
  return _triton_kernels


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(query, key, value, q_ids, kv_ids, st: _FlashStatic):
  return _flash_fwd(query, key, value, q_ids, kv_ids, st)[0]


def _flash_fwd(query, key, value, q_ids, kv_ids, st: _FlashStatic):
  mod = {"mosaic_gpu": _mosaic_gpu_kernels, "mosaic_tpu": _mosaic_tpu_kernels}.get(
      st.backend, _triton_kernels)
  out, lse = _registry.lower_once(mod.forward, query, key, value, q_ids, kv_ids,
                                  **st.kernel_kwargs())
  return (out, lse), (query, key, value, q_ids, kv_ids, out, lse)


def _flash_bwd(st: _FlashStatic, res, cotangents):
  query, key, value, q_ids, kv_ids, out, lse = res
  d_out, d_lse = cotangents
  mod = _backward_module(st, query.shape[-1])
  kw = st.kernel_kwargs()
  if mod is _mosaic_gpu_kernels:  # the other backward kernels are always deterministic
    kw["deterministic"] = st.deterministic
  dq, dk, dv = _registry.lower_once(mod.backward, query, key, value, out, lse,
                                    d_out.astype(query.dtype), q_ids, kv_ids, d_lse, **kw)
  return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _kernel_supports(backend: str, spec: AttentionSpec) -> str | None:
  if spec.dtype not in _KERNEL_DTYPES:
    return f"{backend} needs bfloat16/float16 inputs, got {spec.dtype} (use 'xla')"
  if spec.has_bias:
    return f"additive bias is not supported by {backend} (use 'xla')"
  if spec.has_mask:
    return (f"a dense boolean mask is not supported by {backend}; use is_causal, "
            "local_window_size or segment_ids, or 'xla'")
  return None


def _mosaic_gpu_supports(query, key, value, bias, mask, q_ids, kv_ids, *, spec, return_lse):
  why = _kernel_supports("mosaic_gpu", spec)
  if why is None and spec.head_dim not in _mosaic_gpu_kernels.SUPPORTED_HEAD_DIMS:
    why = (f"mosaic_gpu supports head_dim in {_mosaic_gpu_kernels.SUPPORTED_HEAD_DIMS}, got "
           f"{spec.head_dim}")
  return why


def _triton_supports(query, key, value, bias, mask, q_ids, kv_ids, *, spec, return_lse):
  why = _kernel_supports("triton", spec)
  if why is None and spec.head_dim > 256:
    why = f"triton supports head_dim <= 256, got {spec.head_dim}"
  return why


def _mosaic_tpu_supports(query, key, value, bias, mask, q_ids, kv_ids, *, spec, return_lse):
  return _kernel_supports("mosaic_tpu", spec)


def _flash_impl(backend: str):
  def fn(query, key, value, bias, mask, q_ids, kv_ids, *, spec, return_lse, interpret):
    del bias, mask
    st = _FlashStatic(backend=backend, is_causal=spec.is_causal,
                      window=spec.local_window_size, scale=spec.scale,
                      soft_cap=spec.logits_soft_cap, interpret=interpret,
                      deterministic=spec.deterministic)
    if q_ids is not None:
      q_ids, kv_ids = q_ids.astype(jnp.int32), kv_ids.astype(jnp.int32)
    out, lse = _flash(query, key, value, q_ids, kv_ids, st)
    return (out, lse) if return_lse else out

  fn.__name__ = f"_{backend}"
  return fn


ATTENTION_IMPLS: list[_registry.Implementation] = [
    _registry.Implementation("mosaic_gpu", _flash_impl("mosaic_gpu"), platforms=("gpu",),
                             supports=_mosaic_gpu_supports, interpretable=True,
                             device_kinds=_registry.HOPPER_KINDS),
    _registry.Implementation("cudnn", _cudnn, platforms=("gpu",), supports=_cudnn_supports),
    _registry.Implementation("triton", _flash_impl("triton"), platforms=("gpu",),
                             supports=_triton_supports, interpretable=True),
    _registry.Implementation("mosaic_tpu", _flash_impl("mosaic_tpu"), platforms=("tpu",),
                             supports=_mosaic_tpu_supports, interpretable=True),
    _registry.Implementation("xla", _xla),
]


def _attention(query, key, value, *, bias, mask, is_causal, segment_ids, local_window_size,
               logits_soft_cap, scale, deterministic, implementation, return_lse):
  spec, q_ids, kv_ids = validate(
      query, key, value, bias=bias, mask=mask, is_causal=is_causal, segment_ids=segment_ids,
      local_window_size=local_window_size, logits_soft_cap=logits_soft_cap, scale=scale,
      deterministic=deterministic)
  return _registry.dispatch("dot_product_attention", ATTENTION_IMPLS, implementation, query,
                            key, value, bias, mask, q_ids, kv_ids, spec=spec,
                            return_lse=return_lse)


def dot_product_attention(
    query: jax.Array, key: jax.Array, value: jax.Array, *,
    bias: jax.Array | None = None, mask: jax.Array | None = None, is_causal: bool = False,
    segment_ids: jax.Array | tuple[jax.Array, jax.Array] | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    logits_soft_cap: float | None = None, scale: float | None = None,
    deterministic: bool = False,
    implementation: str | Sequence[str] | None = None) -> jax.Array:
  """Multi-head (grouped-query) scaled dot-product attention.

  Args:
    query: ``[batch, q_len, q_heads, head_dim]``.
    key: ``[batch, kv_len, kv_heads, head_dim]``; ``q_heads % kv_heads == 0``.
    value: ``[batch, kv_len, kv_heads, head_dim]``.
    bias: additive logits bias broadcastable to ``[batch, q_heads, q_len, kv_len]``.
    mask: boolean, broadcastable to ``[batch, q_heads, q_len, kv_len]``; True = attend.
    is_causal: query ``i`` attends keys ``j <= i + kv_len - q_len`` (end-aligned).
    segment_ids: ``[batch, seq]`` int ids (q_len == kv_len) or a pair
      ``(q_ids [batch, q_len], kv_ids [batch, kv_len])``; attend only within equal ids.
    local_window_size: ``(left, right)`` (or one int for both): attend keys within
      ``[pos - left, pos + right]`` of the query's (end-aligned) position.
    logits_soft_cap: ``cap`` for ``cap * tanh(logits / cap)``, applied after scale and bias.
    scale: logits scale; default ``head_dim ** -0.5``.
    deterministic: bitwise-reproducible gradients. The Mosaic GPU backward then writes
      per-key-tile dQ partial sums and adds them in a fixed order (``kv_len / 128`` times
      the float32 size of dQ in temporary memory) instead of reducing them with atomic
      adds; cuDNN is skipped; the Triton, Mosaic TPU and XLA backwards always are.
    implementation: None (fastest available), a name or a sequence of names.

  Returns:
    ``[batch, q_len, q_heads, head_dim]`` in the input dtype; fully masked rows are zero.
  """
  return _attention(query, key, value, bias=bias, mask=mask, is_causal=is_causal,
                    segment_ids=segment_ids, local_window_size=local_window_size,
                    logits_soft_cap=logits_soft_cap, scale=scale,
                    deterministic=deterministic, implementation=implementation, return_lse=False)


def dot_product_attention_with_lse(
    query: jax.Array, key: jax.Array, value: jax.Array, *,
    bias: jax.Array | None = None, mask: jax.Array | None = None, is_causal: bool = False,
    segment_ids: jax.Array | tuple[jax.Array, jax.Array] | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    logits_soft_cap: float | None = None, scale: float | None = None,
    deterministic: bool = False,
    implementation: str | Sequence[str] | None = None) -> tuple[jax.Array, jax.Array]:
  """Like :func:`dot_product_attention`, also returning the log-sum-exp of the logits.

  Returns:
    ``(out [batch, q_len, q_heads, head_dim], lse [batch, q_heads, q_len] float32)``;
    ``lse`` is ``-inf`` on fully masked rows. Partial results over disjoint key blocks
    merge exactly by ``lse`` (ring attention, split-KV decode).
  """
  return _attention(query, key, value, bias=bias, mask=mask, is_causal=is_causal,
                    segment_ids=segment_ids, local_window_size=local_window_size,
                    logits_soft_cap=logits_soft_cap, scale=scale,
                    deterministic=deterministic, implementation=implementation, return_lse=True)


def flash_attention_backward(
    query: jax.Array, key: jax.Array, value: jax.Array, out: jax.Array, lse: jax.Array,
    d_out: jax.Array, *, q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None, is_causal: bool = False, scale: float,
    logits_soft_cap: float | None = None,
    implementation: str) -> tuple[jax.Array, jax.Array, jax.Array]:
  """FlashAttention's backward of one key block from the softmax statistics of a larger one.

  Given the ``out`` and ``lse`` of attention over *all* key blocks (e.g. merged across a
  ring), the gradient contributed by the keys ``key``/``value`` needs nothing else
  (FlashAttention-2, Alg. 2): ``P = exp(S - lse)``, ``dV = P^T dO``,
  ``dS = P (dP - rowsum(dO * out))``. Ring attention calls this once per block.

  Args:
    query: ``[batch, q_len, q_heads, head_dim]``; key, value: ``[batch, kv_len, kv_heads,
      head_dim]`` (bf16/fp16).
    out, d_out: ``[batch, q_len, q_heads, head_dim]``; lse: ``[batch, q_heads, q_len]`` float32.
    q_segment_ids / kv_segment_ids: int ``[batch, q_len]`` / ``[batch, kv_len]`` or None.
    is_causal: causal mask aligned to the end, as in :func:`dot_product_attention`.
    scale: the logits scale used in the forward.
    logits_soft_cap: the forward's soft cap, or None.
    implementation: a kernel backend, ``"mosaic_gpu"``, ``"triton"`` or ``"mosaic_tpu"``,
      optionally with the suffix ``":interpret"``.

  Returns:
    ``(dq, dk, dv)`` shaped and typed like ``query, key, value``.
  """
  backend, _, suffix = implementation.partition(":")
  if backend not in ("mosaic_gpu", "triton", "mosaic_tpu") or suffix not in ("", "interpret"):
    raise ValueError(f"flash_attention_backward: implementation must be 'mosaic_gpu', "
                     f"'triton' or 'mosaic_tpu' (optionally ':interpret'), got "
                     f"{implementation!r}")
  st = _FlashStatic(backend=backend, is_causal=is_causal, window=None, scale=float(scale),
                    soft_cap=logits_soft_cap, interpret=suffix == "interpret")
  mod = _backward_module(st, query.shape[-1])
  return _registry.lower_once(mod.backward, query, key, value, out.astype(query.dtype), lse,
                              d_out.astype(query.dtype), q_segment_ids, kv_segment_ids, None,
                              **st.kernel_kwargs())
