"""Sparse matmul and CATS MLP at decode shapes, against dense bf16 XLA (and BCOO).

Cases (``y = x @ w``, ``x: [m, k]`` bf16, ``w: [k, n]``):

* K = N = 8192 at m = 1, 16, 64; unstructured sparsity 50 / 70 / 80 / 90% in both
  unstructured formats (tiled bitmap, :func:`jaxeff.sparse.compress`, and sliced ELL,
  :func:`jaxeff.sparse.compress_ell`, the latter at m <= 16) and 2:4
  (:func:`jaxeff.sparse.compress_nm`, also its ``words`` layout);
* LLM layer shapes 4096x4096, 4096x14336, 14336x4096 at m = 1, 16: 50%, 80%, 2:4;
* one small case (K = N = 2048, m = 16, 80%) with ``jax.experimental.sparse`` BCOO too
  (its matmul is very slow: it is timed at that size only);
* CATS SwiGLU at decode (D 4096, H 14336, m = 1, 8) at 50% activation sparsity vs the dense
  SwiGLU;
* on GPU (full run), a sweep of the tiled format's tile size at K = N = 8192, m = 16, 80%.

Implementations in each case (same process, same device):

* ``jaxeff:tiled`` / ``jaxeff:ell`` / ``jaxeff``: ``jaxeff.ops.sparse_matmul.sparse_matmul``
  of the tiled / ELL / N:M weight, ``cats_mlp`` (gate and up projections passed
  transposed, ``[H, D]``), default dispatch (the Triton kernels on GPU; on CPU the
  reference, so CPU rows only smoke-test the suite);
* ``xla:bf16``: ``jnp.dot`` of bf16 ``x`` and the dense bf16 ``w`` (the baseline the
  targets are against; timed once per shape and m, repeated in each case);
* ``xla:dense_mlp``: the dense SwiGLU (CATS cases); ``xla:cats``: the thresholded SwiGLU
  written in jnp on dense weights (bf16);
* ``bcoo``: ``jax.experimental.sparse.BCOO`` of the pruned weight, ``x @ w_bcoo``.

Throughput is the dense-equivalent TFLOP/s (``2 m k n`` over the time) so rows of a case
compare directly; ``weight_GBps`` (extra) is the weight bytes actually stored (compressed
for ``jaxeff``) over the time. On CPU the sizes shrink (K = N = 512, LLM shapes / 16) so
``python -m experiments.bench sparse --quick`` runs in seconds.

Timing: every case but BCOO is timed as chained calls inside one jitted program
(``harness.time_fn(chain=True)``): these skinny products take less device time than one
dispatch of a jitted call (~35 us on the H100 machine), which a per-call time would
measure instead, for every implementation alike.
"""

from __future__ import annotations

import functools
import importlib
import math

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench import harness
from jaxeff.sparse import activation, formats
from jaxeff.sparse.pruning import nm_mask

# The module (jaxeff.ops exports the function of the same name).
sm = importlib.import_module("jaxeff.ops.sparse_matmul")

PLOT_X = "sparsity"
ROUNDS, QUICK_ROUNDS = 10, 5
# Device copies of a compressed weight per case (L2 rotation: a 90% weight is 22 MB).
MAX_WEIGHT_SETS = 8


def _sizes(on_gpu: bool, quick: bool):
  scale = 1 if on_gpu else 16
  square = (8192 // scale, 8192 // scale)
  llm = tuple((a // scale, b // scale) for a, b in ((4096, 4096), (4096, 14336), (14336, 4096)))
  if quick:
    return dict(square=square, square_m=(1, 16), square_fmts=(0.6, 0.8, "2:4"),
                llm=llm[1:2], llm_m=(1, 16), llm_fmts=(0.8,), cats_m=(1, 8),
                cats=(4096 // scale, 14336 // scale), bcoo=(2048 // scale, 16, 0.8))
  return dict(square=square, square_m=(1, 16, 64), square_fmts=(0.5, 0.6, 0.7, 0.8, 0.9, "2:4"),
              llm=llm, llm_m=(1, 16), llm_fmts=(0.5, 0.8, "2:4"), cats_m=(1, 8),
              cats=(4096 // scale, 14336 // scale), bcoo=(2048 // scale, 16, 0.8))


def _x(m, k, i):
  return jax.random.normal(jax.random.key(1000 + i), (m, k), jnp.float32).astype(jnp.bfloat16)


@functools.lru_cache(maxsize=None)
def _pruned(k, n, fmt, i):
  """A pruned bf16 ``[k, n]`` weight (random mask for unstructured, magnitude N:M)."""
  kw, km = jax.random.split(jax.random.key(i))
  w = jax.random.normal(kw, (k, n), jnp.float32) / math.sqrt(k)
  if isinstance(fmt, str):
    w = jnp.where(nm_mask(jnp.abs(w), fmt), w, 0)
  else:
    w = jnp.where(jax.random.uniform(km, (k, n)) < fmt, 0, w)
  return w.astype(jnp.bfloat16)


@functools.lru_cache(maxsize=None)
def _compressed(k, n, fmt, kind="tiled"):
  w = _pruned(k, n, fmt, 0)
  if isinstance(fmt, str):
    return formats.compress_nm(w, fmt, words=kind == "words")
  return formats.compress_ell(w) if kind == "ell" else formats.compress(w)


def _copies(tree):
  """``make_args`` weight for set ``i``: a fresh device copy (distinct addresses, so
  repeated calls stream it from HBM, not L2)."""
  return lambda i: tree if i == 0 else jax.tree.map(jnp.copy, tree)


def _time(fn, make, **kw) -> float:
  """Device seconds per call (chained calls in one program; module docstring)."""
  return harness.safe_time(fn, make, chain=True, **kw)


def _row(case, params, impl, t, m, k, n, wbytes):
  flops = 2 * m * k * n
  extra = {"weight_GBps": wbytes / t / 1e9 if t == t else float("nan")}
  print(f"  {case:<48} {impl:<14} {harness.fmt_time(t):>10}  {flops / t / 1e12:8.3f} TFLOP/s"
        f"  {extra['weight_GBps']:8.1f} GB/s", flush=True)
  return harness.Row(case, params, impl, t, flops / t / 1e12, "TFLOP/s", extra)


def _fmt_name(fmt) -> str:
  return fmt if isinstance(fmt, str) else f"{int(round(fmt * 100))}%"


def _sparse_rows(m, k, n, fmt, dense, rounds):
  name = _fmt_name(fmt)
  sparsity = 0.5 if isinstance(fmt, str) else fmt
  case = f"sparse {name} m={m} k={k} n={n}"
  params = {"m": m, "k": k, "n": n, "sparsity": sparsity,
            "format": "nm" if isinstance(fmt, str) else "tiled", "pattern": name,
            "timing": "chained"}
  kinds = [("nm", "jaxeff")] if isinstance(fmt, str) else [("tiled", "jaxeff:tiled")]
  if not isinstance(fmt, str) and m <= sm.ELL_MAX_M:
    kinds.append(("ell", "jaxeff:ell"))
  if fmt == "2:4":
    kinds.append(("words", "jaxeff:words"))
  ours = jax.jit(lambda x, w: sm.sparse_matmul(x, w))
  rows = []
  for kind, impl in kinds:
    w = _compressed(k, n, fmt, kind)
    weight = _copies(w)
    make = lambda i: (_x(m, k, i), weight(i))  # noqa: E731
    t = _time(ours, make, rounds=rounds, max_sets=MAX_WEIGHT_SETS)
    rows.append(_row(case, dict(params, format=kind), impl, t, m, k, n, harness.tree_bytes(w)))
  rows.append(_row(case, params, "xla:bf16", dense, m, k, n, 2 * k * n))
  return rows


def _dense_time(m, k, n, rounds):
  make = lambda i: (_x(m, k, i), _pruned(k, n, 0.5, i % 2))  # noqa: E731
  return _time(jax.jit(jnp.dot), make, rounds=rounds, max_sets=2)


def _bcoo_rows(k, m, sparsity, rounds):
  from jax.experimental import sparse as jsparse

  n = k
  case = f"sparse {_fmt_name(sparsity)} m={m} k={k} n={n} (with BCOO)"
  params = {"m": m, "k": k, "n": n, "sparsity": sparsity, "format": "tiled",
            "pattern": _fmt_name(sparsity)}
  w = _pruned(k, n, sparsity, 0)
  wb = jsparse.BCOO.fromdense(w)
  make_b = lambda i: (_x(m, k, i), wb)  # noqa: E731
  bcoo = jax.jit(lambda x, w: x @ w)
  rows = _sparse_rows(m, k, n, sparsity, _dense_time(m, k, n, rounds), rounds)
  t = harness.safe_time(bcoo, make_b, rounds=min(rounds, 3), max_sets=1, inner=1)
  rows.append(_row(case, params, "bcoo", t, m, k, n, harness.tree_bytes(wb)))
  for r in rows:
    r.case, r.params = case, params
  return rows


def _cats_rows(m, d, h, rounds):
  case = f"cats mlp 50% m={m} d={d} h={h}"
  params = {"m": m, "d": d, "h": h, "activation_sparsity": 0.5, "mode": "decode",
            "timing": "chained"}
  ks = jax.random.split(jax.random.key(7), 4)
  wg, wu = ((jax.random.normal(k, (d, h)) / math.sqrt(d)).astype(jnp.bfloat16) for k in ks[:2])
  wd = (jax.random.normal(ks[2], (h, d)) / math.sqrt(h)).astype(jnp.bfloat16)
  wg_t, wu_t = jnp.asarray(wg.T), jnp.asarray(wu.T)  # [h, d]: the layout the kernel reads
  calib = jax.random.normal(ks[3], (256, d)).astype(jnp.bfloat16) @ wg
  t = float(activation.calibrate_cats_threshold(calib.astype(jnp.float32), 0.5))
  make = lambda i: (_x(m, d, i), wg, wu, wg_t, wu_t, wd)  # noqa: E731  (weights as arguments)
  ours = jax.jit(lambda x, wg, wu, wg_t, wu_t, wd: sm.cats_mlp(
      x, wg_t, wu_t, wd, threshold=t, up_transposed=True, gate_transposed=True))
  def xla_cats(x, wg, wu, wg_t, wu_t, wd):  # a thresholded SwiGLU on dense weights
    a = jax.nn.silu(x @ wg)
    return jnp.dot(jnp.where(jnp.abs(a) > t, a, 0) * (x @ wu), wd)

  ref = jax.jit(xla_cats)
  dense = jax.jit(lambda x, wg, wu, wg_t, wu_t, wd: jnp.dot(jax.nn.silu(x @ wg) * (x @ wu), wd))
  flops = 2 * m * d * h * 3
  rows = []
  for impl, fn in (("jaxeff", ours), ("xla:cats", ref), ("xla:dense_mlp", dense)):
    tm = _time(fn, make, rounds=rounds, max_sets=2)
    print(f"  {case:<48} {impl:<14} {harness.fmt_time(tm):>10}", flush=True)
    rows.append(harness.Row(case, params, impl, tm, flops / tm / 1e12, "TFLOP/s"))
  return rows


SWEEP_TILES = ((64, 128), (128, 128), (256, 128), (128, 256))


def _tile_sweep_rows(m, k, n, sparsity, rounds):
  """Tiled-format tile sizes (the kernel's K and N steps) at one case (GPU, full run)."""
  case = f"tile sweep {_fmt_name(sparsity)} m={m} k={k} n={n}"
  rows = []
  for tile in SWEEP_TILES:
    w = formats.compress(_pruned(k, n, sparsity, 0), tile=tile)
    params = {"m": m, "k": k, "n": n, "sparsity": sparsity, "format": "tiled",
              "tile": f"{tile[0]}x{tile[1]}"}
    fn = jax.jit(lambda x, w: sm.sparse_matmul(x, w))
    weight = _copies(w)
    t = _time(fn, lambda i: (_x(m, k, i), weight(i)), rounds=rounds,
              max_sets=MAX_WEIGHT_SETS)
    rows.append(_row(case, params, f"jaxeff:tile{tile[0]}x{tile[1]}", t, m, k, n,
                     harness.tree_bytes(w)))
  _pruned.cache_clear()
  return rows


def run(quick: bool) -> list[harness.Row]:
  on_gpu = jax.default_backend() == "gpu"
  rounds = QUICK_ROUNDS if quick else ROUNDS
  s = _sizes(on_gpu, quick)
  rows = []
  groups = [(s["square"], s["square_m"], s["square_fmts"])]
  groups += [(shape, s["llm_m"], s["llm_fmts"]) for shape in s["llm"]]
  for (k, n), ms, fmts in groups:
    for m in ms:
      dense = _dense_time(m, k, n, rounds)
      for fmt in fmts:
        rows += _sparse_rows(m, k, n, fmt, dense, rounds)
    _compressed.cache_clear()  # free this shape's weights
    _pruned.cache_clear()
  if on_gpu and not quick:
    rows += _tile_sweep_rows(16, *s["square"], 0.8, rounds)
  rows += _bcoo_rows(*s["bcoo"], rounds)
  d, h = s["cats"]
  for m in s["cats_m"]:
    rows += _cats_rows(m, d, h, rounds)
  return rows
