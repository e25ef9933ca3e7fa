"""Round-to-nearest weight quantization and AdaDim's choice of the grouping dimension.

RTN (:func:`rtn_quantize`) is :func:`formats.quantize_tensor`: per-tensor, per-channel or
per-group scales from the range of each block, codes rounded to nearest.

AdaDim (Heo et al., 2023, "Rethinking Channel Dimensions to Isolate Outliers for Low-bit
Weight Quantization of Large Language Models"): activation outliers of an input channel
make the whole weight *row* ``w[k, :]`` sensitive, so grouping along the input dimension
(``axis=1`` on ``w [K, N]``: one scale per input channel and group of output channels,
"per-IC") can isolate them where the usual per-output-channel groups along ``K`` (``axis=0``,
"per-OC") mix them into every group. :func:`adadim_quantize` quantizes both ways and keeps
the one with the lower output error ``tr(dW^T H dW)`` (or weight error without ``H``).
Per-IC weights run through the dequantize-then-dot path (fused kernels group along ``K``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxeff.quant import formats


def rtn_quantize(w: jax.Array, fmt: str = "int4", *, group_size: int | None = 128,
                 symmetric: bool = True, axis: int = 0,
                 per_tensor: bool = False) -> formats.QArray:
  """Round-to-nearest ``w [K, N]`` -> :class:`formats.QArray` (see ``quantize_tensor``)."""
  return formats.quantize_tensor(w, fmt, axis=axis, group_size=group_size, symmetric=symmetric,
                                 per_tensor=per_tensor)


def output_error(w: jax.Array, w_hat: jax.Array, h: jax.Array | None = None) -> jax.Array:
  """``tr(dW^T H dW)`` with ``H = X^T X [K, K]`` (``||X dW||^2``), or ``||dW||^2`` without ``H``."""
  d = (w - w_hat).astype(jnp.float32)
  if h is None:
    return jnp.sum(d * d)
  return jnp.sum(d * (h.astype(jnp.float32) @ d))


def adadim_quantize(w: jax.Array, fmt: str = "int4", *, group_size: int | None = 128,
                    symmetric: bool = True, h: jax.Array | None = None) -> formats.QArray:
  """Quantizes ``w [K, N]`` per-OC (``axis=0``) or per-IC (``axis=1``), whichever has the lower
  output error (module docstring). A group size that divides only one of ``K`` and ``N``
  selects that axis; one that divides neither raises."""
  if w.ndim != 2:
    raise ValueError(f"w: expected a [K, N] weight, got shape {w.shape}")
  axes = [a for a in (0, 1) if group_size is None or w.shape[a] % group_size == 0]
  if not axes:
    raise ValueError(f"group_size: {group_size} divides neither K = {w.shape[0]} nor "
                     f"N = {w.shape[1]}")
  best, best_err = None, None
  for a in axes:
    qa = formats.quantize_tensor(w, fmt, axis=a, group_size=group_size, symmetric=symmetric)
    err = float(output_error(w, formats.dequantize(qa), h))
    if best is None or err < best_err:
      best, best_err = qa, err
  return best


__all__ = ["adadim_quantize", "output_error", "rtn_quantize"]
