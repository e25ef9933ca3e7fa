"""Sample text from a trained GPT checkpoint with a paged (or contiguous) KV cache.

``python -m experiments.generate --checkpoint runs/<run> --prompt "def " [--prompt ...]``

Generation (:func:`generate`) runs in two compiled programs:

* prefill: the right-padded prompts ``[batch, prompt_len]`` go through the model once,
  filling the KV cache; the logits at each prompt's last real token give its first new
  token (time to first token);
* decode: a ``lax.while_loop`` feeds one token per sequence per iteration, each sequence at
  its own position (prompts of different lengths share one batch), until every sequence
  has hit a stop token or ``max_new_tokens`` tokens were produced.

KV caches (``kv_cache=``):

* ``"paged"`` (default unless the model uses ``scan_layers``): a
  :class:`jaxeff.kv_cache.PagedKVCache` (vLLM's PagedAttention, Kwon et al., 2023), one
  page pool for all layers, pages allocated per sequence as it grows
  (``kv_cache.reserve``), optionally quantized on write (``kv_quant`` int8 / fp8 / int4).
  Prefill runs flash attention on the prompt block and writes the pages; each decode step
  reserves one token per active sequence, appends its K/V and attends through
  :func:`jaxeff.ops.decode_attention`; finished sequences release their pages. The cache
  is carried through the ``while_loop`` and donated to the decode program.
* ``"contiguous"``: preallocated per-layer ``[batch, max_len, kv_heads, head_dim]`` caches
  attended through a masked :func:`jaxeff.ops.dot_product_attention` (also works with
  ``scan_layers``).

Sampling (:func:`sample_logits`): greedy (``temperature=0``), temperature, top-k and
nucleus/top-p (Holtzman et al., 2020) filtering. Tokens are bytes for the byte-level
models trained by :mod:`experiments.train_lm`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxeff import kv_cache as paged
from jaxeff.models import gpt

PAD_TO = 16  # prompt and cache lengths are rounded up to this (fewer recompiles)
KV_CACHES = ("paged", "contiguous")
KV_QUANTS = (None, "int8", "fp8", "int4")


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How to pick tokens.

  Attributes:
    max_new_tokens: tokens to generate per prompt (at most).
    temperature: 0 for greedy decoding, else the softmax temperature.
    top_k: keep only the ``top_k`` most likely tokens (None or 0: all).
    top_p: keep the smallest set of tokens whose probability reaches ``top_p`` (1.0: all).
    stop_tokens: a sequence ends at the first of these (not included in the output).
    seed: sampling randomness.
  """

  max_new_tokens: int = 128
  temperature: float = 1.0
  top_k: int | None = None
  top_p: float = 1.0
  stop_tokens: tuple[int, ...] = ()
  seed: int = 0

  def validate(self, vocab_size: int) -> None:
    if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
    if not self.temperature >= 0:
      raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
    if self.top_k is not None and not 0 <= self.top_k <= vocab_size:
      raise ValueError(f"top_k must be in [0, vocab_size={vocab_size}], got {self.top_k!r}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
    bad = [t for t in self.stop_tokens if not 0 <= t < vocab_size]
    if bad:
      raise ValueError(f"stop_tokens must be token ids in [0, {vocab_size}), got {bad}")


@dataclasses.dataclass
class GenerationResult:
  """Generated tokens and timings.

  Attributes:
    tokens: per prompt, the new tokens (up to, not including, a stop token).
    time_to_first_token_s: prefill plus the first sample, compiled, for the whole batch.
    decode_s: wall time of the decode loop.
    tokens_per_s: ``batch * decode_steps / decode_s`` (decode throughput of the batch).
    compile_s: time spent compiling prefill and decode.
  """

  tokens: list[list[int]]
  time_to_first_token_s: float
  decode_s: float
  tokens_per_s: float
  compile_s: float


def sample_logits(logits: jax.Array, key: jax.Array, *, temperature: float,
                  top_k: int | None = None, top_p: float = 1.0) -> jax.Array:
  """Picks one token per row.

  Args:
    logits: float ``[batch, vocab]``.
    key: PRNG key (unused when ``temperature == 0``).
    temperature / top_k / top_p: see :class:`SamplingConfig`.

  Returns:
    int32 ``[batch]``.
  """
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = mass_before < top_p  # the most likely token is always kept
    cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


_COMPILED: dict = {}  # compiled (prefill, decode) by static shapes and options


@functools.lru_cache(maxsize=32)
def _programs(config: gpt.GPTConfig, batch: int, prompt_len: int, max_len: int, n_new: int,
              temperature: float, top_k: int | None, top_p: float, kv_cache: str = "contiguous",
              kv_quant: str | None = None, page_size: int = 16, num_pages: int = 0):
  """The jitted prefill and decode programs for one set of static shapes and options."""
  if kv_cache == "paged":
    return _paged_programs(config, batch, prompt_len, max_len, n_new, temperature, top_k,
                           top_p, kv_quant, page_size, num_pages)
  model = gpt.GPT(config)
  pick = lambda logits, key: sample_logits(  # noqa: E731
      logits, key, temperature=temperature, top_k=top_k, top_p=top_p)

  def prefill(params, tokens, lengths, key):
    """Prompts [batch, prompt_len] -> (first new token [batch], filled caches)."""
    caches = gpt.init_kv_caches(config, batch, max_len)
    positions = jnp.broadcast_to(jnp.arange(prompt_len, dtype=jnp.int32), tokens.shape)
    logits, caches = model.apply({"params": params}, tokens, positions=positions,
                                 kv_caches=caches)
    last = logits[jnp.arange(batch), lengths - 1]
    return pick(last, jax.random.fold_in(key, 0)), caches

  def decode(params, first, caches, lengths, key, stop):
    """-> (tokens [batch, n_new] with -1 after a stop token, steps run)."""
    out = jnp.full((batch, n_new), -1, jnp.int32).at[:, 0].set(first)
    done = jnp.isin(first, stop)

    def cond(carry):
      i, _, _, _, done = carry
      return (i < n_new) & ~jnp.all(done)

    def body(carry):
      # Invariant: out[:, :i] holds the tokens so far; `token` (the last one, 0 once a row is
      # done) sits at position lengths + i - 1, the next free cache row.
      i, token, caches, out, done = carry
      positions = (lengths + i - 1)[:, None]
      logits, caches = model.apply({"params": params}, token[:, None], positions=positions,
                                   kv_caches=caches)
      nxt = jnp.where(done, -1, pick(logits[:, 0], jax.random.fold_in(key, i)))
      out = out.at[:, i].set(nxt)
      done = done | jnp.isin(nxt, stop)
      return i + 1, jnp.where(done, 0, nxt), caches, out, done

    token = jnp.where(done, 0, first)
    i, _, _, out, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), token, caches, out, done))
    return out, i

  return jax.jit(prefill), jax.jit(decode)


def _paged_programs(config, batch, prompt_len, max_len, n_new, temperature, top_k, top_p,
                    kv_quant, page_size, num_pages):
  """Prefill and decode over a :class:`jaxeff.kv_cache.PagedKVCache` (module docstring)."""
  model = gpt.GPT(config)
  pick = lambda logits, key: sample_logits(  # noqa: E731
      logits, key, temperature=temperature, top_k=top_k, top_p=top_p)

  def prefill(params, tokens, lengths, key):
    """Prompts [batch, prompt_len] -> (first token [batch], cache, all pages reserved)."""
    cache = gpt.init_paged_cache(config, batch, max_len, page_size=page_size, quant=kv_quant,
                                 num_pages=num_pages)
    cache, ok = paged.reserve(cache, lengths)
    positions = jnp.broadcast_to(jnp.arange(prompt_len, dtype=jnp.int32), tokens.shape)
    logits, cache = model.apply({"params": params}, tokens, positions=positions,
                                paged_cache=cache, num_new=lengths)
    last = logits[jnp.arange(batch), lengths - 1]
    return pick(last, jax.random.fold_in(key, 0)), cache, jnp.all(ok)

  def decode(params, first, cache, key, stop):
    """-> (tokens [batch, n_new] with -1 after a stop token, steps run, all reserved, the
    final cache; returned so the donated input cache's buffers are reused in place)."""
    out = jnp.full((batch, n_new), -1, jnp.int32).at[:, 0].set(first)
    done = jnp.isin(first, stop)
    cache = paged.release(cache, done)

    def cond(carry):
      i, _, _, _, done, _ = carry
      return (i < n_new) & ~jnp.all(done)

    def body(carry):
      # Invariant: out[:, :i] holds the tokens so far; `token` (the last one) of each
      # active sequence goes to cache position `lengths` (reserved here).
      i, token, cache, out, done, all_ok = carry
      active = (~done).astype(jnp.int32)
      cache, ok = paged.reserve(cache, active)
      positions = jnp.maximum(cache.lengths - 1, 0)[:, None]
      logits, cache = model.apply({"params": params}, token[:, None], positions=positions,
                                  paged_cache=cache, num_new=active)
      nxt = jnp.where(done, -1, pick(logits[:, 0], jax.random.fold_in(key, i)))
      out = out.at[:, i].set(nxt)
      finished = ~done & jnp.isin(nxt, stop)
      cache = paged.release(cache, finished)
      done = done | finished
      return (i + 1, jnp.where(done, 0, nxt), cache, out, done,
              all_ok & jnp.all(ok | done))

    token = jnp.where(done, 0, first)
    i, _, cache, out, _, ok = jax.lax.while_loop(
        cond, body, (jnp.int32(1), token, cache, out, done, jnp.bool_(True)))
    return out, i, ok, cache

  return jax.jit(prefill), jax.jit(decode, donate_argnums=(2,))


def _check_kv_options(config: gpt.GPTConfig, kv_cache, kv_quant, page_size) -> str:
  """The cache kind to use (``kv_cache`` or the default), after validating the options."""
  if kv_cache is None:
    kv_cache = "contiguous" if config.scan_layers else "paged"
  if kv_cache not in KV_CACHES:
    raise ValueError(f"kv_cache must be one of {KV_CACHES} (or None for the default), got "
                     f"{kv_cache!r}")
  if kv_quant not in KV_QUANTS:
    raise ValueError(f"kv_quant must be one of {KV_QUANTS}, got {kv_quant!r}")
  if kv_cache == "paged" and config.scan_layers:
    raise ValueError("kv_cache='paged' is not supported for a model with scan_layers=True; "
                     "use kv_cache='contiguous' (or None) or a config with scan_layers=False")
  if kv_cache == "contiguous" and kv_quant is not None:
    raise ValueError(f"kv_quant={kv_quant!r} needs kv_cache='paged' (the contiguous cache "
                     "stores the compute dtype)")
  if (not isinstance(page_size, int) or isinstance(page_size, bool) or page_size < 1
      or page_size & (page_size - 1)):
    raise ValueError(f"page_size must be a positive power of two, got {page_size!r}")
  return kv_cache


def generate(config: gpt.GPTConfig, params, prompts: Sequence[Sequence[int]],
             sampling: SamplingConfig = SamplingConfig(), *, kv_cache: str | None = None,
             kv_quant: str | None = None, page_size: int = 16) -> GenerationResult:
  """Continues each prompt (a list of token ids, lengths may differ) with a KV cache.

  Args:
    config: the model's config.
    params: its parameters.
    prompts: ``batch`` non-empty token-id lists.
    sampling: decoding options.
    kv_cache: ``"paged"``, ``"contiguous"`` or None (paged unless ``config.scan_layers``).
    kv_quant: paged cache storage: None (the compute dtype), ``"int8"``, ``"fp8"``,
      ``"int4"``.
    page_size: tokens per page of the paged cache (a power of two).

  Returns:
    A :class:`GenerationResult`.
  """
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("prompts must be a non-empty list of non-empty token lists")
  sampling.validate(config.vocab_size)
  kv_cache = _check_kv_options(config, kv_cache, kv_quant, page_size)
  bad = sorted({t for p in prompts for t in p if not 0 <= t < config.vocab_size})
  if bad:
    raise ValueError(f"prompt tokens must be in [0, {config.vocab_size}), got {bad[:5]}")
  batch = len(prompts)
  lengths = np.array([len(p) for p in prompts], np.int32)
  prompt_len = _round_up(int(lengths.max()), PAD_TO)
  max_len = prompt_len + _round_up(sampling.max_new_tokens, PAD_TO)
  tokens = np.zeros((batch, prompt_len), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, :len(p)] = p
  stop = jnp.asarray(sampling.stop_tokens or (-1,), jnp.int32)
  key = jax.random.key(sampling.seed)
  lengths_d = jnp.asarray(lengths)
  num_pages = 0
  if kv_cache == "paged":
    # Pages for each sequence's own prompt + new tokens (not the padded maximum), rounded
    # up to a multiple of 16 pages so nearby batches share one compiled program.
    need = sum(-(-(int(n) + sampling.max_new_tokens) // page_size) for n in lengths)
    num_pages = _round_up(need, 16)
  static = (config, batch, prompt_len, max_len, sampling.max_new_tokens, sampling.temperature,
            sampling.top_k, sampling.top_p, kv_cache, kv_quant, page_size, num_pages,
            stop.shape[0], tuple(str(x.sharding) for x in jax.tree.leaves(params)[:1]),
            # The params' structure, shapes and dtypes: quantized or otherwise transformed
            # trees of the same config must not reuse another tree's executable.
            jax.tree.structure(params),
            tuple((x.shape, str(x.dtype)) for x in jax.tree.leaves(params)))
  prefill, decode = _programs(*static[:12])
  extra = () if kv_cache == "paged" else (lengths_d,)
  compiled = _COMPILED.get(static)
  compile_s = 0.0
  if compiled is None:
    t0 = time.perf_counter()
    compiled = [prefill.lower(params, tokens, lengths_d, key).compile(), None]
    compile_s += time.perf_counter() - t0

  t0 = time.perf_counter()
  first, caches, *prefill_ok = compiled[0](params, tokens, lengths_d, key)
  first.block_until_ready()
  ttft = time.perf_counter() - t0
  if prefill_ok and not bool(prefill_ok[0]):
    raise RuntimeError(f"generate: the paged cache ({num_pages} pages of {page_size}) could "
                       "not hold the prompts")
  if compiled[1] is None:
    t0 = time.perf_counter()
    compiled[1] = decode.lower(params, first, caches, *extra, key, stop).compile()
    compile_s += time.perf_counter() - t0
    if len(_COMPILED) >= 32:
      _COMPILED.clear()
    _COMPILED[static] = compiled
  t0 = time.perf_counter()
  out, steps, *decode_ok = compiled[1](params, first, caches, *extra, key, stop)[:3]
  out = np.asarray(out)
  decode_s = time.perf_counter() - t0
  steps = int(steps)
  del caches  # donated to the paged decode program
  if decode_ok and not bool(decode_ok[0]):
    raise RuntimeError(f"generate: the paged cache ({num_pages} pages of {page_size}) ran "
                       "out of pages while decoding")

  stop_set = set(sampling.stop_tokens)
  result = []
  for row in out:
    seq = []
    for t in row.tolist():
      if t < 0 or t in stop_set:
        break
      seq.append(t)
    result.append(seq)
  decoded = batch * max(steps - 1, 0)
  return GenerationResult(tokens=result, time_to_first_token_s=ttft, decode_s=decode_s,
                          tokens_per_s=decoded / decode_s if decode_s > 0 and decoded else math.nan,
                          compile_s=compile_s)


def decode_bytes(tokens: Sequence[int]) -> str:
  """Byte tokens to text (invalid UTF-8 shown as U+FFFD)."""
  return bytes(t for t in tokens if 0 <= t < 256).decode("utf-8", errors="replace")


def load_params(checkpoint: str, step: int | None = None):
  """``(config, params, meta)`` from a checkpoint or run folder, on the default device."""
  import os

  from experiments import checkpoint as ckpt

  checkpoint = os.path.abspath(checkpoint)  # Orbax restores from absolute paths only
  meta = ckpt.read_meta(checkpoint, step)
  try:
    config = gpt.GPTConfig.from_dict(meta["model"])
  except (TypeError, ValueError) as e:
    raise ckpt.CheckpointError(f"checkpoint {checkpoint!r} has an invalid model config: {e}") from None
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.eval_shape(lambda: gpt.init_params(config, jax.random.key(0)))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          abstract)
  params, _, meta = ckpt.restore(checkpoint, abstract_params=abstract, step=step)
  return config, params, meta


def main(argv: Sequence[str] | None = None) -> int:
  from experiments import checkpoint as ckpt

  p = argparse.ArgumentParser(prog="python -m experiments.generate", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--checkpoint", required=True, help="run folder or checkpoint folder")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
  p.add_argument("--prompt", action="append", default=None,
                 help="prompt text; repeat for a batch of prompts (default: 'def ')")
  p.add_argument("--max-new-tokens", type=int, default=200)
  p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
  p.add_argument("--top-k", type=int, default=0, help="0 = off")
  p.add_argument("--top-p", type=float, default=1.0, help="1.0 = off")
  p.add_argument("--stop-token", type=int, action="append", default=[],
                 help="token id that ends a sequence (repeatable); e.g. 10 for a newline")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--kv-cache", choices=KV_CACHES, default=None,
                 help="KV cache layout (default: paged, contiguous for scan_layers models)")
  p.add_argument("--kv-quant", choices=[q for q in KV_QUANTS if q], default=None,
                 help="quantize the paged cache on write (default: compute dtype)")
  p.add_argument("--page-size", type=int, default=16, help="tokens per page (power of two)")
  args = p.parse_args(argv)
  try:
    config, params, meta = load_params(args.checkpoint, args.step)
    prompts = args.prompt or ["def "]
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_k=args.top_k or None, top_p=args.top_p,
                              stop_tokens=tuple(args.stop_token), seed=args.seed)
    res = generate(config, params, [list(s.encode()) for s in prompts], sampling,
                   kv_cache=args.kv_cache, kv_quant=args.kv_quant, page_size=args.page_size)
  except (ckpt.CheckpointError, ValueError) as e:
    print(f"generate: error: {e}", file=sys.stderr)
    return 2
  print(f"checkpoint {args.checkpoint} step {meta['step']} on {jax.devices()[0].device_kind}")
  for prompt, toks in zip(prompts, res.tokens):
    print(f"--- prompt {prompt!r} ({len(toks)} new tokens)")
    print(prompt + decode_bytes(toks))
  print(f"--- time to first token {res.time_to_first_token_s * 1e3:.1f} ms, decode "
        f"{res.tokens_per_s:,.0f} tokens/s (batch {len(prompts)}), compile {res.compile_s:.1f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
