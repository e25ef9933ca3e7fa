"""Medium-m weight-only matmul on one GPU: correctness, then device time vs bf16 and XLA.

The kernel is ``kernels_pallas.matmul.mosaic_gpu_medium.weight_only_matmul_medium`` (swap-AB
wgmma, weights upcast in registers, split-K), issue #5's int4 m = 128 case. The script

1. checks every config against the dequantize-then-dot reference at odd shapes (m = 33,
   100, 200; N, K not multiples of the tiles: padded here as the op layer would) and at
   each timed shape before timing it;
2. times each config (``harness.time_fn(chain=True)``: chained calls in one program, i.e.
   device time) against XLA's bf16 dot and XLA's dequantize-then-dot (what dispatch runs
   for m > 64 today) at m = 64, 128, 256, K = N = 8192 and K = 4096, N = 14336, int4
   group 128 and int8 per channel;
3. prints a table and writes ``quant_medium_dev.json`` under ``--out`` after every case.

Run (repo root): ``PYTHONPATH=. python3 experiments/quant_medium_dev.py --out $OUT``
(< 200 s on an H100; cases past ``--budget`` seconds are skipped and listed). ``--smoke``:
tiny shapes, kernel interpreted on CPU (checks this script).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.bench import harness  # noqa: E402
from jaxeff.quant.formats import quantize_tensor  # noqa: E402
from kernels_pallas.matmul import mosaic_gpu_medium as mm  # noqa: E402

qm = importlib.import_module("jaxeff.ops.quantized_matmul")

FORMATS = {"int4_g128": ("int4", 128), "int8": ("int8", None)}
# name -> MediumConfig overrides (split_k / num_stages from medium_config unless given)
CONFIGS = {
    "wg64": dict(wg_rows=64),
    "wg64_serial": dict(wg_rows=64, pipeline_upcast=False),
    "wg128": dict(wg_rows=128),
    "wg128_serial": dict(wg_rows=128, pipeline_upcast=False),
    # x tile multicast to a pair of CTAs (cluster of 2 along N): run last, since a
    # cluster barrier protocol error would hang rather than fail
    "wg64_c2": dict(wg_rows=64, cluster_n=2),
    "wg128_c2": dict(wg_rows=128, cluster_n=2),
}
CLUSTER = ("wg64_c2", "wg128_c2")
# (k, n, format, m values, configs), most important first
PLAN = [
    (8192, 8192, "int4_g128", (128,), ("wg64", "wg128", "wg64_serial", "wg128_serial")),
    (8192, 8192, "int4_g128", (64, 256), ("wg64", "wg128")),
    (8192, 8192, "int8", (128, 64, 256), ("wg64", "wg128")),
    (4096, 14336, "int4_g128", (128, 256), ("wg64", "wg128")),
    (4096, 14336, "int8", (128,), ("wg64", "wg128")),
]
# Run by a child process with its own time limit (--cluster), after the rest: a cluster
# barrier protocol error would hang the GPU rather than fail.
CLUSTER_PLAN = [
    (8192, 8192, "int4_g128", (128,), CLUSTER),
    (8192, 8192, "int8", (128,), CLUSTER),
    (8192, 8192, "int4_g128", (256,), CLUSTER),
]
ODD = ((33, 1152, 600, "int4_g128"), (100, 2000, 300, "int8"), (200, 1152, 520, "int4_g128"))
ROUNDS = 10
INTERPRET = False
XLA_DEQUANT: dict[str, float] = {}  # case -> seconds
T0 = time.perf_counter()


def elapsed() -> float:
  return time.perf_counter() - T0



def _weights(k, n, fmt_name, sets):
  """``sets`` random weights: the QArray (for XLA) and the kernel's K-major operands."""
  fmt, group = FORMATS[fmt_name]
  quant = jax.jit(lambda w: quantize_tensor(w, fmt, group_size=group))
  out = []
  for i in range(sets):
    qa = quant(jax.random.normal(jax.random.key(100 + i), (k, n), jnp.float32) / 64)
    pw = qm.prepack(qa, native_int4=True)
    out.append({"qarray": qa, "packed": pw, "values": pw.values, "scales": pw.scales})
  jax.block_until_ready(out)
  return out


def _x(m, k, i):
  return jax.random.normal(jax.random.key(7 + i), (m, k), jnp.float32).astype(jnp.bfloat16)


def _config(name, m, n, k, fmt_name):
  fmt, group = FORMATS[fmt_name]
  return mm.medium_config(m, n, k, bits=4 if fmt == "int4" else 8, group_size=group,
                          **CONFIGS[name])


def _kernel_fn(cfg, group, n, k):
  """jitted ``x, values, scales -> [M, N] bf16``, operands padded to whole tiles."""
  tn, tk = mm.tile_multiples(cfg, group)
  pn, pk = -n % tn, -k % tk

  def f(x, values, scales):
    if pn or pk:  # zero codes with scale 1 (whole extra groups); zero x columns
      x = jnp.pad(x, ((0, 0), (0, pk)))
      values = jnp.pad(values, ((0, pn), (0, pk)))
      extra = 0 if group is None else (k + pk) // group - scales.shape[1]
      scales = jnp.pad(scales, ((0, pn), (0, extra)), constant_values=1.0)
    out = mm.weight_only_matmul_medium(x, values, scales, group_size=group, config=cfg,
                                       interpret=INTERPRET)
    return out[:, :n].astype(jnp.bfloat16)

  return jax.jit(f)


def _reference(x, qa):
  return qm.quantized_matmul_reference(x, qa, None, out_dtype=jnp.float32)


def check_odd(results):
  print("\n== correctness at odd shapes (rel. error vs dequantize-then-dot) ==", flush=True)
  for m, k, n, fmt_name in ODD:
    w = _weights(k, n, fmt_name, 1)[0]
    x = _x(m, k, 0)
    ref = _reference(x, w["qarray"])
    for name in CONFIGS:
      if name in CLUSTER:  # checked at the timed shapes, at the end
        continue
      try:
        cfg = _config(name, m, n, k, fmt_name)
        out = _kernel_fn(cfg, FORMATS[fmt_name][1], n, k)(x, w["values"], w["scales"])
        err = harness.rel_err(out, ref)
        ok = err < 1.5e-2
      except Exception as e:  # one broken config must not hide the others
        err, ok, cfg = float("nan"), False, None
        print(f"  ! {name}: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
      print(f"  m={m:<3} k={k:<5} n={n:<4} {fmt_name:<9} {name:<13} err={err:.2e} "
            f"{'ok' if ok else 'FAIL'}  {cfg}", flush=True)
      results["checks"].append({"m": m, "k": k, "n": n, "format": fmt_name, "config": name,
                                "rel_err": err if math.isfinite(err) else None, "ok": ok})


def bf16_time(m, k, n):
  make = lambda i: (_x(m, k, i), (jax.random.normal(jax.random.key(50 + i), (k, n),
                                                    jnp.float32) / 64).astype(jnp.bfloat16))
  return harness.safe_time(jax.jit(jnp.dot), make, rounds=ROUNDS, chain=True)


def time_case(results, k, n, m, fmt_name, names, weights, bf16_t):
  case = f"{fmt_name} m={m} k={k} n={n}"
  fmt, group = FORMATS[fmt_name]
  row = {"case": case, "m": m, "k": k, "n": n, "format": fmt_name, "xla_bf16_s": bf16_t,
         "weight_bytes": harness.tree_bytes((weights[0]["values"], weights[0]["scales"])),
         "configs": {}}
  nsets = len(weights)
  x0 = _x(m, k, 0)
  ref = _reference(x0, weights[0]["qarray"])
  flop = 2 * m * k * n

  def report(label, t, err, cfg=None):
    speed = bf16_t / t if math.isfinite(t) else float("nan")
    tflops = flop / t / 1e12 if math.isfinite(t) else float("nan")
    bad = "" if not math.isfinite(err) or err < 1.5e-2 else "  FAIL"
    print(f"  {case:<28} {label:<14} {harness.fmt_time(t):>10} {tflops:6.0f} TFLOP/s "
          f"{speed:5.2f}x bf16  err={err:.1e}{bad}", flush=True)
    row["configs"][label] = {"median_s": t if math.isfinite(t) else None,
                             "x_bf16": speed if math.isfinite(speed) else None,
                             "rel_err": err if math.isfinite(err) else None,
                             "config": None if cfg is None else dataclasses.asdict(cfg)}

  if case not in XLA_DEQUANT:  # timed once per case
    xla = jax.jit(lambda x, qa: qm.quantized_matmul_reference(x, qa, None,
                                                                out_dtype=jnp.bfloat16))
    XLA_DEQUANT[case] = harness.safe_time(
        xla, lambda i: (_x(m, k, i), weights[i % nsets]["qarray"]), rounds=ROUNDS, chain=True)
  report("xla_dequant", XLA_DEQUANT[case], float("nan"))
  if m <= 64 and "decode" not in row["configs"]:  # the decode kernel (dispatched for m <= 64)
    dec = jax.jit(lambda x, pw: qm.weight_only_matmul(x, pw, variant="mosaic",
                                                      interpret=INTERPRET).astype(jnp.bfloat16))
    err = float("nan")
    try:
      err = harness.rel_err(dec(x0, weights[0]["packed"]), ref)
    except Exception as e:
      print(f"  ! decode: {type(e).__name__}: {str(e).splitlines()[0][:300]}", flush=True)
    t = harness.safe_time(dec, lambda i: (_x(m, k, i), weights[i % nsets]["packed"]),
                          rounds=ROUNDS, chain=True) if math.isfinite(err) else float("nan")
    report("decode", t, err)
  names = list(names)
  for name in names:
    if elapsed() > results["budget"]:
      print(f"  skipped {case} {name}: past the budget")
      results["skipped"].append(f"{case} {name}")
      continue
    cfg = _config(name, m, n, k, fmt_name)
    f = _kernel_fn(cfg, group, n, k)
    err, t = float("nan"), float("nan")
    try:
      err = harness.rel_err(f(x0, weights[0]["values"], weights[0]["scales"]), ref)
    except Exception as e:
      print(f"  ! {name}: {type(e).__name__}: {str(e).splitlines()[0][:300]}", flush=True)
    if math.isfinite(err) and err < 1.5e-2:
      t = harness.safe_time(f, lambda i: (_x(m, k, i), weights[i % nsets]["values"],
                                          weights[i % nsets]["scales"]),
                            rounds=ROUNDS, chain=True)
    elif f"{name}_serial" in CONFIGS and f"{name}_serial" not in names:
      names.append(f"{name}_serial")  # the pipelined upcast failed: time the serial twin
    report(name, t, err, cfg)
  results["timings"].append(row)


def _write(args, results):
  os.makedirs(args.out, exist_ok=True)
  name = "quant_medium_dev_cluster.json" if args.cluster else "quant_medium_dev.json"
  with open(os.path.join(args.out, name), "w") as f:
    json.dump(results, f, indent=1, default=lambda o: None)


def summary(results):
  print("\n== best config per case (ratio = XLA bf16 dot time / time) ==")
  for row in results["timings"]:
    ours = {k: v for k, v in row["configs"].items()
            if k not in ("xla_dequant", "decode") and v["median_s"]}
    if not ours:
      print(f"  {row['case']:<28} no kernel timing")
      continue
    best = min(ours, key=lambda k: ours[k]["median_s"])
    deq = row["configs"].get("xla_dequant", {}).get("x_bf16")
    dec = row["configs"].get("decode", {}).get("x_bf16")
    print(f"  {row['case']:<28} bf16 {harness.fmt_time(row['xla_bf16_s']):>9}  best {best:<13} "
          f"{harness.fmt_time(ours[best]['median_s']):>9} = {ours[best]['x_bf16']:.2f}x bf16"
          f"  (xla dequant {deq if deq is None else f'{deq:.2f}x'}"
          f"{'' if dec is None else f', decode kernel {dec:.2f}x'})")


def main():
  global INTERPRET, PLAN, ODD, ROUNDS
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default=os.environ.get("OUT", "/tmp/quant_medium_dev"))
  p.add_argument("--budget", type=float, default=170.0,
                 help="seconds after which remaining timed configs are skipped")
  p.add_argument("--smoke", action="store_true", help="tiny shapes, interpreted on CPU")
  p.add_argument("--cluster", action="store_true",
                 help="only the cluster-pair configs (run in a child process by default)")
  p.add_argument("--total", type=float, default=190.0,
                 help="seconds after which the cluster child process is killed")
  args = p.parse_args()
  if args.smoke:
    INTERPRET, ROUNDS = True, 2
    PLAN = [(512, 256, "int4_g128", (40,), ("wg64", "wg128")),
            (256, 512, "int8", (72,), ("wg64_serial",))]
    CLUSTER_PLAN[:] = [(512, 512, "int8", (40,), ("wg64_c2",))]
    ODD = ((33, 384, 200, "int4_g128"),)
  dev = jax.devices()[0]
  results = {"device": dev.device_kind, "jax_version": jax.__version__, "checks": [],
             "timings": [], "skipped": [], "budget": args.budget}
  print(f"device {dev.device_kind}, jax {jax.__version__}", flush=True)
  if args.cluster:
    plan = CLUSTER_PLAN
  else:
    check_odd(results)
    _write(args, results)
    plan = PLAN
  print(f"\n== timings (chained device time), t={elapsed():.0f}s ==", flush=True)
  bf16: dict[tuple[int, int, int], float] = {}
  for k, n, fmt_name, ms, names in plan:
    if elapsed() > args.budget:
      print(f"  skipped {fmt_name} k={k} n={n} m={ms}: past the budget")
      results["skipped"].append(f"{fmt_name} k={k} n={n} m={ms}")
      continue
    weights = _weights(k, n, fmt_name, 1 if INTERPRET else 3)
    for m in ms:
      if (m, k, n) not in bf16:
        bf16[(m, k, n)] = bf16_time(m, k, n)
        print(f"  xla bf16 m={m} k={k} n={n}: {harness.fmt_time(bf16[(m, k, n)])}", flush=True)
      time_case(results, k, n, m, fmt_name, names, weights, bf16[(m, k, n)])
      _write(args, results)
    del weights
  summary(results)
  print(f"done in {elapsed():.0f}s", flush=True)
  _write(args, results)
  if not args.cluster:
    limit = args.total - elapsed()
    if limit < 25:
      print(f"cluster configs skipped: {limit:.0f} s left")
      return
    cmd = [sys.executable, os.path.abspath(__file__), "--cluster", "--out", args.out,
           "--budget", str(limit - 15)] + (["--smoke"] if args.smoke else [])
    print(f"\n== cluster pairs (child process, limit {limit:.0f} s) ==", flush=True)
    try:
      subprocess.run(cmd, timeout=limit, check=False)
    except subprocess.TimeoutExpired:
      print(f"cluster child process killed after {limit:.0f} s (hang or slow)", flush=True)


if __name__ == "__main__":
  main()
