"""Spectral modules vs NumPy references built from their parameters; SST invariants."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.nn.spectral import (AdaptiveFrequencyFilter, FFTConv, GlobalFilter, HyenaOperator,
                                SpectralDense, causal_depthwise_conv, sst_mask_gradients,
                                sst_reorthogonalize)
from tests.helpers import rel_err


def np_causal_conv(u, k):
  """Direct sum: y[..., t] = sum_j k[..., j] u[..., t - j] (float64)."""
  seq = u.shape[-1]
  y = np.zeros(u.shape)
  for j in range(k.shape[-1]):
    y[..., j:] += k[..., j:j + 1] * u[..., : seq - j]
  return y


def test_fft_conv_module(key):
  x = jax.random.normal(key, (2, 19, 3))
  mod = FFTConv(filter_len=7, implementation="monarch_xla")
  params = jax.jit(mod.init)(jax.random.fold_in(key, 1), x)["params"]
  params = {**params, "skip": jax.random.normal(key, (3,))}
  y = jax.jit(mod.apply)({"params": params}, x)
  u = np.asarray(x, np.float64).transpose(0, 2, 1)
  ref = np_causal_conv(u, np.asarray(params["kernel"], np.float64)).transpose(0, 2, 1)
  ref = ref + np.asarray(x) * np.asarray(params["skip"])
  assert rel_err(y, ref) < 2e-6


def test_hyena_operator_matches_numpy_and_is_causal(key):
  d, seq = 8, 24
  mod = HyenaOperator(d_model=d, max_len=32, order=2, filter_hidden=8, emb_dim=5,
                      implementation="xla")  # monarch vs xla: test_fft_conv.py
  u = jax.random.normal(key, (2, seq, d))
  variables = jax.jit(mod.init)(jax.random.fold_in(key, 1), u)
  p = variables["params"]
  y = jax.jit(mod.apply)(variables, u)
  # NumPy reference of the recurrence from the module's parameters and implicit filters.
  h = np.asarray(_filters(mod, variables, seq), np.float64)
  a = np.asarray(u, np.float64) @ np.asarray(p["in_proj"]["kernel"], np.float64)
  a = a + np.asarray(p["in_proj"]["bias"])
  w = np.asarray(p["short_filter"], np.float64)
  a = np_causal_conv(a.transpose(0, 2, 1), w.T).transpose(0, 2, 1)
  *xs, v = np.split(a.transpose(0, 2, 1), 3, axis=1)
  z = v
  for o in range(2):
    z = xs[o] * (np_causal_conv(z, h[o]) + np.asarray(p["bias"][o])[None, :, None] * z)
  ref = z.transpose(0, 2, 1) @ np.asarray(p["out_proj"]["kernel"]) + np.asarray(
      p["out_proj"]["bias"])
  assert rel_err(y, ref) < 1e-5
  # Causality: changing u after position 10 leaves outputs up to 10 unchanged.
  u2 = u.at[:, 11:].set(jax.random.normal(jax.random.fold_in(key, 5), (2, seq - 11, d)))
  y2 = jax.jit(mod.apply)(variables, u2)
  np.testing.assert_allclose(y2[:, :11], y[:, :11], rtol=1e-5, atol=1e-5)
  assert not np.allclose(y2[:, 11:], y[:, 11:])


def _filters(mod, variables, seq):
  from jaxeff.nn.spectral import ImplicitFilter
  f = ImplicitFilter(mod.d_model, mod.order, mod.max_len, emb_dim=mod.emb_dim,
                     hidden=mod.filter_hidden)
  h = jax.jit(f.apply, static_argnums=1)({"params": variables["params"]["filter"]}, seq)
  assert h.shape == (mod.order, mod.d_model, seq)
  # The exponential window: late taps are smaller than early ones on average.
  assert float(jnp.abs(h[..., -4:]).mean()) < float(jnp.abs(h[..., :4]).mean())
  return h


def np_circular_conv2d(x, g):
  """y[b, i, j, c] = sum_{p, q} g[p, q, c] x[b, i - p, j - q, c] (indices mod h, w)."""
  y = np.zeros(x.shape)
  for p_ in range(g.shape[0]):
    for q in range(g.shape[1]):
      y += g[p_, q] * np.roll(x, (p_, q), axis=(1, 2))
  return y


def test_global_filter_is_a_circular_conv(key):
  x = jax.random.normal(key, (2, 6, 5, 3))
  mod = GlobalFilter(std=1.0)
  params = jax.jit(mod.init)(key, x)["params"]
  y = jax.jit(mod.apply)({"params": params}, x)
  w = np.asarray(params["filter"][0], np.float64) + 1j * np.asarray(params["filter"][1])
  g = np.fft.irfft2(w, s=(6, 5), axes=(0, 1))  # the spatial kernel [h, w, c]
  assert rel_err(y, np_circular_conv2d(np.asarray(x, np.float64), g)) < 2e-6


def test_adaptive_frequency_filter_matches_numpy(key):
  x = jax.random.normal(key, (2, 4, 6, 3))
  mod = AdaptiveFrequencyFilter(hidden=5)
  params = jax.jit(mod.init)(key, x)["params"]
  params = jax.tree.map(lambda a: a + 0.1 * np.random.default_rng(0).standard_normal(a.shape),
                        params)
  y = jax.jit(mod.apply)({"params": params}, x)
  spec = np.fft.rfft2(np.asarray(x, np.float64), axes=(1, 2), norm="ortho")
  feats = np.concatenate([spec.real, spec.imag], -1)
  hid = np.maximum(feats @ np.asarray(params["mask_in"]["kernel"]) + np.asarray(
      params["mask_in"]["bias"]), 0)
  m = hid @ np.asarray(params["mask_out"]["kernel"]) + np.asarray(params["mask_out"]["bias"])
  mask = 1 + m[..., :3] + 1j * m[..., 3:]
  ref = np.fft.irfft2(spec * mask, s=(4, 6), axes=(1, 2), norm="ortho")
  assert rel_err(y, ref) < 1e-5


def test_spectral_dense_and_sst_rules(key):
  mod = SpectralDense(features=12, rank=5)
  x = jax.random.normal(key, (3, 9))
  params = jax.jit(mod.init)(key, x)["params"]
  u, s, v = params["U"], params["s"], params["V"]
  np.testing.assert_allclose(u.T @ u, np.eye(5), atol=1e-5)
  np.testing.assert_allclose(v.T @ v, np.eye(5), atol=1e-5)
  y = jax.jit(mod.apply)({"params": params}, x)
  ref = np.asarray(x, np.float64) @ (np.asarray(u) * np.asarray(s)) @ np.asarray(v).T
  assert rel_err(y, ref + np.asarray(params["bias"])) < 2e-6
  # Gradient rule: all of s, exactly num_active columns of U and V; a dominant value is
  # always sampled.
  tree = {"layer": {**params, "s": s.at[3].set(1e6)}, "other": {"kernel": jnp.ones((2, 2))}}
  grads = jax.tree.map(jnp.ones_like, tree)
  mask_fn = jax.jit(lambda g, p, k: sst_mask_gradients(g, p, k, num_active=2))
  for i in range(3):
    masked = mask_fn(grads, tree, jax.random.fold_in(key, i))
    cols = np.flatnonzero(np.asarray(masked["layer"]["U"]).any(0))
    assert len(cols) == 2 and 3 in cols
    np.testing.assert_array_equal(np.flatnonzero(np.asarray(masked["layer"]["V"]).any(0)), cols)
    np.testing.assert_array_equal(masked["layer"]["s"], 1.0)
    np.testing.assert_array_equal(masked["other"]["kernel"], 1.0)
  # Re-orthogonalisation after a non-orthogonal update keeps W and restores U^T U = I.
  drift = jax.tree.map(lambda a: a + 0.05 * np.random.default_rng(1).standard_normal(a.shape),
                       params)
  fixed = jax.jit(sst_reorthogonalize)({"dense": drift})["dense"]
  w = lambda p: (p["U"] * p["s"]) @ p["V"].T
  assert rel_err(w(fixed), w(drift)) < 1e-5
  np.testing.assert_allclose(fixed["U"].T @ fixed["U"], np.eye(5), atol=1e-5)
  np.testing.assert_allclose(fixed["V"].T @ fixed["V"], np.eye(5), atol=1e-5)
  assert bool(jnp.all(jnp.diff(fixed["s"]) <= 0))  # singular values sorted, descending


def test_bad_inputs(key):
  with pytest.raises(ValueError, match=r"rank must be in \[1, min\(in=9, features=12\)\], got 10"):
    SpectralDense(features=12, rank=10).init(key, jnp.ones((2, 9)))
  with pytest.raises(ValueError, match=r"HyenaOperator: u must be \[batch, seq, d_model=8\]"):
    HyenaOperator(d_model=8, max_len=16).init(key, jnp.ones((1, 4, 6)))
  with pytest.raises(ValueError, match="seq=20 exceeds max_len=16"):
    HyenaOperator(d_model=8, max_len=16).init(key, jnp.ones((1, 20, 8)))
  with pytest.raises(ValueError, match=r"GlobalFilter: x must be \[batch, h, w, channels\]"):
    GlobalFilter().init(key, jnp.ones((2, 3, 4)))
  with pytest.raises(ValueError, match="filter_len = k.shape"):
    FFTConv(filter_len=9).init(key, jnp.ones((1, 5, 2)))
