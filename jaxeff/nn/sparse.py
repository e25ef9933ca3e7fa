"""Mask-carrying Dense layer for sparse training, and a decode-time CATS SwiGLU MLP.

:class:`SparseDense` is ``y = x @ (w * mask) + b`` with one of three masks:

* ``mode="unstructured"``: the mask lives in the ``"sparsity"`` variable collection
  (all ones at init) and is updated between steps by :func:`update_masks` to the
  magnitude mask at the sparsity of Zhu & Gupta's gradual pruning schedule
  (:func:`jaxeff.sparse.gmp_sparsity`); pruned weights get no gradient.
* ``mode="nm"`` with ``nm_method="srste"``: the N:M mask is recomputed from ``|w|`` every
  call and the product uses SR-STE (Zhou et al., 2021; :func:`jaxeff.sparse.srste_weight`).
* ``mode="nm"`` with ``nm_method="mask_decay"``: the N:M mask with pruned weights scaled
  by ``beta(step)`` (mask-decay gradient flow, Bambhaniya et al., 2024;
  :func:`jaxeff.sparse.mask_decay_factor`); pass ``step=`` to the call.

After training, :func:`sparse_kernel` gives the pruned dense kernel to compress
(:func:`jaxeff.sparse.sparsify`) for :func:`jaxeff.ops.sparse_matmul.sparse_matmul`.

:class:`CatsSwiGLU` is the SwiGLU MLP with CATS activation sparsity at a fixed threshold
(:func:`jaxeff.ops.sparse_matmul.cats_mlp`), parameter tree as :class:`jaxeff.nn.mlp.SwiGLU`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxeff.ops.sparse_matmul import cats_mlp
from jaxeff.sparse import training
from jaxeff.sparse.pruning import nm_mask

MODES = ("unstructured", "nm")
NM_METHODS = ("srste", "mask_decay")
MASKS = "sparsity"


def magnitude_mask_traced(w: jax.Array, sparsity) -> jax.Array:
  """Keep-mask dropping ``round(sparsity * size)`` lowest ``|w|`` (``sparsity`` may be
  traced: ranks instead of a static count)."""
  a = jnp.abs(w.astype(jnp.float32)).reshape(-1)
  ranks = jnp.argsort(jnp.argsort(a, stable=True), stable=True)
  drop = jnp.round(jnp.asarray(sparsity, jnp.float32) * a.size).astype(ranks.dtype)
  return (ranks >= drop).reshape(w.shape)


class SparseDense(nn.Module):
  """Dense ``[..., K] -> [..., features]`` with a sparsity mask on its kernel (module doc).

  Attributes:
    features: output width N.
    mode: ``"unstructured"`` or ``"nm"``.
    nm: N:M pattern for ``mode="nm"`` (``"2:4"``, ``"1:4"``, ``"2:8"``, ...).
    nm_method: ``"srste"`` or ``"mask_decay"``.
    srste_decay: SR-STE's ``lambda_w``.
    decay_steps / decay_intervals: the mask-decay schedule.
  """

  features: int
  use_bias: bool = False
  mode: str = "unstructured"
  nm: str = "2:4"
  nm_method: str = "srste"
  srste_decay: float = 2e-4
  decay_steps: int = 1000
  decay_intervals: int = 10
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x: jax.Array, *, step=None) -> jax.Array:
    if self.mode not in MODES:
      raise ValueError(f"SparseDense: mode must be one of {MODES}, got {self.mode!r}")
    if self.nm_method not in NM_METHODS:
      raise ValueError(f"SparseDense: nm_method must be one of {NM_METHODS}, got "
                       f"{self.nm_method!r}")
    k = x.shape[-1]
    w = self.param("kernel", self.kernel_init, (k, self.features), self.param_dtype)
    if self.mode == "unstructured":
      mask = self.variable(MASKS, "mask", lambda: jnp.ones((k, self.features), bool)).value
      w_eff = jnp.where(mask, w, 0).astype(w.dtype)
    else:
      mask = jax.lax.stop_gradient(nm_mask(jnp.abs(w), self.nm))
      if self.nm_method == "srste":
        w_eff = training.srste_weight(w, mask, self.srste_decay)
      else:
        if step is None:
          raise ValueError("SparseDense: nm_method='mask_decay' needs step= in the call")
        beta = training.mask_decay_factor(step, decay_steps=self.decay_steps,
                                          intervals=self.decay_intervals)
        w_eff = training.decayed_mask_weight(w, mask, beta)
    dtype = self.dtype or jnp.result_type(x.dtype, self.param_dtype)
    y = jnp.dot(x.astype(dtype), w_eff.astype(dtype))
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
    return y


def sparse_kernel(kernel: jax.Array, *, mode: str = "unstructured", mask=None,
                  nm: str = "2:4") -> jax.Array:
  """The pruned kernel a trained :class:`SparseDense` serves with: ``kernel * mask``
  (``mode="unstructured"``) or its N:M magnitude projection."""
  if mode == "unstructured":
    if mask is None:
      raise ValueError("sparse_kernel: mode='unstructured' needs the mask")
    return jnp.where(mask, kernel, 0).astype(kernel.dtype)
  return jnp.where(nm_mask(jnp.abs(kernel), nm), kernel, 0).astype(kernel.dtype)


def update_masks(params, masks, sparsity) -> Any:
  """New ``"sparsity"`` collection: each ``mask`` set to the magnitude mask of the kernel
  beside it at ``sparsity`` (a float or traced scalar, e.g. ``gmp_sparsity(step, ...)``)."""
  def visit(path, mask):
    node = params
    for p in path[:-1]:
      node = node[p.key]
    return magnitude_mask_traced(node["kernel"], sparsity)

  return jax.tree_util.tree_map_with_path(visit, masks)


def sparse_dense_interceptor(next_fun, args, kwargs, context,
                             implementation: str | Sequence[str] | None = None):
  """``flax.linen.intercept_methods`` interceptor: Dense / DenseGeneral layers whose
  ``kernel`` param is a sparse format (2-D ``[K, N]`` over the flattened input and output
  axes) run :func:`jaxeff.ops.sparse_matmul.sparse_matmul`."""
  from jaxeff.ops.sparse_matmul import sparse_matmul
  from jaxeff.quant.model import dense_layout
  from jaxeff.sparse.formats import is_sparse

  m = context.module
  if (context.method_name != "__call__" or not isinstance(m, (nn.Dense, nn.DenseGeneral))
      or not m.has_variable("params", "kernel")):
    return next_fun(*args, **kwargs)
  kernel = m.get_variable("params", "kernel")
  if not is_sparse(kernel):
    return next_fun(*args, **kwargs)
  x = args[0] if args else kwargs["inputs"]
  in_dims, features = dense_layout(m, x)
  lead = x.shape[:x.ndim - in_dims]
  dtype = m.dtype or x.dtype
  y = sparse_matmul(x.reshape(lead + (kernel.shape[0],)).astype(dtype), kernel,
                    implementation=implementation)
  y = y.reshape(lead + tuple(features))
  if m.use_bias:
    y = y + m.get_variable("params", "bias").astype(y.dtype)
  return y


@contextlib.contextmanager
def sparse_inference(implementation: str | Sequence[str] | None = None):
  """Context in which stock Dense / DenseGeneral layers run on sparse-format kernels:
  ``with sparse_inference(): model.apply({"params": sparse_params}, tokens)``."""
  def interceptor(next_fun, args, kwargs, context):
    return sparse_dense_interceptor(next_fun, args, kwargs, context,
                                    implementation=implementation)

  with nn.intercept_methods(interceptor):
    yield


def compress_params(params, path_regex: str = r"(attn|mlp)/[^/]+_proj/kernel$", *,
                    fmt: str = "auto", min_sparsity: float | None = None, rows: int = 1,
                    dtype=None, **kwargs):
  """Replaces (pruned) kernels whose path matches ``path_regex`` by their serving form
  (:func:`jaxeff.sparse.sparsify` of the 2-D ``[K, N]`` view; dense below the break-even).

  ``fmt="auto"`` picks, per kernel, the format measured fastest for products with
  ``rows`` activation rows at that kernel's sparsity (sliced ELL for decode), or keeps
  it dense; ``fmt``, ``min_sparsity`` and ``rows`` are passed to ``sparsify``."""
  import re

  from jaxeff.sparse.formats import sparsify
  from jaxeff.sparse.pruning import _flatten, _unflatten, kernel_in_dims

  flat = _flatten(params)
  for path, w in flat.items():
    if re.search(path_regex, path) and hasattr(w, "ndim") and w.ndim >= 2:
      k = int(np.prod(w.shape[:kernel_in_dims(path, w)]))
      w2 = w.reshape(k, -1).astype(dtype or w.dtype)
      out = sparsify(w2, fmt=fmt, min_sparsity=min_sparsity, rows=rows, dtype=dtype,
                     **kwargs)
      flat[path] = w if out is w2 else out
  return _unflatten(flat)


class CatsSwiGLU(nn.Module):
  """SwiGLU ``[..., D] -> [..., D]`` with CATS thresholded activations.

  Attributes:
    hidden_dim: H.
    threshold: from :func:`jaxeff.sparse.calibrate_cats_threshold`.
    implementation: passed to :func:`jaxeff.ops.sparse_matmul.cats_mlp`.
  """

  hidden_dim: int
  threshold: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.normal(0.02)
  implementation: str | Sequence[str] | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    p = lambda name, shape: self.param(name, lambda k, s: {"kernel": self.kernel_init(  # noqa: E731
        k, s, self.param_dtype)}, shape)["kernel"]
    wg = p("gate_proj", (d, self.hidden_dim))
    wu = p("up_proj", (d, self.hidden_dim))
    wd = p("down_proj", (self.hidden_dim, d))
    c = lambda a: a.astype(self.dtype)  # noqa: E731
    return cats_mlp(c(x), c(wg), c(wu), c(wd), threshold=self.threshold,
                    implementation=self.implementation)


__all__ = ["CatsSwiGLU", "SparseDense", "compress_params", "magnitude_mask_traced",
           "sparse_dense_interceptor", "sparse_inference", "sparse_kernel", "update_masks"]
