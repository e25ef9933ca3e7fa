"""jaxeff.spectral rfft/irfft vs NumPy; the Monarch plan on its own."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.spectral import irfft, monarch, rfft
from tests.helpers import rel_err


@pytest.mark.parametrize("shape,n,axis", [((3, 45), None, -1), ((4, 100, 3), 128, 1),
                                          ((2, 1031), None, -1)], ids=str)
def test_rfft_irfft_match_numpy(shape, n, axis, key):
  x = jax.random.normal(key, shape, jnp.float32)
  ref = np.fft.rfft(np.asarray(x, np.float64), n=n, axis=axis)
  fwd = jax.jit(lambda x: rfft(x, n=n, axis=axis))
  inv = jax.jit(lambda s, dt: irfft(s, n=length, axis=axis, compute_dtype=dt), static_argnums=1)
  length = n or shape[axis]
  y = fwd(x)
  assert y.dtype == jnp.complex64 and y.shape == ref.shape
  assert rel_err(jnp.stack([y.real, y.imag]), np.stack([ref.real, ref.imag])) < 2e-6
  yb = fwd(x.astype(jnp.bfloat16))  # jnp.fft rejects bf16
  assert rel_err(jnp.stack([yb.real, yb.imag]), np.stack([ref.real, ref.imag])) < 1e-2
  back = inv(jnp.asarray(ref, jnp.complex64), jnp.float32)
  assert back.dtype == jnp.float32
  assert rel_err(back, np.fft.irfft(ref, n=length, axis=axis)) < 2e-6
  back_bf16 = inv(jnp.asarray(ref, jnp.complex64), jnp.bfloat16)
  assert rel_err(back_bf16, np.fft.irfft(ref, n=length, axis=axis)) < 1e-2


def test_three_level_monarch_matches_numpy(key):
  plan = monarch.MonarchPlan(8 * 4 * 6, (8, 4, 6))
  z = jax.random.normal(key, (2, 3, plan.n))
  ref = np.fft.fft(np.asarray(z[0], np.float64) + 1j * np.asarray(z[1], np.float64))
  y = monarch.fft(z, plan)
  got = np.asarray(y[0]) + 1j * np.asarray(y[1])
  assert rel_err(np.stack([got.real, got.imag]),
                 np.stack([ref.real, ref.imag])[:, :, monarch.natural_frequencies(plan)]) < 2e-6
  back = monarch.ifft(y, plan) / plan.n
  assert rel_err(back, z) < 2e-6


def test_factorize():
  assert monarch.factorize(4096) == (64, 64)
  assert monarch.factorize(1000) == (40, 25)
  assert monarch.factorize(997) == (997,)  # a prime up to MAX_PRIME_FACTOR: one dense level
  assert monarch.factorize(1031 * 2) is None
  with pytest.raises(ValueError, match="n must be a positive int, got 0"):
    monarch.factorize(0)


def test_bad_inputs():
  with pytest.raises(TypeError, match="rfft: x must be a float32/bfloat16/float16 array, got int32"):
    rfft(jnp.ones((4,), jnp.int32))
  with pytest.raises(ValueError, match="rfft: n must be a positive int, got 0"):
    rfft(jnp.ones((4,)), n=0)
  with pytest.raises(TypeError, match="irfft: compute_dtype must be"):
    irfft(jnp.ones((4,), jnp.complex64), compute_dtype=jnp.int8)
