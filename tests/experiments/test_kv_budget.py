"""kv_budget: the simulated budgeted decode is exact where it must be.

A random tiny GPT (no checkpoint): with every token kept, the teacher-forced decode through
the budget hook gives the logits of one full forward pass; a budget evicts (changes the
logits) once the sequence outgrows it, and not before; the policies keep their budget.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import kv_budget
from jaxeff.models import gpt

SEQ, PREFILL = 24, 4


@pytest.fixture(scope="module")
def model():
  cfg = gpt.PRESETS["tiny"]
  params = gpt.init_params(cfg, jax.random.key(0))
  inputs = jax.random.randint(jax.random.key(1), (2, SEQ), 0, cfg.vocab_size, jnp.int32)
  full = gpt.GPT(cfg).apply({"params": params}, inputs,
                            positions=jnp.broadcast_to(jnp.arange(SEQ), (2, SEQ)))
  return cfg, params, inputs, full


def _eval(model, policy, mode="evict", exact=True):
  cfg, params, inputs, _ = model
  return kv_budget._evaluate(cfg, params, inputs, prefill=PREFILL, policy=policy, mode=mode,
                             exact_tokens=exact)


def test_full_cache_equals_forward_pass(model):
  logits = _eval(model, kv_budget._NoEviction(SEQ))
  full = model[3][:, PREFILL - 1:]
  assert logits.shape == full.shape
  np.testing.assert_allclose(np.asarray(logits), np.asarray(full), rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("name", ["window+sinks", "scissorhands", "zipvl-int4"])
def test_budget_changes_logits_only_past_the_budget(model, name):
  budget = 12
  policy, mode = kv_budget.make_policy(name, budget)
  assert policy.budget == budget
  logits = np.asarray(_eval(model, policy, mode))
  full = np.asarray(model[3][:, PREFILL - 1:])
  # Targets up to position budget - 1 saw every token exactly.
  inside = budget - PREFILL + 1
  np.testing.assert_allclose(logits[:, :inside], full[:, :inside], rtol=2e-4, atol=2e-4)
  assert np.abs(logits[:, inside:] - full[:, inside:]).max() > 1e-3


def test_all_quantized_cache_is_close_not_equal(model):
  logits = np.asarray(_eval(model, kv_budget._NoEviction(SEQ), "int8", exact=False))
  full = np.asarray(model[3][:, PREFILL - 1:])
  err = np.linalg.norm(logits - full) / np.linalg.norm(full)
  assert 0 < err < 2e-2


def test_unknown_policy_is_named():
  with pytest.raises(ValueError, match="unknown policy 'lru'"):
    kv_budget.make_policy("lru", 16)
