"""Sparse matmul ``x @ w`` for sparse weights, and the CATS activation-sparse SwiGLU MLP.

``sparse_matmul(x, w)`` takes ``w: [K, N]`` in one of the formats of
:mod:`jaxeff.sparse.formats`:

* :class:`~jaxeff.sparse.TiledSparse` (unstructured, Flash-LLM tiled bitmap; Xia et al.
  2023): expanded on chip for the tensor cores, ``M <= 64``, 50-95% sparsity;
* :class:`~jaxeff.sparse.EllSparse` (unstructured, sliced ELL): decode (``M <= 16``), the
  kernel gathers ``x`` per non-zero, so its work falls with the sparsity;
* :class:`~jaxeff.sparse.NMSparse` (2:4, 1:4, 2:8, ... along K; the 2:4 ``words`` layout
  has a decode kernel that gathers ``x`` (``M <= 2``) and a tensor-core kernel (``M <= 64``));
* :class:`~jaxeff.sparse.BlockSparse` (BSR, blocks 16..128), differentiable in ``x`` and
  the stored blocks (``custom_vjp`` whose backward is two kernels: ``dy @ w^T`` over the
  transposed block index and the kept blocks' ``x^T dy``);
* or a plain dense array (then it is ``jnp.dot``: the dense fallback).

Implementations (``implementation=``), fastest first:

* ``"triton"``: :mod:`kernels_pallas.sparse.triton` (any CUDA GPU; ``":interpret"`` on CPU).
* ``"xla"``: the reference: decompress (exact) then one dot in float32.

Break-even: a sparse kernel only pays when it reads fewer bytes than the dense weight.
With ``implementation=None`` a tiled or ELL weight whose sparsity is under
``min_sparsity`` (default :data:`BREAK_EVEN_SPARSITY`, 0.5: Flash-LLM's reported
break-even; on the H100 the sliced-ELL decode kernel measured 0.97x dense bf16 at 50% and
1.21x at 60%, notes/sparse.md) is served by the reference.
Since that decompresses per call, the real fallback is taken once, offline:
:func:`jaxeff.sparse.sparsify` returns the dense array below the break-even, which this op
then multiplies densely. Shapes that are not whole kernel tiles are padded with zeros here.

``cats_mlp(x, w_gate, w_up, w_down, threshold=t)`` is the SwiGLU MLP with CATS
activation sparsity (Lee et al., 2024): ``a = silu(x @ w_gate)``, entries with
``|a| <= t`` set to zero, ``y = (a * (x @ w_up)) @ w_down``; the ``"triton"`` kernels read
every gate row but only the up / down rows of neurons active in some row of ``x`` (``t``
from :func:`jaxeff.sparse.calibrate_cats_threshold`; pass the gate and up projections
transposed, ``[H, D]``, to avoid a per-call transpose).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxeff.ops import _registry
from jaxeff.sparse.formats import (BlockSparse, EllSparse, NMSparse, TiledSparse, bsr_dense,
                                   decompress, is_sparse)
from kernels_pallas.sparse import triton as _triton

FLOAT_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
BREAK_EVEN_SPARSITY = 0.5
SKINNY_MAX_M = 64  # tiled / N:M kernels are split-K GEMV-like kernels
ELL_MAX_M = 16  # the sliced-ELL kernel unrolls over the rows of x
NM_WORDS_FMA_MAX_M = 2  # 2:4 words: the x-gathering FMA kernel up to here, then tensor cores
CATS_MAX_M = 8  # the CATS kernels unroll over the rows of x
_BLOCK_N = (128, 64, 32, 16)


# ---------------------------------------------------------------------------- reference


def sparse_matmul_reference(x2: jax.Array, w: Any, *, out_dtype) -> jax.Array:
  """``x2 [M, K] @ decompress(w) -> [M, N]`` in float32 math (exact decompression)."""
  wd = w if not is_sparse(w) else (bsr_dense(w.blocks, w) if isinstance(w, BlockSparse)
                                   else decompress(w))
  return jnp.dot(x2.astype(jnp.float32), wd.astype(jnp.float32),
                 precision=jax.lax.Precision.HIGHEST).astype(out_dtype)


# ------------------------------------------------------------------------------ kernels


def _pad_to(a: jax.Array, shape: Sequence[int]) -> jax.Array:
  pads = [(0, t - s) for s, t in zip(a.shape, shape)]
  return jnp.pad(a, pads) if any(p for _, p in pads) else a


def _round_up(v: int, mult: int) -> int:
  return v + (-v % mult)


def _tiled_fn(x2, w: TiledSparse, *, out_dtype, min_sparsity, interpret):
  del min_sparsity
  m = x2.shape[0]
  kp, np_ = w.padded_shape
  tk, tn = w.tile
  cfg = _triton.tiled_default_config(m, np_, kp // tk, tn)
  xp = _pad_to(x2, (_round_up(m, cfg.block_m), kp))
  out = _triton.tiled_sparse_matmul(xp, w.values, w.bitmap, w.col_ptr, tile=w.tile,
                                    m_real=m, config=cfg, interpret=interpret)
  return out[:, :w.shape[1]].astype(out_dtype)


def _ell_fn(x2, w: EllSparse, *, out_dtype, min_sparsity, interpret):
  del min_sparsity
  out = _triton.ell_sparse_matmul(x2, w.data, w.base, w.block_ptr,
                                  chunks_per_block=w.data.shape[0] // w.num_blocks,
                                  interpret=interpret)
  return jnp.take(out, w.inv_perm, axis=1).astype(out_dtype)


def _nm_fn(x2, w: NMSparse, *, out_dtype, min_sparsity, interpret):
  del min_sparsity
  if w.words:
    m, k = x2.shape
    n = w.shape[1]
    bn = next((b for b in (128, 64, 32) if n % b == 0), None)
    kp = 32 * w.values.shape[0]
    np_ = _round_up(n, bn or 128)
    values = _pad_to(w.values, (kp // 32, 8, np_))
    meta = _pad_to(w.meta, (kp // 32, np_))
    if m <= NM_WORDS_FMA_MAX_M:  # gather x, FMA
      out = _triton.nm_words_matmul(_pad_to(x2, (m, kp)), values, meta, block_n=bn or 128,
                                    interpret=interpret)
    else:  # tensor cores
      xp = _pad_to(x2, (_round_up(m, _triton.MIN_DOT), kp))
      out = _triton.nm_words_dot_matmul(xp, values, meta, m_real=m, tile_n=bn or 128,
                                        num_stages=3 if xp.shape[0] <= 16 else 2,
                                        interpret=interpret)
    return out[:, :n].astype(out_dtype)
  m, k = x2.shape
  n = w.shape[1]
  g = k // w.m
  gs = w.values.shape[1]  # stored groups (>= g when packed)
  per_step = 2 * w.meta_block if w.meta_block else _triton.nm_block_sizes(w.m)[0]
  bn = next((b for b in _BLOCK_N if n % b == 0), 16)
  cfg = _triton.default_config(m, _round_up(n, bn), _round_up(gs, per_step) // per_step, bn)
  gp, np_, mp = _round_up(gs, per_step * cfg.split_k), _round_up(n, bn), _round_up(m, cfg.block_m)
  planes = x2.reshape(m, g, w.m).transpose(2, 0, 1)  # planes[j] = x[:, j::m]
  planes = _pad_to(planes, (w.m, mp, gp))
  values = _pad_to(w.values, (w.n, gp, np_))
  meta = _pad_to(w.meta, (gp // 2 if w.meta_block else gp, np_))
  out = _triton.nm_sparse_matmul(planes, values, meta, n=w.n, m=w.m, meta_block=w.meta_block,
                                 m_real=m, config=cfg, block_n=bn, interpret=interpret)
  return out[:, :n].astype(out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _bsr_product(x2, blocks, index, shape, block, interpret):
  rows, counts, _, _, _ = index
  return _triton.bsr_matmul(x2, blocks, rows, counts, interpret=interpret)


def _bsr_product_fwd(x2, blocks, index, shape, block, interpret):
  return _bsr_product(x2, blocks, index, shape, block, interpret), (x2, blocks, index)


def _bsr_product_bwd(shape, block, interpret, res, dy):
  x2, blocks, index = res
  rows, counts, t_cols, t_slots, t_counts = index
  dy = dy.astype(x2.dtype)
  dx = _triton.bsr_matmul_t(dy, blocks, t_cols, t_slots, t_counts, k=shape[0],
                            out_dtype=x2.dtype, interpret=interpret)
  db = _triton.bsr_weight_grad(x2, dy, rows, counts, block=block, out_dtype=blocks.dtype,
                               interpret=interpret)
  return dx, db, None


_bsr_product.defvjp(_bsr_product_fwd, _bsr_product_bwd)


def _bsr_fn(x2, w: BlockSparse, *, out_dtype, min_sparsity, interpret):
  del min_sparsity
  m = x2.shape[0]
  bm = _triton.BsrConfig().block_m
  xp = _pad_to(x2, (_round_up(m, bm), w.shape[0]))
  index = (w.block_rows, w.counts, w.t_cols, w.t_slots, w.t_counts)
  out = _bsr_product(xp, w.blocks.astype(x2.dtype), index, w.shape, w.block, interpret)
  return out[:m].astype(out_dtype)


def _triton_fn(x2, w, *, out_dtype, min_sparsity, interpret):
  fn = {TiledSparse: _tiled_fn, EllSparse: _ell_fn, NMSparse: _nm_fn,
        BlockSparse: _bsr_fn}[type(w)]
  return fn(x2, w, out_dtype=out_dtype, min_sparsity=min_sparsity, interpret=interpret)


def _triton_supports(x2, w, *, out_dtype, min_sparsity):
  del out_dtype
  if not is_sparse(w):
    return "a dense w is multiplied densely (xla)"
  if isinstance(w, EllSparse) and x2.shape[0] > ELL_MAX_M:
    return (f"m={x2.shape[0]} > {ELL_MAX_M}: the sliced-ELL kernel gathers x once a row "
            "(decode); use the tiled format for wider x")
  if isinstance(w, (TiledSparse, EllSparse, NMSparse)):
    if x2.shape[0] > SKINNY_MAX_M:
      return (f"m={x2.shape[0]} > {SKINNY_MAX_M}: the tiled / N:M kernels are skinny "
              "(decode) kernels; the dense product is faster for wide x")
    if w.sparsity < min_sparsity:
      return (f"sparsity {w.sparsity:.3f} < min_sparsity {min_sparsity}: below the "
              "break-even the dense product is faster")
  return None


def _xla_fn(x2, w, *, out_dtype, min_sparsity):
  del min_sparsity
  if not is_sparse(w):
    return jnp.dot(x2, w.astype(x2.dtype), preferred_element_type=jnp.float32).astype(out_dtype)
  return sparse_matmul_reference(x2, w, out_dtype=out_dtype)


SPARSE_MATMUL_IMPLS: list[_registry.Implementation] = [
    _registry.Implementation("triton", _triton_fn, platforms=("gpu",),
                             supports=_triton_supports, interpretable=True),
    _registry.Implementation("xla", _xla_fn),
]


def _weight_shape(w: Any, where: str) -> tuple[int, int]:
  if is_sparse(w):
    return w.shape
  if hasattr(w, "shape") and hasattr(w, "dtype") and len(w.shape) == 2:
    if not jnp.issubdtype(w.dtype, jnp.floating):
      raise TypeError(f"{where}: a dense w must be float, got {w.dtype}")
    return tuple(w.shape)
  raise TypeError(f"{where}: w must be a TiledSparse, NMSparse, BlockSparse or a dense "
                  f"2-D array [K, N], got {type(w).__name__}"
                  + (f" of shape {tuple(w.shape)}" if hasattr(w, "shape") else ""))


def _check_x(x, k: int, where: str, dims: str = "[..., K]"):
  if not hasattr(x, "dtype") or not hasattr(x, "shape") or x.ndim < 1:
    raise TypeError(f"{where}: x must be an array {dims}, got {type(x).__name__}")
  if x.dtype not in FLOAT_DTYPES:
    raise TypeError(f"{where}: x.dtype must be bfloat16, float16 or float32, got {x.dtype}")
  if x.shape[-1] != k:
    raise ValueError(f"{where}: x.shape[-1] = {x.shape[-1]} must equal K = {k}")


def sparse_matmul(x: jax.Array, w_sparse: Any, *, out_dtype=None,
                  min_sparsity: float = BREAK_EVEN_SPARSITY,
                  implementation: str | Sequence[str] | None = None) -> jax.Array:
  """``x @ w`` for a sparse (or dense) weight ``w: [K, N]``.

  Args:
    x: ``[..., K]`` bfloat16 / float16 / float32.
    w_sparse: :class:`~jaxeff.sparse.TiledSparse`, :class:`~jaxeff.sparse.NMSparse`,
      :class:`~jaxeff.sparse.BlockSparse` or a dense float ``[K, N]`` array.
    out_dtype: default ``x.dtype``.
    min_sparsity: below this sparsity a :class:`TiledSparse` weight is not given to the
      kernel (module docstring); in ``[0, 1]``.
    implementation: None, ``"triton"`` (``":interpret"``), ``"xla"`` or a sequence.

  Returns:
    ``[..., N]`` in ``out_dtype``. Differentiable in ``x`` (all formats) and in a
    :class:`BlockSparse` weight's ``blocks``.
  """
  k, n = _weight_shape(w_sparse, "sparse_matmul")
  _check_x(x, k, "sparse_matmul")
  if not 0.0 <= min_sparsity <= 1.0:
    raise ValueError(f"sparse_matmul: min_sparsity must be in [0, 1], got {min_sparsity}")
  out_dtype = jnp.dtype(out_dtype or x.dtype)
  if out_dtype not in FLOAT_DTYPES:
    raise TypeError(f"sparse_matmul: out_dtype must be bfloat16, float16 or float32, got "
                    f"{out_dtype}")
  x2 = x.reshape(-1, k)
  out = _registry.dispatch("sparse_matmul", SPARSE_MATMUL_IMPLS, implementation, x2, w_sparse,
                           out_dtype=out_dtype, min_sparsity=float(min_sparsity))
  return out.reshape(x.shape[:-1] + (n,))


# ------------------------------------------------------------------------------- CATS


def cats_activation(gate: jax.Array, threshold) -> jax.Array:
  """``silu(gate)`` with entries of magnitude ``<= threshold`` set to zero."""
  a = jax.nn.silu(gate.astype(jnp.float32))
  return jnp.where(jnp.abs(a) > threshold, a, 0.0)


def cats_mlp_reference(x2, w_gate, w_up, w_down, *, threshold, up_transposed, out_dtype,
                       gate_transposed: bool = False):
  """The thresholded SwiGLU in float32: ``(cats(x wg) * (x wu)) @ wd``."""
  hp = jax.lax.Precision.HIGHEST
  xf = x2.astype(jnp.float32)
  gate = w_gate.astype(jnp.float32)
  a = cats_activation(jnp.dot(xf, gate.T if gate_transposed else gate, precision=hp),
                      threshold)
  up = w_up.astype(jnp.float32)
  u = jnp.dot(xf, up.T if up_transposed else up, precision=hp)
  return jnp.dot(a * u, w_down.astype(jnp.float32), precision=hp).astype(out_dtype)


def _cats_triton(x2, w_gate, w_up, w_down, *, threshold, up_transposed, gate_transposed,
                 out_dtype, interpret):
  gate_t = w_gate if gate_transposed else w_gate.T
  up_t = w_up if up_transposed else w_up.T
  t = jnp.reshape(jnp.asarray(threshold, jnp.float32), (1,))
  out, _ = _triton.cats_mlp(x2, gate_t, up_t, w_down.astype(gate_t.dtype), t,
                            interpret=interpret)
  return out.astype(out_dtype)


def _cats_supports(x2, w_gate, w_up, w_down, *, threshold, up_transposed, gate_transposed,
                   out_dtype):
  del w_up, w_down, threshold, up_transposed, out_dtype
  m, d = x2.shape
  h = w_gate.shape[0 if gate_transposed else 1]
  if m > CATS_MAX_M:
    return (f"m={m} > {CATS_MAX_M}: CATS pays at decode only (the rows of x share few "
            "inactive neurons)")
  cfg = _triton.cats_default_config(m, d, h)
  hb = cfg.down_block_h * cfg.down_split
  if d % cfg.block_d or d % cfg.down_block_d or h % cfg.block_h or h % hb:
    return (f"the kernel needs D % {max(cfg.block_d, cfg.down_block_d)} == 0 and H % "
            f"{max(cfg.block_h, hb)} == 0, got D={d}, H={h}")
  return None


def _cats_xla(x2, w_gate, w_up, w_down, *, threshold, up_transposed, gate_transposed,
              out_dtype):
  return cats_mlp_reference(x2, w_gate, w_up, w_down, threshold=threshold,
                            up_transposed=up_transposed, gate_transposed=gate_transposed,
                            out_dtype=out_dtype)


CATS_MLP_IMPLS: list[_registry.Implementation] = [
    _registry.Implementation("triton", _cats_triton, platforms=("gpu",),
                             supports=_cats_supports, interpretable=True),
    _registry.Implementation("xla", _cats_xla),
]


def cats_mlp(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array, *,
             threshold, up_transposed: bool = False, gate_transposed: bool = False,
             out_dtype=None, implementation: str | Sequence[str] | None = None) -> jax.Array:
  """SwiGLU MLP with CATS activation sparsity (module docstring).

  Args:
    x: ``[..., D]``.
    w_gate: ``[D, H]`` (``[H, D]`` when ``gate_transposed``); w_up: ``[D, H]`` (``[H, D]``
      when ``up_transposed``); w_down: ``[H, D]``. The kernel reads ``[H, D]`` rows: pass
      the gate and up projections transposed (once, offline) to avoid a per-call
      transpose.
    threshold: scalar ``>= 0`` (float or 0-d array).
    implementation: None, ``"triton"`` (``":interpret"``), ``"xla"``.

  Returns:
    ``[..., D]`` in ``out_dtype`` (default ``x.dtype``).
  """
  for name, w in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
    if not hasattr(w, "shape") or len(w.shape) != 2:
      raise ValueError(f"cats_mlp: {name} must be 2-D, got "
                       f"{getattr(w, 'shape', type(w).__name__)}")
  d, h = w_gate.shape[::-1] if gate_transposed else w_gate.shape
  _check_x(x, d, "cats_mlp", "[..., D]")
  up_shape = (h, d) if up_transposed else (d, h)
  if tuple(w_up.shape) != up_shape or tuple(w_down.shape) != (h, d):
    raise ValueError(f"cats_mlp: with w_gate {tuple(w_gate.shape)} expected w_up "
                     f"{up_shape} and w_down {(h, d)}, got {tuple(w_up.shape)} and "
                     f"{tuple(w_down.shape)}")
  if isinstance(threshold, (int, float)) and threshold < 0:
    raise ValueError(f"cats_mlp: threshold must be >= 0, got {threshold}")
  out_dtype = jnp.dtype(out_dtype or x.dtype)
  x2 = x.reshape(-1, d)
  out = _registry.dispatch("cats_mlp", CATS_MLP_IMPLS, implementation, x2, w_gate, w_up,
                           w_down, threshold=threshold, up_transposed=up_transposed,
                           gate_transposed=gate_transposed, out_dtype=out_dtype)
  return out.reshape(x.shape[:-1] + (d,))


__all__ = ["BREAK_EVEN_SPARSITY", "cats_activation", "cats_mlp", "cats_mlp_reference",
           "sparse_matmul", "sparse_matmul_reference"]
