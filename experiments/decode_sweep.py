"""Decode-attention kernel sweep: block sizes, stages and workers of both backends on one GPU.

A development tool for ``notes/decode.md`` (the ``decode`` bench suite times the chosen
configurations): on the TARGETS.md GQA shape (batch 32, 32 query / 8 KV heads, 8192
tokens, head_dim 128) it times, in one process,

* the ceilings and baselines: an XLA read of the whole bf16 cache (sum of K and V), cuDNN
  (``jax.nn.dot_product_attention``);
* the op's glue alone: the stream-K plan (``common.make_plan``) and the partial merge;
* each kernel configuration in ``VARIANTS`` (backend, cache format, layout, config),
  after checking its output against the reference (relative error printed),

and prints one line per measurement as it goes (``$OUT/decode_sweep.json`` is rewritten
after each), so a crash or the time limit keeps what was measured. Variants that fail
are reported and skipped. ``--deadline S`` stops starting new variants after S seconds.

Usage: ``PYTHONPATH=. python3 -m experiments.decode_sweep [--deadline 150] [--only M,T]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench import harness
from experiments.bench.suites.decode import ragged_lengths
from kernels_pallas.decode import common
from kernels_pallas.decode import mosaic_gpu as mk
from kernels_pallas.decode import triton as tk

da = importlib.import_module("jaxeff.ops.decode_attention")  # the module, not the function

B, N, KH, D, S = 32, 32, 8, 128, 8192
SMOKE = jax.default_backend() == "cpu"  # a CPU run checks the script in interpret mode
if SMOKE:
  B, S = 2, 512


@dataclasses.dataclass(frozen=True)
class Variant:
  name: str
  backend: str  # "mosaic_gpu" | "triton"
  fmt: str = "none"
  layout: str = "contiguous"  # "contiguous" | "paged<P>"
  ragged: bool = False
  config: dict | None = None  # Config overrides
  plan_ahead: bool = False  # time the kernel + merge with the plan built outside


def _t(**kw):
  return kw


VARIANTS = [
    # bf16 contiguous, Mosaic GPU (the glue after the dense merge) and Triton configs:
    # programs per SM sized to what shared memory lets reside.
    Variant("M bk128 s2", "mosaic_gpu"),
    Variant("M bk128 s2 plan-ahead", "mosaic_gpu", plan_ahead=True),
    Variant("T bk64 w4 s2 x3", "triton", config=_t(block_kv=64, num_stages=2, programs_per_sm=3)),
    Variant("T bk64 w4 s3 x2", "triton", config=_t(block_kv=64, num_stages=3, programs_per_sm=2)),
    Variant("T bk128 w4 s2 x1", "triton", config=_t(block_kv=128, num_stages=2, programs_per_sm=1)),
    Variant("T bk128 w8 s3 x1", "triton",
            config=_t(block_kv=128, num_stages=3, num_warps=8, programs_per_sm=1)),
    Variant("T bk32 w4 s4 x3", "triton", config=_t(block_kv=32, num_stages=4, programs_per_sm=3)),
    Variant("T bk64 w4 s2 x4", "triton", config=_t(block_kv=64, num_stages=2, programs_per_sm=4)),
    # The ragged batch (a quarter of the tokens).
    Variant("M ragged paged64", "mosaic_gpu", layout="paged64", ragged=True),
    Variant("T ragged paged64 bk64 s3 x2", "triton", layout="paged64", ragged=True,
            config=_t(block_kv=64, num_stages=3, programs_per_sm=2)),
    # Quantized, Triton (conversion in registers, mma.sync: no 64-row padding).
    Variant("T int8 bk64 s3 x2", "triton", fmt="int8",
            config=_t(block_kv=64, num_stages=3, programs_per_sm=2)),
    Variant("T int8 bk128 s3 x2", "triton", fmt="int8",
            config=_t(block_kv=128, num_stages=3, programs_per_sm=2)),
    Variant("T int8 bk128 w8 s4 x1", "triton", fmt="int8",
            config=_t(block_kv=128, num_stages=4, num_warps=8, programs_per_sm=1)),
    Variant("T int8 bk64 s4 x3", "triton", fmt="int8",
            config=_t(block_kv=64, num_stages=4, programs_per_sm=3)),
    Variant("T fp8 bk128 s3 x2", "triton", fmt="fp8",
            config=_t(block_kv=128, num_stages=3, programs_per_sm=2)),
    Variant("T int4 bk128 s3 x2", "triton", fmt="int4",
            config=_t(block_kv=128, num_stages=3, programs_per_sm=2)),
    Variant("T int4 bk128 s4 x3", "triton", fmt="int4",
            config=_t(block_kv=128, num_stages=4, programs_per_sm=3)),
    Variant("T int4 bk256 s3 x2", "triton", fmt="int4",
            config=_t(block_kv=256, num_stages=3, programs_per_sm=2)),
    Variant("T int8 paged64 bk64 s3 x2", "triton", fmt="int8", layout="paged64",
            config=_t(block_kv=64, num_stages=3, programs_per_sm=2)),
    # Quantized, Mosaic GPU.
    Variant("M int8", "mosaic_gpu", fmt="int8"),
    Variant("M int4", "mosaic_gpu", fmt="int4"),
    Variant("M int4 bk128 s3", "mosaic_gpu", fmt="int4",
            config=_t(block_kv=128, num_stages=3)),
]


def _data(key, fmt: str, layout: str):
  kq, kk, kv, kperm = jax.random.split(key, 4)
  q = jax.random.normal(kq, (B, 1, N, D), jnp.bfloat16)
  k = jax.random.normal(kk, (B, S, KH, D), jnp.bfloat16)
  v = jax.random.normal(kv, (B, S, KH, D), jnp.bfloat16)
  ks = vs = None
  if fmt != "none":
    k, ks = common.quantize(k, fmt)
    v, vs = common.quantize(v, fmt)
  ps = int(layout[5:]) if layout.startswith("paged") else common.contiguous_page_size(S)
  kp, table = common.contiguous_as_paged(k, ps)
  vp, _ = common.contiguous_as_paged(v, ps)
  if ks is not None:
    ks, _ = common.contiguous_as_paged(ks, ps)
    vs, _ = common.contiguous_as_paged(vs, ps)
  if layout.startswith("paged"):  # scatter the pages as in a real pool
    perm = jax.random.permutation(kperm, kp.shape[0])
    inv = jnp.argsort(perm)
    kp, vp = kp[perm], vp[perm]
    ks = None if ks is None else ks[perm]
    vs = None if vs is None else vs[perm]
    table = inv[table].astype(jnp.int32)
  return q, kp, vp, table, ks, vs


def _reference(q, kp, vp, table, lengths, ks, vs, fmt):
  spec = da.validate(q, kp, vp, lengths, table, ks, vs, logits_soft_cap=None,
                     local_window_size=None, scale=None)
  return da.reference(q, kp, vp, lengths, table, ks, vs, spec=spec)[0]


def main() -> int:
  ap = argparse.ArgumentParser()
  ap.add_argument("--deadline", type=float, default=150.0)
  ap.add_argument("--only", default="", help="comma-separated name prefixes")
  args = ap.parse_args()
  t_start = time.perf_counter()
  out_dir = os.environ.get("OUT", ".")
  results = []

  def record(name, seconds, nbytes, err=None, note=""):
    tbs = nbytes / seconds / 1e12 if seconds == seconds and nbytes else float("nan")
    results.append(dict(name=name, median_s=seconds, tb_s=tbs, rel_err=err, note=note))
    e = "" if err is None else f" err {err:.1e}"
    print(f"{name:34s} {seconds * 1e6:9.1f} us {tbs:6.2f} TB/s{e} {note}", flush=True)
    with open(os.path.join(out_dir, "decode_sweep.json"), "w") as f:
      json.dump(dict(device=harness.device_name(), jax=jax.__version__, shape=dict(
          batch=B, q_heads=N, kv_heads=KH, head_dim=D, seq=S), rows=results), f, indent=1)

  print(f"device {jax.devices()[0].device_kind} ({harness.device_name()}), jax {jax.__version__}")
  uniform = jnp.full((B,), S, jnp.int32)
  ragged = jnp.asarray(ragged_lengths(B, B * S // 4, hi=S))  # same capacity, ragged
  bf16_bytes = 2.0 * B * S * KH * D * 2

  # Ceilings and baselines.
  q, kp, vp, table, _, _ = _data(jax.random.key(0), "none", "contiguous")
  kc, vc = kp.reshape(B, S, KH, D), vp.reshape(B, S, KH, D)
  read = jax.jit(lambda k, v: jnp.sum(k, axis=(1,), dtype=jnp.float32)
                 + jnp.sum(v, axis=(1,), dtype=jnp.float32))
  record("xla read K+V (sum)", harness.safe_time(read, lambda i: (kc, vc), rounds=20), bf16_bytes)
  cudnn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn"))
  record("cudnn", harness.safe_time(cudnn, lambda i: (q, kc, vc), rounds=20), bf16_bytes)
  for bk, workers in ((128, 132), (64, 396)):
    mp = jax.jit(lambda l, bk=bk, w=workers: common.make_plan(
        l, kv_heads=KH, q_len=1, block_kv=bk, capacity=S, window=None, num_workers=w))
    record(f"plan bk{bk} W{workers}", harness.safe_time(mp, lambda i: (uniform,), rounds=20), 0)
    plan = mp(uniform)
    o_part = jax.random.normal(jax.random.key(1), (plan.num_slots, 8, D), jnp.float32)
    lse_part = jax.random.normal(jax.random.key(2), (plan.num_slots, 8), jnp.float32)
    merge = jax.jit(lambda o, l, p: common.scatter_items(*common.merge_partials(o, l, p), p, B, KH))
    record(f"merge W{workers}", harness.safe_time(merge, lambda i: (o_part, lse_part, plan),
                                                 rounds=20), 0)
  del q, kp, vp, kc, vc

  cache = {}
  only = [s for s in args.only.split(",") if s]
  for var in VARIANTS:
    if only and not any(var.name.startswith(o) for o in only):
      continue
    if time.perf_counter() - t_start > args.deadline:
      print(f"deadline: skipping {var.name}", flush=True)
      continue
    key = (var.fmt, var.layout)
    if key not in cache:
      cache.clear()
      cache[key] = jax.block_until_ready(_data(jax.random.key(3), var.fmt, var.layout))
    q, kp, vp, table, ks, vs = cache[key]
    lengths = ragged if var.ragged else uniform
    mod = mk if var.backend == "mosaic_gpu" else tk
    base = mk.default_config(D, var.fmt) if mod is mk else tk.Config()
    cfg = dataclasses.replace(base, **(var.config or {}))
    nbytes = 2.0 * float(jnp.sum(lengths)) * KH * common.kv_bytes_per_token(D, var.fmt)
    if SMOKE:
      cfg = dataclasses.replace(cfg, block_kv=min(cfg.block_kv, 64), num_workers=3)
    kw = dict(fmt=var.fmt, window=None, scale=D ** -0.5, soft_cap=None, config=cfg,
              interpret=SMOKE)
    try:
      if var.plan_ahead:
        workers = cfg.num_workers or (cfg.ctas_per_sm if mod is mk else cfg.programs_per_sm) * 132
        plan = common.make_plan(lengths, kv_heads=KH, q_len=1, block_kv=cfg.block_kv,
                                capacity=S, window=None, num_workers=workers)
        fn = jax.jit(lambda q, kp, vp, t, l, ks, vs, plan: mod.decode_attention(
            q, kp, vp, t, l, ks, vs, plan=plan, **kw)[0])
        call = lambda i: (q, kp, vp, table, lengths, ks, vs, plan)
      else:
        fn = jax.jit(lambda q, kp, vp, t, l, ks, vs: mod.decode_attention(
            q, kp, vp, t, l, ks, vs, **kw)[0])
        call = lambda i: (q, kp, vp, table, lengths, ks, vs)
      out = fn(*call(0))
      ref = _reference(q, kp, vp, table, lengths, ks, vs, var.fmt)
      err = float(jnp.linalg.norm((out - ref).astype(jnp.float32))
                  / jnp.linalg.norm(ref.astype(jnp.float32)))
      if not np.isfinite(err) or err > 2e-2:
        record(var.name, float("nan"), nbytes, err, "WRONG: not timed")
        continue
      record(var.name, harness.time_fn(fn, call, rounds=2 if SMOKE else 15,
                                       warmup=1 if SMOKE else 3), nbytes, err)
    except Exception as e:  # report and go on
      msg = str(e).splitlines()[0][:200] if str(e) else ""
      record(var.name, float("nan"), nbytes, None, f"FAIL {type(e).__name__}: {msg}")
  print(f"sweep done in {time.perf_counter() - t_start:.0f} s")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
