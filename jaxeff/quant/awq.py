"""AWQ: activation-aware weight quantization (per-channel scale search and clip search).

Lin et al., 2023, "AWQ: Activation-aware Weight Quantization for LLM Compression and
Acceleration". A few input channels of a linear layer ``y = x @ w`` (``w [K, N]``) carry
large activations; their weight rows matter most. AWQ scales those rows up before
round-to-nearest quantization and the inputs down by the same factor, which keeps the
float product (``(x / s) @ (s * w) = x @ w``) while shrinking the relative rounding error
of the salient rows:

* scale search: ``s = mean|x|^alpha`` (normalised to ``sqrt(max * min) = 1``) for ``alpha``
  on a grid in ``[0, 1]``; keep the ``alpha`` minimising the output error
  ``||x @ w - (x / s) @ Q(s * w)||^2`` on calibration inputs (``alpha = 0`` is plain RTN,
  so the result is never worse than RTN on the calibration data);
* clip search: per (group, output channel), shrink the quantization range by a ratio in
  ``[1 - max_shrink, 1]`` where that lowers the group's output error.

The returned weight is the :class:`~jaxeff.quant.formats.QArray` of ``s * w`` together with
``input_scale = 1 / s`` (an :class:`~jaxeff.quant.formats.ActQuant` multiplies ``x`` by it,
or it can be folded into the preceding normalisation's scale).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxeff.quant import formats


def awq_scales(x_mean_abs: jax.Array, alpha: float | jax.Array) -> jax.Array:
  """``s = mean|x|^alpha`` normalised to ``sqrt(max(s) * min(s)) = 1``; ``[K] -> [K]``."""
  s = jnp.maximum(x_mean_abs.astype(jnp.float32), 1e-5) ** alpha
  return s / jnp.sqrt(jnp.max(s) * jnp.min(s))


def _output_error(x, y, w_hat):
  return jnp.mean(jnp.square(x @ w_hat - y))


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5, 6, 7))
def _search(w, x, fmt, group_size, symmetric, n_grid, n_clip, max_shrink):
  x = x.astype(jnp.float32)
  w = w.astype(jnp.float32)
  y = x @ w
  mean_abs = jnp.mean(jnp.abs(x), axis=0)

  def loss_for(alpha):
    s = awq_scales(mean_abs, alpha)
    w_hat = formats.fake_quantize(w * s[:, None], fmt, group_size=group_size,
                                  symmetric=symmetric) / s[:, None]
    return _output_error(x, y, w_hat)

  alphas = jnp.linspace(0.0, 1.0, n_grid)
  losses = jax.lax.map(loss_for, alphas)
  alpha = alphas[jnp.argmin(losses)]
  s = awq_scales(mean_abs, alpha)
  ws = w * s[:, None]
  xs = x / s[None, :]
  if n_clip <= 1:
    return s, jnp.ones((), jnp.float32), alpha, losses
  k, n = w.shape
  g = k if group_size is None else group_size
  xg = xs.reshape(xs.shape[0], k // g, g)  # [T, G, g]

  def group_errors(ratio):  # [G, N] output error per (group, column) at this clip ratio
    d = ws - formats.fake_quantize(ws, fmt, group_size=group_size, symmetric=symmetric,
                                   clip_ratio=ratio)
    out = jnp.einsum("tgk,gkn->tgn", xg, d.reshape(k // g, g, n))
    return jnp.mean(jnp.square(out), axis=0)

  ratios = jnp.linspace(1.0, 1.0 - max_shrink, n_clip)
  errs = jax.lax.map(group_errors, ratios)  # [R, G, N]
  clip = ratios[jnp.argmin(errs, axis=0)]   # [G, N]
  return s, clip, alpha, losses


def awq_quantize(w: jax.Array, x: jax.Array, fmt: str = "int4", *,
                 group_size: int | None = 128, symmetric: bool = True, n_grid: int = 20,
                 clip_search: bool = True, n_clip: int = 11, max_shrink: float = 0.5,
                 max_tokens: int = 1024) -> tuple[formats.QArray, formats.ActQuant]:
  """AWQ-quantizes ``w`` using calibration inputs ``x`` (module docstring).

  Args:
    w: ``[K, N]`` weight of ``y = x @ w``.
    x: ``[..., K]`` calibration inputs of this layer (the first ``max_tokens`` rows are used).
    fmt / group_size / symmetric: the target format (groups along ``K``).
    n_grid: ``alpha`` grid points in ``[0, 1]``.
    clip_search / n_clip / max_shrink: range-clipping search per (group, column).

  Returns:
    ``(QArray of s * w, ActQuant(input_scale=1 / s))``.
  """
  if w.ndim != 2:
    raise ValueError(f"w: expected a [K, N] weight, got shape {w.shape}")
  if x.shape[-1] != w.shape[0]:
    raise ValueError(f"x: last dim {x.shape[-1]} must equal w's K = {w.shape[0]}")
  formats.format_spec(fmt)
  formats.check_group_size(w.shape, 0, group_size)
  x2 = x.reshape(-1, x.shape[-1])[:max_tokens]
  s, clip, _, _ = _search(w, x2, fmt, group_size, symmetric, int(n_grid),
                          int(n_clip) if clip_search else 1, float(max_shrink))
  qa = formats.quantize_tensor(w.astype(jnp.float32) * s[:, None], fmt, group_size=group_size,
                               symmetric=symmetric, clip_ratio=clip)
  return qa, formats.ActQuant(input_scale=(1.0 / s).astype(jnp.float32))


__all__ = ["awq_quantize", "awq_scales"]
