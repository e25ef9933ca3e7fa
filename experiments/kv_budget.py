"""Quality of a GPT under a KV-cache budget: eviction policies and ZipVL mixed precision.

``python -m experiments.kv_budget --checkpoint runs/<run> [--seq-len 256] [--batch 16]``

A trained byte-level GPT (``experiments.train_lm``) reads held-out sequences of the embedded
corpus token by token (teacher forcing): a short prefill, then one decode step per token
through the model's paged-cache path. Each step the attention of every layer and KV head
sees only what a cache of ``budget`` tokens would hold, and the report gives perplexity
and top-1 agreement with the full-cache model (the same model, same tokens, every past
token kept exactly) against the budget:

* eviction (:mod:`jaxeff.kv_cache` policies, each per layer and KV head as in the papers):
  ``window+sinks`` (StreamingLLM, Xiao et al., 2023: 4 sink tokens + the latest ones),
  ``h2o`` (Zhang et al., 2023: half recent, half heavy hitters by accumulated
  attention), ``scissorhands`` (Liu et al., 2023: half recent, half most often above the
  uniform attention);
* ``zipvl-int4`` (He et al., 2024): the ``budget`` tokens chosen by the H2O score stay
  exact, every other token is kept *quantized* to int4 (one scale per token and head,
  ``kernels_pallas.decode.common``) instead of dropped; ``all-int8`` / ``all-int4`` are
  the quantized caches alone (budget 0 exact tokens).

Protocol (H2O's): the new token enters the kept set first (a full set evicts the policy's
victim), then attention runs over the kept set, then the policy observes that step's
attention probabilities (mean over the query heads of the KV head). Positions
``< prefill`` are the prompt (all kept; ``prefill <= budget``).

How the budget reaches attention: the model's attention layers call
``jaxeff.ops.decode_attention`` with ``implementation=config.decode_implementation``; this
script registers one more implementation for the op (:class:`_BudgetAttention`) that
gathers the layer's cached K/V, applies the kept-set mask (or the mixed precision) from the
step's state, returns the exact attention output and records the probabilities. The model
code is unchanged; the kept set is simulated by masking, which gives exactly the
attention a physically evicting cache of the same kept set gives.

Writes a JSON (``--out``) with every row and prints a markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib
import json
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments import data as data_lib
from experiments import generate as gen
from jaxeff import kv_cache as paged
from jaxeff.models import gpt
from jaxeff.ops import _registry
from kernels_pallas.decode import common

_da = importlib.import_module("jaxeff.ops.decode_attention")  # the module, not the function

IMPL_NAME = "kv_budget_sim"
POLICIES = ("window+sinks", "h2o", "scissorhands", "zipvl-int4")
NUM_SINKS = 4
PAGE_SIZE = 16


@dataclasses.dataclass(frozen=True)
class Config:
  checkpoint: str = "runs/kv_budget_lm"
  seq_len: int = 256
  batch: int = 16
  prefill: int = 8
  budgets: tuple[int, ...] = (16, 32, 64, 128)
  policies: tuple[str, ...] = POLICIES
  out: str = "experiments/results/kv_budget.json"


# ------------------------------------------------------------------ the attention hook


class _BudgetAttention:
  """The op implementation the model calls during a simulated decode step.

  Before each ``model.apply`` the step sets ``keep [layers, batch, kv_heads, capacity]``
  (bool: which cache positions attention may see exactly) and ``mode``: ``"evict"``
  (positions outside ``keep`` are dropped) or a quantization format (positions outside
  ``keep`` are seen through that format's quantize/dequantize). Layer ``l`` is the l-th
  call of the step; the probabilities ``[batch, kv_heads, capacity]`` go to ``probs``.
  """

  def __init__(self):
    self.keep = None
    self.mode = "evict"
    self.probs: list[jax.Array] = []

  def __call__(self, query, key_cache, value_cache, lengths, page_table, k_scale, v_scale, *,
               spec, return_lse):
    del k_scale, v_scale
    layer = len(self.probs)
    b, t, n, d = query.shape
    kh = spec.kv_heads
    keys = _da.logical_cache(key_cache, page_table).astype(jnp.float32)  # [b, cap, kh, d]
    values = _da.logical_cache(value_cache, page_table).astype(jnp.float32)
    cap = keys.shape[1]
    keep = self.keep[layer]  # [b, kh, cap]
    cached = jnp.arange(cap)[None, None, :] < lengths[:, None, None]
    if self.mode == "evict":
      allowed = cached & keep
    else:
      fq = lambda x: common.dequantize(*common.quantize(x, self.mode), self.mode)  # noqa: E731
      exact = jnp.transpose(keep, (0, 2, 1))[..., None]  # [b, cap, kh, 1]
      keys = jnp.where(exact, keys, fq(keys))
      values = jnp.where(exact, values, fq(values))
      allowed = cached
    q = query.astype(jnp.float32).reshape(b, t, kh, n // kh, d)
    logits = jnp.einsum("btkgd,bskd->bkgts", q, keys) * spec.scale
    logits = jnp.where(allowed[:, :, None, None, :], logits, -jnp.inf)
    lse = jax.nn.logsumexp(logits, axis=-1)
    p = jnp.exp(logits - lse[..., None])
    out = jnp.einsum("bkgts,bskd->btkgd", p, values).reshape(b, t, n, d).astype(query.dtype)
    self.probs.append(p[:, :, :, -1].mean(axis=2))  # last query token, mean over the group
    return (out, lse.reshape(b, n, t)) if return_lse else out


_HOOK = _BudgetAttention()


@contextlib.contextmanager
def _registered():
  impl = _registry.Implementation(IMPL_NAME, _HOOK)
  _da.DECODE_ATTENTION_IMPLS.insert(0, impl)
  try:
    yield
  finally:
    _da.DECODE_ATTENTION_IMPLS.remove(impl)


# --------------------------------------------------------------------------- policies


def make_policy(name: str, budget: int):
  """``(policy, mode)``: the :mod:`jaxeff.kv_cache` policy choosing the exact tokens and
  what happens to the others (``"evict"`` or a quantization format)."""
  half = budget // 2
  if name == "window+sinks":
    return paged.SlidingWindowWithSinks(num_sinks=NUM_SINKS, window=budget - NUM_SINKS), "evict"
  if name == "h2o":
    return paged.HeavyHitter(num_recent=half, num_heavy=budget - half), "evict"
  if name == "scissorhands":
    return paged.Scissorhands(num_recent=half, num_heavy=budget - half), "evict"
  if name == "zipvl-int4":
    return paged.HeavyHitter(num_recent=half, num_heavy=budget - half), "int4"
  raise ValueError(f"--policies: unknown policy {name!r}; choose from {POLICIES}")


@dataclasses.dataclass(frozen=True)
class _NoEviction:
  """Keeps every token (the full-cache reference and the all-quantized caches)."""

  budget: int

  def init(self, rows):
    return ()

  def victim(self, state, positions, new_pos):
    return jnp.zeros(positions.shape[:1], jnp.int32)

  def on_write(self, state, slots, written):
    return state

  def observe(self, state, probs, kept):
    return state


# ------------------------------------------------------------------------- evaluation


def _evaluate(model_cfg, params, inputs, *, prefill: int, policy, mode: str,
              exact_tokens: bool = True):
  """Teacher-forced logits ``[batch, seq - prefill + 1, vocab]`` for targets
  ``prefill - 1 .. seq - 1`` under ``policy`` (module docstring)."""
  b, seq = inputs.shape
  layers, kh = model_cfg.num_layers, model_cfg.kv_heads
  rows = b * layers * kh
  budget = policy.budget
  model = gpt.GPT(dataclasses.replace(model_cfg, decode_implementation=IMPL_NAME))

  cap = -(-seq // PAGE_SIZE) * PAGE_SIZE  # the cache's capacity per sequence

  def keep_mask(positions):
    """[rows, budget] positions -> [layers, b, kh, cap] kept positions."""
    idx = jnp.where(positions >= 0, positions, cap)  # -1: dropped
    m = jnp.zeros((rows, cap), jnp.bool_).at[jnp.arange(rows)[:, None], idx].set(
        True, mode="drop")
    if not exact_tokens:
      m = jnp.zeros_like(m)
    return jnp.transpose(m.reshape(b, layers, kh, cap), (1, 0, 2, 3))

  def run(params, inputs):
    cache = gpt.init_paged_cache(model_cfg, b, seq, page_size=PAGE_SIZE)
    lengths = jnp.full((b,), prefill, jnp.int32)
    cache, _ = paged.reserve(cache, lengths)
    pos = jnp.broadcast_to(jnp.arange(prefill, dtype=jnp.int32), (b, prefill))
    logits0, cache = model.apply({"params": params}, inputs[:, :prefill], positions=pos,
                                 paged_cache=cache, num_new=lengths)
    # The prompt is all kept: slots 0..prefill-1 hold positions 0..prefill-1.
    init_pos = jnp.where(jnp.arange(budget) < prefill, jnp.arange(budget), -1)
    positions = jnp.broadcast_to(init_pos.astype(jnp.int32), (rows, budget))
    pstate = policy.init(rows)
    count = jnp.full((rows,), prefill, jnp.int32)

    def step(carry, t):
      cache, positions, pstate, count = carry
      # The new token (position t) enters the kept set; a full set loses the victim.
      full = count >= budget
      victim = policy.victim(pstate, positions, jnp.full((rows,), t, jnp.int32))
      slot = jnp.where(full, victim, count).astype(jnp.int32)
      hit = jnp.arange(budget)[None, :] == slot[:, None]
      positions = jnp.where(hit, t, positions)
      pstate = policy.on_write(pstate, slot, jnp.ones((rows,), jnp.bool_))
      count = jnp.minimum(count + 1, budget)
      cache, _ = paged.reserve(cache, jnp.ones((b,), jnp.int32))
      _HOOK.keep, _HOOK.mode, _HOOK.probs = keep_mask(positions), mode, []
      logits, cache = model.apply({"params": params}, inputs[:, t][:, None],
                                  positions=jnp.full((b, 1), t, jnp.int32), paged_cache=cache,
                                  num_new=jnp.ones((b,), jnp.int32))
      probs = jnp.stack(_HOOK.probs)  # [layers, b, kh, cap]
      probs = jnp.transpose(probs, (1, 0, 2, 3)).reshape(rows, -1)
      slot_p = jnp.where(positions >= 0, jnp.take_along_axis(
          probs, jnp.clip(positions, 0, probs.shape[1] - 1), axis=1), 0.0)
      pstate = policy.observe(pstate, slot_p, count)
      return (cache, positions, pstate, count), logits[:, 0]

    _, logits = jax.lax.scan(step, (cache, positions, pstate, count),
                             jnp.arange(prefill, seq, dtype=jnp.int32))
    return jnp.concatenate([logits0[:, prefill - 1][:, None],
                            jnp.transpose(logits, (1, 0, 2))], axis=1)

  with _registered():
    return jax.jit(run)(params, inputs)


def _metrics(logits, targets, ref_logits):
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  agree = jnp.argmax(logits, -1) == jnp.argmax(ref_logits, -1)
  return dict(nll=float(nll.mean()), perplexity=float(jnp.exp(nll.mean())),
              top1_agreement=float(agree.mean()))


def run(cfg: Config) -> dict:
  model_cfg, params, meta = gen.load_params(cfg.checkpoint)
  if model_cfg.max_seq_len < cfg.seq_len:
    raise ValueError(f"--seq-len {cfg.seq_len} exceeds the model's max_seq_len "
                     f"{model_cfg.max_seq_len}")
  if cfg.prefill > min(cfg.budgets):
    raise ValueError(f"--prefill {cfg.prefill} must be <= the smallest budget {min(cfg.budgets)}")
  dataset = data_lib.load_dataset()
  batch = data_lib.val_batches(dataset, num_batches=1, batch_size=cfg.batch,
                               seq_len=cfg.seq_len)[0]
  inputs = jnp.asarray(batch["inputs"])
  targets = jnp.asarray(batch["targets"])[:, cfg.prefill - 1:]
  ev = lambda policy, mode, exact=True: _evaluate(  # noqa: E731
      model_cfg, params, inputs, prefill=cfg.prefill, policy=policy, mode=mode,
      exact_tokens=exact)
  t0 = time.perf_counter()
  ref = ev(_NoEviction(cfg.seq_len), "evict")
  rows = [dict(policy="full", budget=cfg.seq_len, **_metrics(ref, targets, ref))]
  print(f"full cache: ppl {rows[0]['perplexity']:.3f} ({time.perf_counter() - t0:.0f} s)",
        flush=True)
  for fmt in ("int8", "int4"):
    lg = ev(_NoEviction(cfg.seq_len), fmt, exact=False)
    rows.append(dict(policy=f"all-{fmt}", budget=0, **_metrics(lg, targets, ref)))
    print(f"all-{fmt}: ppl {rows[-1]['perplexity']:.3f}", flush=True)
  for name in cfg.policies:
    for budget in cfg.budgets:
      policy, mode = make_policy(name, budget)
      rows.append(dict(policy=name, budget=budget, **_metrics(ev(policy, mode), targets, ref)))
      r = rows[-1]
      print(f"{name} budget {budget}: ppl {r['perplexity']:.3f} agreement "
            f"{r['top1_agreement']:.3f}", flush=True)
  full_ppl = rows[0]["perplexity"]
  for r in rows:
    r["ppl_vs_full"] = r["perplexity"] / full_ppl
    r["kv_bytes_vs_bf16"] = kv_bytes_ratio(r["policy"], r["budget"], cfg.seq_len,
                                           model_cfg.dim_per_head)
  return dict(experiment="kv_budget", date=datetime.date.today().isoformat(),
              jax_version=jax.__version__, device=jax.devices()[0].device_kind,
              checkpoint=cfg.checkpoint, model=dataclasses.asdict(model_cfg),
              train_step=meta.get("step"), seq_len=cfg.seq_len, batch=cfg.batch,
              prefill=cfg.prefill, eval_tokens=int(targets.size), num_sinks=NUM_SINKS,
              rows=rows)


def kv_bytes_ratio(policy: str, budget: int, seq_len: int, head_dim: int) -> float:
  """KV bytes held at the end of a ``seq_len`` sequence, over a full bf16 cache."""
  full = seq_len * common.kv_bytes_per_token(head_dim, "none")
  if policy == "full":
    return 1.0
  if policy.startswith("all-"):
    return common.kv_bytes_per_token(head_dim, policy[4:]) / common.kv_bytes_per_token(
        head_dim, "none")
  kept = min(budget, seq_len) * common.kv_bytes_per_token(head_dim, "none")
  if policy == "zipvl-int4":
    kept += (seq_len - min(budget, seq_len)) * common.kv_bytes_per_token(head_dim, "int4")
  return kept / full


def table(result: dict) -> str:
  """A markdown table: perplexity (agreement with the full cache) per policy and budget."""
  budgets = sorted({r["budget"] for r in result["rows"] if r["policy"] in POLICIES})
  lines = ["| policy | " + " | ".join(f"budget {b}" for b in budgets) + " |",
           "|---|" + "---|" * len(budgets)]
  for name in POLICIES:
    cells = []
    for b in budgets:
      r = next((r for r in result["rows"] if r["policy"] == name and r["budget"] == b), None)
      cells.append("-" if r is None else f"{r['perplexity']:.3f} ({r['top1_agreement']:.1%})")
    if any(c != "-" for c in cells):
      lines.append(f"| {name} | " + " | ".join(cells) + " |")
  refs = [r for r in result["rows"] if r["policy"] in ("full", "all-int8", "all-int4")]
  lines.append("")
  lines.append("References (every token kept): " + ", ".join(
      f"{r['policy']} {r['perplexity']:.3f} ({r['top1_agreement']:.1%})" for r in refs))
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  d = Config()
  p.add_argument("--checkpoint", default=d.checkpoint)
  p.add_argument("--seq-len", type=int, default=d.seq_len)
  p.add_argument("--batch", type=int, default=d.batch)
  p.add_argument("--prefill", type=int, default=d.prefill)
  p.add_argument("--budgets", default=",".join(map(str, d.budgets)))
  p.add_argument("--policies", default=",".join(d.policies))
  p.add_argument("--out", default=d.out)
  a = p.parse_args(argv)
  cfg = Config(checkpoint=a.checkpoint, seq_len=a.seq_len, batch=a.batch, prefill=a.prefill,
               budgets=tuple(int(x) for x in a.budgets.split(",")),
               policies=tuple(a.policies.split(",")), out=a.out)
  result = run(cfg)
  Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
  Path(cfg.out).write_text(json.dumps(result, indent=1) + "\n")
  print(table(result))
  print(f"wrote {cfg.out}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
