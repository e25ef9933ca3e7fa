"""Fused RMSNorm and LayerNorm (forward and backward).

RMSNorm (Zhang & Sennrich, 2019): ``y = x / sqrt(mean(x**2) + eps) * weight``.
LayerNorm (Ba et al., 2016): ``y = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias``.
Both normalise over the last axis with float32 statistics and return ``x.dtype``.

Implementations (``implementation=``), fastest first:

* ``"mosaic_gpu"``: Pallas Mosaic GPU kernels for Hopper (TMA ring, persistent grid;
  :mod:`kernels_pallas.normalization.mosaic_gpu`); ``features % 128 == 0``.
* ``"triton"``: Pallas kernels lowered through Triton, any CUDA GPU
  (:mod:`kernels_pallas.normalization.triton`); ``features <= 16384``.
* ``"xla"``: the pure-jnp reference below, differentiated by JAX.

Kernel implementations run under a ``jax.custom_vjp``: the forward saves ``rstd`` (and
``mean`` for LayerNorm) as ``[rows]`` float32 besides ``x``, the backward kernel writes
``dx`` and per-program ``[num_programs, features]`` float32 partial sums of
``dweight`` / ``dbias`` that one small sum reduces. A kernel serves a call only when both
its forward and backward kernels support the shape (``supports`` gives the reason
otherwise), so a named kernel is a kernel in both directions.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from types import ModuleType

import jax
import jax.numpy as jnp

from jaxeff.ops import _registry
from kernels_pallas.normalization import mosaic_gpu as _mosaic_gpu
from kernels_pallas.normalization import triton as _triton

_FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _validate(op: str, x, weight, bias, eps) -> None:
  if not hasattr(x, "shape") or x.ndim < 1:
    raise ValueError(f"{op}: x must be an array with at least one axis [..., features], "
                     f"got {getattr(x, 'shape', type(x))}")
  if x.dtype not in [jnp.dtype(d) for d in _FLOAT_DTYPES]:
    raise TypeError(f"{op}: x.dtype must be float32, bfloat16 or float16, got {x.dtype}")
  d = x.shape[-1]
  for name, p in (("weight", weight), ("bias", bias)):
    if p is None:
      continue
    if p.shape != (d,):
      raise ValueError(f"{op}: {name} must have shape [features] = ({d},) to match "
                       f"x.shape {x.shape}, got {p.shape}")
    if not jnp.issubdtype(p.dtype, jnp.floating):
      raise TypeError(f"{op}: {name}.dtype must be floating, got {p.dtype}")
  if not isinstance(eps, (int, float)) or not eps > 0:
    raise ValueError(f"{op}: eps must be a positive Python number, got {eps!r}")


def rms_norm_reference(x: jax.Array, weight: jax.Array | None, *, eps: float) -> jax.Array:
  """Pure-jnp RMSNorm: x [..., d], weight [d] -> [..., d] in x.dtype."""
  xf = x.astype(jnp.float32)
  y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  if weight is not None:
    y = y * weight.astype(jnp.float32)
  return y.astype(x.dtype)


def layer_norm_reference(x: jax.Array, weight: jax.Array | None, bias: jax.Array | None, *,
                         eps: float) -> jax.Array:
  """Pure-jnp LayerNorm: x [..., d], weight/bias [d] -> [..., d] in x.dtype."""
  xf = x.astype(jnp.float32)
  mean = jnp.mean(xf, axis=-1, keepdims=True)
  xc = xf - mean
  y = xc * jax.lax.rsqrt(jnp.mean(xc * xc, axis=-1, keepdims=True) + eps)
  if weight is not None:
    y = y * weight.astype(jnp.float32)
  if bias is not None:
    y = y + bias.astype(jnp.float32)
  return y.astype(x.dtype)


_KERNEL_BACKENDS: dict[str, ModuleType] = {"mosaic_gpu": _mosaic_gpu, "triton": _triton}


@dataclasses.dataclass(frozen=True)
class _KernelCall:
  """Static part of a kernel call (the ``custom_vjp``'s non-differentiable argument)."""

  backend: str
  eps: float
  subtract_mean: bool
  interpret: bool


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _fused_norm(x: jax.Array, weight: jax.Array | None, bias: jax.Array | None,
                call: _KernelCall) -> jax.Array:
  """Kernel norm of ``x: [rows, features]``; see :func:`_fused_norm_fwd`."""
  return _fused_norm_fwd(x, weight, bias, call)[0]


def _fused_norm_fwd(x, weight, bias, call: _KernelCall):
  y, mean, rstd = _registry.lower_once(
      _KERNEL_BACKENDS[call.backend].norm_forward, x, weight, bias, eps=call.eps,
      subtract_mean=call.subtract_mean, interpret=call.interpret)
  return y, (x, weight, bias, mean, rstd)


def _fused_norm_bwd(call: _KernelCall, residuals, dy):
  x, weight, bias, mean, rstd = residuals
  dx, dw_partial, db_partial = _registry.lower_once(
      _KERNEL_BACKENDS[call.backend].norm_backward, dy, x, weight, mean, rstd,
      has_bias=bias is not None, interpret=call.interpret)
  dw = None if weight is None else jnp.sum(dw_partial, axis=0).astype(weight.dtype)
  db = None if bias is None else jnp.sum(db_partial, axis=0).astype(bias.dtype)
  return dx, dw, db


_fused_norm.defvjp(_fused_norm_fwd, _fused_norm_bwd)


def _kernel_norm(backend: str, subtract_mean: bool):
  """Registry ``fn`` of a kernel backend: flattens ``[..., features]`` to rows."""

  def fn(x, weight, bias=None, *, eps, interpret):
    call = _KernelCall(backend, float(eps), subtract_mean, bool(interpret))
    y = _fused_norm(x.reshape(-1, x.shape[-1]), weight, bias, call)
    return y.reshape(x.shape)

  return fn


def _kernel_supports(backend: str):
  """Registry ``supports`` of a kernel backend: both directions must serve the shape."""
  module = _KERNEL_BACKENDS[backend]

  def supports(x, weight, bias=None, *, eps):
    del eps
    rows, features = math.prod(x.shape[:-1]), x.shape[-1]
    weight_dtype = None if weight is None else weight.dtype
    return (module.forward_unsupported(rows, features, x.dtype, weight_dtype=weight_dtype,
                                       bias_dtype=None if bias is None else bias.dtype)
            or module.backward_unsupported(rows, features, x.dtype, weight_dtype=weight_dtype,
                                           has_bias=bias is not None))

  return supports


def _rms_kernel(backend: str):
  fn = _kernel_norm(backend, subtract_mean=False)
  return lambda x, weight, *, eps, interpret: fn(x, weight, None, eps=eps, interpret=interpret)


RMS_NORM_IMPLS: list[_registry.Implementation] = [
    _registry.Implementation(
        "mosaic_gpu", _rms_kernel("mosaic_gpu"), platforms=("gpu",),
        supports=_kernel_supports("mosaic_gpu"), interpretable=True,
        device_kinds=_registry.HOPPER_KINDS),
    _registry.Implementation(
        "triton", _rms_kernel("triton"), platforms=("gpu",),
        supports=_kernel_supports("triton"), interpretable=True),
    _registry.Implementation("xla", lambda x, weight, *, eps: rms_norm_reference(x, weight, eps=eps)),
]
LAYER_NORM_IMPLS: list[_registry.Implementation] = [
    _registry.Implementation(
        "mosaic_gpu", _kernel_norm("mosaic_gpu", subtract_mean=True), platforms=("gpu",),
        supports=_kernel_supports("mosaic_gpu"), interpretable=True,
        device_kinds=_registry.HOPPER_KINDS),
    _registry.Implementation(
        "triton", _kernel_norm("triton", subtract_mean=True), platforms=("gpu",),
        supports=_kernel_supports("triton"), interpretable=True),
    _registry.Implementation(
        "xla", lambda x, weight, bias, *, eps: layer_norm_reference(x, weight, bias, eps=eps)),
]


def rms_norm(x: jax.Array, weight: jax.Array | None = None, *, eps: float = 1e-6,
             implementation: str | Sequence[str] | None = None) -> jax.Array:
  """RMSNorm over the last axis.

  Args:
    x: ``[..., features]`` float32/bfloat16/float16.
    weight: ``[features]`` scale, or None.
    eps: added to the mean square before the reciprocal square root.
    implementation: None (fastest available), a name, or a sequence of names
      (see :mod:`jaxeff.ops._registry`).

  Returns:
    ``[..., features]`` in ``x.dtype``.
  """
  _validate("rms_norm", x, weight, None, eps)
  return _registry.dispatch("rms_norm", RMS_NORM_IMPLS, implementation, x, weight, eps=float(eps))


def layer_norm(x: jax.Array, weight: jax.Array | None = None, bias: jax.Array | None = None, *,
               eps: float = 1e-5,
               implementation: str | Sequence[str] | None = None) -> jax.Array:
  """LayerNorm over the last axis.

  Args:
    x: ``[..., features]`` float32/bfloat16/float16.
    weight: ``[features]`` scale, or None.
    bias: ``[features]`` shift, or None.
    eps: added to the variance before the reciprocal square root.
    implementation: None (fastest available), a name, or a sequence of names.

  Returns:
    ``[..., features]`` in ``x.dtype``.
  """
  _validate("layer_norm", x, weight, bias, eps)
  return _registry.dispatch("layer_norm", LAYER_NORM_IMPLS, implementation, x, weight, bias,
                            eps=float(eps))
