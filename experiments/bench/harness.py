"""Benchmark harness: device-synchronised timing, result rows, tables, JSON and plots.

Every suite times jaxeff and the baselines a user could pick instead in the same process
on the same device. Timing (``time_fn``): compile and warm up, then ``rounds`` rounds of
``inner`` back-to-back calls, each round closed by ``block_until_ready``; the per-call time
of a round is its wall time over ``inner`` and the reported figure is the median over
rounds. When one input set fits in L2, calls rotate over several copies so repeated calls
do not time the cache. Ops that take less time than a dispatch (skinny matmuls) are timed
with ``chain=True``: many chained calls inside one jitted program (device time per call).

Results follow the schema in ARCHITECTURE.md and are written to
``experiments/results/<device>/<suite>.json`` (plus ``<suite>.png`` when matplotlib is
importable).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import re
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

RESULTS_DIR = Path(__file__).resolve().parents[1] / "results"
L2_BYTES = 50 * 2**20  # H100 L2; inputs under 2x this are rotated.


@dataclasses.dataclass
class Row:
  case: str
  params: dict[str, Any]
  implementation: str
  median_s: float
  throughput: float
  unit: str
  extra: dict[str, Any] = dataclasses.field(default_factory=dict)

  def to_json(self) -> dict[str, Any]:
    finite = lambda v: v if isinstance(v, (int, float)) and math.isfinite(v) else None
    # A failed measurement is written as null (strict JSON has no NaN).
    d = {"case": self.case, "params": self.params, "implementation": self.implementation,
         "median_s": finite(self.median_s), "throughput": finite(self.throughput),
         "unit": self.unit}
    d.update(self.extra)
    return d


def device_name() -> str:
  """A filesystem-safe name for the first device, e.g. ``nvidia-h100-80gb-hbm3`` or ``cpu``."""
  dev = jax.devices()[0]
  kind = dev.device_kind if dev.platform != "cpu" else "cpu"
  return re.sub(r"[^a-z0-9]+", "-", kind.lower()).strip("-") or dev.platform


def tree_bytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


def _input_sets(make_args: Callable[[int], Sequence], max_sets: int) -> tuple:
  """Input sets to rotate over: one when a set is at least twice the L2, else enough
  (up to ``max_sets``) that repeated calls stream more than the L2 holds."""
  first = tuple(make_args(0))
  nbytes = tree_bytes(first)
  n_sets = 1 if nbytes >= 2 * L2_BYTES else min(max_sets, max(2, math.ceil(2 * L2_BYTES / max(nbytes, 1))))
  sets = tuple([first] + [tuple(make_args(i)) for i in range(1, n_sets)])
  jax.block_until_ready(sets)
  return sets


def time_fn(fn: Callable, make_args: Callable[[int], Sequence], *, rounds: int = 30,
            inner: int | None = None, warmup: int = 3, max_sets: int = 8,
            target_round_s: float = 0.02, chain: bool = False) -> float:
  """Median seconds per call of ``fn(*make_args(i))``.

  ``make_args(i)`` builds the i-th input set (fresh random data, different per i).
  ``fn`` should already be jitted. Inputs smaller than 2x L2 are rotated over up to
  ``max_sets`` sets.

  ``chain=True`` measures device time for ops shorter than a dispatch: each round runs one
  jitted program of ``calls`` chained calls (``chained_program``), so the per-call cost of
  dispatching a jitted function (~30-40 us on the H100 machine, more than a skinny matmul
  takes) is paid once per program instead of once per op, as inside a model's step.
  """
  if chain:
    return _time_chained(fn, make_args, rounds=rounds, warmup=warmup, max_sets=max_sets)
  sets = _input_sets(make_args, max_sets)
  n_sets = len(sets)
  out = None
  for i in range(warmup):
    out = fn(*sets[i % n_sets])
  jax.block_until_ready(out)
  if inner is None:  # pick inner so one round lasts ~target_round_s
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*sets[0]))
    once = max(time.perf_counter() - t0, 1e-6)
    inner = int(min(100, max(1, target_round_s / once)))
  per_call = []
  for r in range(rounds):
    t0 = time.perf_counter()
    for j in range(inner):
      out = fn(*sets[(r * inner + j) % n_sets])
    jax.block_until_ready(out)
    per_call.append((time.perf_counter() - t0) / inner)
  return statistics.median(per_call)


def chained_program(fn: Callable, n_sets: int, calls: int) -> Callable:
  """``program(sets, zero)``: ``calls`` calls of ``fn`` over the input sets in turn, each
  call's first argument offset by ``zero`` times a scalar of the previous call's output.

  ``zero`` is a runtime 0.0, so the offset changes no value, but the compiler can neither
  merge two calls on the same inputs nor run them out of order: the calls execute one
  after another on the device, as consecutive layers of a model do. The offset is one
  small elementwise pass over the first argument (the activations), paid alike by every
  implementation timed this way.
  """

  def program(sets, zero):
    carry = jnp.zeros((), jnp.float32)
    for j in range(calls):
      args = list(sets[j % n_sets])
      first = args[0]
      offset = (carry * zero).astype(jnp.float32)
      if jnp.issubdtype(first.dtype, jnp.floating) and jnp.dtype(first.dtype).itemsize == 1:
        args[0] = (first.astype(jnp.float32) + offset).astype(first.dtype)  # fp8: no fp8 add
      else:
        args[0] = first + offset.astype(first.dtype)
      out = fn(*args)
      carry = jax.tree.leaves(out)[0].reshape(-1)[0].astype(jnp.float32)
    return carry

  return jax.jit(program)


def _time_chained(fn: Callable, make_args: Callable[[int], Sequence], *, rounds: int,
                  warmup: int, max_sets: int, target_program_s: float = 2e-3,
                  max_calls: int = 64, programs_per_round: int = 4) -> float:
  sets = _input_sets(make_args, max_sets)
  n_sets = len(sets)
  zero = jnp.zeros((), jnp.float32)
  # One dispatched call bounds the device time from above; size the program from it.
  out = fn(*sets[0])
  jax.block_until_ready(out)
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*sets[0]))
  once = max(time.perf_counter() - t0, 1e-6)
  calls = int(min(max_calls, max(1, target_program_s / once)))
  calls = max(n_sets, calls - calls % n_sets)
  program = chained_program(fn, n_sets, calls)
  for _ in range(max(1, warmup)):
    out = program(sets, zero)
  jax.block_until_ready(out)
  per_call = []
  for _ in range(rounds):
    t0 = time.perf_counter()
    for _ in range(programs_per_round):  # dispatch of the next overlaps the running one
      out = program(sets, zero)
    jax.block_until_ready(out)
    per_call.append((time.perf_counter() - t0) / (programs_per_round * calls))
  return statistics.median(per_call)


def print_table(suite: str, rows: Sequence[Row], reference: str = "jaxeff") -> None:
  """Prints one line per row, with the speed-up of ``reference`` (jaxeff) over each baseline."""
  print(f"\n== {suite} on {device_name()} (jax {jax.__version__}) ==")
  header = f"{'case':<44} {'implementation':<22} {'median':>11} {'throughput':>18} {'jaxeff x':>9}"
  print(header)
  print("-" * len(header))
  by_case: dict[str, list[Row]] = {}
  for r in rows:
    by_case.setdefault(r.case, []).append(r)
  for case, rs in by_case.items():
    ours = [r for r in rs if r.implementation.split(":")[0] == reference]
    best_ours = min((r.median_s for r in ours), default=None)
    for r in rs:
      ratio = ""
      if best_ours and r.implementation.split(":")[0] != reference and math.isfinite(r.median_s):
        ratio = f"{r.median_s / best_ours:8.2f}x"
      print(f"{case[:44]:<44} {r.implementation[:22]:<22} {fmt_time(r.median_s):>11} "
            f"{r.throughput:12.2f} {r.unit:<5} {ratio:>9}")


def rel_err(a, b) -> float:
  """``||a - b|| / ||b||`` in float64 (any float dtype, bf16 / fp8 included); NaN when ``a``
  has a non-finite entry, so a broken kernel never passes a tolerance check."""
  a, b = np.asarray(a).astype(np.float64), np.asarray(b).astype(np.float64)
  if not np.isfinite(a).all():
    return float("nan")
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def fmt_time(s: float) -> str:
  if not math.isfinite(s):
    return "failed"
  if s < 1e-3:
    return f"{s * 1e6:.1f} us"
  if s < 1:
    return f"{s * 1e3:.3f} ms"
  return f"{s:.3f} s"


def write_results(suite: str, rows: Sequence[Row], out_dir: Path | None = None,
                  plot_x: str | None = None) -> Path:
  """Writes ``<out_dir or results/<device>>/<suite>.json`` (and a PNG plot)."""
  out_dir = Path(out_dir) if out_dir else RESULTS_DIR / device_name()
  out_dir.mkdir(parents=True, exist_ok=True)
  payload = {
      "suite": suite,
      "device": jax.devices()[0].device_kind,
      "platform": jax.default_backend(),
      "jax_version": jax.__version__,
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "rows": [r.to_json() for r in rows],
  }
  path = out_dir / f"{suite}.json"
  tmp = path.with_suffix(".json.tmp")
  tmp.write_text(json.dumps(payload, indent=1, default=_json_default) + "\n")
  os.replace(tmp, path)
  if plot_x:
    try:
      plot(rows, out_dir / f"{suite}.png", suite=suite, x=plot_x)
    except ImportError:
      pass
  return path


def _json_default(o):
  if isinstance(o, (np.integer,)):
    return int(o)
  if isinstance(o, (np.floating,)):
    return float(o)
  return str(o)


def plot(rows: Sequence[Row], path: Path, *, suite: str, x: str) -> None:
  """Throughput vs ``params[x]``, one line per (implementation, remaining params)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  series: dict[str, list[tuple[float, float]]] = {}
  unit = rows[0].unit if rows else ""
  for r in rows:
    if x not in r.params or not math.isfinite(r.throughput):
      continue
    rest = ",".join(f"{k}={v}" for k, v in sorted(r.params.items()) if k not in (x, "batch"))
    series.setdefault(f"{r.implementation} {rest}", []).append((r.params[x], r.throughput))
  groups: dict[str, dict[str, list]] = {}
  for label, pts in series.items():
    impl, rest = label.split(" ", 1)
    groups.setdefault(rest, {})[impl] = sorted(pts)
  n = max(1, len(groups))
  cols = min(3, n)
  nrows = math.ceil(n / cols)
  fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.6 * nrows), squeeze=False)
  for ax, (rest, impls) in zip(axes.flat, groups.items()):
    for impl, pts in impls.items():
      xs, ys = zip(*pts)
      ax.plot(xs, ys, marker="o", label=impl)
    ax.set_title(rest, fontsize=8)
    ax.set_xlabel(x)
    ax.set_ylabel(unit)
    if len({p[0] for pts in impls.values() for p in pts}) > 2:
      ax.set_xscale("log", base=2)
    ax.legend(fontsize=7)
  for ax in list(axes.flat)[len(groups):]:
    ax.axis("off")
  fig.suptitle(f"{suite} on {jax.devices()[0].device_kind}")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def safe_time(fn: Callable, make_args: Callable[[int], Sequence], **kw) -> float:
  """``time_fn`` that returns ``nan`` (and prints why) when an implementation fails."""
  try:
    return time_fn(fn, make_args, **kw)
  except Exception as e:  # a baseline that cannot run here is reported, not fatal
    msg = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
    print(f"  ! {getattr(fn, '__name__', fn)}: {type(e).__name__}: {msg}")
    return float("nan")


def ptxas_env(folder) -> dict[str, str]:
  """``os.environ`` plus Mosaic GPU's compile reports (ptxas's register / spill summary
  and the kernel's resources) written into ``folder``: for a child process that compiles
  the kernels (the variables are read when a kernel is compiled)."""
  env = dict(os.environ)
  env.update(MOSAIC_GPU_DUMP_PTXAS="1", MOSAIC_GPU_DUMP_RESOURCES="1",
             MOSAIC_GPU_DUMP_TO=str(folder))
  return env


def ptxas_summary(folder) -> list[str]:
  """``file: line`` for every register-count, spill, stack-frame or wgmma-serialisation
  line in the reports under ``folder`` (empty when there are none, e.g. on a CPU)."""
  folder = Path(folder)
  pat = re.compile(r"registers|spill|serializ|stack frame", re.I)
  lines = []
  for f in sorted(folder.rglob("*")) if folder.exists() else []:
    if f.is_file():
      for line in f.read_text(errors="replace").splitlines():
        if pat.search(line):
          lines.append(f"{f.name}: {line.strip()}")
  return lines
