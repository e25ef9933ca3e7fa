"""Device check for the flash-attention kernels: correctness on random odd shapes, then speed.

``PYTHONPATH=. python3 experiments/attention_dev.py [step ...] [--out DIR]`` (steps: check,
quickcheck, triton, time, extra, variants, bwdvariants, wgvariants, dqalt, fwdvariants,
breakdown, profile; default check time)
prints one line per case and a summary table last, and writes ``attention_dev.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench import harness
from jaxeff.ops import attention as A
from kernels_pallas.attention import mosaic_gpu as mg

RESULTS: dict = {"check": [], "time": []}



def inputs(key, b, t, s, n, k, d, dtype=jnp.bfloat16, seg=False):
  ks = jax.random.split(key, 6)
  q = jax.random.normal(ks[0], (b, t, n, d), dtype)
  kk = jax.random.normal(ks[1], (b, s, k, d), dtype)
  v = jax.random.normal(ks[2], (b, s, k, d), dtype)
  do = jax.random.normal(ks[3], (b, t, n, d), dtype)
  ids = None
  if seg:
    qi = jnp.sort(jax.random.randint(ks[4], (b, t), 0, 4), axis=1)
    ki = jnp.sort(jax.random.randint(ks[5], (b, s), 0, 4), axis=1)
    ids = (qi, ki)
  return q, kk, v, do, ids


def check_case(impl, b, t, s, n, k, d, dtype=jnp.bfloat16, seg=False, **kw):
  name = f"{impl} b{b} t{t} s{s} n{n} k{k} d{d} {jnp.dtype(dtype).name} seg={seg} {kw}"
  try:
    q, kk, v, do, ids = inputs(jax.random.key(t * 7 + s + d), b, t, s, n, k, d, dtype, seg)

    def f(impl_):
      def run(q, kk, v):
        return A.dot_product_attention_with_lse(q, kk, v, segment_ids=ids, implementation=impl_,
                                                **kw)
      return run

    up = lambda x: x.astype(jnp.float32)
    t0 = time.perf_counter()
    (o, lse), vjp = jax.vjp(f(impl), q, kk, v)
    grads = vjp((do, jnp.zeros_like(lse)))
    jax.block_until_ready(grads)
    dt = time.perf_counter() - t0
    (ro, rlse), rvjp = jax.vjp(f("xla"), up(q), up(kk), up(v))
    rgrads = rvjp((up(do), jnp.zeros_like(rlse)))
    fin = np.isfinite(np.asarray(rlse))
    lse_ok = bool((np.isfinite(np.asarray(lse)) == fin).all())
    lse_err = float(np.max(np.abs(np.where(fin, np.asarray(lse) - np.asarray(rlse), 0)))) if fin.any() else 0.0
    errs = [harness.rel_err(o, ro)] + [harness.rel_err(g, rg) for g, rg in zip(grads, rgrads)]
    ok = all(e < 2e-2 for e in errs) and lse_ok and lse_err < 1e-2
    line = (f"{'PASS' if ok else 'FAIL'} {name}: o={errs[0]:.1e} dq={errs[1]:.1e} dk={errs[2]:.1e} "
            f"dv={errs[3]:.1e} lse={lse_err:.1e} inf_ok={lse_ok} ({dt:.1f}s)")
    RESULTS["check"].append({"case": name, "ok": ok, "errs": errs, "lse_err": lse_err})
  except Exception as e:  # report and go on
    line = f"ERROR {name}: {type(e).__name__}: {str(e)[:800]}"
    traceback.print_exc(limit=3)
    RESULTS["check"].append({"case": name, "ok": False, "error": str(e)[:2000]})
  print(line, flush=True)


def run_checks(impl="mosaic_gpu", quick=False):
  check_case(impl, 2, 256, 256, 4, 4, 128)
  check_case(impl, 2, 512, 512, 4, 2, 64)
  if quick:
    check_case(impl, 2, 513, 513, 4, 2, 64, seg=True, is_causal=True)
    check_case(impl, 1, 400, 400, 4, 4, 128, logits_soft_cap=10.0, is_causal=True)
    return
  check_case(impl, 2, 256, 256, 4, 4, 128, is_causal=True)
  check_case(impl, 1, 1000, 1000, 4, 1, 64, is_causal=True)
  check_case(impl, 2, 300, 777, 8, 2, 128, is_causal=True)
  check_case(impl, 1, 1, 300, 8, 8, 64, is_causal=True)
  check_case(impl, 1, 17, 1000, 4, 4, 128)
  check_case(impl, 2, 513, 513, 4, 2, 64, seg=True, is_causal=True)
  check_case(impl, 1, 600, 700, 4, 4, 128, local_window_size=(100, 20))
  check_case(impl, 1, 400, 400, 4, 4, 128, logits_soft_cap=10.0, is_causal=True)
  check_case(impl, 1, 256, 384, 4, 2, 256, is_causal=True)
  check_case(impl, 1, 256, 256, 4, 2, 128, dtype=jnp.float16, is_causal=True)
  check_case(impl, 1, 2048, 2048, 4, 4, 128, is_causal=True)


def flops(b, s, h, d, causal, mode):
  f = 4 * b * h * s * s * d / (2 if causal else 1)
  return f * (3.5 if mode == "fwd_bwd" else 1.0)


def timed(fn_name, attn, b, s, h, kvh, d, causal, mode, rounds=10):
  def make(i):
    q, k, v, do, _ = inputs(jax.random.key(100 + i), b, s, s, h, kvh, d)
    return (q, k, v, do)

  if mode == "fwd":
    f = jax.jit(lambda q, k, v, do: attn(q, k, v))
  else:
    f = jax.jit(lambda q, k, v, do: jax.vjp(attn, q, k, v)[1](do))
  t = harness.safe_time(f, make, rounds=rounds, warmup=2)
  tf = flops(b, s, h, d, causal, mode) / t / 1e12 if np.isfinite(t) else float("nan")
  RESULTS["time"].append({"impl": fn_name, "b": b, "s": s, "h": h, "kvh": kvh, "d": d,
                          "causal": causal, "mode": mode, "s_per_call": t, "tflops": tf})
  print(f"TIME {fn_name:<18} d{d} s{s:<6} b{b:<3} h{h}/{kvh} causal={causal!s:<5} {mode:<8} "
        f"{t * 1e3:8.3f} ms {tf:7.1f} TFLOP/s", flush=True)
  return tf


def run_times(shapes=None):
  shapes = shapes or [(128, 1024, False), (128, 4096, False), (128, 4096, True),
                      (128, 16384, False), (64, 4096, False), (64, 4096, True)]
  for d, s, causal in shapes:
    b = 16384 // s
    for mode in ("fwd", "fwd_bwd"):
      ours = lambda q, k, v, c=causal: A.dot_product_attention(
          q, k, v, is_causal=c, implementation="mosaic_gpu")
      cud = lambda q, k, v, c=causal: jax.nn.dot_product_attention(
          q, k, v, is_causal=c, implementation="cudnn")
      timed("jaxeff", ours, b, s, 16, 16, d, causal, mode)
      timed("cudnn", cud, b, s, 16, 16, d, causal, mode)


def run_variants():
  """Kernel-level tile variants (forward and forward+backward), against cuDNN."""
  import dataclasses
  for d, s, causal, vname, modes in [(64, 4096, False, "bkv256", ("fwd",)),
                                     (64, 4096, True, "bkv256", ("fwd",)),
                                     (64, 4096, False, "bwd3stage", ("fwd_bwd",))]:
    b = 16384 // s
    base = mg.default_config(d)
    cfg = {"bkv256": dataclasses.replace(base, block_kv=256),
           "bwd3stage": dataclasses.replace(base, bwd_num_stages=3)}[vname]
    for mode in modes:
      timed(f"jaxeff:{vname}", _config_attn(cfg, causal, d), b, s, 16, 16, d, causal, mode)


def run_extra():
  """GQA (32 q / 8 kv heads) and short sequences against cuDNN."""
  for d, s, causal, h, kvh in [(128, 4096, True, 32, 8), (128, 512, False, 16, 16)]:
    b = 16384 // s
    for mode in ("fwd", "fwd_bwd"):
      ours = lambda q, k, v, c=causal: A.dot_product_attention(
          q, k, v, is_causal=c, implementation="mosaic_gpu")
      cud = lambda q, k, v, c=causal: jax.nn.dot_product_attention(
          q, k, v, is_causal=c, implementation="cudnn")
      timed("jaxeff", ours, b, s, h, kvh, d, causal, mode)
      timed("cudnn", cud, b, s, h, kvh, d, causal, mode)


def run_bwd_variants():
  """Backward register split variants at seq 4096 (default vs 240/24)."""
  import dataclasses
  for d, s, causal in [(128, 4096, False), (128, 4096, True), (64, 4096, False)]:
    b = 16384 // s
    base = mg.default_config(d, causal)
    for vname, cfg in {"default": base,
                       "regs240": dataclasses.replace(base, bwd_compute_registers=240,
                                                      bwd_memory_registers=24)}.items():
      timed(f"jaxeff:{vname}", _config_attn(cfg, causal, d), b, s, 16, 16, d, causal, "fwd_bwd")
    cud = lambda q, k, v, c=causal: jax.nn.dot_product_attention(
        q, k, v, is_causal=c, implementation="cudnn")
    timed("cudnn", cud, b, s, 16, 16, d, causal, "fwd_bwd")


def _config_attn(cfg, causal, d):
  """Op-free custom_vjp around the Mosaic kernels with an explicit config."""

  @jax.custom_vjp
  def attn(q, k, v):
    return mg.forward(q, k, v, is_causal=causal, scale=d ** -0.5, config=cfg)[0]

  def attn_fwd(q, k, v):
    o, l = mg.forward(q, k, v, is_causal=causal, scale=d ** -0.5, config=cfg)
    return o, (q, k, v, o, l)

  def attn_bwd(res, do):
    q, k, v, o, l = res
    return mg.backward(q, k, v, o, l, do, is_causal=causal, scale=d ** -0.5, config=cfg)

  attn.defvjp(attn_fwd, attn_bwd)
  return attn


def run_wg_variants():
  """Three forward warpgroups at head_dim 64, K/V in registers in the head_dim-64
  backward, a 240/24 register split in the head_dim-128 backward; each against the
  default config and cuDNN, seq 4096."""
  import dataclasses
  cases = [
      (64, False, "fwd", {"3wg": mg.THREE_WG}),
      (64, True, "fwd", {"3wg": mg.THREE_WG}),
      (128, False, "fwd", {}),
      (64, False, "fwd_bwd", {"kvregs": "kvregs"}),
      (64, True, "fwd_bwd", {"kvregs": "kvregs"}),
      (128, False, "fwd_bwd", {"regs240": "regs240"}),
      (128, True, "fwd_bwd", {"regs240": "regs240"}),
  ]
  s, h = 4096, 16
  b = 16384 // s
  for d, causal, mode, variants in cases:
    base = mg.default_config(d, causal)
    timed("jaxeff", _config_attn(base, causal, d), b, s, h, h, d, causal, mode)
    for vname, cfg in variants.items():
      if cfg == "kvregs":
        cfg = dataclasses.replace(base, bwd_kv_in_registers=True)
      elif cfg == "regs240":
        cfg = dataclasses.replace(base, bwd_compute_registers=240, bwd_memory_registers=24)
      timed(f"jaxeff:{vname}", _config_attn(cfg, causal, d), b, s, h, h, d, causal, mode)
    cud = lambda q, k, v, c=causal: jax.nn.dot_product_attention(
        q, k, v, is_causal=c, implementation="cudnn")
    timed("cudnn", cud, b, s, h, h, d, causal, mode)


def run_fwd_variants():
  """Forward register split 240/24 against 232/40 (3 K/V stages at head_dim 128 exceed
  shared memory by 128 bytes), seq 4096."""
  import dataclasses
  s, h = 4096, 16
  b = 16384 // s
  for d, causal, variants in [(128, False, ("regs240",)), (128, True, ("regs240",)),
                              (64, False, ("regs240",))]:
    base = mg.default_config(d, causal)
    timed("jaxeff", _config_attn(base, causal, d), b, s, h, h, d, causal, "fwd")
    for vname in variants:
      cfg = {"regs240": dataclasses.replace(base, compute_registers=240, memory_registers=24),
             "stages3": dataclasses.replace(base, num_stages=3)}[vname]
      timed(f"jaxeff:{vname}", _config_attn(cfg, causal, d), b, s, h, h, d, causal, "fwd")
    cud = lambda q, k, v, c=causal: jax.nn.dot_product_attention(
        q, k, v, is_causal=c, implementation="cudnn")
    timed("cudnn", cud, b, s, h, h, d, causal, "fwd")


def run_dq_alternate():
  """Backward with the two warpgroups taking turns on a whole-width dQ (``bwd_dq_alternate``,
  the head_dim-64 default): gradients against the reference first, then fwd+bwd of the
  default against the other dQ form (``dqalt`` at 128, ``splitdq`` at 64) and cuDNN."""
  import dataclasses
  for d, causal, t, s_len, h, kvh in [(128, True, 1000, 1000, 8, 2), (64, False, 777, 1500, 4, 4)]:
    cfg = dataclasses.replace(mg.default_config(d, causal), bwd_dq_alternate=True)
    q, k, v, do, _ = inputs(jax.random.key(7 + d), 1, t, s_len, h, kvh, d)
    got = jax.jit(lambda q, k, v, do: jax.vjp(_config_attn(cfg, causal, d), q, k, v)[1](do))(
        q, k, v, do)
    up = lambda x: x.astype(jnp.float32)
    want = jax.vjp(lambda q, k, v: A.dot_product_attention(q, k, v, is_causal=causal,
                                                           implementation="xla"),
                   up(q), up(k), up(v))[1](up(do))
    errs = [harness.rel_err(g, w) for g, w in zip(got, want)]
    ok = all(e < 2e-2 for e in errs)
    RESULTS["check"].append({"case": f"dq_alternate d{d} causal={causal}", "ok": ok, "errs": errs})
    print(f"{'PASS' if ok else 'FAIL'} dq_alternate d{d} causal={causal} t{t} s{s_len}: "
          + " ".join(f"{e:.1e}" for e in errs), flush=True)
  s, h = 4096, 16
  b = 16384 // s
  for d, causal in [(128, False), (128, True), (64, False), (64, True)]:
    base = mg.default_config(d, causal)
    timed("jaxeff", _config_attn(base, causal, d), b, s, h, h, d, causal, "fwd_bwd")
    flip = not base.bwd_dq_alternate
    timed("jaxeff:dqalt" if flip else "jaxeff:splitdq",
          _config_attn(dataclasses.replace(base, bwd_dq_alternate=flip), causal, d),
          b, s, h, h, d, causal, "fwd_bwd")
    cud = lambda q, k, v, c=causal: jax.nn.dot_product_attention(
        q, k, v, is_causal=c, implementation="cudnn")
    timed("cudnn", cud, b, s, h, h, d, causal, "fwd_bwd")


def run_bwd_breakdown():
  """XLA-side work around the backward kernel at d128 s4096 (delta, dQ zeroing, dQ cast)."""
  b, s, h, d = 4, 4096, 16, 128
  for name, fn in [
      ("delta", lambda q, k, v, do: jnp.einsum("btnd,btnd->bnt", q.astype(jnp.float32),
                                               do.astype(jnp.float32))),
      ("zeros_dq", lambda q, k, v, do: jnp.zeros(q.shape, jnp.float32) + k[0, 0, 0, 0]),
      ("cast_dq", lambda q, k, v, do: (q.astype(jnp.float32) * 0.1).astype(q.dtype)),
  ]:
    f = jax.jit(fn)

    def make(i):
      q, k, v, do, _ = inputs(jax.random.key(300 + i), b, s, s, h, h, d)
      return (q, k, v, do)

    t = harness.safe_time(f, make, rounds=10, warmup=2)
    print(f"TIME xla-side {name:<10} {t * 1e6:8.1f} us", flush=True)
    RESULTS["time"].append({"impl": f"xla-side:{name}", "b": b, "s": s, "h": h, "kvh": h,
                            "d": d, "causal": False, "mode": "part", "s_per_call": t,
                            "tflops": float("nan")})


def run_profile_once():
  """One forward+backward at d128 s4096 (for ncu)."""
  q, k, v, do, _ = inputs(jax.random.key(5), 4, 4096, 4096, 16, 16, 128)
  f = jax.jit(lambda q, k, v, do: jax.vjp(lambda q, k, v: A.dot_product_attention(
      q, k, v, implementation="mosaic_gpu"), q, k, v)[1](do))
  jax.block_until_ready(f(q, k, v, do))
  jax.block_until_ready(f(q, k, v, do))


def summary():
  print("\n== summary ==")
  for r in RESULTS["check"]:
    print(("ok   " if r["ok"] else "BAD  ") + r["case"][:110])
  by = {}
  for r in RESULTS["time"]:
    by.setdefault((r["d"], r["s"], r["causal"], r["mode"], r["h"], r["kvh"]), {})[r["impl"]] = r["tflops"]
  for key, v in by.items():
    ours, base = v.get("jaxeff"), v.get("cudnn")
    ratio = ours / base if ours and base else float("nan")
    others = " ".join(f"{k}={x:.0f}" for k, x in v.items())
    print(f"d{key[0]} s{key[1]} causal={key[2]} {key[3]} h{key[4]}/{key[5]}: {others}  ratio={ratio:.2f}")


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("what", nargs="*", default=["check", "time"])
  p.add_argument("--out", default=None)
  args = p.parse_args(argv)
  print(jax.devices()[0].device_kind, jax.__version__, flush=True)
  try:
    steps = {
        "check": lambda: run_checks("mosaic_gpu"),
        "quickcheck": lambda: run_checks("mosaic_gpu", quick=True),
        "triton": lambda: run_checks("triton"),
        "time": run_times, "extra": run_extra, "variants": run_variants,
        "bwdvariants": run_bwd_variants, "wgvariants": run_wg_variants,
        "dqalt": run_dq_alternate, "fwdvariants": run_fwd_variants,
        "breakdown": run_bwd_breakdown, "profile": run_profile_once,
    }
    unknown = [w for w in args.what if w not in steps]
    if unknown:
      p.error(f"unknown step(s) {unknown}; choose from {sorted(steps)}")
    for name, step in steps.items():
      if name in args.what:
        step()
  finally:
    summary()
    if args.out:
      Path(args.out).mkdir(parents=True, exist_ok=True)
      (Path(args.out) / "attention_dev.json").write_text(json.dumps(RESULTS, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
