"""RoPE (relative-position property, identity at 0, norm preservation) and SwiGLU."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.nn import SwiGLU, apply_rope, rope_frequencies
from tests.helpers import assert_close


def _dot_at(q, k, m, n):
  """<rope(q, m), rope(k, n)> for single vectors q, k: [head_dim]."""
  qr = apply_rope(q[None, None, None], jnp.array([m]))[0, 0, 0]
  kr = apply_rope(k[None, None, None], jnp.array([n]))[0, 0, 0]
  return jnp.dot(qr, kr)


def test_rope_scores_depend_only_on_relative_position(key):
  kq, kk = jax.random.split(key)
  q = jax.random.normal(kq, (40,))
  k = jax.random.normal(kk, (40,))
  base = _dot_at(q, k, 7, 3)
  for m, n in ((4, 0), (104, 100), (1003, 999)):
    np.testing.assert_allclose(_dot_at(q, k, m, n), base, rtol=2e-4, atol=2e-4)
  # ... and they do depend on it.
  assert abs(float(_dot_at(q, k, 9, 3) - base)) > 1e-3


def test_rope_identity_at_zero_and_norm_preserving(key):
  x = jax.random.normal(key, (3, 5, 2, 24))
  pos = jnp.broadcast_to(jnp.arange(5) * 11, (3, 5))
  y = apply_rope(x, pos)
  assert_close(y[:, :1], x[:, :1])
  np.testing.assert_allclose(jnp.linalg.norm(y, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)


def test_rope_matches_complex_rotation(key):
  # "Rotate half": pair (x[i], x[i + h/2]) is the complex number x[i] + j x[i + h/2] times e^{j p w_i}.
  x = jax.random.normal(key, (2, 6, 3, 16))
  pos = jnp.array([[0, 1, 2, 5, 8, 13], [21, 3, 4, 4, 0, 100]])
  y = apply_rope(x, pos, base=500.0)
  w = rope_frequencies(16, base=500.0)
  z = (x[..., :8] + 1j * x[..., 8:]) * jnp.exp(1j * pos[:, :, None, None] * w)
  assert_close(y, jnp.concatenate([z.real, z.imag], -1).astype(jnp.float32))


def test_rope_keeps_dtype_and_per_batch_positions(key):
  x = jax.random.normal(key, (2, 4, 1, 8)).astype(jnp.bfloat16)
  y = apply_rope(x, jnp.array([[0, 1, 2, 3], [10, 11, 12, 13]]))
  assert y.dtype == jnp.bfloat16
  y1 = apply_rope(x[1:], jnp.arange(10, 14))
  assert_close(y[1:], y1)


@pytest.mark.parametrize("bad, match", [
    (dict(x_shape=(2, 4, 8), pos=jnp.arange(4)), "x must be"),
    (dict(x_shape=(2, 4, 1, 8), pos=jnp.arange(5)), "positions must have shape"),
    (dict(x_shape=(2, 4, 1, 7), pos=jnp.arange(4)), "head_dim must be a positive even"),
])
def test_rope_bad_inputs(bad, match):
  with pytest.raises(ValueError, match=match):
    apply_rope(jnp.ones(bad["x_shape"]), bad["pos"])


def test_swiglu_matches_direct_computation(key):
  kx, kp = jax.random.split(key)
  x = jax.random.normal(kx, (3, 7, 24))
  mlp = SwiGLU(hidden_dim=40)
  params = mlp.init(kp, x)["params"]
  assert params["gate_proj"]["kernel"].shape == (24, 40)
  assert params["down_proj"]["kernel"].shape == (40, 24)
  y = mlp.apply({"params": params}, x)
  g, u, d = (params[n]["kernel"] for n in ("gate_proj", "up_proj", "down_proj"))
  expected = ((x @ g) * jax.nn.sigmoid(x @ g) * (x @ u)) @ d
  assert_close(y, expected)


def test_swiglu_bf16_compute(key):
  x = jax.random.normal(key, (2, 5, 16))
  mlp = SwiGLU(hidden_dim=32, dtype=jnp.bfloat16)
  params = mlp.init(key, x)["params"]
  y = mlp.apply({"params": params}, x)
  assert y.dtype == jnp.bfloat16 and params["up_proj"]["kernel"].dtype == jnp.float32
  y32 = SwiGLU(hidden_dim=32).apply({"params": params}, x)
  assert_close(y.astype(jnp.float32), y32, rtol=2e-2)


def test_swiglu_bad_hidden_dim():
  with pytest.raises(ValueError, match="hidden_dim must be positive"):
    SwiGLU(hidden_dim=0).init(jax.random.key(0), jnp.ones((1, 2, 8)))
