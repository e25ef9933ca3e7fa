"""RMSNorm and LayerNorm, forward and forward+backward, at LLM shapes (bf16).

Implementations: ``jaxeff`` (``implementation="mosaic_gpu"``, the Hopper kernels),
``jaxeff:triton`` (the Pallas-Triton kernels) and ``xla`` (the pure-jnp reference, jitted;
XLA fuses it as it likes). A ``copy`` case (``x + 1``, one read and one write) gives the
device's elementwise bandwidth ceiling in the same run (at 4096 tokens it also shows the
per-call floor of host dispatch, which the smaller cases approach).

Throughput is GB/s of the fewest bytes each mode must move, ``s = itemsize(x)``:

* ``fwd``:     read x, write y                                  -> ``2 * tokens * features * s``
* ``fwd_bwd``: the forward, then read x and dy, write dx         -> ``5 * tokens * features * s``

(weight, bias, their gradients and the float32 row statistics are under 0.1% at these
shapes and are not counted). The ``fwd_bwd`` function returns ``y`` and the gradients
w.r.t. x and weight (and bias), as a training step uses them.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from experiments.bench import harness
from jaxeff import ops
from kernels_pallas.normalization import mosaic_gpu

PLOT_X = "tokens"
IMPLEMENTATIONS = {"jaxeff": "mosaic_gpu", "jaxeff:triton": "triton", "xla": "xla"}
DTYPE = jnp.bfloat16
TOKENS = (4096, 16384)
FEATURES = (2048, 4096, 8192)
QUICK_SHAPES = ((4096, 4096), (16384, 4096))
QUICK_ROUNDS = 5
ROUNDS = 30
SWEEP_SHAPE = (16384, 4096)  # Mosaic GPU block-size sweep (kernel level, RMSNorm)


def _norm(op: str, implementation: str):
  if op == "rms_norm":
    return lambda x, w, b: ops.rms_norm(x, w, implementation=implementation)
  return lambda x, w, b: ops.layer_norm(x, w, b, implementation=implementation)


def _step(op: str, mode: str, implementation: str):
  norm = _norm(op, implementation)
  if mode == "fwd":
    return jax.jit(lambda x, w, b, dy: norm(x, w, b))

  def fwd_bwd(x, w, b, dy):
    y, vjp = jax.vjp(norm, x, w, b)
    return y, vjp(dy)

  return jax.jit(fwd_bwd)


def _make_args(tokens: int, features: int, op: str, i: int):
  kx, kw, kb, kd = jax.random.split(jax.random.key(i), 4)
  x = jax.random.normal(kx, (tokens, features), jnp.float32).astype(DTYPE)
  w = 1.0 + 0.1 * jax.random.normal(kw, (features,), jnp.float32)
  b = jax.random.normal(kb, (features,), jnp.float32) if op == "layer_norm" else None
  dy = jax.random.normal(kd, (tokens, features), jnp.float32).astype(DTYPE)
  return x, w, b, dy


def _bytes(mode: str, tokens: int, features: int) -> int:
  per_pass = tokens * features * jnp.dtype(DTYPE).itemsize
  return (2 if mode == "fwd" else 5) * per_pass


def _copy_row(tokens: int, features: int, rounds: int) -> harness.Row:
  fn = jax.jit(lambda x: x + 1)
  make = lambda i: (_make_args(tokens, features, "rms_norm", i)[0],)
  t = harness.safe_time(fn, make, rounds=rounds)
  params = {"op": "copy", "mode": "fwd", "tokens": tokens, "features": features,
            "dtype": jnp.dtype(DTYPE).name}
  return harness.Row(f"copy x+1 tokens={tokens} features={features}", params, "xla", t,
                     _bytes("fwd", tokens, features) / t / 1e9, "GB/s")


def _sweep_configs(tokens: int, features: int):
  """Named (forward, backward) Mosaic GPU configs around the heuristic's choice."""
  fwd = lambda **kw: mosaic_gpu.forward_config(tokens, features, DTYPE, weight_dtype=jnp.float32, **kw)
  bwd = lambda **kw: mosaic_gpu.backward_config(tokens, features, DTYPE, weight_dtype=jnp.float32, **kw)
  f, b = fwd(), bwd()
  return {
      "default": (f, b),
      "1 per SM": (fwd(programs_per_sm=1), bwd(programs_per_sm=1)),
      "3 per SM fwd": (fwd(programs_per_sm=3), b),
      "shallow ring": (dataclasses.replace(f, num_stages=mosaic_gpu.MIN_STAGES),
                       dataclasses.replace(b, num_stages=mosaic_gpu.MIN_STAGES)),
  }


def _sweep_rows(rounds: int) -> list[harness.Row]:
  tokens, features = SWEEP_SHAPE
  rows = []
  for mode in ("fwd", "fwd_bwd"):
    case = f"mosaic config sweep rms_norm {mode} tokens={tokens} features={features}"
    for name, (fcfg, bcfg) in _sweep_configs(tokens, features).items():
      def step(x, w, b, dy, fcfg=fcfg, bcfg=bcfg, mode=mode):
        y, _, rstd = mosaic_gpu.norm_forward(x, w, None, eps=1e-6, subtract_mean=False, config=fcfg)
        if mode == "fwd":
          return y
        dx, dw, _ = mosaic_gpu.norm_backward(dy, x, w, None, rstd, has_bias=False, config=bcfg)
        return y, dx, dw.sum(0)

      make = functools.partial(_make_args, tokens, features, "rms_norm")
      t = harness.safe_time(jax.jit(step), make, rounds=rounds)
      params = {"op": "rms_norm", "mode": mode, "tokens": tokens, "features": features,
                "dtype": jnp.dtype(DTYPE).name, "forward_config": str(fcfg),
                "backward_config": str(bcfg)}
      rows.append(harness.Row(case, params, f"jaxeff:{name}", t,
                              _bytes(mode, tokens, features) / t / 1e9, "GB/s"))
      print(f"  {case:<60} {name:<12} {harness.fmt_time(t):>10}  {fcfg} {bcfg}", flush=True)
  return rows


def run(quick: bool) -> list[harness.Row]:
  rounds = QUICK_ROUNDS if quick else ROUNDS
  shapes = QUICK_SHAPES if quick else [(t, f) for t in TOKENS for f in FEATURES]
  rows = []
  for op in ("rms_norm", "layer_norm"):
    for mode in ("fwd", "fwd_bwd"):
      for tokens, features in shapes:
        if op == "layer_norm" and not quick and tokens != max(TOKENS):
          continue  # LayerNorm at the larger token count only
        case = f"{op} {mode} tokens={tokens} features={features}"
        params = {"op": op, "mode": mode, "tokens": tokens, "features": features,
                  "dtype": jnp.dtype(DTYPE).name}
        make = functools.partial(_make_args, tokens, features, op)
        for name, implementation in IMPLEMENTATIONS.items():
          t = harness.safe_time(_step(op, mode, implementation), make, rounds=rounds)
          rows.append(harness.Row(case, params, name, t, _bytes(mode, tokens, features) / t / 1e9,
                                  "GB/s"))
          print(f"  {case:<46} {name:<14} {harness.fmt_time(t):>10}", flush=True)
  rows += [_copy_row(tokens, 4096, rounds) for tokens in TOKENS]
  if jax.default_backend() == "gpu":
    rows += _sweep_rows(rounds)
  return rows
