"""GPTQ: Hessian-based post-training weight quantization with error compensation.

Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers" (the Optimal Brain Quantizer of Frantar & Alistarh, 2022, applied
row by row with lazy block updates). For a linear layer ``y = x @ w`` with ``w [K, N]`` and
calibration inputs ``X [T, K]``, the layer's output error ``||X w - X q||^2`` is a quadratic
form in ``H = X^T X [K, K]``. GPTQ quantizes the input rows of ``w`` one at a time (in order,
or by decreasing ``diag(H)`` with ``act_order``) and after each row moves its rounding error
onto the rows not yet quantized, weighted by the upper Cholesky factor ``U`` of ``H^-1``
(``H^-1 = U^T U``)::

    err_i    = (w_i - q_i) / U[i, i]                # [N]
    w_{j>i} -= U[i, j] * err_i                      # within the current block, row by row
    w_{rest} -= U[block, rest]^T @ err_block         # after each block (lazy batch update)

``H`` is damped by ``damp * mean(diag(H))`` for stability; rows with ``H[i, i] = 0`` (dead
inputs) are zeroed. Group scales are computed when the loop enters a group, from the
already-updated weights (the reference implementation's behaviour); with ``act_order`` the
groups of the storage format are contiguous in the *original* order, so their scales are
fixed up front from ``w`` (AutoGPTQ's ``static_groups``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxeff.quant import formats


def hessian(x: jax.Array) -> jax.Array:
  """``X^T X`` in float32 of calibration inputs ``x: [..., K]`` -> ``[K, K]``."""
  x2 = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  return x2.T @ x2


def _block_size(k: int, group_size: int | None, act_order: bool, block_size: int) -> int:
  if group_size is not None and not act_order:
    return group_size  # scales are computed when a block (= group) starts
  return max(d for d in range(1, min(block_size, k) + 1) if k % d == 0)


def gptq_quantize(w: jax.Array, h: jax.Array, fmt: str = "int4", *,
                  group_size: int | None = 128, symmetric: bool = True, damp: float = 0.01,
                  act_order: bool = False, block_size: int = 128) -> formats.QArray:
  """GPTQ-quantizes a weight given the Hessian of its inputs (module docstring).

  Args:
    w: ``[K, N]`` float weight of ``y = x @ w``.
    h: ``[K, N]``'s input Hessian ``X^T X: [K, K]`` (:func:`hessian`).
    fmt: any :data:`formats.FORMATS` entry.
    group_size: scale group along ``K``; None = per channel.
    symmetric: symmetric or asymmetric codes.
    damp: relative damping ``damp * mean(diag(H))`` added to ``diag(H)``.
    act_order: quantize rows by decreasing ``diag(H)`` (static group scales).
    block_size: rows per lazy update (``group_size`` is used when grouping without act_order).

  Returns:
    A :class:`formats.QArray` of ``[K, N]`` (``axis=0``).
  """
  if w.ndim != 2:
    raise ValueError(f"w: expected a [K, N] weight, got shape {w.shape}")
  k, n = w.shape
  if h.shape != (k, k):
    raise ValueError(f"h: expected the [K, K] = {(k, k)} input Hessian, got shape {h.shape}")
  formats.format_spec(fmt)
  formats.check_group_size(w.shape, 0, group_size)
  if not damp >= 0:
    raise ValueError(f"damp: expected >= 0, got {damp}")
  bs = _block_size(k, group_size, act_order, block_size)
  w_hat, scales, zeros = _gptq(w.astype(jnp.float32), h.astype(jnp.float32), fmt, group_size,
                               symmetric, float(damp), act_order, bs)
  return formats.quantize_with_scales(w_hat, scales, zeros, fmt, axis=0, group_size=group_size)


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5, 6, 7))
def _gptq(w, h, fmt, group_size, symmetric, damp, act_order, bs):
  """-> (dequantized result ``[K, N]``, scales, zeros); all rows on the quantization grid."""
  k, n = w.shape
  g = k if group_size is None else group_size
  diag = jnp.diag(h)
  dead = diag == 0
  h = h + jnp.diag(dead.astype(h.dtype))
  w = jnp.where(dead[:, None], 0.0, w)
  static = act_order or group_size is None
  if static:  # scales fixed from the (dead-zeroed) original weight
    scales, zeros = formats.compute_scales(w, fmt, group_size=group_size, symmetric=symmetric)
  else:
    scales = jnp.zeros((k // g, n), jnp.float32)
    zeros = None if symmetric else jnp.zeros((k // g, n), jnp.float32)
  perm = jnp.argsort(-jnp.diag(h)) if act_order else jnp.arange(k)
  w = w[perm]
  h = h[perm][:, perm]
  h = h + damp * jnp.mean(jnp.diag(h)) * jnp.eye(k, dtype=h.dtype)
  chol = jnp.linalg.cholesky(h)
  h_inv = jax.scipy.linalg.cho_solve((chol, True), jnp.eye(k, dtype=h.dtype))
  u = jnp.linalg.cholesky(h_inv).T  # upper: H^-1 = U^T U
  group_of = perm // g  # group (in storage order) of each quantization-order row

  def quant_row(row, s, z):
    q = formats.quantize_codes(row[None], s[None], None if z is None else z[None], fmt)
    return formats.dequantize_codes(q, s[None], None if z is None else z[None])[0]

  def block(b, carry):
    w, scales, zeros = carry
    start = b * bs
    if not static:  # block == group: its scales from the current (updated) weights
      s, z = formats.compute_scales(jax.lax.dynamic_slice_in_dim(w, start, bs), fmt,
                                    group_size=None, symmetric=symmetric)
      scales = jax.lax.dynamic_update_slice_in_dim(scales, s, b, 0)
      if zeros is not None:
        zeros = jax.lax.dynamic_update_slice_in_dim(zeros, z, b, 0)
    wb = jax.lax.dynamic_slice_in_dim(w, start, bs)          # [bs, N]
    ub = jax.lax.dynamic_slice(u, (start, start), (bs, bs))  # [bs, bs]

    def row(i, c):
      wb, err = c
      gi = group_of[start + i]
      zi = None if zeros is None else zeros[gi]
      q = quant_row(wb[i], scales[gi], zi)
      e = (wb[i] - q) / ub[i, i]
      later = (jnp.arange(bs) > i).astype(wb.dtype)
      wb = wb - (ub[i] * later)[:, None] * e[None]
      wb = wb.at[i].set(q)
      return wb, err.at[i].set(e)

    wb, err = jax.lax.fori_loop(0, bs, row, (wb, jnp.zeros_like(wb)))
    urows = jax.lax.dynamic_slice_in_dim(u, start, bs)  # [bs, K]
    rest = (jnp.arange(k) >= start + bs).astype(w.dtype)
    w = w - (urows * rest[None]).T @ err
    w = jax.lax.dynamic_update_slice_in_dim(w, wb, start, 0)
    return w, scales, zeros

  w, scales, zeros = jax.lax.fori_loop(0, k // bs, block, (w, scales, zeros))
  w = w[jnp.argsort(perm)]
  return w, scales, zeros


def layer_error(w: jax.Array, w_hat: jax.Array, h: jax.Array) -> jax.Array:
  """Output error ``||X w - X w_hat||_F^2 = tr(dW^T H dW)`` from ``H = X^T X``."""
  d = (w - w_hat).astype(jnp.float32)
  return jnp.sum(d * (h.astype(jnp.float32) @ d))


def relative_layer_error(w: jax.Array, w_hat: jax.Array, h: jax.Array) -> jax.Array:
  """:func:`layer_error` over ``||X w||^2``."""
  return layer_error(w, w_hat, h) / jnp.maximum(layer_error(w, jnp.zeros_like(w), h), 1e-30)


__all__ = ["gptq_quantize", "hessian", "layer_error", "relative_layer_error"]
