"""Prune a trained GPT one-shot and compare validation perplexity (and decode speed).

``python -m experiments.sparsify_lm [--checkpoint runs/<run>] [--quick] [--finetune-steps N]``

Without ``--checkpoint`` a byte-level GPT is trained first with
:mod:`experiments.train_lm` (``--preset``, default ``cpu-small``; reused from
``runs/sparsify_lm-<preset>`` when it is already there). The attention and MLP projection
kernels (``(attn|mlp)/*_proj/kernel``; embeddings and head stay dense) are pruned by
:func:`jaxeff.sparse.prune`:

* magnitude (``|W|``, one threshold per matrix) and Wanda (``|W| * ||X||``, per output,
  Sun et al. 2023, calibrated on training batches) at 50 / 60 / 70 / 80 / 90% unstructured;
* magnitude and Wanda 2:4 (N:M along the input features);
* structured: 25% of the MLP hidden channels (Wanda-style channel importance).

``--finetune-steps N`` adds, for Wanda 70% and Wanda 2:4, a short recovery fine-tune
(AdamW on training batches, pruned weights held at zero by masking the update).

Perplexity is over the validation windows of :mod:`experiments.data`. On GPU, decode
tokens/s of :func:`experiments.generate.generate` (greedy, batch ``--batch``) is measured
with the pruned projections compressed (:func:`jaxeff.nn.sparse.compress_params`; for
unstructured pruning ``--unstructured-format auto`` (default: sliced ELL where its measured
break-even for the decode batch is reached, else dense), ``ell`` or ``tiled`` (dense below
50% sparsity); the 2:4 decode words layout at batch <= 8) and served
by :func:`jaxeff.ops.sparse_matmul.sparse_matmul` through
:func:`jaxeff.nn.sparse.sparse_inference`; on CPU it is left out (no kernels there).
The table is printed and written to ``experiments/results/<device>/sparsify_lm.{json,md}``
(and under ``$OUT`` when set).
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
from jaxeff.models import gpt
from jaxeff.sparse import pruning

LINEAR = r"(attn|mlp)/[^/]+_proj/kernel$"


@dataclasses.dataclass(frozen=True)
class Method:
  """One row: ``kind`` is ``"dense"``, ``"unstructured"``, ``"nm"`` or ``"channels"``."""

  name: str
  kind: str
  method: str = "magnitude"
  sparsity: float | None = None
  nm: str | None = None
  finetune: bool = False


def methods(quick: bool, finetune: bool) -> list[Method]:
  levels = (0.5, 0.7, 0.9) if quick else (0.5, 0.6, 0.7, 0.8, 0.9)
  rows = [Method("dense", "dense")]
  for how in ("magnitude", "wanda"):
    rows += [Method(f"{how} {int(s * 100)}%", "unstructured", how, s) for s in levels]
    rows.append(Method(f"{how} 2:4", "nm", how, nm="2:4"))
  if not quick:
    rows.append(Method("mlp channels 25%", "channels", "wanda", 0.25))
  if finetune:
    rows += [Method("wanda 70% + finetune", "unstructured", "wanda", 0.7, finetune=True),
             Method("wanda 2:4 + finetune", "nm", "wanda", nm="2:4", finetune=True)]
  return rows
def finetune(model, params, dataset, *, steps: int, seq_len: int, lr: float = 3e-4):
  """AdamW on training batches with the zero pattern of ``params`` kept (masked updates)."""
  import optax

  masks = jax.tree.map(lambda a: a != 0, params)
  opt = optax.adamw(lr, weight_decay=0.0)
  state = opt.init(params)

  @jax.jit
  def step(p, s, inputs, targets):
    def loss(p):
      logits = model.apply({"params": p}, inputs)
      logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
      return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))

    g = jax.grad(loss)(p)
    upd, s = opt.update(g, s, p)
    p = optax.apply_updates(p, upd)
    return jax.tree.map(lambda a, m: jnp.where(m, a, 0).astype(a.dtype), p, masks), s

  for i in range(steps):
    b = data_lib.train_batch(dataset, 200_000 + i, batch_size=16, seq_len=seq_len, seed=2)
    params, state = step(params, state, b["inputs"], b["targets"])
  return params


def apply_method(m: Method, params, norms):
  if m.kind == "dense":
    return params
  if m.kind == "channels":
    return pruning.prune_mlp_channels(params, m.sparsity, norms)
  rule = pruning.PruneRule(LINEAR, m.method, sparsity=m.sparsity if m.kind != "nm" else None,
                           nm=m.nm)
  return pruning.prune(params, [rule], norms)[0]


def decode_speed(config, params, prompts, new_tokens: int, repeats: int,
                 sparse: bool) -> float:
  """Best-of-``repeats`` decode tokens/s of :func:`experiments.generate.generate`."""
  import contextlib

  from experiments import generate as gen
  from jaxeff.nn.sparse import sparse_inference

  sampling = gen.SamplingConfig(max_new_tokens=new_tokens, temperature=0.0)
  best = 0.0
  with sparse_inference() if sparse else contextlib.nullcontext():
    for _ in range(repeats):
      best = max(best, gen.generate(config, params, prompts, sampling).tokens_per_s)
  return best


def run(args, log=print) -> dict:
  from experiments import generate as gen
  from jaxeff.nn.sparse import compress_params
  from jaxeff.sparse import is_sparse

  device = jax.devices()[0]
  on_gpu = device.platform == "gpu"
  ckpt = args.checkpoint or lm_tools.train_checkpoint("sparsify_lm", args.preset,
                                                     args.train_steps, log)
  ckpt = str(Path(ckpt).resolve())  # Orbax wants absolute paths
  config, params, meta = gen.load_params(ckpt)
  config, params = lm_tools.unstack_layers(config, params)
  dtype = "bfloat16" if on_gpu else config.dtype
  config = config.replace(dtype=dtype)
  seq_len = int(meta.get("train", {}).get("seq_len", 64))
  dataset = data_lib.load_dataset(None)
  val = data_lib.val_batches(dataset, num_batches=args.eval_batches, batch_size=16,
                             seq_len=seq_len)
  calib = [data_lib.train_batch(dataset, 100_000 + i, batch_size=16, seq_len=seq_len,
                                seed=1)["inputs"] for i in range(args.calib_batches)]
  model = gpt.GPT(config)
  t0 = time.perf_counter()
  norms = pruning.collect_input_norms(model, params, calib, LINEAR)
  log(f"sparsify_lm: {gpt.num_params(config) / 1e6:.2f}M params ({config.num_layers} layers, "
      f"d {config.d_model}), {device.device_kind}; ppl over {args.eval_batches}x16x{seq_len} "
      f"val tokens; Wanda norms from {args.calib_batches}x16x{seq_len} tokens "
      f"({time.perf_counter() - t0:.1f} s)")
  rows = []
  for m in methods(args.quick, args.finetune_steps > 0):
    t0 = time.perf_counter()
    p = apply_method(m, params, norms)
    if m.finetune:
      p = finetune(model, p, dataset, steps=args.finetune_steps, seq_len=seq_len)
    prune_s = time.perf_counter() - t0
    row = {"method": m.name, "kind": m.kind, "criterion": m.method, "target": m.sparsity,
           "nm": m.nm, "finetune_steps": args.finetune_steps if m.finetune else 0,
           "linear_sparsity": pruning.sparsity_of(p, LINEAR),
           "ppl": lm_tools.perplexity(model, p, val), "prune_s": prune_s, "decode_tokens_per_s": None}
    if on_gpu and not args.no_decode:
      fmt = "nm" if m.kind == "nm" else args.unstructured_format
      extra = ({"pattern": m.nm, "words": args.batch <= 8} if fmt == "nm"
               else {"rows": args.batch} if fmt == "auto" else {})
      serve = jax.tree.map(lambda a: a.astype(jnp.bfloat16), p)
      if m.kind in ("unstructured", "nm"):
        serve = compress_params(serve, LINEAR, fmt=fmt, **extra)
      served = [type(l).__name__ for l in jax.tree.leaves(serve, is_leaf=is_sparse)
                if is_sparse(l)]
      row["served_format"] = sorted(set(served)) or ["dense"]
      row["compressed_kernels"] = len(served)
      row["decode_tokens_per_s"] = decode_speed(config, serve, [list(b"def ")] * args.batch,
                                                args.new_tokens, args.repeats,
                                                sparse=m.kind != "dense")
    rows.append(row)
    tps = row["decode_tokens_per_s"]
    log(f"  {m.name:24s} sparsity {row['linear_sparsity']:.3f}  ppl {row['ppl']:8.3f}"
        + (f"  decode {tps:9.1f} tok/s ({row['compressed_kernels']} kernels as "
           f"{'/'.join(row['served_format'])})" if tps else "") + f"  ({prune_s:.1f} s)")
  base = rows[0]
  for r in rows:
    r["ppl_vs_dense"] = r["ppl"] / base["ppl"]
    if r["decode_tokens_per_s"] and base["decode_tokens_per_s"]:
      r["speedup_vs_dense"] = r["decode_tokens_per_s"] / base["decode_tokens_per_s"]
  from experiments.bench import harness
  return {"suite": "sparsify_lm", "device": harness.device_name(),
          "device_kind": device.device_kind, "jax_version": jax.__version__,
          "date": datetime.datetime.now().isoformat(timespec="seconds"),
          "checkpoint": ckpt, "model": config.to_dict(), "compute_dtype": dtype,
          "eval_tokens": args.eval_batches * 16 * seq_len,
          "calib_tokens": args.calib_batches * 16 * seq_len, "quick": args.quick,
          "rows": rows}


def markdown(result: dict) -> str:
  lines = [f"# sparsify_lm on {result['device_kind']} (jax {result['jax_version']}, "
           f"{result['date']})", "",
           f"Model: {result['model']['num_layers']} layers, d {result['model']['d_model']}, "
           f"compute {result['compute_dtype']}; perplexity over {result['eval_tokens']} "
           f"validation bytes; Wanda calibrated on {result['calib_tokens']} training bytes.",
           "", "| method | linear sparsity | val ppl | ppl / dense | decode tok/s |",
           "|---|---|---|---|---|"]
  for r in result["rows"]:
    tps = r["decode_tokens_per_s"]
    lines.append(f"| {r['method']} | {r['linear_sparsity']:.3f} | {r['ppl']:.3f} | "
                 f"{r['ppl_vs_dense']:.3f} | {f'{tps:.1f}' if tps else '-'} |")
  return "\n".join(lines) + "\n"


def write(result: dict, out_dirs: Sequence[Path]) -> None:
  for d in out_dirs:
    d.mkdir(parents=True, exist_ok=True)
    (d / "sparsify_lm.json").write_text(json.dumps(result, indent=1) + "\n")
    (d / "sparsify_lm.md").write_text(markdown(result))


def parse_args(argv: Sequence[str] | None = None):
  p = argparse.ArgumentParser(prog="python -m experiments.sparsify_lm", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--checkpoint", default=None, help="trained run/checkpoint folder "
                 "(default: train --preset first)")
  p.add_argument("--preset", default="cpu-small", help="train_lm preset when training")
  p.add_argument("--train-steps", type=int, default=None, help="override the preset's steps")
  p.add_argument("--quick", action="store_true", help="fewer sparsity levels")
  p.add_argument("--finetune-steps", type=int, default=0,
                 help="recovery fine-tune steps for Wanda 70%% and 2:4 (0 = none)")
  p.add_argument("--eval-batches", type=int, default=None)
  p.add_argument("--calib-batches", type=int, default=4)
  p.add_argument("--batch", type=int, default=1, help="decode batch (GPU)")
  p.add_argument("--new-tokens", type=int, default=128)
  p.add_argument("--repeats", type=int, default=2, help="decode timing repeats (best kept)")
  p.add_argument("--no-decode", action="store_true", help="skip decode timing on GPU")
  p.add_argument("--unstructured-format", default="auto", choices=("auto", "ell", "tiled"),
                 help="serving format of unstructured-pruned kernels: auto (the measured "
                      "break-even for --batch: sliced ELL or dense), sliced ELL (decode "
                      "kernel that gathers x) or the tiled bitmap")
  p.add_argument("--out", default=None, help="results folder (default "
                 "experiments/results/<device>, and $OUT when set)")
  args = p.parse_args(argv)
  if args.eval_batches is None:
    args.eval_batches = 4 if args.quick else 8
  if args.finetune_steps < 0:
    p.error(f"--finetune-steps must be >= 0, got {args.finetune_steps}")
  return args


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  result = run(args)
  from experiments.bench import harness
  dirs = [Path(args.out) if args.out else Path("experiments/results") / harness.device_name()]
  if os.environ.get("OUT"):
    dirs.append(Path(os.environ["OUT"]))
  write(result, dirs)
  print(markdown(result))
  print("wrote " + ", ".join(str(d / "sparsify_lm.json") for d in dirs))
  return 0


if __name__ == "__main__":
  sys.exit(main())
