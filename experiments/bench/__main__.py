"""Runs benchmark suites: ``python -m experiments.bench <suite|all> [--quick] [--out DIR]``.

Each suite is a module ``experiments.bench.suites.<name>`` with
``run(quick: bool) -> list[Row]`` and an optional ``PLOT_X`` (the params key for the
plot's x axis).
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import traceback

from experiments.bench import harness, suites


def available() -> list[str]:
  return sorted(m.name for m in pkgutil.iter_modules(suites.__path__) if not m.name.startswith("_"))


def main(argv=None) -> int:
  names = available()
  p = argparse.ArgumentParser(prog="python -m experiments.bench", description=__doc__)
  p.add_argument("suite", nargs="+", help=f"one or more of {names}, or 'all'")
  p.add_argument("--quick", action="store_true", help="fewer shapes and rounds (smoke run)")
  p.add_argument("--out", default=None, help="results folder (default experiments/results/<device>)")
  args = p.parse_args(argv)
  chosen = names if args.suite == ["all"] else args.suite
  unknown = [s for s in chosen if s not in names]
  if unknown:
    p.error(f"unknown suite(s) {unknown}; available: {names}")
  failed = []
  for name in chosen:
    mod = importlib.import_module(f"experiments.bench.suites.{name}")
    try:
      rows = mod.run(quick=args.quick)
    except Exception:
      traceback.print_exc()
      failed.append(name)
      continue
    harness.print_table(name, rows)
    path = harness.write_results(name, rows, args.out, plot_x=getattr(mod, "PLOT_X", None))
    print(f"wrote {path}")
  if failed:
    print(f"suites that failed: {failed}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
