"""Rotary position embeddings (RoPE; Su et al., 2021, "RoFormer").

Each pair of features ``(x[i], x[i + head_dim/2])`` of a query or key at position ``p`` is
rotated by the angle ``p * base**(-2i / head_dim)`` (the "rotate half" layout of GPT-NeoX
and LLaMA). Because rotations compose, ``<rope(q, m), rope(k, n)>`` depends on ``m - n``
only, which is what makes attention scores relative-position aware. Angles and the
rotation are computed in float32 and the result is cast back to the input dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rope_frequencies(head_dim: int, *, base: float = 10000.0) -> jax.Array:
  """Inverse frequencies ``base**(-2i / head_dim)`` for ``i < head_dim / 2``: ``[head_dim/2]``."""
  if not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 2:
    raise ValueError(f"rope: head_dim must be a positive even int, got {head_dim!r}")
  if not base > 1:
    raise ValueError(f"rope: base must be > 1, got {base!r}")
  return base ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)


def apply_rope(x: jax.Array, positions: jax.Array, *, base: float = 10000.0) -> jax.Array:
  """Rotates ``x`` by its positions.

  Args:
    x: ``[batch, seq, heads, head_dim]`` (head_dim even).
    positions: integer ``[batch, seq]`` or ``[seq]`` absolute positions.
    base: the frequency base (10000 in RoFormer/LLaMA).

  Returns:
    ``[batch, seq, heads, head_dim]`` in ``x.dtype``.
  """
  if not hasattr(x, "ndim") or x.ndim != 4:
    raise ValueError(f"apply_rope: x must be [batch, seq, heads, head_dim], got shape "
                     f"{getattr(x, 'shape', type(x))}")
  b, t, _, h = x.shape
  positions = jnp.asarray(positions)
  if positions.shape not in ((t,), (b, t)):
    raise ValueError(f"apply_rope: positions must have shape [seq] = ({t},) or [batch, seq] = "
                     f"({b}, {t}), got {positions.shape}")
  if positions.ndim == 1:
    positions = positions[None, :]
  inv_freq = rope_frequencies(h, base=base)
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [b, t, h/2]
  sin = jnp.sin(angles)[:, :, None, :]
  cos = jnp.cos(angles)[:, :, None, :]
  xf = x.astype(jnp.float32)
  x1, x2 = xf[..., : h // 2], xf[..., h // 2:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)
