"""Generation: sampling filters, paged / contiguous KV-cache generation vs a full-forward loop,
quantized paged caches, stop tokens, cache options, CLI."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import checkpoint as ckpt
from experiments import generate as gen
from jaxeff.models import gpt

CONFIG = gpt.PRESETS["tiny"]


@pytest.fixture(scope="module")
def params():
  return jax.jit(lambda k: gpt.init_params(CONFIG, k))(jax.random.key(1))


def test_sample_logits_filters(key):
  sample = jax.jit(gen.sample_logits, static_argnames=("temperature", "top_k", "top_p"))
  logits = jax.random.normal(key, (4, 50)) * 3
  greedy = sample(logits, key, temperature=0.0)
  np.testing.assert_array_equal(greedy, jnp.argmax(logits, -1))
  np.testing.assert_array_equal(sample(logits, key, temperature=2.0, top_k=1), greedy)
  np.testing.assert_array_equal(sample(logits, key, temperature=1.0, top_p=1e-6), greedy)
  # top-k = 3: every draw is one of the 3 most likely tokens, and more than one of them occurs.
  rows = jnp.broadcast_to(logits[0] / 3, (512, 50))
  draws = np.asarray(sample(rows, key, temperature=1.0, top_k=3))
  top3 = set(np.argsort(np.asarray(logits[0]))[-3:].tolist())
  assert set(draws.tolist()) <= top3 and len(set(draws.tolist())) > 1
  # top-p: only the smallest set of tokens holding probability >= p.
  probs = jnp.array([0.5, 0.3, 0.15, 0.05])
  rows = jnp.broadcast_to(jnp.log(probs), (512, 4))
  draws = np.asarray(sample(rows, key, temperature=1.0, top_p=0.7))
  assert set(draws.tolist()) == {0, 1}


def _greedy_reference(params, prompt, n):
  """Greedy decoding by re-running the whole (right-padded, causal) sequence each step."""
  apply = jax.jit(gpt.GPT(CONFIG).apply)
  toks = np.zeros((1, 32), np.int32)
  toks[0, :len(prompt)] = prompt
  for i in range(len(prompt), len(prompt) + n):
    logits = apply({"params": params}, jnp.asarray(toks))
    toks[0, i] = int(jnp.argmax(logits[0, i - 1]))
  return toks[0, len(prompt):len(prompt) + n].tolist()


def test_kv_cache_generation_matches_full_forward_for_ragged_batch(params):
  prompts = [list(b"def f(x):"), list(b"a"), list(b"import os, sys\n")]
  res = gen.generate(CONFIG, params, prompts, gen.SamplingConfig(max_new_tokens=7, temperature=0))
  for prompt, out in zip(prompts, res.tokens):
    assert out == _greedy_reference(params, prompt, 7)
  assert res.time_to_first_token_s > 0 and res.tokens_per_s > 0


def test_paged_equals_contiguous_equals_full_forward_greedy(params):
  prompts = [list(b"for i in"), list(b"x"), list(b"while True:\n  ")]
  s = gen.SamplingConfig(max_new_tokens=6, temperature=0)
  pag = gen.generate(CONFIG, params, prompts, s, kv_cache="paged", page_size=4)
  con = gen.generate(CONFIG, params, prompts, s, kv_cache="contiguous")
  assert pag.tokens == con.tokens
  for prompt, out in zip(prompts, pag.tokens):
    assert out == _greedy_reference(params, prompt, 6)
  assert pag.time_to_first_token_s > 0 and pag.tokens_per_s > 0 and pag.compile_s > 0


def test_paged_decode_calls_decode_attention(params, monkeypatch):
  from jaxeff import ops
  calls = []
  real = ops.decode_attention

  def spy(*args, **kwargs):
    calls.append(kwargs.get("page_table") is not None)
    return real(*args, **kwargs)

  monkeypatch.setattr(ops, "decode_attention", spy)
  gen._programs.cache_clear()
  gen._COMPILED.clear()
  gen.generate(CONFIG, params, [[5, 6, 7]], gen.SamplingConfig(max_new_tokens=3, temperature=0),
               kv_cache="paged", page_size=8)
  gen._programs.cache_clear()
  gen._COMPILED.clear()
  assert calls and all(calls)  # traced once per layer, always with a page table


def test_int8_paged_generation_and_stop_tokens(params):
  quant = "int8"  # int4 / fp8 numerics: tests/models/test_gpt.py
  prompts = [list(b"def f(x):"), list(b"a")]
  s = gen.SamplingConfig(max_new_tokens=6, temperature=0)
  ref = gen.generate(CONFIG, params, prompts, s, kv_cache="paged")
  q = gen.generate(CONFIG, params, prompts, s, kv_cache="paged", kv_quant=quant)
  assert all(len(t) == 6 for t in q.tokens)
  # A random tiny model's argmax is fragile; int8 keeps (at least) the first tokens.
  assert [t[:2] for t in q.tokens] == [t[:2] for t in ref.tokens]
  stop = ref.tokens[0][2]
  cut = gen.generate(CONFIG, params, prompts[:1], gen.SamplingConfig(
      max_new_tokens=6, temperature=0, stop_tokens=(stop,)), kv_cache="paged")
  assert cut.tokens[0] == ref.tokens[0][:ref.tokens[0].index(stop)]


def test_scan_layers_model_uses_the_contiguous_cache_or_errors(params):
  config = CONFIG.replace(scan_layers=True)
  sp = jax.jit(lambda k: gpt.init_params(config, k))(jax.random.key(1))
  s = gen.SamplingConfig(max_new_tokens=4, temperature=0)
  res = gen.generate(config, sp, [[1, 2, 3]], s)  # default: contiguous
  assert len(res.tokens[0]) == 4
  with pytest.raises(ValueError, match="kv_cache='paged' is not supported for a model with "
                     "scan_layers=True"):
    gen.generate(config, sp, [[1, 2, 3]], s, kv_cache="paged")


@pytest.mark.parametrize("kw, match", [
    (dict(kv_cache="ring"), "kv_cache must be one of"),
    (dict(kv_quant="int2"), "kv_quant must be one of"),
    (dict(kv_cache="contiguous", kv_quant="int8"), "kv_quant='int8' needs kv_cache='paged'"),
    (dict(page_size=12), "page_size must be a positive power of two, got 12"),
    (dict(page_size=0), "page_size must be a positive power of two, got 0"),
])
def test_bad_kv_cache_options(params, kw, match):
  with pytest.raises(ValueError, match=match):
    gen.generate(CONFIG, params, [[1, 2]], gen.SamplingConfig(max_new_tokens=2), **kw)


def test_stop_tokens_and_sampling_is_seeded(params):
  prompt = [list(b"class ")]
  full = gen.generate(CONFIG, params, prompt, gen.SamplingConfig(max_new_tokens=6, temperature=0))
  stop = full.tokens[0][3]
  cut = gen.generate(CONFIG, params, prompt, gen.SamplingConfig(
      max_new_tokens=6, temperature=0, stop_tokens=(stop,)))
  assert cut.tokens[0] == full.tokens[0][:full.tokens[0].index(stop)]
  s = gen.SamplingConfig(max_new_tokens=6, temperature=1.0, top_k=20, top_p=0.9, seed=3)
  a = gen.generate(CONFIG, params, prompt * 2, s)
  b = gen.generate(CONFIG, params, prompt * 2, s)
  assert a.tokens == b.tokens and all(len(t) == 6 for t in a.tokens)


@pytest.mark.parametrize("sampling, match", [
    (dict(max_new_tokens=0), "max_new_tokens must be"),
    (dict(temperature=-1.0), "temperature must be >= 0"),
    (dict(top_p=0.0), "top_p must be in"),
    (dict(top_k=1000), "top_k must be in"),
    (dict(stop_tokens=(300,)), "stop_tokens must be token ids"),
])
def test_bad_sampling_options(params, sampling, match):
  with pytest.raises(ValueError, match=match):
    gen.generate(CONFIG, params, [[1, 2]], gen.SamplingConfig(**sampling))


def test_bad_prompts(params):
  with pytest.raises(ValueError, match="non-empty"):
    gen.generate(CONFIG, params, [[1], []])
  with pytest.raises(ValueError, match="prompt tokens must be in"):
    gen.generate(CONFIG, params, [[1, 999]])


def test_cli_loads_a_checkpoint_and_samples(params, tmp_path, capsys):
  c = ckpt.Checkpointer(tmp_path / "checkpoints", every=1)
  c.save(5, params, {"count": jnp.int32(0)}, {"model": CONFIG.to_dict()})
  c.close()
  assert gen.main(["--checkpoint", str(tmp_path), "--prompt", "def ", "--prompt", "x = 1",
                   "--max-new-tokens", "5", "--temperature", "0", "--stop-token", "10"]) == 0
  out = capsys.readouterr().out
  assert "step 5" in out and "prompt 'x = 1'" in out and "tokens/s" in out
  assert "time to first token" in out
  assert gen.main(["--checkpoint", str(tmp_path / "nothing")]) == 2
  assert "does not exist" in capsys.readouterr().err
  assert gen.main(["--checkpoint", str(tmp_path), "--top-p", "2"]) == 2
  assert "top_p must be in" in capsys.readouterr().err
  assert gen.main(["--checkpoint", str(tmp_path), "--prompt", "ab", "--max-new-tokens", "3",
                   "--kv-quant", "int8", "--page-size", "8"]) == 0
  assert "prompt 'ab' (3 new tokens)" in capsys.readouterr().out
  assert gen.main(["--checkpoint", str(tmp_path), "--page-size", "6"]) == 2
  assert "page_size must be a positive power of two" in capsys.readouterr().err
