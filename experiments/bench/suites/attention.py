"""Attention for training: forward and forward+backward TFLOP/s against cuDNN and XLA.

Shapes (TARGETS.md): batch x seq = 16k tokens, 16 heads, head_dim 64 and 128,
seq 512..16384, causal and not; plus grouped-query attention (32 query / 8 key-value
heads) and packed sequences (segment ids). FLOPs: forward ``4 * B * H * S * S * D``
(halved when causal), forward+backward 3.5x the forward. Implementations: ``jaxeff``
(``implementation="mosaic_gpu"`` on Hopper, else the portable ``"triton"`` kernel),
``cudnn`` (``jax.nn.dot_product_attention(implementation="cudnn")``), ``xla`` (the
reference; skipped above seq 4096, where its S x S logits make it slow or run out of
memory) and ``tokamax`` when importable.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp

from experiments.bench import harness
from jaxeff.ops import dot_product_attention

PLOT_X = "seq"
TOKENS = 16384
XLA_MAX_SEQ = 4096


def _flops(b, s, h, d, causal, mode):
  f = 4 * b * h * s * s * d / (2 if causal else 1)
  return f * (3.5 if mode == "fwd_bwd" else 1.0)


def _our_impl() -> str:
  kind = jax.devices()[0].device_kind
  if jax.default_backend() == "gpu" and any(k in kind for k in ("H100", "H200", "H800", "H20")):
    return "mosaic_gpu"
  return "triton"


def _implementations(causal: bool, seq: int, segments: bool, skip=()):
  ours = _our_impl()
  impls = {"jaxeff": lambda q, k, v, ids: dot_product_attention(
      q, k, v, is_causal=causal, segment_ids=ids, implementation=ours)}
  if not segments:
    impls["cudnn"] = lambda q, k, v, ids: jax.nn.dot_product_attention(
        q, k, v, is_causal=causal, implementation="cudnn")
  if seq <= XLA_MAX_SEQ and "xla" not in skip:
    impls["xla"] = lambda q, k, v, ids: dot_product_attention(
        q, k, v, is_causal=causal, segment_ids=ids, implementation="xla")
  try:
    import tokamax  # noqa: F401  (not on the GPU image; used when present)
    if not segments:
      impls["tokamax"] = lambda q, k, v, ids: tokamax.dot_product_attention(
          q, k, v, is_causal=causal, implementation="mosaic")  # its Hopper kernel, no fallback
  except ImportError:
    pass
  return impls


def _segment_ids(key, b, s, n_segments=4):
  """Packed rows: ``n_segments`` documents of random lengths per row."""
  cuts = jnp.sort(jax.random.randint(key, (b, n_segments - 1), 1, s), axis=1)
  pos = jnp.arange(s)[None, :]
  return (pos[:, :, None] >= cuts[:, None, :]).sum(-1).astype(jnp.int32)


def _cases(quick: bool):
  seqs = (1024, 4096) if quick else (512, 1024, 2048, 4096, 8192, 16384)
  cases = [dict(seq=s, heads=16, kv_heads=16, head_dim=128, causal=c)
           for c in (False, True) for s in seqs]
  cases.append(dict(seq=4096, heads=32, kv_heads=8, head_dim=128, causal=True))
  cases.append(dict(seq=4096, heads=16, kv_heads=16, head_dim=128, causal=True, segments=True))
  if not quick:
    cases += [dict(seq=s, heads=16, kv_heads=16, head_dim=64, causal=c)
              for c in (False, True) for s in seqs]
  return cases


def _jobs(case, skip=()):
  """(case name, params, implementation, jitted fn, make_args, FLOPs) for one shape."""
  seq, heads, kv_heads, d = case["seq"], case["heads"], case["kv_heads"], case["head_dim"]
  causal, segments = case["causal"], case.get("segments", False)
  b = max(1, TOKENS // seq)

  def make(i, b=b):
    ks = jax.random.split(jax.random.key(1000 + i), 5)
    q = jax.random.normal(ks[0], (b, seq, heads, d), jnp.bfloat16)
    k = jax.random.normal(ks[1], (b, seq, kv_heads, d), jnp.bfloat16)
    v = jax.random.normal(ks[2], (b, seq, kv_heads, d), jnp.bfloat16)
    do = jax.random.normal(ks[3], (b, seq, heads, d), jnp.bfloat16)
    ids = _segment_ids(ks[4], b, seq) if segments else None
    return q, k, v, do, ids

  jobs = []
  for mode in ("fwd", "fwd_bwd"):
    params = {"batch": b, "seq": seq, "heads": heads, "kv_heads": kv_heads, "head_dim": d,
              "causal": causal, "segments": segments, "mode": mode}
    name = (f"attn d{d} h{heads}/{kv_heads} s{seq} "
            f"{'causal' if causal else 'full'}{' packed' if segments else ''} {mode}")
    for impl, fn in _implementations(causal, seq, segments, skip).items():
      if mode == "fwd":
        f = jax.jit(lambda q, k, v, do, ids, fn=fn: fn(q, k, v, ids))
      else:
        f = jax.jit(lambda q, k, v, do, ids, fn=fn: jax.vjp(
            lambda q, k, v: fn(q, k, v, ids), q, k, v)[1](do))
      jobs.append((name, params, impl, f, make, _flops(b, seq, heads, d, causal, mode)))
  return jobs


def _previous_rows(keep) -> list[harness.Row]:
  """Rows of an earlier run on this device kept by a partial run (see :func:`run`)."""
  path = harness.RESULTS_DIR / harness.device_name() / "attention.json"
  if not path.exists():
    return []
  data = json.loads(path.read_text())
  if data.get("device") != jax.devices()[0].device_kind:
    return []
  rows = []
  for r in data["rows"]:
    if keep(r):
      nan = float("nan")  # failed timings are stored as null
      rows.append(harness.Row(r["case"], r["params"], r["implementation"],
                              nan if r["median_s"] is None else r["median_s"],
                              nan if r["throughput"] is None else r["throughput"], r["unit"]))
  return rows


def _selected(cases, head_dim: str, min_seq: str, skip):
  if head_dim:
    cases = [c for c in cases if c["head_dim"] == int(head_dim)]
  if min_seq:
    cases = [c for c in cases if c["seq"] >= int(min_seq)]
  if "packed" in skip:
    cases = [c for c in cases if not c.get("segments", False)]
  return cases


def run(quick: bool = False) -> list[harness.Row]:
  """Times every case in order.

  Environment (the full suite compiles ~140 programs and takes ~7 minutes on an H100):

  * ``JAXEFF_BENCH_DEADLINE_S``: stop early and keep what is done;
  * partial runs: ``JAXEFF_ATTN_BENCH_HEAD_DIM=64|128`` and ``JAXEFF_ATTN_BENCH_MIN_SEQ=N``
    select cases, ``JAXEFF_ATTN_BENCH_SKIP=xla,packed`` drops the XLA baseline and the
    packed-segments case. A partial run keeps, from this device's committed
    ``attention.json``, every row of the cases it does not time (a case is always timed
    whole, so rows compared with each other come from one run);
    ``JAXEFF_ATTN_BENCH_PART=1`` is ``HEAD_DIM=128`` and ``=2`` is ``HEAD_DIM=64``.
  """
  rows: list[harness.Row] = []
  if jax.default_backend() != "gpu":
    print("attention suite: needs a GPU (the kernels run on CPU only in interpret mode)")
    return rows
  deadline = time.perf_counter() + float(os.environ.get("JAXEFF_BENCH_DEADLINE_S", "inf"))
  part = os.environ.get("JAXEFF_ATTN_BENCH_PART", "")
  head_dim = {"1": "128", "2": "64"}.get(part, os.environ.get("JAXEFF_ATTN_BENCH_HEAD_DIM", ""))
  min_seq = os.environ.get("JAXEFF_ATTN_BENCH_MIN_SEQ", "")
  skip = tuple(x for x in os.environ.get("JAXEFF_ATTN_BENCH_SKIP", "").split(",") if x)
  all_cases = _cases(quick)
  cases = _selected(all_cases, head_dim, min_seq, skip)
  jobs = [job for case in cases for job in _jobs(case, skip)]
  for i, (name, params, impl, f, make, flops) in enumerate(jobs):
    if time.perf_counter() > deadline:
      print(f"attention suite: deadline reached, {len(jobs) - i} timings skipped")
      break
    t = harness.safe_time(f, make, rounds=10, warmup=2)
    rows.append(harness.Row(name, dict(params), impl, t, flops / t / 1e12, "TFLOP/s"))
    print(f"  {name:<48} {impl:<8} {harness.fmt_time(t):>11} {rows[-1].throughput:7.1f}",
          flush=True)
  if len(cases) < len(all_cases) or len(rows) < len(jobs):
    timed_now = {r.case for r in rows}
    rows = _previous_rows(lambda r: r["case"] not in timed_now) + rows
  return rows
