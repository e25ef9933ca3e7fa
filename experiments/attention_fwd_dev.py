"""Device check and timing of flash-attention forward candidates.

``PYTHONPATH=. python3 experiments/attention_fwd_dev.py --out DIR [--set tiles|pipe]
[--budget-s 200]`` (``--smoke``: the same control flow on CPU, interpret mode, tiny
shapes, XLA for cuDNN)

Sets of candidates (``--set``):

* ``tiles`` (default): head_dim-128 tilings that need the log-sum-exp stored from
  registers (``mosaic_gpu.FWD_TILE_VARIANTS``): ``kv192`` (192-key tiles), ``s3`` (a third
  128-key K/V stage), ``kv192_r240`` (192-key tiles, 240/24 registers) and ``lse_direct``
  alone (its own cost or gain). Timed at head_dim 128 only.
* ``pipe``: the intra-warpgroup pipelined forward (``mosaic_gpu.fwd_pipeline_config``:
  ``Config.fwd_pipeline_softmax``, 128-key tiles) and ``pipe_r240`` (240/24 registers a
  thread); measured -22..-30% on the H100 (notes/attention.md, session 7), parked.

1. Checks against the float32 XLA reference, in a child process with a time limit (a hang
   or a crash costs only the check; a variant that fails is not timed). Forward output and
   log-sum-exp (-inf exactly where the reference's is), then dq/dk/dv through the default
   backward fed by the variant's lse. Every variant is checked on the first case (d128
   causal GQA 8/2) first, so a time-out still leaves each one checked once.
2. TFLOP/s (fwd 4*B*H*S*S*D, halved when causal; fwd+bwd 3.5x that), b*s = 16k tokens, 16
   heads, seq 4096: forward first (head_dim 128 full and causal, then 64 for ``pipe``),
   implementation by implementation (cuDNN ``jax.nn.dot_product_attention(
   implementation="cudnn")``, the default kernel, then the variants that passed), then
   fwd+bwd in the same order. A timing starts only while the time budget lasts, so the step
   ends within ``--budget-s``; the last rows of the plan are dropped first.

Prints a table (x cuDNN, x default) and writes ``attention_fwd_dev.json`` to ``--out``.
The check process compiles with Mosaic GPU's ptxas report on (``MOSAIC_GPU_DUMP_PTXAS``,
``MOSAIC_GPU_DUMP_RESOURCES`` into ``--out``/ptxas): registers a thread and spill bytes
of every kernel it builds are printed after the checks (``--no-ptxas`` turns it off).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench import harness
from jaxeff.ops import attention as A
from kernels_pallas.attention import mosaic_gpu as mg

TILES = ("kv192", "s3", "kv192_r240", "lse_direct")  # timing priority order
SETS = {
    "tiles": {
        "variants": TILES,
        "head_dims": (128,),
        # (batch, q_len, kv_len, heads, kv_heads, head_dim, causal, segments, variants)
        "checks": [
            (1, 1000, 1000, 8, 2, 128, True, False, TILES),
            (2, 2048, 2048, 4, 4, 128, False, False, TILES),
            (1, 1500, 700, 4, 1, 128, True, False, ("kv192", "s3")),  # empty query tiles
        ],
        "smoke_checks": [(1, 150, 400, 2, 1, 128, True, False, ("kv192", "s3"))],
    },
    "pipe": {
        "variants": ("pipe", "pipe_r240"),
        "head_dims": (128, 64),
        "checks": [
            (1, 1000, 1000, 8, 2, 128, True, False, ("pipe", "pipe_r240")),
            (1, 777, 1500, 4, 4, 64, False, True, ("pipe",)),
            (2, 2048, 2048, 4, 4, 128, False, False, ("pipe",)),
            (1, 1500, 700, 4, 1, 64, True, False, ("pipe",)),  # q_len > kv_len
        ],
        "smoke_checks": [(1, 150, 200, 2, 1, 64, True, False, ("pipe",))],
    },
}
VARIANTS: tuple[str, ...] = SETS["tiles"]["variants"]  # the chosen set's (main() sets it)
CHECKS = SETS["tiles"]["checks"]
SMOKE_CHECKS = SETS["tiles"]["smoke_checks"]
SMOKE = {"on": False}  # --smoke: interpret mode, tiny shapes, XLA instead of cuDNN


def select(name: str) -> None:
  global VARIANTS, CHECKS, SMOKE_CHECKS
  VARIANTS, CHECKS = SETS[name]["variants"], SETS[name]["checks"]
  SMOKE_CHECKS = SETS[name]["smoke_checks"]


def config(variant: str | None, d: int, causal: bool) -> mg.Config:
  if variant is None:
    return mg.default_config(d, causal)
  if variant in mg.FWD_TILE_VARIANTS:
    return mg.FWD_TILE_VARIANTS[variant]
  cfg = mg.fwd_pipeline_config(d, causal)
  if variant == "pipe_r240":
    cfg = dataclasses.replace(cfg, compute_registers=240, memory_registers=24)
  return cfg


def attention_fns(cfg: mg.Config, d: int, causal: bool, segment_ids=None):
  """(forward with lse, differentiable attention) around the Mosaic GPU kernels: the
  forward with ``cfg``, the backward with the default config (the variant is forward-only)."""
  qs, ks = segment_ids if segment_ids is not None else (None, None)
  kw = dict(is_causal=causal, scale=d ** -0.5, interpret=SMOKE["on"])

  def fwd_lse(q, k, v):
    return mg.forward(q, k, v, qs, ks, config=cfg, **kw)

  @jax.custom_vjp
  def attn(q, k, v):
    return fwd_lse(q, k, v)[0]

  def fwd(q, k, v):
    o, lse = fwd_lse(q, k, v)
    return o, (q, k, v, o, lse)

  def bwd(res, do):
    q, k, v, o, lse = res
    return mg.backward(q, k, v, o, lse, do, qs, ks, **kw)

  attn.defvjp(fwd, bwd)
  return fwd_lse, attn


def inputs(seed, b, t, s, n, kh, d, seg=False):
  ks = jax.random.split(jax.random.key(seed), 6)
  q = jax.random.normal(ks[0], (b, t, n, d), jnp.bfloat16)
  k = jax.random.normal(ks[1], (b, s, kh, d), jnp.bfloat16)
  v = jax.random.normal(ks[2], (b, s, kh, d), jnp.bfloat16)
  do = jax.random.normal(ks[3], (b, t, n, d), jnp.bfloat16)
  ids = None
  if seg:
    ids = (jnp.sort(jax.random.randint(ks[4], (b, t), 0, 4), axis=1),
           jnp.sort(jax.random.randint(ks[5], (b, s), 0, 4), axis=1))
  return q, k, v, do, ids


def run_checks(out: Path) -> None:
  """Child process: every variant against the reference."""
  results = []
  cases = SMOKE_CHECKS if SMOKE["on"] else CHECKS
  order = [(i, v) for v in VARIANTS for i in range(1)]  # each variant on case 0 first
  order += [(i, v) for i in range(1, len(cases)) for v in cases[i][-1]]
  up = lambda x: x.astype(jnp.float32)
  for i, variant in order:
    if variant not in cases[i][-1]:
      continue
    b, t, s, n, kh, d, causal, seg, _ = cases[i]
    q, k, v, do, ids = inputs(11 + i, b, t, s, n, kh, d, seg)
    name = f"{variant} b{b} t{t} s{s} h{n}/{kh} d{d} causal={causal} seg={seg}"
    try:
      (ro, rlse), rvjp = jax.vjp(lambda q, k, v: A.dot_product_attention_with_lse(
          q, k, v, is_causal=causal, segment_ids=ids, implementation="xla"), up(q), up(k), up(v))
      want = rvjp((up(do), jnp.zeros_like(rlse)))
      fwd_lse, attn = attention_fns(config(variant, d, causal), d, causal, ids)
      o, lse = jax.block_until_ready(jax.jit(fwd_lse)(q, k, v))
      grads = jax.block_until_ready(jax.jit(
          lambda q, k, v, do: jax.vjp(attn, q, k, v)[1](do))(q, k, v, do))
      fin = np.isfinite(np.asarray(rlse))
      inf_ok = bool((np.isfinite(np.asarray(lse)) == fin).all())
      lse_err = float(np.max(np.abs(np.asarray(lse)[fin] - np.asarray(rlse)[fin]))) if fin.any() else 0.0
      errs = [harness.rel_err(o, ro)] + [harness.rel_err(g, w) for g, w in zip(grads, want)]
      ok = all(e < 2e-2 for e in errs) and inf_ok and lse_err < 1e-2
      rec = {"case": name, "variant": variant, "ok": ok, "errs": errs, "lse_err": lse_err,
             "inf_ok": inf_ok}
      print(f"{'PASS' if ok else 'FAIL'} {name}: o={errs[0]:.1e} lse={lse_err:.1e} "
            f"inf_ok={inf_ok} dq={errs[1]:.1e} dk={errs[2]:.1e} dv={errs[3]:.1e}", flush=True)
    except Exception as e:  # reported; the variant is then not timed
      rec = {"case": name, "variant": variant, "ok": False,
             "error": f"{type(e).__name__}: {str(e)[:1500]}"}
      print(f"ERROR {name}: {rec['error'][:600]}", flush=True)
    results.append(rec)
    (out / "checks.json").write_text(json.dumps(results, indent=1))


def flops(b, s, h, d, causal, mode):
  f = 4 * b * h * s * s * d / (2 if causal else 1)
  return f * (3.5 if mode == "fwd_bwd" else 1.0)


def timed(rows, impl, fns, d, s, causal, mode, h=16):
  b = 16384 // s
  if SMOKE["on"]:
    b, s, h = 1, 256, 2
  fwd_lse, attn = fns

  def make(i):
    q, k, v, do, _ = inputs(100 + i, b, s, s, h, h, d)
    return (q, k, v, do)

  if mode == "fwd":
    f = jax.jit(lambda q, k, v, do: fwd_lse(q, k, v)[0])
  else:
    f = jax.jit(lambda q, k, v, do: jax.vjp(attn, q, k, v)[1](do))
  t = harness.safe_time(f, make, **(dict(rounds=1, warmup=1, max_sets=1) if SMOKE["on"]
                                    else dict(rounds=10, warmup=2)))
  tf = flops(b, s, h, d, causal, mode) / t / 1e12 if np.isfinite(t) else float("nan")
  rows.append({"impl": impl, "seq": s, "batch": b, "heads": h, "head_dim": d, "causal": causal,
               "mode": mode, "median_s": t, "tflops": tf})
  print(f"TIME {impl:<18} {mode:<7} d{d:<4} s{s:<5} causal={causal!s:<5} {t * 1e3:8.3f} ms "
        f"{tf:7.1f} TFLOP/s", flush=True)


def baseline_fns(causal, baseline):
  def fwd_lse(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=baseline), None

  return fwd_lse, lambda q, k, v: fwd_lse(q, k, v)[0]


def main(argv=None) -> int:
  p = argparse.ArgumentParser()
  p.add_argument("what", nargs="?", default="all", choices=["all", "check"])
  p.add_argument("--out", default="/tmp/attention_fwd_dev")
  p.add_argument("--budget-s", type=float, default=200.0)
  p.add_argument("--check-limit-s", type=float, default=75.0)
  p.add_argument("--smoke", action="store_true")
  p.add_argument("--set", default="tiles", choices=sorted(SETS))
  p.add_argument("--no-ptxas", action="store_true", help="no ptxas report in the checks")
  args = p.parse_args(argv)
  SMOKE["on"] = args.smoke
  select(args.set)
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  if args.what == "check":
    run_checks(out)
    return 0

  t0 = time.time()
  env = dict(os.environ) if args.no_ptxas else harness.ptxas_env(out / "ptxas")
  try:  # the child gets the GPU first; this process touches it only afterwards
    subprocess.run([sys.executable, __file__, "check", "--out", str(out), "--set", args.set]
                   + (["--smoke"] if args.smoke else []),
                   timeout=args.check_limit_s, check=False, env=env)
  except subprocess.TimeoutExpired:
    print(f"CHECK TIMED OUT after {args.check_limit_s:.0f} s (hang?)", flush=True)
  for line in harness.ptxas_summary(out / "ptxas")[:200]:
    print("PTXAS", line, flush=True)
  checks = json.loads((out / "checks.json").read_text()) if (out / "checks.json").exists() else []
  passed = [v for v in VARIANTS
            if any(c["variant"] == v for c in checks)
            and all(c["ok"] for c in checks if c["variant"] == v)]
  print(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}; "
        f"variants passing the check: {passed or 'none'}", flush=True)

  rows = []
  baseline = "xla" if args.smoke else "cudnn"
  plan = []  # (mode, head_dim, causal, impl) in priority order
  for mode in ("fwd", "fwd_bwd"):
    for d in SETS[args.set]["head_dims"]:
      for causal in (False, True):
        for impl in ("cudnn", None, *passed):
          if impl == "pipe_r240" and d != 128:
            continue
          plan.append((mode, d, causal, impl))
  if args.smoke:  # a few rows of each mode
    plan = plan[:3] + [x for x in plan if x[0] == "fwd_bwd"][:3]
  for n_done, (mode, d, causal, impl) in enumerate(plan):
    if time.time() - t0 > args.budget_s - 15:
      print(f"budget: skipping {len(plan) - n_done} timings from {impl or 'default'} {mode} "
            f"d{d} causal={causal} on", flush=True)
      break
    if impl == "cudnn":
      fns, name = baseline_fns(causal, baseline), baseline
    else:
      fns = attention_fns(config(impl, d, causal), d, causal)
      name = "jaxeff" if impl is None else f"jaxeff:{impl}"
    timed(rows, name, fns, d, 4096, causal, mode)

  print("\n== TFLOP/s, 16 heads, 16k tokens, seq 4096: impl (x baseline, x default) ==")
  by = {}
  for r in rows:
    by.setdefault((r["mode"], r["head_dim"], r["causal"]), {})[r["impl"]] = r["tflops"]
  for (mode, d, causal), v in by.items():
    cud, dflt = v.get(baseline, float("nan")), v.get("jaxeff", float("nan"))
    cells = "  ".join(f"{k}={x:.0f} ({x / cud:.2f}x, {x / dflt:.3f})" for k, x in v.items()
                      if k != baseline)
    print(f"{mode:<7} d{d:<4} causal={causal!s:<5} {baseline}={cud:.0f}  {cells}")
  print(f"elapsed {time.time() - t0:.0f} s", flush=True)
  (out / "attention_fwd_dev.json").write_text(json.dumps(
      {"device": jax.devices()[0].device_kind, "jax_version": jax.__version__,
       "date": time.strftime("%Y-%m-%d %H:%M:%S"), "checks": checks, "rows": rows},
      indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
