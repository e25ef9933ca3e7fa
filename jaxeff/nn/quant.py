"""Linear layers on quantized weights: :class:`QuantDense` and an interceptor for stock Dense.

Both compute ``y = x @ dequant(w_q) (+ bias)`` through
:func:`jaxeff.ops.quantized_matmul.quantized_matmul` (fused dequantisation kernels, or the
dequantize-then-dot reference) with ``w_q`` a :class:`jaxeff.quant.QArray` of the kernel
viewed as ``[K, N]`` (``K`` = the contracted input dims, ``N`` = the features) or a
prepacked :class:`jaxeff.ops.quantized_matmul.PackedWeight`. A sibling params leaf
``act_quant`` (:class:`jaxeff.quant.ActQuant`) optionally multiplies ``x`` by a per-channel
``input_scale`` (AWQ / SmoothQuant smoothing) and quantizes ``x`` per token (W8A8 int8 /
fp8) before the product.

* :class:`QuantDense` is a drop-in for ``flax.linen.Dense`` / ``DenseGeneral`` (same
  ``features`` / ``axis`` / ``use_bias`` attributes, last-axes contraction) whose params
  are quantized.
* :func:`quantized_inference` (a context manager around ``flax.linen.intercept_methods``)
  runs *unchanged* models — e.g. :class:`jaxeff.models.gpt.GPT` — on params from
  :func:`jaxeff.quant.quantize`: every ``Dense`` / ``DenseGeneral`` call whose ``kernel``
  is a QArray / PackedWeight is computed here instead; other calls run as usual. Enter
  it around the *tracing* of the model (``jax.jit`` traces once per params structure).
"""

from __future__ import annotations

import contextlib
import importlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxeff.quant import formats
from jaxeff.quant.model import dense_layout, trailing_axes


def _op_module():
  # By module path: ``jaxeff.ops`` re-exports the function under the module's name.
  return importlib.import_module("jaxeff.ops.quantized_matmul")


def _is_quantized(kernel: Any) -> bool:
  if isinstance(kernel, formats.QArray):
    return True
  qmm = _op_module()
  return isinstance(kernel, qmm.PackedWeight)


def _matmul(x2: jax.Array, w_q: Any, act_fmt: str | None,
            implementation: str | Sequence[str] | None) -> jax.Array:
  """``x2 [..., K] @ dequant(w_q) -> [..., N]`` in ``x2.dtype`` (W8A8 when ``act_fmt``)."""
  qmm = _op_module()

  if isinstance(w_q, formats.QArray) and w_q.axis != 0 and act_fmt is None:
    # Per-input-channel groups (AdaDim): the op's kernels group along K only.
    return jnp.dot(x2, formats.dequantize(w_q, x2.dtype))
  if act_fmt is None:
    return qmm.quantized_matmul(x2, w_q, implementation=implementation)
  x_q, x_scale = qmm.quantize_activations(x2, act_fmt)
  return qmm.quantized_matmul(x_q, w_q, x_scale=x_scale, out_dtype=x2.dtype,
                              implementation=implementation)


def quant_dense_apply(x: jax.Array, kernel: Any, *, in_dims: int,
                      features: tuple[int, ...], bias: jax.Array | None = None,
                      act_quant: formats.ActQuant | None = None, dtype=None,
                      implementation: str | Sequence[str] | None = None,
                      name: str = "QuantDense") -> jax.Array:
  """The quantized linear map shared by :class:`QuantDense` and the interceptor.

  Args:
    x: ``[*batch, *in_features]`` with ``in_dims`` trailing contracted dims (``K`` = their
      product).
    kernel: QArray / PackedWeight of logical shape ``[K, N]``, ``N = prod(features)``.
    features: output feature dims.
    bias: ``[*features]`` or None.
    act_quant: input treatment (module docstring) or None.
    dtype: computation dtype (default ``x.dtype``).

  Returns:
    ``[*batch, *features]`` in ``dtype``.
  """
  dtype = dtype or x.dtype
  batch, in_shape = x.shape[:x.ndim - in_dims], x.shape[x.ndim - in_dims:]
  k, n = math.prod(in_shape), math.prod(features)
  if tuple(kernel.shape) != (k, n):
    raise ValueError(f"{name}: kernel has logical shape {tuple(kernel.shape)}, expected "
                     f"[K, N] = {(k, n)} for input dims {in_shape} and features {features}")
  x2 = x.reshape(batch + (k,)).astype(dtype)
  act_fmt = None
  if act_quant is not None:
    act_fmt = act_quant.fmt
    if act_quant.input_scale is not None:
      if act_quant.input_scale.shape != (k,):
        raise ValueError(f"{name}: act_quant.input_scale shape {act_quant.input_scale.shape} "
                         f"must be ({k},)")
      x2 = (x2 * act_quant.input_scale.astype(dtype)).astype(dtype)
  y = _matmul(x2, kernel, act_fmt, implementation).astype(dtype)
  y = y.reshape(batch + tuple(features))
  if bias is not None:
    y = y + bias.astype(dtype)
  return y


class QuantDense(nn.Module):
  """A ``Dense`` / ``DenseGeneral`` on a quantized kernel: ``[..., *in] -> [..., *features]``.

  Attributes:
    features: output features (int or tuple, as ``DenseGeneral``).
    axis: contracted input axes (trailing; int or tuple).
    use_bias: add a float bias ``[*features]``.
    dtype / param_dtype: computation dtype (default: the input's) / float init dtype.
    kernel_init / bias_init: initializers of the float kernel (quantized at init) and bias.
    fmt / group_size / symmetric: the kernel's format when initialised here (params from
      :func:`jaxeff.quant.quantize` may carry any format the op serves).
    act_fmt: per-token activation quantization (``"int8"`` / ``"fp8_e4m3"``: W8A8), used
      when the params hold no ``act_quant`` leaf.
    implementation: passed to :func:`jaxeff.ops.quantized_matmul.quantized_matmul`.

  Params: ``kernel`` (QArray ``[K, N]``), optional ``bias``, optional ``act_quant``.
  """

  features: int | Sequence[int]
  axis: int | Sequence[int] = -1
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros_init()
  fmt: str = "int8"
  group_size: int | None = None
  symmetric: bool = True
  act_fmt: str | None = None
  implementation: str | Sequence[str] | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    axes = trailing_axes(self.axis, x.ndim, "QuantDense")
    in_shape = tuple(x.shape[a] for a in axes)
    k, n = math.prod(in_shape), math.prod(features)

    def init(key):
      w = self.kernel_init(key, in_shape + features, self.param_dtype)
      return formats.quantize_tensor(w.reshape(k, n), self.fmt, group_size=self.group_size,
                                     symmetric=self.symmetric)

    kernel = self.param("kernel", init)
    if not _is_quantized(kernel):
      raise TypeError(f"QuantDense: params 'kernel' must be a QArray or PackedWeight, got "
                      f"{type(kernel).__name__} (quantize Dense params with "
                      f"jaxeff.quant.quantize)")
    bias = self.param("bias", self.bias_init, features, self.param_dtype) if self.use_bias else None
    if self.has_variable("params", "act_quant"):
      act = self.get_variable("params", "act_quant")
    else:
      act = formats.ActQuant(None, self.act_fmt) if self.act_fmt else None
    return quant_dense_apply(x, kernel, in_dims=len(axes), features=features, bias=bias,
                             act_quant=act, dtype=self.dtype,
                             implementation=self.implementation)


def quantized_dense_interceptor(next_fun, args, kwargs, context,
                                implementation: str | Sequence[str] | None = None):
  """``flax.linen.intercept_methods`` interceptor: Dense / DenseGeneral calls whose
  ``kernel`` param is quantized go through :func:`quant_dense_apply`."""
  m = context.module
  if (context.method_name != "__call__" or not isinstance(m, (nn.Dense, nn.DenseGeneral))
      or not m.has_variable("params", "kernel")):
    return next_fun(*args, **kwargs)
  kernel = m.get_variable("params", "kernel")
  if not _is_quantized(kernel):
    return next_fun(*args, **kwargs)
  x = args[0] if args else kwargs["inputs"]
  in_dims, features = dense_layout(m, x)
  bias = m.get_variable("params", "bias") if m.use_bias else None
  act = m.get_variable("params", "act_quant") if m.has_variable("params", "act_quant") else None
  dtype = m.dtype or jnp.result_type(x.dtype, m.param_dtype)
  return quant_dense_apply(x, kernel, in_dims=in_dims, features=features, bias=bias,
                           act_quant=act, dtype=dtype, implementation=implementation,
                           name="/".join(m.path))


@contextlib.contextmanager
def quantized_inference(implementation: str | Sequence[str] | None = None):
  """Context in which stock Dense / DenseGeneral layers run on quantized params.

  ``with quantized_inference(): logits = model.apply({"params": qparams}, tokens)``.
  """
  def interceptor(next_fun, args, kwargs, context):
    return quantized_dense_interceptor(next_fun, args, kwargs, context,
                                       implementation=implementation)

  with nn.intercept_methods(interceptor):
    yield


def prepack_params(params: Any) -> Any:
  """Replaces QArray leaves the fused kernels take K-major (int4 / int8 / fp8 along K) by
  :func:`jaxeff.ops.quantized_matmul.prepack`'s PackedWeight (once, before serving)."""
  qmm = _op_module()

  def visit(leaf):
    if (isinstance(leaf, formats.QArray) and leaf.fmt in qmm.PACKED_FORMATS and leaf.axis == 0
        and leaf.ndim == 2):
      return qmm.prepack(leaf)
    return leaf

  return jax.tree.map(visit, params, is_leaf=lambda l: isinstance(l, formats.QArray))


__all__ = ["QuantDense", "prepack_params", "quant_dense_apply",
           "quantized_dense_interceptor", "quantized_inference"]
