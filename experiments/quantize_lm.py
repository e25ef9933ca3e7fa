"""Quantize a trained GPT and compare perplexity, size and decode speed against float.

``python -m experiments.quantize_lm [--checkpoint runs/<run>] [--quick]``

Without ``--checkpoint`` a byte-level GPT is trained first with
:mod:`experiments.train_lm` (``--preset``, default ``cpu-small``; reused from
``runs/quantize_lm-<preset>`` when it is already there). The float model's attention and
MLP kernels (``(attn|mlp)/*_proj/kernel``; embeddings and head stay float) are quantized
with :func:`jaxeff.quant.quantize` by each method:

* weight-only RTN / AWQ / GPTQ at int4 (group 128) and int8 (per channel), fp8 e4m3;
* W8A8 int8 (per-token activations) without and with SmoothQuant, W8A8 fp8 + SmoothQuant;
* mixed int4/int8 under a 5-bit budget (sensitivity = each layer's output error).

Calibration uses batches of the training split; perplexity the validation windows of
:mod:`experiments.data`; decode tokens/s the unchanged :func:`experiments.generate.generate`
(greedy, paged KV cache) with the model's Dense layers routed to
:func:`jaxeff.ops.quantized_matmul.quantized_matmul` by
:func:`jaxeff.nn.quant.quantized_inference`. On GPU the computation runs in bfloat16 and
quantized weights are prepacked K-major for the kernels. The table is printed and written
to ``experiments/results/<device>/quantize_lm.{json,md}`` (and under ``$OUT`` when set).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp

from experiments import data as data_lib
from experiments import lm_tools
from experiments import generate as gen
from jaxeff import quant
from jaxeff.models import gpt
from jaxeff.nn.quant import prepack_params, quantized_inference

LINEAR = r"(attn|mlp)/[^/]+_proj/kernel$"


@dataclasses.dataclass(frozen=True)
class Method:
  """One row of the table: a name and the rules (None = the float baseline)."""

  name: str
  rules: tuple | None
  calibrated: bool = False
  mixed: bool = False


def methods(quick: bool) -> list[Method]:
  r = lambda *a: (quant.QuantRule(LINEAR, *a),)  # noqa: E731
  rows = [
      Method("float", None),
      Method("rtn int8", r("rtn", "int8", None)),
      Method("rtn int4 g128", r("rtn", "int4", 128)),
      Method("awq int4 g128", r("awq", "int4", 128), calibrated=True),
      Method("gptq int4 g128", r("gptq", "int4", 128), calibrated=True),
      Method("gptq int8", r("gptq", "int8", None), calibrated=True),
      Method("fp8 e4m3", r("rtn", "fp8_e4m3", None)),
      Method("w8a8 int8", r("rtn", "int8", None, True, "int8")),
      Method("w8a8 int8 smoothquant", r("smoothquant", "int8", None, True, "int8", 0.5),
             calibrated=True),
      Method("w8a8 fp8 smoothquant", r("smoothquant", "fp8_e4m3", None, True, "fp8_e4m3", 0.5),
             calibrated=True),
      Method("mixed int4/int8 5-bit", None, calibrated=True, mixed=True),
  ]
  if not quick:
    rows.insert(4, Method("awq int8", r("awq", "int8", None), calibrated=True))
    rows.insert(6, Method("gptq int4 g128 act-order",
                          (quant.QuantRule(LINEAR, "gptq", "int4", 128, act_order=True),),
                          calibrated=True))
  return rows


def perplexity(model, params, batches) -> float:
  """Validation perplexity with quantized params served by :func:`quantized_inference`."""
  with quantized_inference():
    return lm_tools.perplexity(model, params, batches)


def decode_speed(config, params, prompts, new_tokens: int, repeats: int) -> tuple[float, str]:
  """Best-of-``repeats`` decode tokens/s of :func:`generate` (greedy) and the first text."""
  sampling = gen.SamplingConfig(max_new_tokens=new_tokens, temperature=0.0)
  best, text = 0.0, ""
  with quantized_inference():
    for _ in range(repeats):
      res = gen.generate(config, params, prompts, sampling)
      best = max(best, res.tokens_per_s)
      text = gen.decode_bytes(res.tokens[0])
  return best, text


def _linear_bytes(params) -> int:
  flat = quant.model._flatten(params)
  return sum(quant.model_bytes(v) for k, v in flat.items()
             if k[-1] in ("kernel", "act_quant") and "embed" not in k and "lm_head" not in k)


def run(args, log=print, partial=None) -> dict:
  device = jax.devices()[0]
  on_gpu = device.platform == "gpu"
  ckpt = args.checkpoint or lm_tools.train_checkpoint("quantize_lm", args.preset,
                                                     args.train_steps, log)
  ckpt = str(Path(ckpt).resolve())  # Orbax wants absolute paths
  config, params, meta = gen.load_params(ckpt)
  config, params = lm_tools.unstack_layers(config, params)
  dtype = args.dtype or ("bfloat16" if on_gpu else config.dtype)
  config = config.replace(dtype=dtype)
  seq_len = int(meta.get("train", {}).get("seq_len", 64))
  batch_size = max(1, min(16, 8192 // seq_len))  # <= 8k tokens a batch (logits memory)
  dataset = data_lib.load_dataset(None)
  val = data_lib.val_batches(dataset, num_batches=args.eval_batches, batch_size=batch_size,
                             seq_len=seq_len)
  calib = [data_lib.train_batch(dataset, 100_000 + i, batch_size=batch_size, seq_len=seq_len,
                                seed=1)["inputs"] for i in range(args.calib_batches)]
  model = gpt.GPT(config)
  float_params = params
  if dtype == "bfloat16":  # the baseline a user would serve: bf16 weights
    float_params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
  prompt = list(b"def ")
  prompts = [prompt] * args.batch
  log(f"quantize_lm: {gpt.num_params(config) / 1e6:.2f}M params ({config.num_layers} layers, "
      f"d {config.d_model}), compute {dtype}, {device.device_kind}; ppl over "
      f"{args.eval_batches}x{batch_size}x{seq_len} val tokens, decode batch {args.batch} x "
      f"{args.new_tokens} tokens")
  rows = []
  chosen = methods(args.quick)
  if args.methods:
    names = [n.strip() for n in args.methods.split(",")]
    known = {m.name: m for m in methods(False)}
    unknown = [n for n in names if n not in known]
    if unknown:
      raise SystemExit(f"quantize_lm: error: --methods: unknown {unknown}; known: {list(known)}")
    chosen = [known["float"]] + [known[n] for n in names if n != "float"]
  header = {"suite": "quantize_lm", "device_kind": device.device_kind,
            "jax_version": jax.__version__, "checkpoint": ckpt, "model": config.to_dict(),
            "compute_dtype": dtype, "eval_tokens": args.eval_batches * batch_size * seq_len,
            "decode_batch": args.batch, "new_tokens": args.new_tokens, "quick": args.quick}
  for m in chosen:
    t0 = time.perf_counter()
    extra = {}
    if m.rules is None and not m.mixed:
      p = float_params
    else:
      rules = m.rules
      if m.mixed:
        rules, report = quant.mixed_precision_rules(params, model, calib, pattern=LINEAR,
                                                    budget_bits=5.0)
        extra = {"average_bits": report["average_bits"],
                 "int8_layers": sorted(k for k, v in report["bits"].items() if v == "int8")}
      p = quant.quantize(params, rules, calib if m.calibrated else None, model=model,
                         example_input=calib[0])
    quant_s = time.perf_counter() - t0
    serve = prepack_params(p) if on_gpu and m.rules is not None else p
    ppl = perplexity(model, serve, val)
    tps, text = decode_speed(config, serve, prompts, args.new_tokens, args.repeats)
    row = {"method": m.name, "ppl": ppl, "model_bytes": quant.model_bytes(p),
           "linear_bytes": _linear_bytes(p), "decode_tokens_per_s": tps,
           "quantize_s": quant_s, "sample": text[:60], **extra}
    rows.append(row)
    if partial is not None:
      partial({**header, "rows": rows})
    log(f"  {m.name:26s} ppl {ppl:8.3f}  bytes {row['model_bytes'] / 1e6:7.2f} MB  "
        f"decode {tps:9.1f} tok/s  ({quant_s:.1f} s)")
  base = rows[0]
  for r in rows:
    r["ppl_vs_float"] = r["ppl"] / base["ppl"]
    r["bytes_vs_float"] = r["model_bytes"] / base["model_bytes"]
    r["linear_bytes_vs_float"] = r["linear_bytes"] / base["linear_bytes"]
    r["speedup_vs_float"] = r["decode_tokens_per_s"] / base["decode_tokens_per_s"]
  from experiments.bench import harness
  return {**header, "device": harness.device_name(),
          "date": datetime.datetime.now().isoformat(timespec="seconds"), "rows": rows}


def markdown(result: dict) -> str:
  lines = [f"# quantize_lm on {result['device_kind']} (jax {result['jax_version']}, "
           f"{result['date']})", "",
           f"Model: {result['model']['num_layers']} layers, d {result['model']['d_model']}, "
           f"compute {result['compute_dtype']}; perplexity over {result['eval_tokens']} "
           f"validation bytes; decode: batch {result['decode_batch']}, "
           f"{result['new_tokens']} new tokens, greedy, through experiments.generate.", "",
           "| method | val ppl | ppl / float | model MB | linear layers MB | "
           "decode tok/s | speed / float |",
           "|---|---|---|---|---|---|---|"]
  for r in result["rows"]:
    lines.append(f"| {r['method']} | {r['ppl']:.3f} | {r['ppl_vs_float']:.4f} | "
                 f"{r['model_bytes'] / 1e6:.3f} | {r['linear_bytes'] / 1e6:.3f} | "
                 f"{r['decode_tokens_per_s']:.1f} | {r['speedup_vs_float']:.2f}x |")
  return "\n".join(lines) + "\n"


def write(result: dict, out_dirs: Sequence[Path]) -> None:
  for d in out_dirs:
    d.mkdir(parents=True, exist_ok=True)
    (d / "quantize_lm.json").write_text(json.dumps(result, indent=1) + "\n")
    (d / "quantize_lm.md").write_text(markdown(result))


def parse_args(argv: Sequence[str] | None = None):
  p = argparse.ArgumentParser(prog="python -m experiments.quantize_lm", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--checkpoint", default=None, help="trained run/checkpoint folder "
                 "(default: train --preset first)")
  p.add_argument("--preset", default="cpu-small", help="train_lm preset when training")
  p.add_argument("--train-steps", type=int, default=None,
                 help="override the preset's steps (--quick: 100)")
  p.add_argument("--methods", default=None,
                 help="comma-separated row names to run (the float baseline always runs)")
  p.add_argument("--quick", action="store_true", help="fewer methods and tokens")
  p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                 help="compute dtype (default: bfloat16 on GPU, the model's on CPU)")
  p.add_argument("--eval-batches", type=int, default=None)
  p.add_argument("--calib-batches", type=int, default=4)
  p.add_argument("--batch", type=int, default=1, help="decode batch")
  p.add_argument("--new-tokens", type=int, default=None)
  p.add_argument("--repeats", type=int, default=2, help="decode timing repeats (best kept)")
  p.add_argument("--out", default=None, help="results folder (default "
                 "experiments/results/<device>, and $OUT when set)")
  args = p.parse_args(argv)
  if args.eval_batches is None:
    args.eval_batches = 4 if args.quick else 8
  if args.quick and args.train_steps is None:
    args.train_steps = 100
  if args.new_tokens is None:
    args.new_tokens = 64 if args.quick else 128
  return args


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  from experiments.bench import harness
  dirs = [Path(args.out) if args.out else Path("experiments/results") / harness.device_name()]
  if os.environ.get("OUT"):
    dirs.append(Path(os.environ["OUT"]))

  def partial(res):  # rows so far, in case the run is cut short
    for d in dirs:
      d.mkdir(parents=True, exist_ok=True)
      (d / "quantize_lm.partial.json").write_text(json.dumps(res, indent=1) + "\n")

  result = run(args, partial=partial)
  write(result, dirs)
  for d in dirs:
    (d / "quantize_lm.partial.json").unlink(missing_ok=True)
  print(markdown(result))
  print("wrote " + ", ".join(str(d / "quantize_lm.json") for d in dirs))
  return 0


if __name__ == "__main__":
  sys.exit(main())
