"""Sparse-kernel development run on one GPU: correctness, then timings of every variant.

(a) Correctness: each kernel variant against the dense masked product (float32 math) on
random inputs at odd shapes (K, N not whole tiles, m = 1, 3, 5, 16), and every timed
output against the same reference (``err`` column; > 2e-2 is flagged ``BAD``).

(b) Timings, same process and device, dense bf16 XLA (``jnp.dot``) as the baseline:

* unstructured, K = N = 8192, sparsity 50 / 60 / 70 / 80 / 90%: the tiled bitmap kernel
  (``tiled``, tensor cores, in-thread ranks) and the sliced-ELL kernel (``ell``, gathers
  x, FMA) at m = 1, 4, 16 (tiled also 64); 4096 x 14336 and 14336 x 4096 at 80%;
  tile / split / block variants of both at 80%;
* a dense Triton GEMV (FMA, same loads as the sparse kernels) at m = 1: the streaming
  bandwidth a Pallas Triton kernel gets here (calibrates the others);
* CATS SwiGLU at decode (D 4096, H 14336, 50% activation sparsity, m = 1 and 8) against
  the dense SwiGLU (XLA);
* 2:4 (K = N = 8192, m = 1, 4, 16): the words layout's kernels (gathers x with FMAs, m <=
  4; tensor cores, 3 and 2 stages) and the planes layout's tensor-core kernel (default and
  ``meta_block=16``, 2 stages).

Weights are rotated over device copies so that more than twice the L2 is streamed between
repeats (a compressed 8192^2 weight at 90% is 22 MB). Sections run in priority order and
are skipped, and said so, past ``--budget`` seconds; the JSON is rewritten after each
section.

Run (repo root): ``PYTHONPATH=. python3 experiments/sparse_dev.py --out $OUT``
(< 240 s on an H100).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import json
import math
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.bench import harness  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402
from jax.experimental.pallas import triton as pltriton  # noqa: E402
from jaxeff.sparse import formats as F  # noqa: E402
from jaxeff.sparse.pruning import nm_mask  # noqa: E402
from kernels_pallas.sparse import triton as T  # noqa: E402

sm = importlib.import_module("jaxeff.ops.sparse_matmul")

T0 = time.perf_counter()
ROWS: list[dict] = []
SKIPPED: list[str] = []
ERR_LIMIT = 2e-2
ROUNDS = 7
SCALE = 1  # --smoke: shapes / 32, interpret mode (a CPU check that the script runs)
INTERPRET = False
IMPL = "triton"


def elapsed() -> float:
  return time.perf_counter() - T0


# ------------------------------------------------------------------------------ helpers


def _weight(k, n, sparsity, seed):
  """Random bf16 ``[k, n]`` with a uniform random ``sparsity`` fraction of zeros."""
  kw, km = jax.random.split(jax.random.key(seed))
  w = jax.random.normal(kw, (k, n), jnp.float32) / math.sqrt(k)
  return jnp.where(jax.random.uniform(km, (k, n)) < sparsity, 0.0, w).astype(jnp.bfloat16)


def _x(m, k, seed):
  return jax.random.normal(jax.random.key(10_000 + seed), (m, k)).astype(jnp.bfloat16)


@jax.jit
def _ref(x, w):
  return jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32),
                 precision=jax.lax.Precision.HIGHEST)


def _err(out, ref) -> float:
  out = jnp.asarray(out, jnp.float32)
  return float(jnp.max(jnp.abs(out - ref)) / jnp.maximum(jnp.max(jnp.abs(ref)), 1e-30))


def _check(fn, x, w, ref) -> float | None:
  """Max relative error of ``fn(x, w)`` against ``ref``; a failure is printed (the timing
  that follows reports it as failed) instead of ending the section."""
  try:
    return _err(fn(x, w), ref)
  except Exception as e:  # noqa: BLE001  (a variant that does not compile here)
    msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
    print(f"  ! {type(e).__name__}: {msg}", flush=True)
    return None


def _time(fn, x_of, w) -> float:
  """Median device seconds of ``fn(x, w)`` (chained calls in one program: a per-call time
  would be the ~35 us dispatch floor); ``w`` rotated over fresh device copies."""
  def make(i):
    return x_of(i), (w if i == 0 else jax.tree.map(jnp.copy, w))
  return harness.safe_time(fn, make, rounds=ROUNDS, warmup=2, max_sets=8, chain=True)


def record(section, case, impl, t, *, base=None, err=None, nbytes=None, **params):
  row = {"section": section, "case": case, "implementation": impl,
         "median_us": t * 1e6 if t == t else None, "err": err, **params}
  if base is not None and t == t and base == base:
    row["speedup_vs_dense"] = base / t
  if nbytes is not None and t == t:
    row["GBps"] = nbytes / t / 1e9
  ROWS.append(row)
  flag = "" if err is None or err <= ERR_LIMIT else "  BAD"
  sp = f"{row['speedup_vs_dense']:6.2f}x" if "speedup_vs_dense" in row else "       "
  gb = f"{row['GBps']:7.0f} GB/s" if "GBps" in row else ""
  er = f"err {err:.1e}" if err is not None else ""
  tt = f"{t * 1e6:9.1f} us" if t == t else ("    check" if section == "correctness"
                                             else "   failed")
  print(f"{case:<34} {impl:<30} {tt} {sp} {gb:>12} {er}{flag}", flush=True)
  return row


def save(out_dir):
  """``sparse_dev.json`` under ``out_dir`` and experiments/results/<device>/."""
  payload = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
             "elapsed_s": elapsed(), "skipped": SKIPPED, "rows": ROWS}
  dirs = [out_dir] + ([] if INTERPRET else [harness.RESULTS_DIR / harness.device_name()])
  for d in dirs:
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "sparse_dev.json"), "w") as f:
      json.dump(payload, f, indent=1, default=str)


# ------------------------------------------------------------------ kernel entry points


def tiled_fn(cfg: T.SparseMatmulConfig | None = None):
  """The op's tiled path with an optional launch override."""
  if cfg is None:
    return jax.jit(lambda x, w: sm.sparse_matmul(x, w, min_sparsity=0.0,
                                                 implementation=IMPL))

  def f(x, w):
    m = x.shape[0]
    kp, np_ = w.padded_shape
    xp = jnp.pad(x, ((0, -m % cfg.block_m), (0, kp - x.shape[1])))
    out = T.tiled_sparse_matmul(xp, w.values, w.bitmap, w.col_ptr, tile=w.tile, m_real=m,
                                config=cfg, interpret=INTERPRET)
    return out[:, :w.shape[1]].astype(x.dtype)
  return jax.jit(f)


def ell_fn(cfg: T.EllConfig | None = None):
  if cfg is None:
    return jax.jit(lambda x, w: sm.sparse_matmul(x, w, min_sparsity=0.0,
                                                 implementation=IMPL))

  def f(x, w):
    out = T.ell_sparse_matmul(x, w.data, w.base, w.block_ptr, config=cfg, interpret=INTERPRET)
    return jnp.take(out, w.inv_perm, axis=1).astype(x.dtype)
  return jax.jit(f)


def nm_fn(block_n=None, cfg=None):
  """The op's N:M path with optional block / launch overrides."""
  def f(x, w):
    m, k = x.shape
    n = w.shape[1]
    g, gs = k // w.m, w.values.shape[1]
    per_step = 2 * w.meta_block if w.meta_block else T.nm_block_sizes(w.m)[0]
    bn = block_n or next((b for b in (128, 64, 32, 16) if n % b == 0), 16)
    c = cfg or T.default_config(m, n, gs // per_step, bn)
    mp = -(-m // c.block_m) * c.block_m
    planes = jnp.pad(x.reshape(m, g, w.m).transpose(2, 0, 1), ((0, 0), (0, mp - m), (0, gs - g)))
    out = T.nm_sparse_matmul(planes, w.values, w.meta, n=w.n, m=w.m, meta_block=w.meta_block,
                             m_real=m, config=c, block_n=bn, interpret=INTERPRET)
    return out[:, :n].astype(x.dtype)
  return jax.jit(f)


def words_fn(dot: bool, num_stages: int = 3):
  """The 2:4 words kernels directly: FMA (gathers x) or tensor cores."""
  def f(x, w):
    m = x.shape[0]
    if dot:
      xp = jnp.pad(x, ((0, -m % 16), (0, 0)))
      out = T.nm_words_dot_matmul(xp, w.values, w.meta, m_real=m, num_stages=num_stages,
                                  interpret=INTERPRET)
    else:
      out = T.nm_words_matmul(x, w.values, w.meta, interpret=INTERPRET)
    return out.astype(x.dtype)
  return jax.jit(f)


def _gemv_kernel(x_ref, w_ref, o_ref, *, bk, bn, steps):
  cb, sp = pl.program_id(0), pl.program_id(1)
  cols = pl.ds(cb * bn, bn)

  def body(i, acc):
    ks = pl.ds((sp * steps + i) * bk, bk)
    return acc + w_ref[ks, cols].astype(jnp.float32) * x_ref[ks].astype(jnp.float32)[:, None]

  acc = jax.lax.fori_loop(0, steps, body, jnp.zeros((bk, bn), jnp.float32))
  o_ref[sp, cols] = jnp.sum(acc, axis=0)


def dense_gemv_fn(bk=32, bn=256, split=8, num_warps=4):
  """Dense bf16 GEMV in Pallas Triton (FMA): y = x[0] @ w."""
  def f(x, w):
    k, n = w.shape
    out = pl.pallas_call(
        functools.partial(_gemv_kernel, bk=bk, bn=bn, steps=k // (bk * split)),
        grid=(n // bn, split), out_shape=jax.ShapeDtypeStruct((split, n), jnp.float32),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=INTERPRET, name="dense_gemv")(x[0], w)
    return jnp.sum(out, axis=0)[None].astype(x.dtype)
  return jax.jit(f)


# ------------------------------------------------------------------------------ sections


def correctness():
  """Odd shapes, every kernel, against the dense masked product (a failing case is
  printed and recorded with no error value; the others still run)."""
  sw = lambda x, w: sm.sparse_matmul(x, w, min_sparsity=0.0, implementation=IMPL)  # noqa: E731
  cases = [("tiled", 1, 300, 200, 0.8, None), ("tiled", 5, 1000, 333, 0.6, (64, 128)),
           ("tiled", 17, 777, 130, 0.9, (256, 64)), ("tiled", 40, 500, 260, 0.7, None),
           ("ell", 1, 1000, 333, 0.9, None), ("ell", 5, 777, 500, 0.5, None),
           ("ell", 16, 1000, 200, 0.8, None), ("ell", 3, 5000, 129, 0.97, None)]
  for kind, m, k, n, s, tile in cases:
    w = _weight(k, n, s, seed=m)
    x = _x(m, k, seed=m)
    ws = F.compress(w, tile=tile or F.DEFAULT_TILE) if kind == "tiled" else F.compress_ell(w)
    record("correctness", f"{kind} m={m} k={k} n={n} s={s}", kind, float("nan"),
           err=_check(sw, x, ws, _ref(x, w)))
  w = jnp.where(nm_mask(jnp.abs(_weight(1024, 384, 0.0, 3)), "2:4"), _weight(1024, 384, 0.0, 3), 0)
  x = _x(3, 1024, 3)
  for mb in (32, 16):
    record("correctness", f"2:4 m=3 k=1024 n=384 meta_block={mb}", "nm", float("nan"),
           err=_check(nm_fn(), x, F.compress_nm(w, "2:4", meta_block=mb), _ref(x, w)))
  w = jnp.where(nm_mask(jnp.abs(_weight(1000, 333, 0.0, 5)), "2:4"), _weight(1000, 333, 0.0, 5), 0)
  words = F.compress_nm(w, "2:4", words=True)
  for m in (1, 3):  # the FMA and the tensor-core kernel
    x = _x(m, 1000, 5)
    record("correctness", f"2:4 words m={m} k=1000 n=333", "nm:words", float("nan"),
           err=_check(sw, x, words, _ref(x, w)))
  for m in (1, 3):
    d, h = 512, 1536
    ks = jax.random.split(jax.random.key(m), 4)
    wg, wu = ((jax.random.normal(k_, (d, h)) / 16).astype(jnp.bfloat16) for k_ in ks[:2])
    wd = (jax.random.normal(ks[2], (h, d)) / 32).astype(jnp.bfloat16)
    x = _x(m, d, m)
    t = float(jnp.quantile(jnp.abs(jax.nn.silu((x @ wg).astype(jnp.float32))), 0.5))
    ours = lambda x, w, t=t: sm.cats_mlp(x, w[0], w[1], w[2], threshold=t,  # noqa: E731
                                         up_transposed=True, gate_transposed=True,
                                         implementation=IMPL)
    ref = sm.cats_mlp_reference(x, wg, wu, wd, threshold=t, up_transposed=False,
                                out_dtype=jnp.float32)
    record("correctness", f"cats m={m} d={d} h={h}", "cats", float("nan"),
           err=_check(ours, x, (wg.T, wu.T, wd), ref))


def unstructured(k, n, sparsities, ms_tiled, ms_ell, section, variants=False):
  dense_t = {}
  wd = _weight(k, n, 0.0, 99)
  for m in sorted(set(ms_tiled) | set(ms_ell)):
    dense_t[m] = _time(jax.jit(jnp.dot), lambda i, m=m: _x(m, k, i), wd)
    record(section, f"dense m={m} k={k} n={n}", "xla:bf16", dense_t[m], nbytes=2 * k * n)
  del wd
  for s in sparsities:
    if elapsed() > BUDGET:
      SKIPPED.append(f"{section} sparsity {s}")
      continue
    w = _weight(k, n, s, seed=int(s * 100))
    wh = np.asarray(w)
    formats = [("tiled", F.compress(wh), ms_tiled), ("ell", F.compress_ell(wh), ms_ell)]
    for kind, ws, ms in formats:
      nbytes = harness.tree_bytes(ws)
      fn = tiled_fn() if kind == "tiled" else ell_fn()
      for m in ms:
        x0 = _x(m, k, 0)
        err = _check(fn, x0, ws, _ref(x0, w))
        t = _time(fn, lambda i, m=m: _x(m, k, i), ws)
        record(section, f"{int(s * 100)}% m={m} k={k} n={n}", kind, t, base=dense_t[m], err=err,
               nbytes=nbytes, sparsity=s, m=m, k=k, n=n, bytes_per_elt=nbytes / (k * n))
    if variants and abs(s - 0.8) < 1e-6:
      variant_sweep(k, n, s, w, wh, formats, dense_t, section)
    del w, wh, formats


def variant_sweep(k, n, s, w, wh, formats, dense_t, section):
  """Tile / launch variants of both kernels at one sparsity (80%)."""
  ell = formats[1][1]
  nb = ell.num_blocks
  per = ell.data.shape[0] // nb
  base = T.ell_default_config(nb, per)
  ell_vars = [("ell:split/2", ell, T.EllConfig(split=max(1, base.split // 2))),
              ("ell:split*2", ell, T.EllConfig(split=base.split * 2)),
              ("ell:diag_no_x_gather", ell, dataclasses.replace(base, gather_x=False))]
  if elapsed() < BUDGET:
    e16 = F.compress_ell(wh, chunk=16)
    ell_vars.append(("ell:chunk16", e16, None))
    e64 = F.compress_ell(wh, block_n=64)
    ell_vars.append(("ell:block_n64", e64, None))
  for name, ws, cfg in ell_vars:
    for m in (1,):
      if elapsed() > BUDGET:
        SKIPPED.append(f"{section} {name}")
        continue
      fn = ell_fn(cfg)
      x0 = _x(m, k, 0)
      err = None if "diag" in name else _check(fn, x0, ws, _ref(x0, w))
      t = _time(fn, lambda i, m=m: _x(m, k, i), ws)
      nbytes = harness.tree_bytes(ws)
      record(section, f"{int(s * 100)}% m={m} k={k} n={n}", name, t, base=dense_t[m], err=err,
             nbytes=nbytes, sparsity=s, m=m, k=k, n=n)
  tiled_vars = [((64, 128), 4), ((256, 128), 4), ((128, 256), 8)]
  for tile, warps in tiled_vars:
    if elapsed() > BUDGET:
      SKIPPED.append(f"{section} tiled {tile}")
      continue
    ws = F.compress(wh, tile=tile)
    nbytes = harness.tree_bytes(ws)
    for m in (1, 16):
      kp, np_ = ws.padded_shape
      cfg = dataclasses.replace(T.tiled_default_config(m, np_, kp // tile[0], tile[1]),
                                num_warps=warps)
      fn = tiled_fn(cfg)
      x0 = _x(m, k, 0)
      err = _check(fn, x0, ws, _ref(x0, w))
      t = _time(fn, lambda i, m=m: _x(m, k, i), ws)
      record(section, f"{int(s * 100)}% m={m} k={k} n={n}",
             f"tiled:{tile[0]}x{tile[1]}w{warps}s{cfg.split_k}", t, base=dense_t[m], err=err,
             nbytes=nbytes, sparsity=s, m=m, k=k, n=n)
  # split-K of the default tile, twice and half the default; the value gather left out
  ws = formats[0][1]
  for m in (1, 16):
    kp, np_ = ws.padded_shape
    d = T.tiled_default_config(m, np_, kp // ws.tile[0], ws.tile[1])
    tries = [(f"tiled:split{sp}", dataclasses.replace(d, split_k=sp))
             for sp in (max(1, d.split_k // 2), d.split_k * 2) if (kp // ws.tile[0]) % sp == 0]
    tries.append(("tiled:by_word", dataclasses.replace(d, whole_tile=False)))
    if m == 1:
      tries.append(("tiled:diag_no_value_gather", dataclasses.replace(d, gather=False)))
    for name, cfg in tries:
      if elapsed() > BUDGET:
        continue
      t = _time(tiled_fn(cfg), lambda i, m=m: _x(m, k, i), ws)
      record(section, f"{int(s * 100)}% m={m} k={k} n={n}", name, t,
             base=dense_t[m], nbytes=harness.tree_bytes(ws), sparsity=s, m=m, k=k, n=n)
  # the streaming bandwidth of a dense Triton GEMV (same loads, FMA)
  wd = _weight(k, n, 0.0, 98)
  for bk, bn, split in ((32, 256, 8), (64, 128, 4)):
    fn = dense_gemv_fn(bk, bn, split)
    x0 = _x(1, k, 0)
    err = _check(fn, x0, wd, _ref(x0, wd))
    t = _time(fn, lambda i: _x(1, k, i), wd)
    record(section, f"dense m=1 k={k} n={n}", f"triton_gemv:{bk}x{bn}s{split}", t,
           base=dense_t[1], err=err, nbytes=2 * k * n)


def cats(ms):
  d, h = 4096 // SCALE, 14336 // SCALE
  ks = jax.random.split(jax.random.key(7), 4)
  wg, wu = ((jax.random.normal(k_, (d, h)) / math.sqrt(d)).astype(jnp.bfloat16) for k_ in ks[:2])
  wd = (jax.random.normal(ks[2], (h, d)) / math.sqrt(h)).astype(jnp.bfloat16)
  gt, ut = jnp.asarray(wg.T), jnp.asarray(wu.T)
  calib = (jax.random.normal(ks[3], (256, d)).astype(jnp.bfloat16) @ wg).astype(jnp.float32)
  t = float(jnp.quantile(jnp.abs(jax.nn.silu(calib)), 0.5))
  ours = jax.jit(lambda x, w: sm.cats_mlp(x, w[0], w[1], w[2], threshold=t, up_transposed=True,
                                          gate_transposed=True, implementation=IMPL))
  dense = jax.jit(lambda x, w: jnp.dot(jax.nn.silu(x @ w[0]) * (x @ w[1]), w[2]))
  for m in ms:
    if elapsed() > BUDGET:
      SKIPPED.append(f"cats m={m}")
      continue
    x0 = _x(m, d, 0)
    ref = sm.cats_mlp_reference(x0, wg, wu, wd, threshold=t, up_transposed=False,
                                out_dtype=jnp.float32)
    active = float(jnp.mean(jnp.any(jnp.abs(jax.nn.silu((x0 @ wg).astype(jnp.float32))) > t,
                                    axis=0)))
    td = _time(dense, lambda i: _x(m, d, i), (wg, wu, wd))
    record("cats", f"cats m={m} d={d} h={h}", "xla:dense_mlp", td, nbytes=3 * 2 * d * h)
    to = _time(ours, lambda i: _x(m, d, i), (gt, ut, wd))
    nbytes = 2 * d * h * (1 + 2 * active)
    record("cats", f"cats m={m} d={d} h={h}", "jaxeff:cats", to, base=td,
           err=_check(ours, x0, (gt, ut, wd), ref), nbytes=nbytes, active_fraction=active, m=m)
    if m > 1:
      continue
    base = T.cats_default_config(m, d, h)
    for name, cfg in (("cats:block_h32", dataclasses.replace(base, block_h=32)),
                      ("cats:down16x512", dataclasses.replace(base, down_block_h=16,
                                                              down_block_d=512))):
      if elapsed() > BUDGET:
        continue
      fn = jax.jit(lambda x, w, cfg=cfg: T.cats_mlp(
          x, w[0], w[1], w[2], jnp.full((1,), t, jnp.float32), config=cfg,
          interpret=INTERPRET)[0].astype(x.dtype))
      tv = _time(fn, lambda i: _x(m, d, i), (gt, ut, wd))
      record("cats", f"cats m={m} d={d} h={h}", name, tv, base=td,
             err=_check(fn, x0, (gt, ut, wd), ref), nbytes=nbytes, active_fraction=active, m=m)


def nm(ms):
  k = n = 8192 // SCALE
  base = _weight(k, n, 0.0, 44)
  w = jnp.where(nm_mask(jnp.abs(base), "2:4"), base, 0).astype(jnp.bfloat16)
  wh = np.asarray(w)
  wd = _weight(k, n, 0.0, 99)
  words = F.compress_nm(wh, "2:4", words=True)
  meta16 = F.compress_nm(wh, "2:4", meta_block=16)
  variants = [("nm:default", F.compress_nm(wh, "2:4"), {}), ("nm:meta16", meta16, {})]
  words_fns = {"nm:words_fma": words_fn(dot=False), "nm:words_dot": words_fn(dot=True),
               "nm:words_dot_s2": words_fn(dot=True, num_stages=2)}
  for m in ms:
    td = _time(jax.jit(jnp.dot), lambda i, m=m: _x(m, k, i), wd)
    record("nm", f"dense m={m} k={k} n={n}", "xla:bf16", td, nbytes=2 * k * n)
    for name, fn in words_fns.items():
      if elapsed() > BUDGET or (name == "nm:words_fma" and m > 4):
        continue
      x0 = _x(m, k, 0)
      err = _check(fn, x0, words, _ref(x0, w))
      t = _time(fn, lambda i, m=m: _x(m, k, i), words)
      record("nm", f"2:4 m={m} k={k} n={n}", name, t, base=td, err=err,
             nbytes=harness.tree_bytes(words), m=m)
    for name, ws, kw in variants:
      if elapsed() > BUDGET:
        SKIPPED.append(f"nm {name} m={m}")
        continue
      fn = nm_fn(**kw)
      x0 = _x(m, k, 0)
      err = _check(fn, x0, ws, _ref(x0, w))
      t = _time(fn, lambda i, m=m: _x(m, k, i), ws)
      record("nm", f"2:4 m={m} k={k} n={n}", name, t, base=td, err=err,
             nbytes=harness.tree_bytes(ws), m=m)
    for stages, warps in ((2, 4),):
      if elapsed() > BUDGET:
        continue
      ws = variants[1][1]
      g = ws.values.shape[1]
      d = T.default_config(m, n, g // 32, 128)
      fn = nm_fn(cfg=dataclasses.replace(d, num_stages=stages, num_warps=warps))
      t = _time(fn, lambda i, m=m: _x(m, k, i), ws)
      record("nm", f"2:4 m={m} k={k} n={n}", f"nm:meta16_s{stages}w{warps}", t, base=td,
             nbytes=harness.tree_bytes(ws), m=m)


def main():
  global BUDGET, SCALE, INTERPRET, IMPL, ROUNDS
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default=os.environ.get("OUT", "/tmp/sparse_dev"))
  p.add_argument("--budget", type=float, default=200.0,
                 help="seconds after which remaining cases are skipped")
  p.add_argument("--smoke", action="store_true",
                 help="shapes / 32 in Pallas interpret mode: checks the script on a CPU")
  args = p.parse_args()
  BUDGET = args.budget
  if args.smoke:
    SCALE, INTERPRET, IMPL, ROUNDS = 32, True, "triton:interpret", 1
  sq = 8192 // SCALE
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}", flush=True)
  sections = [
      ("correctness", correctness),
      ("square 80", lambda: unstructured(sq, sq, (0.8,), (1, 16, 64), (1, 4, 16), "square",
                                         variants=True)),
      ("square 60/90", lambda: unstructured(sq, sq, (0.6, 0.9), (1, 16), (1, 4), "square")),
      ("cats", lambda: cats((1, 8))),
      ("nm", lambda: nm((1, 4, 16))),
      ("square 70/50", lambda: unstructured(sq, sq, (0.7, 0.5), (1, 16), (1, 4), "square")),
      ("llm 4096x14336", lambda: unstructured(4096 // SCALE, 14336 // SCALE, (0.8,), (1, 16),
                                              (1,), "llm")),
      ("llm 14336x4096", lambda: unstructured(14336 // SCALE, 4096 // SCALE, (0.8,), (1, 16),
                                              (1,), "llm")),
  ]
  for name, fn in sections:
    if elapsed() > BUDGET:
      SKIPPED.append(name)
      print(f"-- skipped {name} (budget)", flush=True)
      continue
    print(f"-- {name} ({elapsed():.0f} s)", flush=True)
    try:
      fn()
    except Exception:  # a failing section is reported; the others still run
      traceback.print_exc()
      SKIPPED.append(f"{name} (failed)")
    save(args.out)
  print(f"done in {elapsed():.0f} s; skipped: {SKIPPED}", flush=True)
  save(args.out)


BUDGET = 200.0

if __name__ == "__main__":
  main()
