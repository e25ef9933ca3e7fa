"""Device sweep for the fused Triton FFT convolution (issue #8): correctness, then speed.

``PYTHONPATH=. python3 experiments/fftconv_dev.py [--budget S] [--sizes 1024,4096,16384]
[--out DIR]``

1. ``check``: forward and gradients (u, k, x, v; gated, causal; plus a circular case and a
   three-dot variant) of :func:`fft_conv_triton` against float64 NumPy (direct FFT
   formulas, independent of JAX's autodiff) at N = 1K, 4K (two levels) and 16K (three
   levels), small batch.
2. ``time``: batch 64 x 768 channels, bf16, causal, filter as long as the input, at each
   size: the float32 ``jnp.fft`` convolution (baseline, same run), the Triton launch
   configurations of the sweep (forward), the filter-gradient kernel alone for a few
   configurations, and forward+backward (default configuration vs ``jnp.fft``). Every
   forward row carries its error vs float64 on 2 rows x 8 channels.

Prints one line per row as it goes and a summary table at the end; writes
``fftconv_dev.json`` into ``--out`` (default ``$OUT`` or ``experiments/results/<device>``)
after every size. Stops starting new rows when ``--budget`` seconds (default 225) are spent.

``--focus``: a short run instead (about 90 s): the checks of the default configurations
at 1K, 4K and 16K, then the rows of :data:`FOCUS` in order of importance (forward: the
``jnp.fft`` baseline, the default and the few candidate launch configurations at 4K and
16K, the default at 1K; then forward+backward of the defaults), and per size the fastest
forward configuration with its error.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench import harness
from jaxeff.ops.fft_conv import fft_conv, fft_conv_reference, fft_conv_triton
from kernels_pallas.fftconv import triton as T

BATCH, CHANNELS = 64, 768
INTERPRET = False  # --smoke: tiny shapes in Pallas interpret mode (CPU check of this script)
RESULTS: dict = {"check": [], "time": []}
T0 = time.time()
BUDGET = 225.0
DEADLINE = float("inf")  # per-size share of the budget for the optional rows (time.time())


def left() -> float:
  return BUDGET - (time.time() - T0)



def np_conv_and_grads(u, k, x, v, dy, causal=True):
  """float64 ``y = v * conv(k, u x)`` and its gradients from direct FFT formulas."""
  u, k, x, v, dy = (np.asarray(jnp.asarray(a, jnp.float32), np.float64) for a in (u, k, x, v, dy))
  seq, flen = u.shape[-1], k.shape[-1]
  n = 1 << (2 * seq - 1).bit_length() if causal else seq
  w, dc = u * x, dy * v
  kf = np.fft.rfft(k, n)
  conv = np.fft.irfft(np.fft.rfft(w, n) * kf, n)[..., :seq]
  dw = np.fft.irfft(np.conj(kf) * np.fft.rfft(dc, n), n)[..., :seq]
  dk = np.fft.irfft((np.conj(np.fft.rfft(w, n)) * np.fft.rfft(dc, n)).sum(0), n)[..., :flen]
  return v * conv, dw * x, dk, dw * u, dy * conv


def np_conv(u, k):
  u = np.asarray(jnp.asarray(u, jnp.float32), np.float64)
  k = np.asarray(k, np.float64)
  n = 2 * u.shape[-1]
  return np.fft.irfft(np.fft.rfft(u, n) * np.fft.rfft(k, n), n)[..., :u.shape[-1]]


def make_inputs(key, b, c, seq, dtype=jnp.bfloat16, flen=None):
  ks = jax.random.split(key, 5)
  flen = flen or seq
  u = jax.random.normal(ks[0], (b, c, seq), jnp.float32).astype(dtype)
  k = jax.random.normal(ks[1], (c, flen), jnp.float32) / np.sqrt(flen)
  x = jax.random.normal(ks[2], (b, c, seq), jnp.float32).astype(dtype)
  v = jax.random.normal(ks[3], (b, c, seq), jnp.float32).astype(dtype)
  dy = jax.random.normal(ks[4], (b, c, seq), jnp.float32).astype(dtype)
  return u, k, x, v, dy


# ----------------------------------------------------------------------------- check


def check(seq, cfg=None, dk_cfg=None, causal=True, b=4, c=16, label=""):
  name = f"check seq={seq} causal={causal} {label or 'default'}"
  try:
    u, k, x, v, dy = make_inputs(jax.random.key(seq + 3), b, c, seq)

    def f(u, k, x, v, dy):
      y, vjp = jax.vjp(lambda *a: fft_conv_triton(a[0], a[1], causal=causal, gate=a[2:],
                                                    config=cfg, dk_config=dk_cfg,
                                                    interpret=INTERPRET), u, k, x, v)
      return (y, *vjp(dy))

    got = jax.jit(f)(u, k, x, v, dy)
    ref = np_conv_and_grads(u, k, x, v, dy, causal)
    errs = {nm: harness.rel_err(g, r) for nm, g, r in zip(("y", "du", "dk", "dx", "dv"), got, ref)}
    ok = all(e < 1e-2 for e in errs.values())
    print(f"{name:<58} {'OK ' if ok else 'BAD'} " +
          " ".join(f"{nm} {e:.1e}" for nm, e in errs.items()), flush=True)
    RESULTS["check"].append({"name": name, "ok": ok, **errs})
  except Exception as e:  # keep going: one failure must not cost the other rows
    print(f"{name:<58} FAILED {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
    traceback.print_exc(limit=3, file=sys.stdout)
    RESULTS["check"].append({"name": name, "ok": False, "error": str(e)[:500]})


# ----------------------------------------------------------------------------- time


def time_call(fn, args, rounds=7) -> float:
  out = fn(*args)  # compile
  jax.block_until_ready(out)
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  once = max(time.perf_counter() - t0, 1e-6)
  inner = int(min(50, max(1, 0.03 / once)))
  per = []
  for _ in range(rounds):
    t0 = time.perf_counter()
    for _ in range(inner):
      out = fn(*args)
    jax.block_until_ready(out)
    per.append((time.perf_counter() - t0) / inner)
  return statistics.median(per)


def record(seq, mode, name, fn, args, base=None, err_fn=None, extra=None, must=False):
  if left() < 5 or (not must and time.time() > DEADLINE):
    print(f"  {seq:>6} {mode:<8} {name:<40} skipped (budget)", flush=True)
    return None
  row = {"seq": seq, "mode": mode, "name": name, **(extra or {})}
  try:
    t = time_call(fn, args)
    row["time_s"] = t
    if base:
      row["speedup"] = base / t
    if err_fn is not None:
      row["err"] = err_fn()
  except Exception as e:
    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    t = None
  RESULTS["time"].append(row)
  s = "failed " + row["error"] if t is None else (
      f"{harness.fmt_time(t):>10}  {row.get('speedup', float('nan')):5.2f}x  "
      f"err {row.get('err', float('nan')):.1e}")
  print(f"  {seq:>6} {mode:<8} {name:<40} {s}", flush=True)
  return t


def variants(seq):
  """(name, config) of the forward sweep: warps w, chunk c, pairs per program p, stack st,
  pipelining stages s, lowp = bf16 twiddles and filter spectrum, gauss = three-dot products."""
  C = T.FFTConvConfig
  lp = dict(lowp_consts=True)
  if seq <= 1024:
    return [("w8 c32 p4 st4", C(8, 32, 4, stack=4)),
            ("w8 c32 p4 st4 lowp", C(8, 32, 4, stack=4, **lp)),
            ("w8 c32 p8 st4 lowp", C(8, 32, 8, stack=4, **lp)),
            ("w4 c32 p4 st2", C(4, 32, 4, stack=2)), ("w4 c16 p4 st2", C(4, 16, 4, stack=2)),
            ("w8 c16 p8 st4", C(8, 16, 8, stack=4)), ("w8 c32 p8 st8", C(8, 32, 8, stack=8)),
            ("w8 c64 p4 st4", C(8, 64, 4, stack=4)),
            ("w4 c32 p4 st2 s2", C(4, 32, 4, stack=2, num_stages=2)),
            ("w8 c32 p4 st4 s2", C(8, 32, 4, stack=4, num_stages=2)),
            ("w8 c32 p4 st4 gauss", C(8, 32, 4, stack=4, gauss=True)),
            ("w8 c32 p4 st4 gauss lowp", C(8, 32, 4, stack=4, gauss=True, **lp)),
            ("w4 c32 p4", C(4, 32, 4)), ("w4 c32 p1", C(4, 32, 1)), ("w2 c32 p4", C(2, 32, 4)),
            ("w4 c64 p4", C(4, 64, 4)), ("w4 c32 p16", C(4, 32, 16)), ("w2 c64 p1", C(2, 64, 1))]
  if seq <= 4096:
    return [("w8 c32 p2", C(8, 32, 2)), ("w8 c32 p2 lowp", C(8, 32, 2, **lp)),
            ("w8 c32 p8 lowp", C(8, 32, 8, **lp)), ("w4 c32 p2", C(4, 32, 2)),
            ("w8 c16 p2", C(8, 16, 2)), ("w8 c32 p1", C(8, 32, 1)), ("w8 c32 p8", C(8, 32, 8)),
            ("w8 c32 p2 s2", C(8, 32, 2, num_stages=2)),
            ("w8 c32 p2 gauss", C(8, 32, 2, gauss=True)),
            ("w8 c32 p2 gauss lowp", C(8, 32, 2, gauss=True, **lp)), ("w4 c16 p4", C(4, 16, 4)),
            ("w8 c16 p4 st2", C(8, 16, 4, stack=2)),
            ("w16 c16 p4 st2 lowp", C(16, 16, 4, stack=2, **lp)), ("w16 c32 p2", C(16, 32, 2)),
            ("w8 c32 p2 inner4096", C(8, 32, 2, inner=4096))]
  return [("w8 c32 p2 i4096", C(8, 32, 2, inner=4096)),
          ("w8 c32 p2 i4096 lowp", C(8, 32, 2, inner=4096, **lp)),
          ("w8 c32 p2 i8192", C(8, 32, 2, inner=8192)),
          ("w4 c32 p2 i4096", C(4, 32, 2, inner=4096)),
          ("w4 c32 p4 i2048", C(4, 32, 4, inner=2048)),
          ("w8 c32 p4 st2 i2048", C(8, 32, 4, stack=2, inner=2048)),
          ("w8 c16 p4 i4096", C(8, 16, 4, inner=4096)),
          ("w8 c32 p8 i4096", C(8, 32, 8, inner=4096)),
          ("w8 c32 p2 gauss lowp i4096", C(8, 32, 2, inner=4096, gauss=True, **lp))]


def dk_variants(seq):
  D = T.DkConfig
  if seq <= 1024:
    return [("dk w4 c16", D(4, 16)), ("dk w4 c32", D(4, 32)), ("dk w8 c64 g2", D(8, 64, 2)),
            ("dk w4 c16 g4", D(4, 16, 4)), ("dk w4 c32 st2", D(4, 32, stack=2)),
            ("dk w8 c32 st4", D(8, 32, stack=4)), ("dk w4 c16 gauss", D(4, 16, gauss=True))]
  if seq <= 4096:
    return [("dk w8 c16 i8192", D(8, 16, inner=8192)), ("dk w4 c16 i8192", D(4, 16, inner=8192)),
            ("dk w8 c32 i8192", D(8, 32, inner=8192)), ("dk w8 c16 g4 i8192", D(8, 16, 4, inner=8192)),
            ("dk w8 c32 i4096", D(8, 32, inner=4096))]
  return [("dk w8 c32 i4096", D(8, 32, inner=4096)), ("dk w4 c16 i2048", D(4, 16, inner=2048)),
          ("dk w8 c16 i4096", D(8, 16, inner=4096)), ("dk w8 c32 g2 i4096", D(8, 32, 2, inner=4096))]


def time_size(seq, share):
  """Times one size; the optional rows stop after ``share`` of the time left."""
  global DEADLINE
  n = 2 * seq
  print(f"== seq {seq} (n = {n}) batch {BATCH} x {CHANNELS}, bf16 ==", flush=True)
  DEADLINE = time.time() + share * left()
  key = jax.random.key(seq)
  u, k, _, _, dy = make_inputs(key, BATCH, CHANNELS, seq)
  ref = np_conv(u[:2, :8], k[:8])

  def err_of(fn, *args):
    return lambda: harness.rel_err(fn(*args)[:2, :8], ref)

  def fb(conv):
    def f(u, k, dy):
      y, vjp = jax.vjp(conv, u, k)
      return y, vjp(dy.astype(y.dtype))
    return jax.jit(f)

  base_fn = jax.jit(lambda u, k: fft_conv_reference(u.astype(jnp.float32), k))
  u32 = u.astype(jnp.float32)
  base = record(seq, "fwd", "jnp.fft fp32", base_fn, (u32, k), err_fn=err_of(base_fn, u32, k),
                must=True)
  dflt = jax.jit(lambda u, k: fft_conv(u, k))
  record(seq, "fwd", "jaxeff default", dflt, (u, k), base, err_of(dflt, u, k),
         {"config": repr(T.config_for(n))}, must=True)
  base_fb = record(seq, "fwd_bwd", "jnp.fft fp32",
                   fb(lambda u, k: fft_conv_reference(u, k)), (u32, k, dy), must=True)
  record(seq, "fwd_bwd", "jaxeff default", fb(lambda u, k: fft_conv(u, k)), (u, k, dy),
         base_fb, extra={"dk_config": repr(T.dk_config_for(n))}, must=True)
  del u32
  for name, cfg in variants(seq):
    fn = jax.jit(lambda u, k, cfg=cfg: fft_conv_triton(u, k, config=cfg, interpret=INTERPRET))
    record(seq, "fwd", "triton " + name, fn, (u, k), base, err_of(fn, u, k),
           {"config": repr(cfg)})
  # the filter-gradient kernel alone (its spectrum; the small inverse is not included)
  for name, dcfg in dk_variants(seq):
    geo = T.geometry(n, seq, inner=dcfg.inner)
    if geo.in_len != seq:
      continue
    shape = (BATCH // 2, 2, CHANNELS, geo.in_a, geo.in_rows, geo.n_2)
    fn = jax.jit(lambda w, d, dcfg=dcfg, geo=geo, shape=shape: T.filter_grad_spectrum(
        w.reshape(shape), d.reshape(shape), geo, config=dcfg, interpret=INTERPRET))
    record(seq, "dk", name, fn, (u, dy), extra={"config": repr(dcfg)})
  if seq <= 1024:
    record(seq, "fwd_bwd", "jaxeff monarch_xla",
           fb(lambda u, k: fft_conv(u, k, implementation="monarch_xla")), (u, k, dy), base_fb)


C_ = T.FFTConvConfig
# (seq, kind, name, config): kind "base" (jnp.fft fp32 forward), "default", "cfg" (forward
# with config), "base_fb" / "default_fb" (forward+backward). In order of importance, with
# the pipelined (num_stages > 1, never run on the device before) rows after the plain
# ones: the run stops starting rows when the budget is spent, and a compiler crash would
# cost only the rows after it (the JSON is written after every row).
FOCUS = [
    (4096, "base", "jnp.fft fp32", None),
    (4096, "default", "jaxeff default", None),  # w8 c128 p1 (whole tile), chained products
    (4096, "cfg", "w8 c128 p1 split", C_(8, 128, 1, chain=False)),  # the session-2 kernel
    (4096, "cfg", "w8 c128 p1 lowp", C_(8, 128, 1, lowp_consts=True)),
    (16384, "base", "jnp.fft fp32", None),
    (16384, "default", "jaxeff default", None),  # w8 c32 p2 i4096, chained products
    (16384, "cfg", "w8 c64 p1 i4096", C_(8, 64, 1, inner=4096)),
    (1024, "base", "jnp.fft fp32", None),
    (1024, "default", "jaxeff default", None),  # w4 c32 p4 st2 split (measured 407 us)
    (4096, "cfg", "w8 c32 p2 s3", C_(8, 32, 2, num_stages=3)),
    (4096, "cfg", "w8 c16 p2 s2", C_(8, 16, 2, num_stages=2)),
    (16384, "cfg", "w8 c32 p2 s3 i4096", C_(8, 32, 2, inner=4096, num_stages=3)),
    (4096, "cfg", "w8 c32 p2 split", C_(8, 32, 2, chain=False)),  # session-3 default
    (16384, "cfg", "w8 c32 p2 i4096 split", C_(8, 32, 2, inner=4096, chain=False)),
    (4096, "base_fb", "jnp.fft fp32", None),
    (4096, "default_fb", "jaxeff default", None),
    (4096, "cfg", "w8 c16 p2", C_(8, 16, 2)),
    (1024, "cfg", "w4 c32 p4 st2 s3", C_(4, 32, 4, stack=2, num_stages=3, chain=False)),
    (1024, "cfg", "w2 c64 p1", C_(2, 64, 1)),  # the session-2 kernel's 1K configuration
    (1024, "base_fb", "jnp.fft fp32", None),
    (1024, "default_fb", "jaxeff default", None),
    (16384, "base_fb", "jnp.fft fp32", None),
    (16384, "default_fb", "jaxeff default", None),
]


def run_focus(out: Path):
  """The :data:`FOCUS` rows (module doc); ``fftconv_dev.json`` after every row."""
  global DEADLINE
  DEADLINE = float("inf")
  data, base = {}, {}

  def get(seq):
    if seq not in data:
      key = jax.random.key(seq)
      ks = jax.random.split(key, 3)
      u = jax.random.normal(ks[0], (BATCH, CHANNELS, seq), jnp.float32).astype(jnp.bfloat16)
      k = jax.random.normal(ks[1], (CHANNELS, seq), jnp.float32) / np.sqrt(seq)
      dy = jax.random.normal(ks[2], (BATCH, CHANNELS, seq), jnp.float32).astype(jnp.bfloat16)
      data[seq] = (u, k, dy, np_conv(u[:2, :8], k[:8]))
    return data[seq]

  def fb(conv):
    def f(u, k, dy):
      y, vjp = jax.vjp(conv, u, k)
      return y, vjp(dy.astype(y.dtype))
    return jax.jit(f)

  for seq, kind, name, cfg in FOCUS:
    need = 12 if (seq >= 16384 or kind.endswith("_fb")) else 6
    if left() < need:
      print(f"  {seq:>6} {kind:<10} {name:<36} skipped (budget)", flush=True)
      continue
    u, k, dy, ref = get(seq)
    err_of = lambda fn, *a: (lambda: harness.rel_err(fn(*a)[:2, :8], ref))
    n = 2 * seq
    if kind == "base":
      fn = jax.jit(lambda u, k: fft_conv_reference(u.astype(jnp.float32), k))
      base[seq, "fwd"] = record(seq, "fwd", name, fn, (u, k), err_fn=err_of(fn, u, k), must=True)
    elif kind == "default":
      fn = jax.jit(lambda u, k: fft_conv(u, k))
      record(seq, "fwd", name, fn, (u, k), base.get((seq, "fwd")), err_of(fn, u, k),
             {"config": repr(T.config_for(n))}, must=True)
    elif kind == "cfg":
      fn = jax.jit(lambda u, k, c=cfg: fft_conv_triton(u, k, config=c, interpret=INTERPRET))
      record(seq, "fwd", "triton " + name, fn, (u, k), base.get((seq, "fwd")), err_of(fn, u, k),
             {"config": repr(cfg)}, must=True)
    elif kind == "base_fb":
      base[seq, "fb"] = record(seq, "fwd_bwd", name, fb(
          lambda u, k: fft_conv_reference(u.astype(jnp.float32), k)), (u, k, dy), must=True)
    elif kind == "default_fb":
      record(seq, "fwd_bwd", name, fb(lambda u, k: fft_conv(u, k)), (u, k, dy),
             base.get((seq, "fb")), extra={"config": repr(T.config_for(n)),
                                           "dk_config": repr(T.dk_config_for(n))}, must=True)
    write(out)


def best_per_size():
  """The fastest correct forward row per size (err < 1e-2), to set ``config_for``."""
  print("\n== fastest forward per size (err < 1e-2) ==")
  rows = [r for r in RESULTS["time"] if r.get("mode") == "fwd" and r.get("time_s")
          and "config" in r and r.get("err", 1.0) < 1e-2]
  for seq in sorted({r["seq"] for r in rows}):
    r = min((r for r in rows if r["seq"] == seq), key=lambda r: r["time_s"])
    print(f"{seq:>6} {r['name']:<36} {harness.fmt_time(r['time_s']):>10} "
          f"{r.get('speedup', float('nan')):5.2f}x  {r['config']}")


def write(out: Path):
  out.mkdir(parents=True, exist_ok=True)
  RESULTS["device"] = harness.device_name()
  (out / "fftconv_dev.json").write_text(json.dumps(RESULTS, indent=1))


def summary():
  print("\n== summary (time, speedup vs jnp.fft fp32 same mode, err vs float64) ==")
  for r in RESULTS["time"]:
    t = r.get("time_s")
    s = "failed" if t is None else (f"{harness.fmt_time(t):>10} {r.get('speedup', float('nan')):6.2f}x"
                                    f" {r.get('err', float('nan')):8.1e}")
    print(f"{r['seq']:>6} {r['mode']:<8} {r['name']:<40} {s}")
  bad = [c["name"] for c in RESULTS["check"] if not c.get("ok")]
  print(f"checks: {len(RESULTS['check']) - len(bad)} ok, {len(bad)} bad {bad}")


def main():
  global BUDGET
  p = argparse.ArgumentParser()
  p.add_argument("--budget", type=float, default=225.0)
  p.add_argument("--sizes", default="1024,4096,16384")
  p.add_argument("--out", default=None)
  p.add_argument("--skip-check", action="store_true")
  p.add_argument("--smoke", action="store_true")
  p.add_argument("--focus", action="store_true")
  a = p.parse_args()
  BUDGET = a.budget
  if a.smoke:
    global BATCH, CHANNELS, INTERPRET, variants, dk_variants
    BATCH, CHANNELS, INTERPRET = 2, 2, True
    variants = lambda seq: [("w4 c16 p1", T.FFTConvConfig(4, 16, 1)),
                            ("w4 c16 p1 inner256", T.FFTConvConfig(4, 16, 1, inner=256))]
    dk_variants = lambda seq: [("dk w4 c16 g1", T.DkConfig(4, 16, 1)),
                               ("dk w4 c16 i256", T.DkConfig(4, 16, 1, inner=256))]
  out = Path(a.out or os.environ.get("OUT") or f"experiments/results/{harness.device_name()}")
  print("jax", jax.__version__, jax.devices()[0].device_kind, flush=True)
  if a.focus:
    if a.smoke:
      global FOCUS
      BATCH, CHANNELS, INTERPRET = 2, 2, True
      FOCUS = [(256, "base", "jnp.fft fp32", None), (256, "default", "jaxeff default", None),
               (256, "cfg", "w4 c16 p1 split", T.FFTConvConfig(4, 16, 1, chain=False)),
               (256, "base_fb", "jnp.fft fp32", None), (256, "default_fb", "jaxeff default", None)]
      check(256, T.FFTConvConfig(4, 16, 2), T.DkConfig(4, 16, 2), b=4, c=2)
    elif not a.skip_check:
      for seq in (1024, 4096, 16384):
        check(seq)
    write(out)
    run_focus(out)
    summary()
    best_per_size()
    write(out)
    return
  if a.smoke:
    check(256, T.FFTConvConfig(4, 16, 2), T.DkConfig(4, 16, 2), b=4, c=2)
    check(512, T.FFTConvConfig(4, 16, 1, inner=256), T.DkConfig(4, 16), b=2, c=2)
  elif not a.skip_check:
    for seq in (1024, 4096, 16384):
      check(seq)
    check(2048, causal=False, label="circular")
    write(out)
  sizes = list(map(int, a.sizes.split(",")))
  for i, seq in enumerate(sizes):
    if left() < 10:
      break
    time_size(seq, 1.0 / (len(sizes) - i) - 0.03 * (not a.skip_check))
    write(out)
  if not a.smoke and not a.skip_check and left() > 30:
    check(1024, T.FFTConvConfig(8, 32, 4, stack=4, gauss=True), T.DkConfig(gauss=True),
          label="gauss stack4")
    check(16384, T.FFTConvConfig(8, 32, 2, inner=8192), T.DkConfig(4, 16, inner=2048),
          label="inner8192 dk2048")
  summary()
  write(out)


if __name__ == "__main__":
  main()
