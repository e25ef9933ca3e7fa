"""SwiGLU feed-forward block (Shazeer, 2020, "GLU Variants Improve Transformer").

``y = down_proj(silu(gate_proj(x)) * up_proj(x))`` with no biases, as in LLaMA/PaLM.
The hidden width is usually ``~8/3 * features`` rounded to a hardware-friendly multiple.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class SwiGLU(nn.Module):
  """SwiGLU MLP: ``[..., features] -> [..., features]``.

  Attributes:
    hidden_dim: width of the gated hidden layer.
    dtype: computation dtype (e.g. ``jnp.bfloat16``); parameters stay ``param_dtype``.
    param_dtype: dtype of the weights.
    kernel_init: initializer of ``gate_proj`` and ``up_proj``.
    out_init: initializer of ``down_proj`` (GPT-2 scales it by ``1/sqrt(2 * layers)``).
    fused: one ``gate_up_proj`` of ``[features, 2 * hidden_dim]`` (gate then up) instead of
      separate ``gate_proj`` / ``up_proj`` (one wider matmul; a different parameter tree).
  """

  hidden_dim: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  kernel_init: nn.initializers.Initializer = nn.initializers.normal(0.02)
  out_init: nn.initializers.Initializer = nn.initializers.normal(0.02)
  fused: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.hidden_dim <= 0:
      raise ValueError(f"SwiGLU: hidden_dim must be positive, got {self.hidden_dim}")
    dense = lambda n, init, name: nn.Dense(n, use_bias=False, dtype=self.dtype,  # noqa: E731
                                           param_dtype=self.param_dtype, kernel_init=init,
                                           name=name)
    if self.fused:
      gate, up = jnp.split(dense(2 * self.hidden_dim, self.kernel_init, "gate_up_proj")(x), 2, -1)
    else:
      gate = dense(self.hidden_dim, self.kernel_init, "gate_proj")(x)
      up = dense(self.hidden_dim, self.kernel_init, "up_proj")(x)
    return dense(x.shape[-1], self.out_init, "down_proj")(nn.silu(gate) * up)
