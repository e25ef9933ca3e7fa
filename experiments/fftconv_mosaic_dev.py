"""Device check and timing of the Mosaic GPU FFT convolution (issue #8).

``PYTHONPATH=. python3 experiments/fftconv_mosaic_dev.py [--out DIR] [--budget S] [--smoke]
[--backward | --long]``

Forward (default):

1. ``check``: :func:`kernels_pallas.fftconv.mosaic_gpu.fft_conv_mosaic` against float64
   NumPy (direct FFT formula) at seq 1024 and 4096 (batch 64 x 768, error over 4 batch
   rows x 64 channels of the full-size call), and small odd / gated / circular cases.
2. ``time``: batch 64 x 768 channels, bf16, causal, filter as long as the input, at seq
   1024 and 4096: the float32 ``jnp.fft`` convolution (``fft_conv(implementation="xla")``,
   the baseline), the Triton default (``implementation="triton"``) and a few Mosaic GPU
   launch configurations; every row with ``experiments.bench.harness.time_fn`` in this
   process.

Prints a table; writes ``fftconv_mosaic_dev.json`` into ``--out`` (default ``$OUT``) after
every row. ``--smoke``: tiny shapes in interpret mode (CPU check of this script).

``--backward`` (forward + backward, ``jaxeff.ops.fft_conv.fft_conv_mosaic_gpu``):

1. ``check`` (child process, ``--check-timeout``; in priority order, so that a time-out
   costs the least important ones): the gradients of the Mosaic forward with the fused
   Mosaic backward (:mod:`kernels_pallas.fftconv.mosaic_gpu_bwd`,
   ``backward="mosaic_fused"``), gated batch 8 x 64 and ungated full size; then those of
   the Mosaic forward with the Mosaic backward and the Mosaic filter gradient
   (:mod:`kernels_pallas.fftconv.mosaic_gpu_dk`, ``filter_grad="mosaic"``), gated, batch
   8 x 64 channels, causal at each size, and ungated at full size (batch 64 x 768:
   forward, du, dk); the filter-gradient kernel alone at full size (64 channels against
   float64 NumPy) and its timed configurations at batch 16 x 4; the Mosaic backward with
   the Triton dk at full size; circular seq 2048; the Mosaic and Triton backward gated;
   all against the float32 ``jnp.fft`` reference's autodiff (relative error < 1e-2).
2. ``time`` (rows stop starting at ``--budget`` seconds; most important first, over all
   sizes): ``jax.grad`` of the sum over (u, k), batch 64 x 768, bf16, causal, filter as
   long as the input, at seq 1024 and 4096: ``jnp.fft``, the Mosaic forward + fused
   backward, the Mosaic forward + backward + filter gradient, the Mosaic forward + backward
   with the Triton dk; then the backward alone (``(dw, dk)`` from ``(a, d, k)``): the
   separate Mosaic correlation + dk kernels (the base) and the fused kernel; then the filter
   gradient alone (``dk [channels, filter_len]`` from ``w, d [batch, channels, seq]``,
   kernel + XLA inverse): the Triton kernel, the Mosaic kernel's default and
   configurations; then fwd+bwd of the Mosaic forward with the Triton backward and of the
   Triton path. Mosaic rows only where their checks passed. Writes
   ``fftconv_mosaic_bwd.json``.

``--long`` (the long-sequence kernel, :mod:`kernels_pallas.fftconv.mosaic_gpu_long`,
transform sizes 16384 / 32768; default ``--sizes 8192,16384``):

1. ``check`` (child process, ``--check-timeout``): the default at each seq, full size
   (batch 64 x 768, error over 4 batch rows x 64 channels) against float64 NumPy; every
   timed configuration at batch 16 x 2 channels; a gated odd case (seq 8000, filter 300);
   circular seq 16384; the correlation; the op path ``fft_conv_mosaic_gpu(long=True)``.
2. ``time``: batch 64 x 768, bf16, causal, filter as long as the input: ``jnp.fft``, the
   Triton default, the long kernel's configurations (only those whose check passed).
   Writes ``fftconv_mosaic_long.json``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench import harness
from jaxeff.ops.fft_conv import fft_conv
from kernels_pallas.fftconv import mosaic_gpu as M
from kernels_pallas.fftconv import mosaic_gpu_bwd as BW
from kernels_pallas.fftconv import mosaic_gpu_dk as D
from kernels_pallas.fftconv import mosaic_gpu_long as L

BATCH, CHANNELS = 64, 768
RESULTS: dict = {"check": [], "time": []}
JSON_NAME = ["fftconv_mosaic_dev.json"]
T0 = time.time()
C = M.MosaicFFTConvConfig
VARIANTS = {  # name: config (None: default_config)
    1024: [("default", None),
           ("wg2 st2 staging", C(compute_wgs=2, stages=2, o_in_p=False)),
           ("wg2 st1 lowp", C(compute_wgs=2, stages=1, const_dtype="bfloat16")),
           ("wg2 st2 ppc8", C(compute_wgs=2, stages=2, pairs_per_cta=8)),
           ("wg1 st2", C(compute_wgs=1, stages=2))],
    4096: [("default", None),
           ("wg1 st2 lowp", C(compute_wgs=1, stages=2, const_dtype="bfloat16")),
           ("wg1 st2 lowp half", C(compute_wgs=1, stages=2, const_dtype="bfloat16",
                                   half_twiddles=True)),
           ("wg2 st1 lowp half ppc8", C(compute_wgs=2, stages=1, const_dtype="bfloat16",
                                        half_twiddles=True, pairs_per_cta=8))],
}


DK_VARIANTS = {  # the filter-gradient kernel alone: name -> MosaicDkConfig (None: default)
    1024: [("default", None),
           ("wg1 st2", D.MosaicDkConfig(compute_wgs=1, stages=2)),
           ("lowp", D.MosaicDkConfig(stages=2, const_dtype="bfloat16"))],
    4096: [("default", None),
           ("col64 st1", D.MosaicDkConfig(stages=1, col_width=64, const_dtype="bfloat16",
                                          half_twiddles=True)),
           ("f32 half st1", D.MosaicDkConfig(stages=1, half_twiddles=True))],
}


LONG_VARIANTS = {  # name: LongFFTConvConfig (None: the default)
    8192: [("default", None),
           ("overlap", L.LongFFTConvConfig(overlap=True)),
           ("f32 twiddles", L.LongFFTConvConfig(twiddle_dtype="float32")),
           ("overlap ppc8", L.LongFFTConvConfig(overlap=True, pairs_per_cta=8))],
    16384: [("default", None),
            ("overlap", L.LongFFTConvConfig(overlap=True)),
            ("f32 twiddles", L.LongFFTConvConfig(twiddle_dtype="float32"))],
}


def np_conv(u, k, x=None, v=None, causal=True, conjugate=False):
  """float64 ``v * conv(k, u x)`` (or the correlation with ``k``)."""
  f64 = lambda a: None if a is None else np.asarray(jnp.asarray(a, jnp.float32), np.float64)
  u, k, x, v = f64(u), f64(k), f64(x), f64(v)
  seq = u.shape[-1]
  n = M.fft_size(seq, k.shape[-1], causal=causal)
  w = u if x is None else u * x
  kf = np.fft.rfft(k, n)
  y = np.fft.irfft(np.fft.rfft(w, n) * (np.conj(kf) if conjugate else kf), n)[..., :seq]
  return y if v is None else y * v



def inputs(seed, b, c, seq, flen=None):
  ks = jax.random.split(jax.random.key(seed), 4)
  flen = flen or seq
  u = jax.random.normal(ks[0], (b, c, seq), jnp.float32).astype(jnp.bfloat16)
  k = jax.random.normal(ks[1], (c, flen), jnp.float32) / np.sqrt(flen)
  x = jax.random.normal(ks[2], (b, c, seq), jnp.float32).astype(jnp.bfloat16)
  v = jax.random.normal(ks[3], (b, c, seq), jnp.float32).astype(jnp.bfloat16)
  return u, k, x, v


def save(out: Path):
  out.mkdir(parents=True, exist_ok=True)
  RESULTS.update(device=harness.device_name(), jax_version=jax.__version__,
                 date=time.strftime("%Y-%m-%d %H:%M:%S"))
  (out / JSON_NAME[0]).write_text(json.dumps(RESULTS, indent=1, default=str))


def check(name, fn, ref):
  try:
    err = harness.rel_err(fn(), ref())
    ok = bool(err < 1e-2)
  except Exception as e:  # one failure must not cost the other rows
    err, ok = float("nan"), False
    print(f"{name}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:300]}", flush=True)
    traceback.print_exc(limit=4, file=sys.stdout)
  print(f"check {name:<44} {'OK ' if ok else 'BAD'} err {err:.2e}", flush=True)
  RESULTS["check"].append({"name": name, "ok": ok, "err": err})
  return ok


def checks(sizes, smoke):
  interp = dict(interpret=True) if smoke else {}
  b, c = (4, 2) if smoke else (BATCH, CHANNELS)
  for seq in sizes:
    u, k, _, _ = inputs(seq, b, c, seq)
    sub = (slice(0, 4), slice(0, min(c, 64)))
    f = jax.jit(lambda u, k: M.fft_conv_mosaic(u, k, **interp))
    check(f"seq={seq} B{b}xC{c} default", lambda: f(u, k)[sub], lambda: np_conv(u[sub], k[:64]))
  u, k, x, v = inputs(7, 3, 3, 1000, flen=37)
  check("seq=1000 flen=37 B3 gated", lambda: M.fft_conv_mosaic(u, k, x, v, **interp),
        lambda: np_conv(u, k, x, v))
  u, k, _, _ = inputs(8, 4, 2, 2048, flen=300)
  check("seq=2048 circular", lambda: M.fft_conv_mosaic(u, k, causal=False, **interp),
        lambda: np_conv(u, k, causal=False))
  for seq in sizes:  # every timed configuration, small batch (pairs_per_cta 8 needs 16 rows)
    u, k, _, _ = inputs(seq + 1, 16, 2, seq)
    for name, cfg in VARIANTS[seq]:
      if cfg is not None:
        check(f"seq={seq} B16xC2 {name}",
              lambda: M.fft_conv_mosaic(u, k, config=cfg, **interp), lambda: np_conv(u, k))


def timing(sizes, smoke, budget, out, passed):
  b, c = (4, 2) if smoke else (BATCH, CHANNELS)
  interp = dict(interpret=True) if smoke else {}
  table = []
  for seq in sizes:
    make = lambda i, seq=seq: inputs(100 + i, b, c, seq)[:2]
    rows = [("jnp.fft", jax.jit(lambda u, k: fft_conv(u, k, implementation="xla")))]
    if not smoke:
      rows.append(("triton default", jax.jit(lambda u, k: fft_conv(u, k, implementation="triton"))))
    for name, cfg in VARIANTS[seq]:
      if not passed.get(f"seq={seq} B16xC2 {name}", passed.get(f"seq={seq} default", False)):
        print(f"{seq:>6} mosaic {name:<21} skipped (check failed or did not finish)", flush=True)
        continue
      rows.append((f"mosaic {name}", jax.jit(
          lambda u, k, cfg=cfg: M.fft_conv_mosaic(u, k, config=cfg, **interp))))
    _time_rows(seq, rows, make, smoke=smoke, budget=budget, out=out, table=table, batch=b,
               channels=c)
  _print_table("", table)


def _time_rows(seq, rows, make, *, smoke, budget, out, table, base_name="jnp.fft",
               base=None, **record):
  """Times each ``(name, jitted fn)`` of one sequence length in order (ratios to the
  ``base_name`` row, or to the time ``base``), skipping past ``budget`` seconds; appends
  to ``RESULTS`` (with ``record``'s fields) and ``table``, saves the JSON after every
  row, and returns the base time."""
  for name, fn in rows:
    if time.time() - T0 > budget:
      print(f"{seq:>6} {name:<36} skipped (budget)", flush=True)
      continue
    try:
      t = harness.time_fn(fn, make, rounds=1 if smoke else 15, max_sets=2,
                          warmup=1 if smoke else 3)
    except Exception as e:
      print(f"{seq:>6} {name:<36} FAILED {type(e).__name__}: {str(e).splitlines()[0][:200]}",
            flush=True)
      RESULTS["time"].append({"seq": seq, "name": name, "error": str(e)[:400]})
      continue
    base = t if name == base_name else base
    x = base / t if base else float("nan")
    key = "vs_" + base_name.replace(".", "_").replace(" ", "_")
    RESULTS["time"].append({"seq": seq, "name": name, "time_s": t, key: x, **record})
    table.append((seq, name, t, x))
    print(f"{seq:>6} {name:<36} {harness.fmt_time(t):>10}  {x:6.2f}x {base_name}", flush=True)
    save(out)
  return base


def _print_table(title, table, base_name="jnp.fft"):
  print(f"\n{title}" if title else "")
  print(f"seq    implementation                   time   vs {base_name}")
  for seq, name, t, x in table:
    print(f"{seq:>6} {name:<36} {harness.fmt_time(t):>10}  {x:6.2f}x")


# --------------------------------------------------------------------------- backward


def _impls(smoke):
  """name -> ``conv(u, k, gate, causal)`` for the forward + backward rows (priority order)."""
  F = importlib.import_module("jaxeff.ops.fft_conv")  # the module (jaxeff.ops exports the op)
  sfx = ":interpret" if smoke else ""
  mosaic = lambda bwd, dk="triton": (lambda u, k, gate=None, causal=True: F.fft_conv_mosaic_gpu(
      u, k, causal=causal, gate=gate, backward=bwd, filter_grad=dk, interpret=smoke))
  return {
      "jnp.fft": lambda u, k, gate=None, causal=True: fft_conv(
          u, k, causal=causal, gate=gate, implementation="xla"),
      # the new rows first: the budget may cut the last rows (Triton was measured before)
      "mosaic fwd + mosaic fused bwd": mosaic("mosaic_fused"),
      "mosaic fwd + mosaic bwd + mosaic dk": mosaic("mosaic", "mosaic"),
      "mosaic fwd + mosaic bwd": mosaic("mosaic"),
      "mosaic fwd + triton bwd": mosaic("triton"),
      "triton": lambda u, k, gate=None, causal=True: fft_conv(
          u, k, causal=causal, gate=gate, implementation="triton" + sfx),
  }


# fwd+bwd rows gated by checks: row name -> the suffix of its check names
CHECKED = {"mosaic fwd + mosaic fused bwd": "mosaic fused",
           "mosaic fwd + mosaic bwd + mosaic dk": "mosaic dk",
           "mosaic fwd + mosaic bwd": "mosaic bwd"}
_REF_GRADS: dict = {}  # memo of the jnp.fft reference's gradients per input set


def _grads(conv, u, k, x, v, dy, causal=True):
  """``(y, du, dk, dx, dv)`` of ``conv`` (x, v None: ungated, their gradients None)."""
  def f(u, k, x, v):
    return conv(u, k, None if x is None else (x, v), causal)
  y, vjp = jax.vjp(f, u, k, x, v)
  return (y,) + tuple(vjp(dy))


def grad_check(name, conv, u, k, x, v, causal=True, parts=("y", "du", "dk", "dx", "dv"),
               ref_key=None):
  """One check row per gradient of ``conv`` vs the jnp.fft reference's autodiff
  (``ref_key``: reuse the reference's gradients computed for the same inputs)."""
  ref_conv = _impls(False)["jnp.fft"]
  dy = jax.random.normal(jax.random.key(99), u.shape, jnp.float32).astype(u.dtype)
  try:
    got = jax.jit(lambda *a: _grads(conv, *a, causal=causal))(u, k, x, v, dy)
    if ref_key is not None and ref_key in _REF_GRADS:
      ref = _REF_GRADS[ref_key]
    else:
      ref = jax.jit(lambda *a: _grads(ref_conv, *a, causal=causal))(u, k, x, v, dy)
      ref = tuple(None if r is None else np.asarray(jnp.asarray(r, jnp.float32), np.float64)
                  for r in ref)
      if ref_key is not None:
        _REF_GRADS[ref_key] = ref
    errs = {}
    for part, g, r in zip(("y", "du", "dk", "dx", "dv"), got, ref):
      if part in parts and r is not None:
        errs[part] = harness.rel_err(g, r)
  except Exception as e:
    print(f"{name}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:300]}", flush=True)
    traceback.print_exc(limit=4, file=sys.stdout)
    errs = {"error": float("nan")}
  ok = all(np.isfinite(e) and e < 1e-2 for e in errs.values())
  text = " ".join(f"{p} {e:.2e}" for p, e in errs.items())
  print(f"check {name:<44} {'OK ' if ok else 'BAD'} {text}", flush=True)
  RESULTS["check"].append({"name": name, "ok": ok, "errs": errs})
  return ok


def np_filter_grad(w, d, flen, causal=True):
  """float64 ``dk[c, j] = sum_b sum_t w[b, c, t] d[b, c, t + j]`` by NumPy's FFT."""
  f64 = lambda a: np.asarray(jnp.asarray(a, jnp.float32), np.float64)
  seq = w.shape[-1]
  n = M.fft_size(seq, flen, causal=causal)
  g = np.conj(np.fft.rfft(f64(w), n)) * np.fft.rfft(f64(d), n)
  return np.fft.irfft(g.sum(0), n)[:, :flen]


def _dk_fns(smoke, b, c, seq):
  """name -> jitted ``dk(w, d)`` for the filter-gradient rows (Triton first: the base)."""
  F = importlib.import_module("jaxeff.ops.fft_conv")
  call = F._triton_call(jnp.zeros((b, c, seq), jnp.bfloat16), jnp.zeros((c, seq)), causal=True,
                        interpret=smoke)
  fns = {"dk triton": jax.jit(lambda w, d: F._triton_filter_grad(w, None, d, None, call))}
  for name, cfg in DK_VARIANTS[seq]:
    fns[f"dk mosaic {name}"] = jax.jit(
        lambda w, d, cfg=cfg: D.filter_grad_mosaic(w, d, seq, config=cfg, interpret=smoke))
  return fns


def _bwd_fns(smoke, seq):
  """name -> jitted backward alone ``(dw, dk)`` from ``(a, d, k)`` (the separate Mosaic
  kernels first: the base)."""
  return {
      "bwd separate": jax.jit(lambda a, d, k: (
          M.fft_conv_mosaic(d, k, conjugate=True, interpret=smoke),
          D.filter_grad_mosaic(a, d, seq, interpret=smoke))),
      "bwd fused": jax.jit(lambda a, d, k: BW.fft_conv_backward_mosaic(a, d, k,
                                                                       interpret=smoke)),
  }


def backward_checks(sizes, smoke):
  impls = _impls(smoke)
  b, c = (4, 2) if smoke else (8, 64)
  fused = impls["mosaic fwd + mosaic fused bwd"]
  for seq in sizes:  # the fused backward first: gated small, then ungated full size
    u, k, x, v = inputs(seq + 3, b, c, seq)
    grad_check(f"seq={seq} B{b}xC{c} gated mosaic fused", fused, u, k, x, v,
               ref_key=("g", seq))
  if not smoke:
    for seq in sizes:
      u, k, _, _ = inputs(seq + 5, BATCH, CHANNELS, seq)
      grad_check(f"seq={seq} B{BATCH}xC{CHANNELS} mosaic fused", fused, u, k, None, None,
                 parts=("y", "du", "dk"), ref_key=("full", seq))
  new = impls["mosaic fwd + mosaic bwd + mosaic dk"]
  for seq in sizes:  # the new path, gated, small
    u, k, x, v = inputs(seq + 3, b, c, seq)
    grad_check(f"seq={seq} B{b}xC{c} gated mosaic dk", new, u, k, x, v, ref_key=("g", seq))
  if not smoke:
    for seq in sizes:  # full size, ungated (the timed case)
      u, k, _, _ = inputs(seq + 5, BATCH, CHANNELS, seq)
      grad_check(f"seq={seq} B{BATCH}xC{CHANNELS} mosaic dk", new, u, k, None, None,
                 parts=("y", "du", "dk"), ref_key=("full", seq))
  for seq in sizes:  # the filter-gradient kernel alone: full-size default, timed configs
    bd, cd = (4, 2) if smoke else (BATCH, CHANNELS)
    w, _, d, _ = inputs(seq + 7, bd, cd, seq)
    sub = slice(0, min(cd, 64))
    fns = _dk_fns(smoke, bd, cd, seq)
    check(f"seq={seq} B{bd}xC{cd} dk default", lambda: fns["dk mosaic default"](w, d)[sub],
          lambda: np_filter_grad(w[:, sub], d[:, sub], seq))
    if not smoke:
      w, _, d, _ = inputs(seq + 9, 16, 4, seq)
      fns = _dk_fns(smoke, 16, 4, seq)
      for name, cfg in DK_VARIANTS[seq]:
        if cfg is not None:
          check(f"seq={seq} B16xC4 dk {name}", lambda: fns[f"dk mosaic {name}"](w, d),
                lambda: np_filter_grad(w, d, seq))
  if not smoke:
    for seq in sizes:  # the Mosaic backward with the Triton dk, full size
      u, k, _, _ = inputs(seq + 5, BATCH, CHANNELS, seq)
      grad_check(f"seq={seq} B{BATCH}xC{CHANNELS} mosaic bwd", impls["mosaic fwd + mosaic bwd"],
                 u, k, None, None, parts=("y", "du", "dk"), ref_key=("full", seq))
  u, k, _, _ = inputs(11, 4, 8 if not smoke else 2, 2048, flen=300)
  grad_check("seq=2048 circular mosaic fused", fused, u, k, None, None, causal=False,
             ref_key=("circ",))
  grad_check("seq=2048 circular mosaic dk", new, u, k, None, None, causal=False,
             ref_key=("circ",))
  grad_check("seq=2048 circular mosaic bwd", impls["mosaic fwd + mosaic bwd"], u, k, None,
             None, causal=False, ref_key=("circ",))
  for seq in sizes:
    u, k, x, v = inputs(seq + 3, b, c, seq)
    for bwd in ("mosaic", "triton"):
      grad_check(f"seq={seq} B{b}xC{c} gated {bwd} bwd", impls[f"mosaic fwd + {bwd} bwd"],
                 u, k, x, v, ref_key=("g", seq))


def backward_timing(sizes, smoke, budget, out, passed):
  """Four passes over the sizes, most important rows first: fwd+bwd (jnp.fft and the
  Mosaic paths, the fused backward first), the backward alone (fused vs the separate
  Mosaic kernels), the filter gradient alone, fwd+bwd of the earlier paths."""
  b, c = (4, 2) if smoke else (BATCH, CHANNELS)
  impls = _impls(smoke)
  table, dk_table, bwd_table = [], [], []
  grad = lambda conv: jax.jit(jax.grad(
      lambda u, k: jnp.sum(conv(u, k).astype(jnp.float32)), argnums=(0, 1)))

  def fwd_bwd_rows(seq, names):
    rows = []
    for name in names:
      suffix = CHECKED.get(name)
      if suffix is not None and not passed.get((seq, suffix), False):
        print(f"{seq:>6} {name:<36} skipped (check failed or did not finish)", flush=True)
        continue
      rows.append((name, grad(impls[name])))
    return rows

  base = {}
  first = ["jnp.fft", "mosaic fwd + mosaic fused bwd", "mosaic fwd + mosaic bwd + mosaic dk",
           "mosaic fwd + mosaic bwd"]
  for seq in sizes:
    make = lambda i, seq=seq: inputs(200 + i, b, c, seq)[:2]
    base[seq] = _time_rows(seq, fwd_bwd_rows(seq, first), make, smoke=smoke, budget=budget,
                           out=out, table=table, batch=b, channels=c, kind="fwd_bwd")
  for seq in sizes:  # the backward alone: fused vs the separate Mosaic kernels
    make = lambda i, seq=seq: (lambda u, k, x, v: (u, x, k))(*inputs(500 + i, b, c, seq))
    rows = []
    for name, fn in _bwd_fns(smoke, seq).items():
      suffix = "mosaic fused" if name == "bwd fused" else "mosaic dk"
      if not passed.get((seq, suffix), False):
        print(f"{seq:>6} {name:<36} skipped (check failed or did not finish)", flush=True)
        continue
      rows.append((name, fn))
    _time_rows(seq, rows, make, smoke=smoke, budget=budget, out=out, table=bwd_table,
               base_name="bwd separate", batch=b, channels=c, kind="bwd")
  for seq in sizes:
    make = lambda i, seq=seq: inputs(400 + i, b, c, seq)[::2]  # (w, d): [b, c, seq] each
    rows = []
    for name, fn in _dk_fns(smoke, b, c, seq).items():
      variant = name[len("dk mosaic "):]
      key = f"seq={seq} B{b}xC{c} dk default" if variant == "default" else (
          f"seq={seq} B16xC4 dk {variant}")
      if name != "dk triton" and not passed.get(key, False):
        print(f"{seq:>6} {name:<36} skipped (check failed, did not run or smoke)", flush=True)
        continue
      rows.append((name, fn))
    _time_rows(seq, rows, make, smoke=smoke, budget=budget, out=out, table=dk_table,
               base_name="dk triton", batch=b, channels=c, kind="dk")
  for seq in sizes:
    make = lambda i, seq=seq: inputs(200 + i, b, c, seq)[:2]
    _time_rows(seq, fwd_bwd_rows(seq, ["mosaic fwd + triton bwd", "triton"]), make,
               smoke=smoke, budget=budget, out=out, table=table, base=base.get(seq),
               batch=b, channels=c, kind="fwd_bwd")
  _print_table("fwd+bwd (grad of sum over u, k)", sorted(table, key=lambda r: r[0]))
  _print_table("backward alone, (dw, dk) from (a, d, k)", bwd_table, "bwd separate")
  _print_table("filter gradient alone (kernel + XLA inverse)", dk_table, "dk triton")


def main_backward(a, sizes, out):
  JSON_NAME[0] = "fftconv_mosaic_bwd.json"
  if a.checks_only:
    backward_checks(sizes, a.smoke)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fftconv_mosaic_bwd_checks.json").write_text(json.dumps(RESULTS["check"],
                                                                   default=str))
    return
  print("device", harness.device_name(), "jax", jax.__version__, "(fwd+bwd)", flush=True)
  cmd = [sys.executable, __file__, "--checks-only", "--backward", "--out", str(out),
         "--sizes", a.sizes] + (["--smoke"] if a.smoke else [])
  try:
    subprocess.run(cmd, timeout=a.check_timeout, check=False)
  except subprocess.TimeoutExpired:
    print(f"checks did not finish in {a.check_timeout:.0f} s (hang?)", flush=True)
  path = out / "fftconv_mosaic_bwd_checks.json"
  RESULTS["check"] = json.loads(path.read_text()) if path.exists() else []
  ok = {r["name"]: r["ok"] for r in RESULTS["check"]}
  passed = dict(ok)  # the filter-gradient rows: by check name
  for seq in sizes:  # the fwd+bwd rows: every check of (seq, suffix) passed, at least one
    for suffix in CHECKED.values():
      mine = [v for n, v in ok.items() if n.startswith(f"seq={seq} ") and n.endswith(suffix)]
      passed[(seq, suffix)] = bool(mine) and all(mine)
  save(out)
  backward_timing(sizes, a.smoke, a.budget, out, passed)
  save(out)


# --------------------------------------------------------------------------- long


def long_checks(sizes, smoke):
  interp = dict(interpret=True) if smoke else {}
  b, c = (2, 1) if smoke else (BATCH, CHANNELS)
  for seq in sizes:
    u, k, _, _ = inputs(seq, b, c, seq)
    sub = (slice(0, 4), slice(0, min(c, 64)))
    f = jax.jit(lambda u, k: L.fft_conv_mosaic_long(u, k, **interp))
    check(f"seq={seq} B{b}xC{c} long default", lambda: f(u, k)[sub],
          lambda: np_conv(u[sub], k[:64]))
  if smoke:  # the timed configurations are the default's code with other constants
    return
  for seq in sizes:
    u, k, _, _ = inputs(seq + 1, 16, 2, seq)
    for name, cfg in LONG_VARIANTS[seq]:
      if cfg is not None:
        check(f"seq={seq} B16xC2 long {name}",
              lambda: L.fft_conv_mosaic_long(u, k, config=cfg), lambda: np_conv(u, k))
  u, k, x, v = inputs(7, 3, 2, 8000, flen=300)
  check("seq=8000 flen=300 B3 gated", lambda: L.fft_conv_mosaic_long(u, k, x, v),
        lambda: np_conv(u, k, x, v))
  u, k, _, _ = inputs(8, 4, 2, 16384, flen=1000)
  check("seq=16384 circular", lambda: L.fft_conv_mosaic_long(u, k, causal=False),
        lambda: np_conv(u, k, causal=False))
  for seq in sizes:
    u, k, _, _ = inputs(seq + 2, 4, 2, seq)
    check(f"seq={seq} correlation", lambda: L.fft_conv_mosaic_long(u, k, conjugate=True),
          lambda: np_conv(u, k, conjugate=True))
  F = importlib.import_module("jaxeff.ops.fft_conv")
  u, k, _, _ = inputs(9, 4, 2, 8192)
  check("seq=8192 op fft_conv_mosaic_gpu(long=True)",
        lambda: jax.jit(lambda u, k: F.fft_conv_mosaic_gpu(u, k, long=True))(u, k),
        lambda: np_conv(u, k))


def long_timing(sizes, smoke, budget, out, passed):
  b, c = (2, 1) if smoke else (BATCH, CHANNELS)
  interp = dict(interpret=True) if smoke else {}
  table = []
  for seq in sizes:
    make = lambda i, seq=seq: inputs(300 + i, b, c, seq)[:2]
    rows = [("jnp.fft", jax.jit(lambda u, k: fft_conv(u, k, implementation="xla")))]
    for name, cfg in LONG_VARIANTS[seq]:
      key = f"seq={seq} B16xC2 long {name}" if cfg is not None else f"seq={seq} long default"
      if not passed.get(key, False) or (smoke and cfg is not None):
        print(f"{seq:>6} mosaic long {name:<16} skipped (check failed, did not run or smoke)",
              flush=True)
        continue
      rows.append((f"mosaic long {name}", jax.jit(
          lambda u, k, cfg=cfg: L.fft_conv_mosaic_long(u, k, config=cfg, **interp))))
    if not smoke:  # after the new kernel's default: the budget may cut the last rows
      rows.insert(min(2, len(rows)), ("triton default", jax.jit(
          lambda u, k: fft_conv(u, k, implementation="triton"))))
    _time_rows(seq, rows, make, smoke=smoke, budget=budget, out=out, table=table, batch=b,
               channels=c)
  _print_table("forward, long-sequence kernel", table)


def main_long(a, sizes, out):
  JSON_NAME[0] = "fftconv_mosaic_long.json"
  if a.checks_only:
    long_checks(sizes, a.smoke)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fftconv_mosaic_long_checks.json").write_text(json.dumps(RESULTS["check"],
                                                                    default=str))
    return
  print("device", harness.device_name(), "jax", jax.__version__, "(long)", flush=True)
  # Checks in a child process with a time limit: a hang costs the checks, not the rows.
  cmd = [sys.executable, __file__, "--checks-only", "--long", "--out", str(out),
         "--sizes", ",".join(map(str, sizes))] + (["--smoke"] if a.smoke else [])
  try:
    subprocess.run(cmd, timeout=a.check_timeout, check=False)
  except subprocess.TimeoutExpired:
    print(f"checks did not finish in {a.check_timeout:.0f} s (hang?)", flush=True)
  path = out / "fftconv_mosaic_long_checks.json"
  RESULTS["check"] = json.loads(path.read_text()) if path.exists() else []
  passed = {}
  for r in RESULTS["check"]:
    name = r["name"]
    if " B16xC2 long " in name:
      passed[name] = r["ok"]
    elif name.endswith(" long default"):
      passed[name.split(" ")[0] + " long default"] = r["ok"]
  save(out)
  long_timing(sizes, a.smoke, a.budget, out, passed)
  save(out)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/fftconv_mosaic_dev"))
  ap.add_argument("--budget", type=float, default=170.0)
  ap.add_argument("--smoke", action="store_true")
  ap.add_argument("--sizes", default=None, help="seq lengths (default 1024,4096; --long: "
                  "8192,16384)")
  ap.add_argument("--checks-only", action="store_true")
  ap.add_argument("--check-timeout", type=float, default=80.0)
  ap.add_argument("--backward", action="store_true",
                  help="forward + backward checks and timing (module docstring)")
  ap.add_argument("--long", action="store_true",
                  help="the long-sequence kernel at seq 8192 / 16384 (module docstring)")
  a = ap.parse_args()
  a.sizes = a.sizes or ("8192,16384" if a.long else "1024,4096")
  sizes = [int(s) for s in a.sizes.split(",")]
  out = Path(a.out)
  if a.long:
    main_long(a, sizes, out)
    return
  if a.backward:
    main_backward(a, sizes, out)
    return
  if a.checks_only:
    checks(sizes, a.smoke)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fftconv_mosaic_checks.json").write_text(json.dumps(RESULTS["check"], default=str))
    return
  print("device", harness.device_name(), "jax", jax.__version__, flush=True)
  # The checks run in a child process with a time limit: a kernel that hangs on the device
  # costs the checks, not the baseline rows (configurations without a passed check are
  # not timed).
  cmd = [sys.executable, __file__, "--checks-only", "--out", str(out), "--sizes", a.sizes]
  try:
    subprocess.run(cmd + (["--smoke"] if a.smoke else []), timeout=a.check_timeout, check=False)
  except subprocess.TimeoutExpired:
    print(f"checks did not finish in {a.check_timeout:.0f} s (hang?)", flush=True)
  path = out / "fftconv_mosaic_checks.json"
  RESULTS["check"] = json.loads(path.read_text()) if path.exists() else []
  passed = {}  # "seq=S B16xC2 <variant>" and "seq=S default" -> ok
  for r in RESULTS["check"]:
    name = r["name"]
    key = name if "B16xC2" in name else name.split(" ")[0] + " default"
    if "B16xC2" in name or name.endswith(" default"):
      passed[key] = r["ok"]
  save(out)
  timing(sizes, a.smoke, a.budget, out, passed)
  save(out)


if __name__ == "__main__":
  main()
