"""Quantized-KV decode attention on one Hopper GPU: the keys-major Mosaic GPU form with
64-key blocks (the default) vs 128-key blocks (two M tiles), against bf16 KV, in one process
(issue 4; notes/decode.md, sessions 5 and 6).

1. Correctness, in a subprocess with a timeout (a fault or hang cannot take the timings
   with it): ``mosaic_gpu.self_check`` (ragged paged cache, lengths 0 / 1 / capacity,
   pieces crossing items): the 128-key-block form (``keys_major_wide_config``) of int8 /
   fp8 / int4 at GQA 4 and 8 first, then the 64-key default and bf16.
2. Timing on the TARGETS.md GQA shape (batch 32, 32 query / 8 KV heads, 8192 tokens,
   head_dim 128, contiguous): bf16 KV, then each quantized format with 64-key blocks
   (``keys_major_config``, today's default) and 128-key blocks, plus a few 128-key
   variants; every variant's output is first compared with the op's reference
   on the same cache (not timed when wrong). Prints one line per variant as it goes and a
   table at the end; writes ``$OUT/decode_quant.json`` after every variant.

Usage: ``PYTHONPATH=. python3 -m experiments.decode_quant_step [--deadline 200]``
(``--check`` runs part 1 alone). On CPU it runs a tiny shape in interpret mode.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench import harness
from kernels_pallas.decode import common
from kernels_pallas.decode import mosaic_gpu as mk

da = importlib.import_module("jaxeff.ops.decode_attention")  # the module, not the function

B, N, KH, D, S = 32, 32, 8, 128, 8192
SMOKE = jax.default_backend() == "cpu"
if SMOKE:
  B, S = 2, 256
CHECK_TOLERANCE = 2e-2


def _variants():
  """(name, fmt, config) in timing order: baselines first, then the 128-key-block variants
  (session 5, not yet timed). The query-major form and the variants settled in session 5 (2-byte loads,
  3 CTAs/SM) are no longer timed."""
  km, wide = mk.keys_major_config, mk.keys_major_wide_config
  out = [("bf16", "none", mk.default_config(D, "none"))]
  for fmt in ("int8", "fp8", "int4"):
    out.append((f"{fmt} keys-major bk64", fmt, km()))
    out.append((f"{fmt} keys-major bk128", fmt, wide(fmt)))
  out += [
      ("int4 keys-major bk128 s4", "int4", wide("int4", num_stages=4)),
      ("int8 keys-major bk128 2B", "int8", wide("int8", upcast_layout=False)),
      # One CTA per SM with 3 stages (~140 KB): deeper ring, no second CTA to overlap.
      ("int8 keys-major bk128 1CTA s3", "int8", wide("int8", ctas_per_sm=1, num_stages=3)),
  ]
  return out


def _form(cfg) -> str:
  if not cfg.keys_major:
    return "query-major"
  if cfg.block_kv == 128:
    return "keys-major-wide" if cfg.upcast_layout else "keys-major-wide-2B"
  return "keys-major" if cfg.upcast_layout else "keys-major-2B"


def _check_config(fmt: str, form: str):
  if form == "query-major":
    return dataclasses.replace(mk.default_config(128, fmt), keys_major=False)
  if form.startswith("keys-major-wide"):
    return mk.keys_major_wide_config(fmt, upcast_layout=not form.endswith("2B"))
  return mk.keys_major_config(upcast_layout=form == "keys-major")


# Most needed first (a timeout loses only the tail): the new 128-key-block form of every
# format at GQA 4 and 8 (8 / 16 query columns), then today's default (64-key blocks) and
# bf16 for the baselines, then the 2-byte-load wide variant.
_QUANT = ("int8", "fp8", "int4")
CHECKS = ([(f, "keys-major-wide", h) for f in _QUANT for h in (8, 16)]
          + [(f, "keys-major", 8) for f in _QUANT]
          + [("none", "query-major", 8), ("int8", "keys-major-wide-2B", 8)])


def check_main() -> int:
  """Part 1: prints ``check <fmt> <form> g<group> ok|FAIL <err>`` per case."""
  failed = False
  for fmt, form, heads in CHECKS:
    config = _check_config(fmt, form)
    try:
      err = mk.self_check(fmt, config=config, q_heads=heads)
      ok = err < CHECK_TOLERANCE
      print(f"check {fmt} {form} g{heads // 2} {'ok' if ok else 'FAIL'} {err:.2e}", flush=True)
    except Exception as e:  # report and go on
      ok = False
      msg = str(e).splitlines()[0][:300] if str(e) else ""
      print(f"check {fmt} {form} g{heads // 2} FAIL {type(e).__name__}: {msg}", flush=True)
    failed |= not ok
  return 1 if failed else 0


def _run_checks(timeout_s: float) -> dict[tuple[str, str], str]:
  """Part 1 in a subprocess: (fmt, form) -> "ok" (every GQA ratio passed), "wrong" (a
  check ran and failed: safe to run in this process, where the full-shape comparison
  keeps it from being timed) or "crash" (no result: a fault, an exception or a hang)."""
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
  cmd = [sys.executable, "-m", "experiments.decode_quant_step", "--check"]
  try:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    out = res.stdout
    if res.returncode not in (0, 1):
      print("check process ended early:", " | ".join(
          (res.stdout + res.stderr).strip().splitlines()[-6:]))
  except subprocess.TimeoutExpired as e:
    out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
    print(f"check process did not finish within {timeout_s:.0f} s")
  print(out, end="", flush=True)
  # The worst state over a form's lines that are present; a form without any line (the
  # process died or timed out before it) counts as crashed. (The timings use GQA 4 only.)
  rank = {"ok": 0, "wrong": 1, "crash": 2}
  passed = {}
  for fmt, form, heads in CHECKS:
    line = next((l for l in out.splitlines()
                 if l.startswith(f"check {fmt} {form} g{heads // 2} ")), None)
    if line is None:
      passed.setdefault((fmt, form), None)
      continue
    words = line.split()
    state = ("ok" if " ok " in line else
             "wrong" if len(words) > 5 and words[4] == "FAIL" and _is_number(words[5])
             else "crash")
    old = passed.get((fmt, form)) or "ok"
    passed[(fmt, form)] = state if rank[state] > rank[old] else old
  return {k: v or "crash" for k, v in passed.items()}


def _is_number(text: str) -> bool:
  try:
    float(text)
    return True
  except ValueError:
    return False


def _data(key, fmt: str):
  kq, kk, kv = jax.random.split(key, 3)
  q = jax.random.normal(kq, (B, 1, N, D), jnp.bfloat16)
  k = jax.random.normal(kk, (B, S, KH, D), jnp.bfloat16)
  v = jax.random.normal(kv, (B, S, KH, D), jnp.bfloat16)
  ks = vs = None
  if fmt != "none":
    k, ks = common.quantize(k, fmt)
    v, vs = common.quantize(v, fmt)
  ps = common.contiguous_page_size(S)
  kp, table = common.contiguous_as_paged(k, ps)
  vp, _ = common.contiguous_as_paged(v, ps)
  if ks is not None:
    ks, _ = common.contiguous_as_paged(ks, ps)
    vs, _ = common.contiguous_as_paged(vs, ps)
  return q, kp, vp, table, ks, vs


def _reference(q, kp, vp, table, lengths, ks, vs):
  spec = da.validate(q, kp, vp, lengths, table, ks, vs, logits_soft_cap=None,
                     local_window_size=None, scale=None)
  return jax.jit(lambda *a: da.reference(*a, spec=spec)[0])(q, kp, vp, lengths, table, ks, vs)


def main() -> int:
  ap = argparse.ArgumentParser()
  ap.add_argument("--deadline", type=float, default=210.0)
  ap.add_argument("--check", action="store_true")
  ap.add_argument("--check-timeout", type=float, default=120.0)
  args = ap.parse_args()
  if args.check:
    return check_main()
  t_start = time.perf_counter()
  out_dir = os.environ.get("OUT", ".")
  os.makedirs(out_dir, exist_ok=True)
  print(f"device {jax.devices()[0].device_kind} ({harness.device_name()}), jax {jax.__version__}")
  passed = _run_checks(args.check_timeout) if not SMOKE else {}
  results = []

  def record(name, fmt, seconds, err=None, note=""):
    nbytes = 2.0 * B * S * KH * common.kv_bytes_per_token(D, fmt)
    tbs = nbytes / seconds / 1e12 if seconds == seconds else float("nan")
    results.append(dict(name=name, fmt=fmt, median_s=seconds, tb_s=tbs, rel_err=err,
                        note=note))
    e = "" if err is None else f" err {err:.1e}"
    print(f"{name:28s} {seconds * 1e6:8.1f} us {tbs:5.2f} TB/s{e} {note}", flush=True)
    with open(os.path.join(out_dir, "decode_quant.json"), "w") as f:
      json.dump(dict(device=harness.device_name(), jax=jax.__version__, shape=dict(
          batch=B, q_heads=N, kv_heads=KH, head_dim=D, seq=S, layout="contiguous"),
          checks={f"{k[0]} {k[1]}": v for k, v in passed.items()}, rows=results), f, indent=1)

  lengths = jnp.full((B,), S, jnp.int32)
  cache = {}
  for name, fmt, cfg in _variants():
    if time.perf_counter() - t_start > args.deadline:
      print(f"deadline: skipping {name}", flush=True)
      continue
    form = _form(cfg)
    if not SMOKE and passed.get((fmt, form), "crash") == "crash":
      record(name, fmt, float("nan"), note=f"skipped: {fmt} {form} self-check crashed")
      continue
    if fmt not in cache:
      cache.clear()
      data = jax.block_until_ready(_data(jax.random.key(3), fmt))
      cache[fmt] = (data, _reference(data[0], data[1], data[2], data[3], lengths, data[4],
                                     data[5]))
    (q, kp, vp, table, ks, vs), ref = cache[fmt]
    if SMOKE:
      cfg = dataclasses.replace(cfg, num_workers=3)
      if not cfg.keys_major:
        cfg = dataclasses.replace(cfg, block_kv=64)
    fn = jax.jit(lambda q, kp, vp, t, l, ks, vs, cfg=cfg, fmt=fmt: mk.decode_attention(
        q, kp, vp, t, l, ks, vs, fmt=fmt, window=None, scale=D ** -0.5, soft_cap=None,
        config=cfg, interpret=SMOKE)[0])
    call = lambda i: (q, kp, vp, table, lengths, ks, vs)
    try:
      out = fn(*call(0))
      err = float(jnp.linalg.norm((out - ref).astype(jnp.float32))
                  / jnp.linalg.norm(ref.astype(jnp.float32)))
      if not np.isfinite(err) or err > CHECK_TOLERANCE:
        record(name, fmt, float("nan"), err, "WRONG: not timed")
        continue
      t = harness.time_fn(fn, call, rounds=2 if SMOKE else 20, warmup=1 if SMOKE else 3)
      record(name, fmt, t, err)
    except Exception as e:  # report and go on
      msg = str(e).splitlines()[0][:200] if str(e) else ""
      record(name, fmt, float("nan"), None, f"FAIL {type(e).__name__}: {msg}")

  base = next((r["median_s"] for r in results if r["fmt"] == "none"), float("nan"))
  print(f"\n{'variant':28s} {'us':>8s} {'x bf16':>7s}  (targets: int8/fp8 >= 1.7x, int4 >= 2.8x)")
  for r in results:
    print(f"{r['name']:28s} {r['median_s'] * 1e6:8.1f} {base / r['median_s']:7.2f}")
  print(f"done in {time.perf_counter() - t_start:.0f} s")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
