"""Hyena LM vs GPT at the same sequence length, steps and data: train tokens/s and
validation perplexity.

The end-to-end comparison of the spectral issue (Hyena, Poli et al. 2023: long
convolutions by FFT instead of attention): both models are trained by
:func:`experiments.train_lm.train` on the embedded corpus (the Python standard library's
sources, byte-level) with the same batch, sequence length, step count, learning-rate
schedule and seed; each run's summary gives throughput (tokens/s, MFU where the device's
peak is known), the final training loss and the validation perplexity. The GPT's
``max_seq_len`` is raised to the sequence length (RoPE has no learned positions).

GPU (the issue's setting, seq 8192)::

    python -m experiments.hyena_vs_gpt --steps 200 --out runs/hyena_vs_gpt

pairs ``hyena-160m`` (18 layers, d 864) with ``gpt-125m`` (12 layers, d 768) at batch 8 x
seq 8192. CPU smoke (small models, seq 256)::

    python -m experiments.hyena_vs_gpt --small --steps 20 --out /tmp/hvg

Writes ``<out>/hyena_vs_gpt.json`` (one row per model plus the settings) and prints a
table.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from experiments import train_lm

GPU_PAIR = dict(hyena="hyena-160m", gpt="gpt-125m", seq_len=8192, batch_size=8, lr=6e-4)
SMALL_PAIR = dict(hyena="hyena-cpu-small", gpt="cpu-small", seq_len=256, batch_size=8, lr=3e-3)
FIELDS = ("params", "tokens_per_s", "mfu", "compile_s", "first_train_loss", "final_train_loss",
          "val_loss", "val_ppl", "wall_s", "device")


def run_pair(*, hyena: str, gpt: str, seq_len: int, batch_size: int, lr: float, steps: int,
             out: Path, eval_batches: int = 4, seed: int = 0, log=print) -> dict[str, Any]:
  """Trains both presets with identical settings; returns the comparison record.

  Args:
    hyena, gpt: preset names of :mod:`experiments.train_lm` (a ``hyena-*`` and a GPT one).
    seq_len, batch_size, lr, steps, eval_batches, seed: shared training settings.
    out: folder for the two run folders and ``hyena_vs_gpt.json``.

  Returns:
    ``{"settings": {...}, "rows": [{"model", "preset", <FIELDS>}, ...]}``.
  """
  if not hyena.startswith("hyena"):
    raise ValueError(f"run_pair: hyena must name a hyena-* preset, got {hyena!r}")
  if gpt.startswith("hyena"):
    raise ValueError(f"run_pair: gpt must name a GPT preset, got {gpt!r}")
  if steps < 1:
    raise ValueError(f"run_pair: steps must be >= 1, got {steps}")
  settings = dict(seq_len=seq_len, batch_size=batch_size, lr=lr, steps=steps,
                  eval_batches=eval_batches, seed=seed)
  rows = []
  for model, preset in (("hyena", hyena), ("gpt", gpt)):
    overrides = (("max_seq_len", seq_len),)
    cfg = train_lm.preset_config(
        preset, steps=steps, seq_len=seq_len, batch_size=batch_size, lr=lr, seed=seed,
        eval_every=steps, eval_batches=eval_batches, log_every=max(steps // 10, 1),
        checkpoint_every=steps, sample_tokens=0, model_overrides=overrides,
        out=str(out / model))
    log(f"== {model} ({preset}), batch {batch_size} x seq {seq_len}, {steps} steps ==")
    summary = train_lm.train(cfg, log=log)
    rows.append({"model": model, "preset": preset, **{k: summary.get(k) for k in FIELDS}})
  record = {"settings": settings, "rows": rows}
  out.mkdir(parents=True, exist_ok=True)
  tmp = out / "hyena_vs_gpt.json.tmp"
  tmp.write_text(json.dumps(record, indent=1) + "\n")
  os.replace(tmp, out / "hyena_vs_gpt.json")  # atomic: never a half-written record
  return record


def format_table(record: dict[str, Any]) -> str:
  """The comparison as aligned text (tokens/s and perplexity ratios are Hyena / GPT)."""
  lines = [f"{'model':6} {'preset':16} {'params':>10} {'tokens/s':>11} {'MFU':>6} "
           f"{'train loss':>10} {'val ppl':>8}"]
  for r in record["rows"]:
    mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}"
    tps = "n/a" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:,.0f}"
    ppl = "n/a" if r["val_ppl"] is None else f"{r['val_ppl']:.3f}"
    loss = "n/a" if r["final_train_loss"] is None else f"{r['final_train_loss']:.4f}"
    lines.append(f"{r['model']:6} {r['preset']:16} {r['params']:>10,} {tps:>11} {mfu:>6} "
                 f"{loss:>10} {ppl:>8}")
  hy, gp = record["rows"]
  if hy["tokens_per_s"] and gp["tokens_per_s"]:
    lines.append(f"hyena / gpt: tokens/s {hy['tokens_per_s'] / gp['tokens_per_s']:.2f}x"
                 + (f", val ppl {hy['val_ppl'] / gp['val_ppl']:.3f}x"
                    if hy["val_ppl"] and gp["val_ppl"] else ""))
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--small", action="store_true",
                 help="CPU-sized pair (hyena-cpu-small vs cpu-small, seq 256)")
  p.add_argument("--steps", type=int, default=200)
  p.add_argument("--seq-len", type=int, default=None)
  p.add_argument("--batch-size", type=int, default=None)
  p.add_argument("--eval-batches", type=int, default=4)
  p.add_argument("--out", default=None, help="output folder (default: a new temporary one)")
  args = p.parse_args(argv)
  pair = dict(SMALL_PAIR if args.small else GPU_PAIR)
  if args.seq_len is not None:
    pair["seq_len"] = args.seq_len
  if args.batch_size is not None:
    pair["batch_size"] = args.batch_size
  out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="hyena_vs_gpt-"))
  try:
    record = run_pair(**pair, steps=args.steps, out=out, eval_batches=args.eval_batches)
  except (ValueError, train_lm.ConfigError) as e:
    p.error(str(e))
  print(format_table(record))
  print(f"wrote {out / 'hyena_vs_gpt.json'}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
