"""SmoothQuant: migrate activation outliers into the weights for W8A8 quantization.

Xiao et al., 2022, "SmoothQuant: Accurate and Efficient Post-Training Quantization for
Large Language Models". Activations of LLM linear layers have a few channels with
outliers ~100x larger than the rest, which per-token int8 quantization cannot represent;
weights are smooth. SmoothQuant divides each input channel ``k`` of ``x [T, K]`` by

    s_k = max|x_k|^alpha / max_n |w_kn|^(1 - alpha)

and multiplies row ``k`` of ``w [K, N]`` by it, so ``(x / s) @ (s * w) = x @ w`` exactly in
real arithmetic (the *float product is preserved before rounding*); ``alpha`` (0.5 by
default, 0.75-0.85 for models with strong outliers) sets how much of the difficulty moves
to the weights. The smoothed weight is then quantized per output channel (int8, or fp8)
and the smoothed activations per token at run time
(:func:`jaxeff.ops.quantized_matmul.quantize_activations`);
``1 / s`` travels as :class:`~jaxeff.quant.formats.ActQuant` ``input_scale`` (or is folded
into the preceding normalisation).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxeff.quant import formats


def smoothquant_scales(x_absmax: jax.Array, w: jax.Array, alpha: float = 0.5) -> jax.Array:
  """Smoothing factors ``s [K]`` from per-channel activation maxima ``x_absmax [K]`` and the
  weight ``w [K, N]`` (module docstring); clamped to ``[1e-5, 1e5]``."""
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"alpha: expected a migration strength in [0, 1], got {alpha}")
  if x_absmax.shape != (w.shape[0],):
    raise ValueError(f"x_absmax: expected shape ({w.shape[0]},) (K of w {w.shape}), got "
                     f"{x_absmax.shape}")
  a = jnp.maximum(x_absmax.astype(jnp.float32), 1e-5)
  b = jnp.maximum(jnp.max(jnp.abs(w.astype(jnp.float32)), axis=1), 1e-5)
  return jnp.clip(a ** alpha / b ** (1.0 - alpha), 1e-5, 1e5)


def smooth(x: jax.Array, w: jax.Array, s: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(x / s, s * w)``: the same product ``x @ w`` with outliers moved into ``w``.

  Args:
    x: ``[..., K]``; w: ``[K, N]``; s: ``[K]``.
  """
  return x / s, w * s[:, None]


def smoothquant_quantize(w: jax.Array, x_absmax: jax.Array, *, alpha: float = 0.5,
                         w_fmt: str = "int8", act_fmt: str = "int8",
                         group_size: int | None = None
                         ) -> tuple[formats.QArray, formats.ActQuant]:
  """Smooths and quantizes a W8A8 layer.

  Args:
    w: ``[K, N]`` weight.
    x_absmax: ``[K]`` per-channel ``max |x|`` over calibration inputs.
    alpha: migration strength.
    w_fmt: weight format (``"int8"`` per output channel by default, or an fp8 format).
    act_fmt: dynamic per-token activation format (``"int8"`` or ``"fp8_e4m3"``).

  Returns:
    ``(QArray of s * w, ActQuant(input_scale=1 / s, fmt=act_fmt))``.
  """
  formats.format_spec(w_fmt, name="w_fmt")
  spec = formats.format_spec(act_fmt, name="act_fmt")
  if spec.packed:
    raise ValueError(f"act_fmt: activations are quantized to int8 or fp8, got {act_fmt!r}")
  s = smoothquant_scales(x_absmax, w, alpha)
  qa = formats.quantize_tensor(w.astype(jnp.float32) * s[:, None], w_fmt, group_size=group_size)
  return qa, formats.ActQuant(input_scale=1.0 / s, fmt=act_fmt)


__all__ = ["smooth", "smoothquant_quantize", "smoothquant_scales"]
