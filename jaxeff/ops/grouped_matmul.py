"""Grouped (ragged) matmul, the mixture-of-experts expert product, with both gradients.

``grouped_matmul(lhs, rhs, group_sizes)`` has the semantics of :func:`jax.lax.ragged_dot`:
the rows of ``lhs: [m, k]`` are cut into consecutive groups of ``group_sizes[g]`` rows and
group ``g`` is multiplied by ``rhs[g]: [k, n]`` (``rhs[g]^T`` for ``rhs: [groups, n, k]``
with ``transpose_rhs=True``); rows past ``sum(group_sizes)`` are zero. It is the
"grouped GEMM" of MegaBlocks (Gale et al. 2023, "dropless MoE"), applied to tokens sorted
by expert.

The ``custom_vjp`` uses two products of the same family (MegaBlocks' gmm / tgmm):

* ``dlhs = grouped_matmul(dout, rhs, group_sizes, transpose_rhs=not transpose_rhs)``;
* ``drhs[g] = lhs_g^T @ dout_g`` (``dout_g^T @ lhs_g`` when ``transpose_rhs``), the
  "transposed grouped matmul" whose contraction runs over each group's rows.

Implementations (``implementation=``), fastest first:

* ``"mosaic_gpu"``: :mod:`kernels_pallas.moe.mosaic_gpu` (Hopper: TMA + wgmma, a persistent
  grid over (row tile, group) work items, masked stores for tiles straddling groups).
* ``"triton"``: :mod:`kernels_pallas.moe.triton` (Pallas-Triton, any CUDA GPU).
* ``"xla"``: :func:`jax.lax.ragged_dot` (and its autodiff) with float32 accumulation.

Kernels take 16-bit operands of one dtype (bfloat16 / float16); other calls fall back to
``"xla"``. Shapes that are not whole tiles are zero-padded here. A quantized ``rhs`` (a
``jaxeff.quant.QArray`` of logical shape ``[groups, k, n]``) is dequantized to
``lhs.dtype`` first (the fused dequantizing kernel is not written yet) and gets no
gradient.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxeff.ops import _registry
from kernels_pallas.moe import common as _common
from kernels_pallas.moe import mosaic_gpu as _mosaic_gpu
from kernels_pallas.moe import triton as _triton

KERNEL_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
OUT_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
_BACKENDS = {"mosaic_gpu": _mosaic_gpu, "triton": _triton}


# ---------------------------------------------------------------------------- reference


def grouped_matmul_reference(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *,
                             transpose_rhs: bool = False, preferred_element_type=None
                             ) -> jax.Array:
  """Per-group oracle: ``out = sum_g mask_g * (lhs @ rhs[g])`` in float32 (tests only).

  ``lhs: [m, k]``, ``rhs: [groups, k, n]`` (``[groups, n, k]`` if ``transpose_rhs``),
  ``group_sizes: [groups]`` -> ``[m, n]``. Costs ``groups`` full products.
  """
  if transpose_rhs:
    rhs = jnp.swapaxes(rhs, 1, 2)
  ends = jnp.cumsum(group_sizes)
  starts = ends - group_sizes
  row = jnp.arange(lhs.shape[0])
  out = jnp.zeros((lhs.shape[0], rhs.shape[2]), jnp.float32)
  for g in range(rhs.shape[0]):
    mask = (row >= starts[g]) & (row < ends[g])
    prod = jnp.dot(lhs.astype(jnp.float32), rhs[g].astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST)
    out = out + jnp.where(mask[:, None], prod, 0.0)
  return out.astype(preferred_element_type or jnp.result_type(lhs.dtype, rhs.dtype))


def _xla_fn(lhs, rhs, group_sizes, *, transpose_rhs, out_dtype):
  if transpose_rhs:
    rhs = jnp.swapaxes(rhs, 1, 2)
  out = jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=jnp.float32)
  return out.astype(out_dtype)


# ------------------------------------------------------------------------------ kernels


def _forward(backend: str, lhs, rhs, group_sizes, transpose_rhs, out_dtype, interpret):
  """The forward product through ``backend``'s kernel, padding to whole tiles."""
  mod = _BACKENDS[backend]
  m, k = lhs.shape
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  if backend == "mosaic_gpu":
    cfg = mod.default_config(m, k, n, rhs.shape[0], interpret=interpret)
  else:
    cfg = mod.default_config(m, k, n, interpret=interpret)
  k_axis, n_axis = (2, 1) if transpose_rhs else (1, 2)
  lhs_p = _common.pad_axis(_common.pad_axis(lhs, 0, cfg.block_m), 1, cfg.block_k)
  rhs_p = _common.pad_axis(_common.pad_axis(rhs, k_axis, cfg.block_k), n_axis, cfg.block_n)
  out = mod.grouped_matmul(lhs_p, rhs_p, group_sizes, m=m, transpose_rhs=transpose_rhs,
                           out_dtype=out_dtype, config=cfg, interpret=interpret)
  return out[:m, :n]


def _transposed(backend: str, lhs, dout, group_sizes, out_dtype, interpret):
  """``[groups, k, n]``: ``lhs_g^T @ dout_g`` through ``backend``'s tgmm kernel."""
  mod = _BACKENDS[backend]
  m, k = lhs.shape
  n = dout.shape[1]
  if backend == "mosaic_gpu":
    cfg = mod.default_config(m, k, n, group_sizes.shape[0], interpret=interpret)
  else:
    cfg = mod.default_config(m, k, n, interpret=interpret)
  lhs_p = _common.pad_axis(_common.pad_axis(lhs, 0, cfg.block_m), 1, cfg.block_k)
  dout_p = _common.pad_axis(_common.pad_axis(dout, 0, cfg.block_m), 1, cfg.block_n)
  out = mod.transposed_grouped_matmul(lhs_p, dout_p, group_sizes, out_dtype=out_dtype,
                                      config=cfg, interpret=interpret)
  return out[:, :k, :n]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _kernel_gmm(lhs, rhs, group_sizes, backend, transpose_rhs, out_dtype, interpret):
  return _forward(backend, lhs, rhs, group_sizes, transpose_rhs, out_dtype, interpret)


def _kernel_gmm_fwd(lhs, rhs, group_sizes, backend, transpose_rhs, out_dtype, interpret):
  out = _forward(backend, lhs, rhs, group_sizes, transpose_rhs, out_dtype, interpret)
  return out, (lhs, rhs, group_sizes)


def _kernel_gmm_bwd(backend, transpose_rhs, out_dtype, interpret, res, dout):
  del out_dtype
  lhs, rhs, group_sizes = res
  dout = dout.astype(lhs.dtype)
  dlhs = _forward(backend, dout, rhs, group_sizes, not transpose_rhs, lhs.dtype, interpret)
  if transpose_rhs:  # rhs [groups, n, k]: drhs[g] = dout_g^T @ lhs_g
    drhs = _transposed(backend, dout, lhs, group_sizes, rhs.dtype, interpret)
  else:
    drhs = _transposed(backend, lhs, dout, group_sizes, rhs.dtype, interpret)
  return dlhs, drhs, np.zeros(group_sizes.shape, jax.dtypes.float0)


_kernel_gmm.defvjp(_kernel_gmm_fwd, _kernel_gmm_bwd)


def _kernel_supports(lhs, rhs, group_sizes, *, transpose_rhs, out_dtype):
  del group_sizes, transpose_rhs
  if lhs.dtype not in KERNEL_DTYPES or rhs.dtype != lhs.dtype:
    return (f"kernels take bfloat16 / float16 operands of one dtype, got lhs {lhs.dtype} and "
            f"rhs {rhs.dtype}")
  if jnp.dtype(out_dtype) not in OUT_DTYPES:
    return f"output dtype {out_dtype} is not one of {[str(d) for d in OUT_DTYPES]}"
  return None


def _kernel_fn(backend):
  def fn(lhs, rhs, group_sizes, *, transpose_rhs, out_dtype, interpret):
    return _kernel_gmm(lhs, rhs, group_sizes.astype(jnp.int32), backend, transpose_rhs,
                       jnp.dtype(out_dtype), interpret)
  return fn


GROUPED_MATMUL_IMPLS: list[_registry.Implementation] = [
    _registry.Implementation("mosaic_gpu", _kernel_fn("mosaic_gpu"), platforms=("gpu",),
                             supports=_kernel_supports, interpretable=True,
                             device_kinds=_registry.HOPPER_KINDS),
    _registry.Implementation("triton", _kernel_fn("triton"), platforms=("gpu",),
                             supports=_kernel_supports, interpretable=True),
    _registry.Implementation("xla", _xla_fn),
]


# ---------------------------------------------------------------------------- public op


def _is_qarray(x) -> bool:
  return all(hasattr(x, a) for a in ("values", "scales", "fmt", "shape", "dequantize"))


def _concrete(x) -> np.ndarray | None:
  if isinstance(x, jax.core.Tracer):
    return None
  try:
    return np.asarray(x)
  except Exception:  # an abstract value
    return None


def _validate(lhs, rhs, group_sizes, transpose_rhs):
  name = "grouped_matmul"
  if not hasattr(lhs, "ndim") or lhs.ndim != 2:
    raise ValueError(f"{name}: lhs must be 2-D [m, k], got shape {getattr(lhs, 'shape', None)}")
  if not jnp.issubdtype(lhs.dtype, jnp.floating):
    raise TypeError(f"{name}: lhs must be floating point, got {lhs.dtype}")
  if len(rhs.shape) != 3:
    raise ValueError(f"{name}: rhs must be 3-D [groups, k, n] ([groups, n, k] with "
                     f"transpose_rhs=True), got shape {tuple(rhs.shape)}")
  if not hasattr(group_sizes, "ndim") or group_sizes.ndim != 1 or not jnp.issubdtype(
      group_sizes.dtype, jnp.integer):
    raise TypeError(f"{name}: group_sizes must be an integer array [groups], got "
                    f"{getattr(group_sizes, 'dtype', type(group_sizes).__name__)} "
                    f"{getattr(group_sizes, 'shape', '')}")
  groups = rhs.shape[0]
  if group_sizes.shape[0] != groups:
    raise ValueError(f"{name}: group_sizes has {group_sizes.shape[0]} groups but rhs has "
                     f"{groups} (rhs.shape {tuple(rhs.shape)})")
  k_rhs = rhs.shape[2] if transpose_rhs else rhs.shape[1]
  if k_rhs != lhs.shape[1]:
    raise ValueError(f"{name}: lhs.shape {tuple(lhs.shape)} contracts k={lhs.shape[1]} but rhs "
                     f"{tuple(rhs.shape)} (transpose_rhs={transpose_rhs}) has k={k_rhs}")
  sizes = _concrete(group_sizes)
  if sizes is not None:
    if (sizes < 0).any():
      raise ValueError(f"{name}: group_sizes must be non-negative, got {sizes.tolist()}")
    if int(sizes.sum()) != lhs.shape[0]:
      raise ValueError(f"{name}: group_sizes sum to {int(sizes.sum())} but lhs has "
                       f"m={lhs.shape[0]} rows; they must be equal")


def grouped_matmul(lhs: jax.Array, rhs: Any, group_sizes: jax.Array, *,
                   transpose_rhs: bool = False, preferred_element_type=None,
                   implementation: str | Sequence[str] | None = None) -> jax.Array:
  """Grouped matmul: ``out[rows of group g] = lhs[rows of group g] @ rhs[g]``.

  Args:
    lhs: ``[m, k]`` (tokens sorted by group / expert).
    rhs: ``[groups, k, n]``, or ``[groups, n, k]`` with ``transpose_rhs=True``; or a
      ``jaxeff.quant.QArray`` of that logical shape (dequantized to ``lhs.dtype``).
    group_sizes: int ``[groups]``, non-negative, summing to ``m`` (checked when concrete;
      under ``jit`` rows past the sum come out zero, as with ``lax.ragged_dot``).
    transpose_rhs: ``rhs`` is laid out ``[groups, n, k]``.
    preferred_element_type: output dtype (default: ``lhs``/``rhs`` promoted); accumulation
      is float32 in every implementation.
    implementation: ``None``, ``"mosaic_gpu"``, ``"triton"``, ``"xla"`` (a ``":interpret"``
      suffix runs a kernel in Pallas interpret mode) or a sequence tried in order.

  Returns:
    ``[m, n]`` in ``preferred_element_type``.
  """
  if _is_qarray(rhs):
    _validate(lhs, rhs, group_sizes, transpose_rhs)
    rhs = jax.lax.stop_gradient(rhs.dequantize(lhs.dtype))
  _validate(lhs, rhs, group_sizes, transpose_rhs)
  out_dtype = jnp.dtype(preferred_element_type or jnp.result_type(lhs.dtype, rhs.dtype))
  return _registry.dispatch("grouped_matmul", GROUPED_MATMUL_IMPLS, implementation, lhs, rhs,
                            group_sizes, transpose_rhs=transpose_rhs, out_dtype=out_dtype)


def transposed_grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *,
                              preferred_element_type=None,
                              implementation: str | None = None) -> jax.Array:
  """The weight-gradient product: ``out[g] = lhs[rows of g]^T @ rhs[rows of g]``.

  Args:
    lhs: ``[m, k]``; rhs: ``[m, n]``; group_sizes: int ``[groups]``.
    implementation: ``"mosaic_gpu"``, ``"triton"`` (``":interpret"`` allowed) or ``None`` /
      ``"xla"`` (the transpose of ``lax.ragged_dot``).

  Returns:
    ``[groups, k, n]`` (zeros for empty groups).
  """
  out_dtype = jnp.dtype(preferred_element_type or jnp.result_type(lhs.dtype, rhs.dtype))
  if implementation in (None, "xla"):
    groups = group_sizes.shape[0]
    zeros = jnp.zeros((groups, lhs.shape[1], rhs.shape[1]), jnp.float32)
    _, vjp = jax.vjp(lambda w: jax.lax.ragged_dot(lhs.astype(jnp.float32), w, group_sizes),
                     zeros)
    return vjp(rhs.astype(jnp.float32))[0].astype(out_dtype)
  backend, _, suffix = implementation.partition(":")
  if backend not in _BACKENDS or suffix not in ("", "interpret"):
    raise ValueError(f"transposed_grouped_matmul: unknown implementation {implementation!r}")
  return _transposed(backend, lhs, rhs, group_sizes.astype(jnp.int32), out_dtype,
                     suffix == "interpret")


__all__ = ["grouped_matmul", "grouped_matmul_reference", "transposed_grouped_matmul"]
