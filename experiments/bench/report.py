"""Markdown summary of committed benchmark results: ``python -m experiments.bench.report``.

For every ``experiments/results/<device>/<suite>.json`` prints one table: each case with
jaxeff's throughput and the ratio ``baseline time / jaxeff time`` for every baseline
measured in the same run (> 1 means jaxeff is faster).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from experiments.bench.harness import RESULTS_DIR


def summarize(path: Path) -> str:
  data = json.loads(path.read_text())
  by_case: dict[str, dict[str, dict]] = {}
  for r in data["rows"]:
    by_case.setdefault(r["case"], {})[r["implementation"]] = r
  baselines = sorted({i for impls in by_case.values() for i in impls
                      if not i.startswith("jaxeff")})
  lines = [f"**{data['suite']}** on {data['device']}, jax {data['jax_version']}, "
           f"{data['date'][:10]}", "",
           "| case | jaxeff | " + " | ".join(f"vs {b}" for b in baselines) + " |",
           "|---|---|" + "---|" * len(baselines)]
  for case, impls in by_case.items():
    ours = [r for i, r in impls.items() if i.startswith("jaxeff") and r["median_s"] is not None]
    if not ours:
      continue
    best = min(ours, key=lambda r: r["median_s"])
    cells = []
    for b in baselines:
      r = impls.get(b)
      cells.append(f"{r['median_s'] / best['median_s']:.2f}x"
                   if r and r["median_s"] is not None else "-")
    lines.append(f"| {case} | {best['throughput']:.4g} {best['unit']} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("paths", nargs="*", help="result JSON files (default: all committed)")
  args = p.parse_args(argv)
  paths = [Path(x) for x in args.paths] or sorted(RESULTS_DIR.glob("*/*.json"))
  for path in paths:
    print(summarize(path))
    print()


if __name__ == "__main__":
  main()
