"""Mixture of experts: grouped matmul (forward, forward+backward) and the MoE layer (bf16).

Grouped matmul ``[M, K] x [E, K, N] -> [M, N]`` with ``M = 16384`` rows sorted by expert,
``E`` in {8, 64}, ``(K, N)`` in {(4096, 4096), (7168, 2048)} (DeepSeek-V3-style expert
projection), ``balanced`` (equal groups) or ``skewed`` (Zipf-like sizes, ``s = 1.2``, the
last eighth of the experts empty) groups. Implementations in the same run:

* ``jaxeff`` (``implementation="mosaic_gpu"``, Hopper), ``jaxeff:triton``;
* ``lax.ragged_dot`` (XLA), ``tokamax`` (``tokamax.ragged_dot``) when importable.

Throughput: TFLOP/s of ``2 * M * K * N`` (``fwd``) and ``6 * M * K * N`` (``fwd_bwd``:
the forward, ``dlhs`` and ``drhs``). A ``mosaic config`` case sweeps a few tile configs of
the forward kernel (GPU only) to tune :func:`kernels_pallas.moe.mosaic_gpu.default_config`.

The MoE layer (``jaxeff.nn.MoE``, 8 experts, top-2, d 2048, expert hidden 1408, 16384
tokens) is timed forward+backward in tokens/s against a dense SwiGLU of hidden
``2 * 1408`` (the same active FLOPs) and against the same layer on ``lax.ragged_dot``.

On CPU (smoke test) sizes shrink automatically and kernels are skipped.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench import harness
from jaxeff.nn.mlp import SwiGLU
from jaxeff.nn.moe import MoE
from jaxeff.ops.grouped_matmul import grouped_matmul
from kernels_pallas.moe import mosaic_gpu

PLOT_X = "experts"
DTYPE = jnp.bfloat16
M = 16384
SHAPES = ((4096, 4096), (7168, 2048))
EXPERTS = (8, 64)
BALANCE = ("balanced", "skewed")
QUICK_CASES = ((8, (4096, 4096), "balanced"), (64, (7168, 2048), "skewed"))
ROUNDS, QUICK_ROUNDS = 10, 5
LAYER = dict(tokens=16384, d=2048, hidden=1408, experts=8, k=2)
SWEEP = {
    "128x128x64 s4": mosaic_gpu.GroupedMatmulConfig(),
    "128x256x64 s4": mosaic_gpu.GroupedMatmulConfig(block_n=256, max_concurrent_steps=3),
    "64x128x64 s4": mosaic_gpu.GroupedMatmulConfig(block_m=64),
    "128x128x64 s6 band16": mosaic_gpu.GroupedMatmulConfig(max_concurrent_steps=6,
                                                           grid_block_n=16),
}


def _on_gpu() -> bool:
  return jax.default_backend() == "gpu"


def _scale(m, k, n, layer):
  """CPU smoke sizes: everything divided so one case runs in well under a second."""
  if _on_gpu():
    return m, k, n, layer
  return 512, k // 32, n // 32, dict(LAYER, tokens=256, d=128, hidden=64)


def group_sizes(m: int, experts: int, balance: str) -> np.ndarray:
  if balance == "balanced":
    sizes = np.full(experts, m // experts)
    sizes[: m - sizes.sum()] += 1
    return sizes.astype(np.int32)
  live = experts - max(1, experts // 8)
  w = 1.0 / np.arange(1, live + 1) ** 1.2
  sizes = np.floor(w / w.sum() * m).astype(np.int64)
  sizes[0] += m - sizes.sum()
  return np.concatenate([sizes, np.zeros(experts - live, np.int64)]).astype(np.int32)


def _implementations():
  impls = {}
  if _on_gpu():
    impls["jaxeff"] = lambda a, b, s: grouped_matmul(a, b, s, implementation="mosaic_gpu")
    impls["jaxeff:triton"] = lambda a, b, s: grouped_matmul(a, b, s, implementation="triton")
  else:
    impls["jaxeff"] = lambda a, b, s: grouped_matmul(a, b, s)
  impls["lax.ragged_dot"] = lambda a, b, s: jax.lax.ragged_dot(a, b, s)
  try:
    import tokamax  # noqa: F401  (used when importable)
    impls["tokamax"] = lambda a, b, s: tokamax.ragged_dot(a, b, s, implementation="mosaic")
  except ImportError:
    pass
  return impls


def _step(fn, mode):
  if mode == "fwd":
    return jax.jit(fn)

  def fwd_bwd(a, b, s, dout):
    out, vjp = jax.vjp(lambda a, b: fn(a, b, s), a, b)
    return out, vjp(dout)

  return jax.jit(fwd_bwd)


def _make(m, k, n, sizes, i):
  ka, kb, kd = jax.random.split(jax.random.key(i), 3)
  a = jax.random.normal(ka, (m, k), jnp.float32).astype(DTYPE)
  b = (jax.random.normal(kb, (len(sizes), k, n), jnp.float32) / np.sqrt(k)).astype(DTYPE)
  d = jax.random.normal(kd, (m, n), jnp.float32).astype(DTYPE)
  return a, b, jnp.asarray(sizes), d


def _gmm_rows(experts, shape, balance, rounds) -> list[harness.Row]:
  m, k, n, _ = _scale(M, *shape, LAYER)
  sizes = group_sizes(m, experts, balance)
  rows = []
  for mode in ("fwd", "fwd_bwd"):
    case = f"gmm {mode} E={experts} K={k} N={n} {balance}"
    params = {"op": "grouped_matmul", "mode": mode, "m": m, "k": k, "n": n,
              "experts": experts, "balance": balance, "dtype": jnp.dtype(DTYPE).name}
    flops = (2 if mode == "fwd" else 6) * m * k * n
    make = functools.partial(_make, m, k, n, sizes)
    for name, fn in _implementations().items():
      step = _step(fn, mode)
      t = harness.safe_time(step if mode == "fwd_bwd" else (lambda a, b, s, d, f=step: f(a, b, s)),
                            make, rounds=rounds)
      rows.append(harness.Row(case, params, name, t, flops / t / 1e12, "TFLOP/s"))
      print(f"  {case:<44} {name:<16} {harness.fmt_time(t):>10} {flops / t / 1e12:8.1f} TFLOP/s",
            flush=True)
  return rows


def _sweep_rows(rounds) -> list[harness.Row]:
  k, n = SHAPES[0]
  sizes = group_sizes(M, 8, "balanced")
  case = f"mosaic config sweep gmm fwd E=8 K={k} N={n}"
  rows = []
  for name, cfg in SWEEP.items():
    fn = jax.jit(lambda a, b, s, d, cfg=cfg: mosaic_gpu.grouped_matmul(a, b, s, m=M, config=cfg))
    t = harness.safe_time(fn, functools.partial(_make, M, k, n, sizes), rounds=rounds)
    params = {"op": "grouped_matmul", "mode": "fwd", "m": M, "k": k, "n": n, "experts": 8,
              "balance": "balanced", "config": str(cfg)}
    rows.append(harness.Row(case, params, f"jaxeff:{name}", t, 2 * M * k * n / t / 1e12,
                            "TFLOP/s"))
    print(f"  {case:<44} {name:<22} {harness.fmt_time(t):>10}", flush=True)
  return rows


def _layer_rows(rounds) -> list[harness.Row]:
  _, _, _, cfg = _scale(M, 1, 1, LAYER)
  t_, d, h, e, k = cfg["tokens"], cfg["d"], cfg["hidden"], cfg["experts"], cfg["k"]
  layers = {
      "jaxeff": MoE(e, k, h, dtype=DTYPE, param_dtype=DTYPE,
                    implementation="mosaic_gpu" if _on_gpu() else None),
      "jaxeff:triton": MoE(e, k, h, dtype=DTYPE, param_dtype=DTYPE, implementation="triton"),
      "lax.ragged_dot": MoE(e, k, h, dtype=DTYPE, param_dtype=DTYPE, implementation="xla"),
      "dense_swiglu": SwiGLU(k * h, dtype=DTYPE, param_dtype=DTYPE),
  }
  if not _on_gpu():
    del layers["jaxeff:triton"]
  case = f"moe layer fwd_bwd tokens={t_} d={d} E={e} k={k} h={h}"
  params_row = {"op": "moe_layer", "mode": "fwd_bwd", "tokens": t_, "d": d, "experts": e,
                "k": k, "hidden": h, "dtype": jnp.dtype(DTYPE).name}
  rows = []
  for name, layer in layers.items():
    x0 = jnp.zeros((t_, d), DTYPE)
    variables = jax.jit(layer.init)(jax.random.key(0), x0)

    def loss(v, x, layer=layer):
      out = layer.apply(v, x)
      y, aux = out if isinstance(out, tuple) else (out, {})
      return jnp.mean(y.astype(jnp.float32) ** 2) + sum(aux.values(), 0.0)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    make = lambda i, variables=variables: (variables, jax.random.normal(
        jax.random.key(i), (t_, d), jnp.float32).astype(DTYPE))
    t = harness.safe_time(step, make, rounds=rounds)
    rows.append(harness.Row(case, params_row, name, t, t_ / t, "tokens/s"))
    print(f"  {case:<44} {name:<16} {harness.fmt_time(t):>10} {t_ / t:12.0f} tokens/s", flush=True)
  return rows


def run(quick: bool) -> list[harness.Row]:
  rounds = QUICK_ROUNDS if quick else ROUNDS
  cases = QUICK_CASES if quick else [(e, s, b) for e in EXPERTS for s in SHAPES for b in BALANCE]
  rows = []
  for experts, shape, balance in cases:
    rows += _gmm_rows(experts, shape, balance, rounds)
  rows += _layer_rows(rounds)
  if _on_gpu() and not quick:
    rows += _sweep_rows(rounds)
  return rows
