"""Device check and timing of the head_dim-128 flash-attention backward variants.

``PYTHONPATH=. python3 experiments/attention_bwd128_dev.py --out DIR [--budget-s 190]``
(``--smoke``: the same control flow on CPU, interpret mode, tiny shapes, XLA for cuDNN)

1. Gradient checks against the float32 XLA reference, in a child process with a time
   limit (a hang or a crash costs only the check; a variant that fails is not timed):
   ``deferred`` (``Config.bwd_dq_deferred``: previous dQ staged between S^T and dP^T),
   ``deferred_writer`` and ``writer`` (``Config.bwd_dq_writer``: the memory warpgroup
   issues the dQ reduce-adds, with and without deferred dQ), ``deferred_3stage`` and
   ``3stage`` (a 3-stage Q/dO ring with and without deferred dQ), ``deferred_late_store``
   (previous dQ staged under dP^T). Every variant is checked on the first (causal GQA)
   case first, so a time-out still leaves each one checked once; the segment-id case (the
   tightest shared memory) and the full-attention case follow for the leading variants.
2. fwd+bwd TFLOP/s (FLOPs 3.5 x 4*B*H*S*S*D, halved when causal), b*s = 16k tokens, 16
   heads, head_dim 128: seq 4096, implementation by implementation (cuDNN
   ``jax.nn.dot_product_attention(implementation="cudnn")``, the default backward, then the
   variants that passed, in the order above), full and causal each; then 2048 and 8192
   (default, ``deferred``, cuDNN). A timing starts only while the time budget lasts, so
   the step ends within ``--budget-s``; the variants last in the order are dropped first.

Prints a table and writes ``attention_bwd128_dev.json`` to ``--out``. The check process
compiles with Mosaic GPU's ptxas report on (into ``--out``/ptxas); its register, spill and
serialisation lines are printed after the checks (``--no-ptxas`` turns it off).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
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

D = 128
VARIANTS = {  # timing priority order
    "deferred": dict(bwd_dq_deferred=True),
    "deferred_writer": dict(bwd_dq_deferred=True, bwd_dq_writer=True),
    "writer": dict(bwd_dq_writer=True),
    "deferred_3stage": dict(bwd_dq_deferred=True, bwd_num_stages=3),
    "3stage": dict(bwd_num_stages=3),
    "deferred_late_store": dict(bwd_dq_deferred=True, bwd_dq_store_before_dp=False),
}
# (batch, q_len, kv_len, heads, kv_heads, causal, segments, variants checked). With segment
# ids a 3-stage config runs 2 stages at head_dim 128 (shared memory).
CHECKS = [
    (1, 1000, 1000, 8, 2, True, False, tuple(VARIANTS)),
    (1, 777, 1500, 4, 4, False, True, ("deferred", "deferred_writer", "writer",
                                       "deferred_3stage")),
    (2, 2048, 2048, 4, 4, False, False, ("deferred", "deferred_writer", "writer")),
]
SMOKE_CHECKS = [(1, 150, 200, 2, 1, True, False, ("deferred_writer",))]
SMOKE = {"on": False}  # --smoke: interpret mode, tiny shapes, XLA instead of cuDNN


def config(variant: str | None, causal: bool) -> mg.Config:
  base = mg.default_config(D, causal)
  return base if variant is None else dataclasses.replace(base, **VARIANTS[variant])


def attention_fn(cfg: mg.Config, causal: bool, segment_ids=None):
  """custom_vjp around the Mosaic GPU kernels with an explicit config."""
  scale = D ** -0.5
  qs, ks = segment_ids if segment_ids is not None else (None, None)

  kw = dict(is_causal=causal, scale=scale, config=cfg, interpret=SMOKE["on"])

  @jax.custom_vjp
  def attn(q, k, v):
    return mg.forward(q, k, v, qs, ks, **kw)[0]

  def fwd(q, k, v):
    o, lse = mg.forward(q, k, v, qs, ks, **kw)
    return o, (q, k, v, o, lse)

  def bwd(res, do):
    q, k, v, o, lse = res
    return mg.backward(q, k, v, o, lse, do, qs, ks, **kw)

  attn.defvjp(fwd, bwd)
  return attn


def inputs(seed, b, t, s, n, kh, seg=False):
  ks = jax.random.split(jax.random.key(seed), 6)
  q = jax.random.normal(ks[0], (b, t, n, D), jnp.bfloat16)
  k = jax.random.normal(ks[1], (b, s, kh, D), jnp.bfloat16)
  v = jax.random.normal(ks[2], (b, s, kh, D), jnp.bfloat16)
  do = jax.random.normal(ks[3], (b, t, n, D), jnp.bfloat16)
  ids = None
  if seg:
    ids = (jnp.sort(jax.random.randint(ks[4], (b, t), 0, 4), axis=1),
           jnp.sort(jax.random.randint(ks[5], (b, s), 0, 4), axis=1))
  return q, k, v, do, ids



def run_checks(out: Path) -> None:
  """Child process: every variant against the reference."""
  results = []
  for i, (b, t, s, n, kh, causal, seg, variants) in enumerate(
      SMOKE_CHECKS if SMOKE["on"] else CHECKS):
    q, k, v, do, ids = inputs(11 + i, b, t, s, n, kh, seg)
    up = lambda x: x.astype(jnp.float32)
    ref = lambda q, k, v: A.dot_product_attention(q, k, v, is_causal=causal, segment_ids=ids,
                                                  implementation="xla")
    want = jax.vjp(ref, up(q), up(k), up(v))[1](up(do))
    for variant in variants:
      name = f"{variant} b{b} t{t} s{s} h{n}/{kh} causal={causal} seg={seg}"
      try:
        f = jax.jit(lambda q, k, v, do, cfg=config(variant, causal): jax.vjp(
            attention_fn(cfg, causal, ids), q, k, v)[1](do))
        got = jax.block_until_ready(f(q, k, v, do))
        errs = [harness.rel_err(g, w) for g, w in zip(got, want)]
        ok = all(e < 2e-2 for e in errs)
        rec = {"case": name, "variant": variant or "default", "ok": ok, "errs": errs}
        print(f"{'PASS' if ok else 'FAIL'} {name}: dq={errs[0]:.1e} dk={errs[1]:.1e} "
              f"dv={errs[2]:.1e}", flush=True)
      except Exception as e:  # reported; the variant is then not timed
        rec = {"case": name, "variant": variant or "default", "ok": False,
               "error": f"{type(e).__name__}: {str(e)[:1500]}"}
        print(f"ERROR {name}: {rec['error'][:600]}", flush=True)
      results.append(rec)
      (out / "checks.json").write_text(json.dumps(results, indent=1))


def flops(b, s, h, causal):
  return 3.5 * 4 * b * h * s * s * D / (2 if causal else 1)


def timed(rows, impl, attn, s, causal, h=16):
  b = 16384 // s
  if SMOKE["on"]:
    b, s, h = 1, 256, 2

  def make(i):
    q, k, v, do, _ = inputs(100 + i, b, s, s, h, h)
    return (q, k, v, do)

  f = jax.jit(lambda q, k, v, do: jax.vjp(attn, q, k, v)[1](do))
  t = harness.safe_time(f, make, **(dict(rounds=1, warmup=1, max_sets=1) if SMOKE["on"]
                                    else dict(rounds=10, warmup=2)))
  tf = flops(b, s, h, causal) / t / 1e12 if np.isfinite(t) else float("nan")
  rows.append({"impl": impl, "seq": s, "batch": b, "heads": h, "head_dim": D, "causal": causal,
               "mode": "fwd_bwd", "median_s": t, "tflops": tf})
  print(f"TIME {impl:<24} s{s:<5} causal={causal!s:<5} {t * 1e3:8.3f} ms {tf:7.1f} TFLOP/s",
        flush=True)


def main(argv=None) -> int:
  p = argparse.ArgumentParser()
  p.add_argument("what", nargs="?", default="all", choices=["all", "check"])
  p.add_argument("--out", default="/tmp/attention_bwd128_dev")
  p.add_argument("--budget-s", type=float, default=190.0)
  p.add_argument("--check-limit-s", type=float, default=90.0)
  p.add_argument("--smoke", action="store_true")
  p.add_argument("--no-ptxas", action="store_true", help="no ptxas report in the checks")
  args = p.parse_args(argv)
  SMOKE["on"] = args.smoke
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  if args.what == "check":
    run_checks(out)
    return 0

  t0 = time.time()
  try:  # the child gets the GPU first; this process touches it only afterwards
    subprocess.run([sys.executable, __file__, "check", "--out", str(out)]
                   + (["--smoke"] if args.smoke else []),
                   timeout=args.check_limit_s, check=False,
                   env=None if args.no_ptxas else harness.ptxas_env(out / "ptxas"))
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
  # (impl, seq, causal) in priority order: seq 4096 implementation by implementation (full
  # and causal each), then the other lengths for the default, deferred and cuDNN.
  plan = [(impl, 4096, c) for impl in ("cudnn", None, *passed) for c in (False, True)]
  plan += [(impl, s, c) for s, c in [(2048, False), (8192, False), (2048, True), (8192, True)]
           for impl in (None, "deferred", "cudnn") if impl is None or impl == "cudnn"
           or impl in passed]
  for n_done, (impl, s, causal) in enumerate(plan):
    if time.time() - t0 > args.budget_s - 20:
      print(f"budget: skipping {len(plan) - n_done} timings from {impl or 'default'} s{s} "
            f"causal={causal} on", flush=True)
      break
    if impl == "cudnn":
      attn = lambda q, k, v, c=causal: jax.nn.dot_product_attention(
          q, k, v, is_causal=c, implementation=baseline)
      name = baseline
    else:
      attn = attention_fn(config(impl, causal), causal)
      name = "jaxeff" if impl is None else f"jaxeff:{impl}"
    timed(rows, name, attn, s, causal)
    if args.smoke and n_done >= 5:
      break

  print("\n== fwd+bwd TFLOP/s, head_dim 128, 16 heads, 16k tokens ==")
  by = {}
  for r in rows:
    by.setdefault((r["seq"], r["causal"]), {})[r["impl"]] = r["tflops"]
  for (s, causal), v in by.items():  # (x baseline, x default) per implementation
    cud, dflt = v.get(baseline, float("nan")), v.get("jaxeff", float("nan"))
    cells = "  ".join(f"{k}={x:.0f} ({x / cud:.2f}x, {x / dflt:.3f})" for k, x in v.items()
                      if k != baseline)
    print(f"s{s:<5} causal={causal!s:<5} {baseline}={cud:.0f}  {cells}")
  print(f"elapsed {time.time() - t0:.0f} s", flush=True)
  (out / "attention_bwd128_dev.json").write_text(json.dumps(
      {"device": jax.devices()[0].device_kind, "jax_version": jax.__version__,
       "date": time.strftime("%Y-%m-%d %H:%M:%S"), "checks": checks, "rows": rows},
      indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
