"""End-to-end generation speed: decode tokens/s and time to first token, bf16 vs quantized KV.

``python -m experiments.generate_bench [--batches 1,8,64] [--kv bf16,int8] [--quick]``

Runs :func:`experiments.generate.generate` (paged KV cache, the decode-attention op
inside the decode loop, greedy sampling, no stop token so every sequence decodes
``--new`` tokens) on a randomly initialised GPT (speed does not depend on the weights;
parameters are cast to bf16 as a server stores them) for each batch size and KV storage,
twice: the first call compiles, the second is timed. Prompts are random tokens of
``--prompt`` length.

Default model: the ``gpt-125m`` shape with 8 layers, GQA (12 query / 4 KV heads of 64),
unrolled layers (the paged cache needs ``scan_layers=False``), bf16 compute; page size 64
(the Mosaic GPU decode kernel's quantized caches need pages >= 32 tokens).

Writes ``experiments/results/<device>/generate.json`` in the bench schema: one row per
(batch, KV format), ``case`` = ``generate b<batch> prompt<p> new<n>``, ``implementation``
= ``jaxeff:kv_<fmt>``, ``median_s`` = seconds per decode step of the batch, ``throughput``
= decode tokens/s; ``params`` hold the time to first token (prefill of the batch plus the
first sample) and the compile time. On CPU (``--quick``) a tiny model checks the script.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments import generate as gen
from experiments.bench import harness
from jaxeff.models import gpt


@dataclasses.dataclass(frozen=True)
class BenchConfig:
  batches: tuple[int, ...] = (1, 8, 64)
  kv: tuple[str, ...] = ("bf16", "int8")
  prompt: int = 1024
  new: int = 128
  page_size: int = 64
  preset: str = "gpt-125m"
  num_layers: int = 8
  num_kv_heads: int = 4
  out_dir: str | None = None  # default experiments/results/<device>


QUICK = BenchConfig(batches=(1, 2), prompt=40, new=8, page_size=32, preset="tiny",
                    num_layers=2, num_kv_heads=2)


def model_config(cfg: BenchConfig) -> gpt.GPTConfig:
  base = gpt.PRESETS[cfg.preset]
  return base.replace(num_layers=cfg.num_layers, num_kv_heads=cfg.num_kv_heads,
                      scan_layers=False, max_seq_len=max(base.max_seq_len, cfg.prompt + cfg.new))


def run(cfg: BenchConfig) -> list[harness.Row]:
  mcfg = model_config(cfg)
  params = gpt.init_params(mcfg, jax.random.key(0))
  if mcfg.dtype == "bfloat16":
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  sampling = gen.SamplingConfig(max_new_tokens=cfg.new, temperature=0.0)
  rng = np.random.default_rng(0)
  rows, tokens_by = [], {}
  for batch in cfg.batches:
    prompts = rng.integers(0, mcfg.vocab_size, (batch, cfg.prompt)).tolist()
    for kv in cfg.kv:
      quant = None if kv == "bf16" else kv
      call = lambda: gen.generate(mcfg, params, prompts, sampling, kv_cache="paged",  # noqa: E731
                                  kv_quant=quant, page_size=cfg.page_size)
      first = call()  # compiles
      res = call()
      steps = max(len(res.tokens[0]) - 1, 1)
      tokens_by[(batch, kv)] = res.tokens
      case = f"generate b{batch} prompt{cfg.prompt} new{cfg.new}"
      params_row = dict(batch=batch, prompt=cfg.prompt, new_tokens=cfg.new, kv_format=kv,
                        page_size=cfg.page_size, layers=mcfg.num_layers, d_model=mcfg.d_model,
                        heads=mcfg.num_heads, kv_heads=mcfg.kv_heads, head_dim=mcfg.dim_per_head,
                        time_to_first_token_s=res.time_to_first_token_s,
                        compile_s=first.compile_s, decode_s=res.decode_s)
      rows.append(harness.Row(case, params_row, f"jaxeff:kv_{kv}", res.decode_s / steps,
                              res.tokens_per_s, "tokens/s"))
      print(f"batch {batch:3d} kv {kv:5s}: {res.tokens_per_s:10,.0f} tokens/s, time to first "
            f"token {res.time_to_first_token_s * 1e3:8.1f} ms, compile {first.compile_s:.1f} s",
            flush=True)
    base = tokens_by.get((batch, "bf16"))
    for kv in cfg.kv:
      if kv != "bf16" and base is not None:
        same = np.mean([a == b for a, b in zip(np.ravel(base), np.ravel(tokens_by[(batch, kv)]))])
        print(f"  greedy tokens equal to bf16 KV ({kv}): {same:.1%}", flush=True)
  return rows


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batches", default=None)
  p.add_argument("--kv", default=None)
  p.add_argument("--prompt", type=int, default=None)
  p.add_argument("--new", type=int, default=None)
  p.add_argument("--quick", action="store_true", help="a tiny model (CPU check)")
  p.add_argument("--out-dir", default=None)
  a = p.parse_args(argv)
  cfg = QUICK if a.quick else BenchConfig()
  changes = {}
  if a.batches:
    changes["batches"] = tuple(int(x) for x in a.batches.split(","))
  if a.kv:
    changes["kv"] = tuple(a.kv.split(","))
  for name in ("prompt", "new", "out_dir"):
    if getattr(a, name) is not None:
      changes[name] = getattr(a, name)
  cfg = dataclasses.replace(cfg, **changes)
  rows = run(cfg)
  out = Path(cfg.out_dir) if cfg.out_dir else None
  path = harness.write_results("generate", rows, out_dir=out)
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
