"""End-to-end generation speed: decode tokens/s and time to first token, bf16 vs quantized
KV cache and bf16 vs quantized weights.

``python -m experiments.generate_bench [--batches 1,8,64] [--kv bf16,int8] [--quick]``
``python -m experiments.generate_bench --preset gpt-1b --layers 24 --combos bf16/bf16,int4/int8``

Runs :func:`experiments.generate.generate` (paged KV cache, the decode-attention op
inside the decode loop, greedy sampling, no stop token so every sequence decodes
``--new`` tokens) on a randomly initialised GPT (speed does not depend on the weights;
parameters are cast to bf16 as a server stores them) for each batch size and KV storage,
twice: the first call compiles, the second is timed. Prompts are random tokens of
``--prompt`` length.

Weights (``--weights`` or the ``weights/kv`` pairs of ``--combos``): ``bf16``, or the
attention and MLP projections quantized round-to-nearest (``int4`` symmetric, group 128;
``int8`` per channel; speed does not depend on the method), prepacked K-major for the
fused kernels (:func:`jaxeff.nn.quant.prepack_params`) and served through
:func:`jaxeff.nn.quant.quantized_inference`, as ``experiments.quantize_lm`` serves them
(that script measures the perplexity of the same formats on a trained model).

Default model: the ``gpt-125m`` shape with 8 layers, GQA (12 query / 4 KV heads of 64),
unrolled layers (the paged cache needs ``scan_layers=False``), bf16 compute; page size 64
(the Mosaic GPU decode kernel's quantized caches need pages >= 32 tokens).

Writes ``experiments/results/<device>/generate.json`` in the bench schema: one row per
(batch, weights, KV format), ``case`` = ``generate b<batch> prompt<p> new<n>``,
``implementation`` = ``jaxeff:kv_<fmt>`` (bf16 weights) or ``jaxeff:w_<fmt>_kv_<fmt>``, ``median_s`` = seconds per decode step of the batch, ``throughput``
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
from jaxeff import quant
from jaxeff.models import gpt
from jaxeff.nn.quant import prepack_params, quantized_inference

LINEAR = r"(attn|mlp)/[^/]+_proj/kernel$"
WEIGHT_RULES = {"int4": ("rtn", "int4", 128), "int8": ("rtn", "int8", None)}
WEIGHTS = ("bf16", *WEIGHT_RULES)
KVS = ("bf16", "int8", "fp8", "int4")


@dataclasses.dataclass(frozen=True)
class BenchConfig:
  batches: tuple[int, ...] = (1, 8, 64)
  kv: tuple[str, ...] = ("bf16", "int8")
  weights: tuple[str, ...] = ("bf16",)
  combos: tuple[tuple[str, str], ...] | None = None  # (weights, kv) pairs instead of the product
  prompt: int = 1024
  new: int = 128
  page_size: int = 64
  preset: str = "gpt-125m"
  num_layers: int = 8
  num_kv_heads: int = 4
  out_dir: str | None = None  # default experiments/results/<device>


QUICK = BenchConfig(batches=(1, 2), prompt=40, new=8, page_size=32, preset="cpu-small",
                    num_layers=2, num_kv_heads=2)


def model_config(cfg: BenchConfig) -> gpt.GPTConfig:
  base = gpt.PRESETS[cfg.preset]
  return base.replace(num_layers=cfg.num_layers, num_kv_heads=cfg.num_kv_heads,
                      scan_layers=False, max_seq_len=max(base.max_seq_len, cfg.prompt + cfg.new))


def serving_params(config: gpt.GPTConfig, params, weights: str):
  """``params`` with the linear projections in the ``weights`` format (bf16: unchanged)."""
  if weights == "bf16":
    return params
  rule = quant.QuantRule(LINEAR, *WEIGHT_RULES[weights])
  example = jnp.zeros((1, 8), jnp.int32)  # traces the [K, N] layout of DenseGeneral kernels
  return prepack_params(quant.quantize(params, (rule,), model=gpt.GPT(config),
                                       example_input=example))


def combos(cfg: BenchConfig) -> list[tuple[str, str]]:
  """The (weights, kv) pairs to run, validated."""
  pairs = list(cfg.combos) if cfg.combos else [(w, kv) for w in cfg.weights for kv in cfg.kv]
  for w, kv in pairs:
    if w not in WEIGHTS:
      raise ValueError(f"generate_bench: weights must be one of {WEIGHTS}, got {w!r}")
    if kv not in KVS:
      raise ValueError(f"generate_bench: kv must be one of {KVS}, got {kv!r}")
  return pairs


def run(cfg: BenchConfig, on_row=None) -> list[harness.Row]:
  """Times every (batch, weights, kv); ``on_row(rows)`` after each, e.g. to write them."""
  mcfg = model_config(cfg)
  pairs = combos(cfg)
  params = gpt.init_params(mcfg, jax.random.key(0))
  if mcfg.dtype == "bfloat16":
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  served = {w: serving_params(mcfg, params, w) for w in dict.fromkeys(w for w, _ in pairs)}
  sampling = gen.SamplingConfig(max_new_tokens=cfg.new, temperature=0.0)
  rng = np.random.default_rng(0)
  rows, tokens_by, speed_by = [], {}, {}
  for batch in cfg.batches:
    prompts = rng.integers(0, mcfg.vocab_size, (batch, cfg.prompt)).tolist()
    for w, kv in pairs:
      quant_kv = None if kv == "bf16" else kv

      def call(p=served[w], quant_kv=quant_kv):
        with quantized_inference():
          return gen.generate(mcfg, p, prompts, sampling, kv_cache="paged", kv_quant=quant_kv,
                              page_size=cfg.page_size)

      first = call()  # compiles
      res = call()
      steps = max(len(res.tokens[0]) - 1, 1)
      tokens_by[(batch, w, kv)] = res.tokens
      speed_by[(batch, w, kv)] = res.tokens_per_s
      case = f"generate b{batch} prompt{cfg.prompt} new{cfg.new}"
      params_row = dict(batch=batch, prompt=cfg.prompt, new_tokens=cfg.new, kv_format=kv,
                        weights=w, page_size=cfg.page_size, layers=mcfg.num_layers,
                        d_model=mcfg.d_model, heads=mcfg.num_heads, kv_heads=mcfg.kv_heads,
                        head_dim=mcfg.dim_per_head,
                        time_to_first_token_s=res.time_to_first_token_s,
                        compile_s=first.compile_s, decode_s=res.decode_s)
      impl = f"jaxeff:kv_{kv}" if w == "bf16" else f"jaxeff:w_{w}_kv_{kv}"
      rows.append(harness.Row(case, params_row, impl, res.decode_s / steps,
                              res.tokens_per_s, "tokens/s"))
      if on_row is not None:
        on_row(rows)
      print(f"batch {batch:3d} weights {w:4s} kv {kv:5s}: {res.tokens_per_s:10,.0f} tokens/s, "
            f"time to first token {res.time_to_first_token_s * 1e3:8.1f} ms, compile "
            f"{first.compile_s:.1f} s", flush=True)
    base = (batch, "bf16", "bf16")
    for key in tokens_by:
      if key[0] == batch and key != base and base in tokens_by:
        same = np.mean([a == b for a, b in zip(np.ravel(tokens_by[base]),
                                                np.ravel(tokens_by[key]))])
        print(f"  weights {key[1]} kv {key[2]}: {speed_by[key] / speed_by[base]:.2f}x the "
              f"bf16/bf16 tokens/s, greedy tokens equal to bf16/bf16: {same:.1%}", flush=True)
  return rows


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batches", default=None)
  p.add_argument("--kv", default=None)
  p.add_argument("--prompt", type=int, default=None)
  p.add_argument("--new", type=int, default=None)
  p.add_argument("--weights", default=None, help="comma list of bf16, int8, int4")
  p.add_argument("--combos", default=None,
                 help="comma list of weights/kv pairs (e.g. bf16/bf16,int4/int8) instead of "
                      "every --weights x --kv")
  p.add_argument("--preset", default=None, help="model preset (jaxeff.models.gpt.PRESETS)")
  p.add_argument("--layers", type=int, default=None, help="number of layers")
  p.add_argument("--quick", action="store_true", help="a tiny model (CPU check)")
  p.add_argument("--out-dir", default=None)
  a = p.parse_args(argv)
  cfg = QUICK if a.quick else BenchConfig()
  changes = {}
  if a.batches:
    changes["batches"] = tuple(int(x) for x in a.batches.split(","))
  if a.kv:
    changes["kv"] = tuple(a.kv.split(","))
  if a.weights:
    changes["weights"] = tuple(a.weights.split(","))
  if a.combos:
    pairs = [c.split("/") for c in a.combos.split(",")]
    if any(len(c) != 2 for c in pairs):
      p.error(f"--combos: expected weights/kv pairs like bf16/bf16,int4/int8, got {a.combos!r}")
    changes["combos"] = tuple(tuple(c) for c in pairs)
  if a.preset:
    if a.preset not in gpt.PRESETS:
      p.error(f"--preset: unknown {a.preset!r}; known: {sorted(gpt.PRESETS)}")
    changes["preset"] = a.preset
  if a.layers is not None:
    changes["num_layers"] = a.layers
  for name in ("prompt", "new", "out_dir"):
    if getattr(a, name) is not None:
      changes[name] = getattr(a, name)
  cfg = dataclasses.replace(cfg, **changes)
  try:
    combos(cfg)
  except ValueError as e:
    p.error(str(e))
  out = Path(cfg.out_dir) if cfg.out_dir else None
  # rewritten after every row: a run cut short by its time limit keeps what it measured
  rows = run(cfg, on_row=lambda rows: harness.write_results("generate", rows, out_dir=out))
  path = harness.write_results("generate", rows, out_dir=out)
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
