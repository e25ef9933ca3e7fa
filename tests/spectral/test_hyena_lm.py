"""Hyena LM: forward shapes, causality, parameter count, config errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.models import hyena


def test_forward_causal_and_param_count(key):
  # The long convolution's implementations are compared in test_fft_conv.py; here the
  # jnp.fft reference keeps the compile small.
  config = hyena.get_config("hyena-tiny", num_layers=1, fft_conv_implementation="xla")
  model = hyena.HyenaLM(config)
  params = jax.jit(lambda k: hyena.init_params(config, k))(key)
  n = sum(x.size for x in jax.tree.leaves(params))
  assert n == hyena.num_params(config)
  tokens = jax.random.randint(key, (2, 13), 0, config.vocab_size)
  apply = jax.jit(lambda t: model.apply({"params": params}, t))
  logits = apply(tokens)
  assert logits.shape == (2, 13, config.vocab_size) and logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all()
  changed = tokens.at[:, 7].set((tokens[:, 7] + 1) % config.vocab_size)
  logits2 = apply(changed)
  np.testing.assert_allclose(logits2[:, :7], logits[:, :7], rtol=1e-5, atol=1e-5)
  assert not np.allclose(logits2[:, 7:], logits[:, 7:])
  assert hyena.flops_per_token(config, 13) > 6 * hyena.num_params(config, non_embedding=True)


def test_bad_config_and_inputs(key):
  with pytest.raises(ValueError, match="filter_emb_dim must be odd"):
    hyena.HyenaConfig(filter_emb_dim=4)
  with pytest.raises(ValueError, match="unknown model preset 'hyena-big'"):
    hyena.get_config("hyena-big")
  config = hyena.get_config("hyena-tiny", num_layers=1, max_seq_len=8)
  with pytest.raises(ValueError, match="seq=9 exceeds max_seq_len=8"):
    hyena.HyenaLM(config).init(key, jnp.zeros((1, 9), jnp.int32))
  with pytest.raises(TypeError, match="tokens must be integer"):
    hyena.HyenaLM(config).init(key, jnp.zeros((1, 4), jnp.float32))
