"""Quantized matmul: weight-only int4 / int8, W8A8 int8 and fp8, against XLA baselines.

Cases (``y = x @ w``, ``x: [m, k]`` bf16, ``w: [k, n]``): K = N = 8192 at m = 1, 16, 128,
4096 and the LLM layer shapes 4096x4096, 4096x14336, 14336x4096 at m = 1, 16.

Implementations in each case (same process, same device):

* ``jaxeff``: ``jaxeff.ops.quantized_matmul`` (default dispatch: Triton weight-only
  kernel, Mosaic GPU scaled matmul for int8 / fp8 activations; prepacked weights).
* ``xla:bf16``: ``jnp.dot`` of bf16 x and bf16 w (the baseline the targets are against;
  timed once per shape and repeated in every case of that shape).
* ``xla:dequant``: dequantize then dot, jitted (XLA fuses what it can).
* ``xla:int8``: ``lax.dot`` int8 x int8 -> int32, then the two scales (W8A8 cases).
* ``xla:fp8``: ``lax.dot`` fp8 x fp8 -> float32, then the scales (fp8 per-row case).
* ``qwix`` (when importable): ``qwix.dot`` with the weight as a ``qwix.QArray`` of the same
  format (int4 / int8 per output channel, K groups of 128 for ``int4_g128``); in the W8A8
  and fp8 per-row cases the activations are quantized per row inside the timed call, as
  qwix's dynamic-range PTQ does (compare with ``jaxeff:with_x_quant`` / ``jaxeff``).

Throughput is TFLOP/s (``2 m k n``); ``weight_GBps`` (extra field) is the quantized weight
bytes (values + scales + zeros) over the time, the figure that matters when m is small.

Timing: products with m <= 256 take less device time than one dispatch of a jitted call
(~35 us on the H100 machine: a jitted ``x * 2`` measured 35.8 us per call), so a per-call
time would be the dispatch floor for every implementation. They are timed as chained calls
inside one jitted program (``harness.time_fn(chain=True)``: device time per call, as in a
model's decode step); ``params["timing"]`` says which way each case was timed.
"""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp

from experiments.bench import harness
from jaxeff.quant.formats import quantize_tensor

# The module (jaxeff.ops exports the function of the same name).
qm = importlib.import_module("jaxeff.ops.quantized_matmul")

PLOT_X = "m"
SQUARE = (8192, 8192)
SQUARE_M = (1, 16, 128, 4096)
LLM_SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096))
LLM_M = (1, 16)
WEIGHT_ONLY = {"int4_g128": ("int4", 128), "int4": ("int4", None), "int8": ("int8", None)}
LLM_FORMATS = ("int4_g128", "int8")
ACT_M = (128, 4096)  # W8A8 / fp8 cases
ROUNDS, QUICK_ROUNDS = 15, 5
CHAIN_MAX_M = 256  # products this skinny are timed as chained calls in one program


def _x(m, k, i):
  return jax.random.normal(jax.random.key(1000 + i), (m, k), jnp.float32).astype(jnp.bfloat16)


def _wf(k, n, i):
  return jax.random.normal(jax.random.key(i), (k, n), jnp.float32) / 64


def _qwix():
  """The ``qwix`` module when importable (not on every GPU image), else None."""
  try:
    return importlib.import_module("qwix")
  except ImportError:
    return None


@functools.lru_cache(maxsize=None)
def _qwix_quantizer(qtype, group):
  """bf16 ``w [k, n]`` -> ``qwix.QArray`` scaled per output channel (and per K group)."""
  qwix = _qwix()
  return jax.jit(lambda w: qwix.quantize(
      w.astype(jnp.bfloat16), qtype, channelwise_axes=[1],
      tiled_axes={0: group} if group else None))


def _qwix_rows(case, params, m, k, n, qtype, group, rounds, *, quantize_x: bool):
  """The ``qwix`` row of a case (none when qwix is not importable)."""
  qwix = _qwix()
  if qwix is None:
    return []
  quant = _qwix_quantizer(qtype, group)
  make = lambda i: (_x(m, k, i), quant(_wf(k, n, i)))
  if quantize_x:  # dynamic per-row activation quantization inside the call
    fn = jax.jit(lambda x, w: qwix.dot(qwix.quantize(x, qtype, channelwise_axes=[0]), w))
  else:
    fn = jax.jit(lambda x, w: qwix.dot(x, w))
  wbytes = harness.tree_bytes(make(0)[1])
  return [_row(case, params, "qwix", _time(m, fn, make, rounds=rounds), m, k, n, wbytes)]


@functools.lru_cache(maxsize=None)
def _quantizer(fmt, group, per_tensor=False):
  return jax.jit(lambda w: quantize_tensor(w, fmt, group_size=group, per_tensor=per_tensor))


def _time(m, fn, make, **kw):
  """Seconds per call: device time of chained calls inside one program for skinny
  products (m <= CHAIN_MAX_M, shorter than a dispatch), per-call time otherwise."""
  return harness.safe_time(fn, make, chain=m <= CHAIN_MAX_M, **kw)


def _timing(m) -> str:
  return "chained" if m <= CHAIN_MAX_M else "per_call"


def _row(case, params, impl, t, m, k, n, wbytes):
  flops = 2 * m * k * n
  extra = {"weight_GBps": wbytes / t / 1e9 if t == t else float("nan")}
  print(f"  {case:<52} {impl:<16} {harness.fmt_time(t):>10}  {flops / t / 1e12:8.1f} TFLOP/s"
        f"  {extra['weight_GBps']:8.0f} GB/s", flush=True)
  return harness.Row(case, params, impl, t, flops / t / 1e12, "TFLOP/s", extra)


def _bf16_time(m, k, n, rounds):
  make = lambda i: (_x(m, k, i), _wf(k, n, i).astype(jnp.bfloat16))
  return _time(m, jax.jit(jnp.dot), make, rounds=rounds), 2 * k * n


def _weight_only_rows(m, k, n, fmt_name, bf16, rounds, implementation=None):
  fmt, group = WEIGHT_ONLY[fmt_name]
  case = f"{fmt_name} weight-only m={m} k={k} n={n}"
  params = {"m": m, "k": k, "n": n, "format": fmt_name, "mode": "weight_only",
            "timing": _timing(m)}
  quant = _quantizer(fmt, group)
  make = lambda i: (_x(m, k, i), quant(_wf(k, n, i)))
  w0 = make(0)[1]
  wbytes = harness.tree_bytes(w0)
  ours = jax.jit(lambda x, w: qm.quantized_matmul(x, w, implementation=implementation))
  deq = jax.jit(lambda x, w: qm.quantized_matmul(x, w, implementation="xla"))
  make_packed = lambda i: (_x(m, k, i), qm.prepack(quant(_wf(k, n, i))))
  rows = [_row(case, params, "jaxeff", _time(m, ours, make, rounds=rounds), m, k, n,
               wbytes),
          _row(case, params, "jaxeff:prepacked", _time(m, ours, make_packed, rounds=rounds),
               m, k, n, wbytes),
          _row(case, params, "xla:dequant", _time(m, deq, make, rounds=rounds), m, k, n,
               wbytes),
          _row(case, params, "xla:bf16", bf16[0], m, k, n, bf16[1])]
  rows += _qwix_rows(case, params, m, k, n, jnp.int4 if fmt == "int4" else jnp.int8, group,
                     rounds, quantize_x=False)
  return rows


def _w8a8_rows(m, k, n, bf16, rounds):
  case = f"w8a8 int8 m={m} k={k} n={n}"
  params = {"m": m, "k": k, "n": n, "format": "int8", "mode": "w8a8", "timing": _timing(m)}
  quant = _quantizer("int8", None)

  def make(i):
    xq, xs = qm.quantize_activations(_x(m, k, i), "int8")
    return xq, xs, qm.prepack(quant(_wf(k, n, i)))

  w0 = make(0)[2]
  wbytes = w0.values.size + w0.scales.size * 4
  ours = jax.jit(lambda x, s, w: qm.quantized_matmul(x, w, x_scale=s))
  def fused(x, w):
    xq, xs = qm.quantize_activations(x, "int8")
    return qm.quantized_matmul(xq, w, x_scale=xs)

  fused = jax.jit(fused)

  def xla_int8(xq, xs, w):
    acc = jax.lax.dot_general(xq, w.values, (((1,), (1,)), ((), ())),
                              preferred_element_type=jnp.int32)
    return (acc.astype(jnp.float32) * xs * w.scales[:, 0]).astype(jnp.bfloat16)

  make_x = lambda i: (_x(m, k, i), make(i)[2])
  return [
      _row(case, params, "jaxeff", _time(m, ours, make, rounds=rounds), m, k, n, wbytes),
      _row(case, params, "jaxeff:with_x_quant", _time(m, fused, make_x, rounds=rounds),
           m, k, n, wbytes),
      _row(case, params, "xla:int8", _time(m, jax.jit(xla_int8), make, rounds=rounds),
           m, k, n, wbytes),
      _row(case, params, "xla:bf16", bf16[0], m, k, n, bf16[1]),
  ] + _qwix_rows(case, params, m, k, n, jnp.int8, None, rounds, quantize_x=True)


def _fp8_rows(m, k, n, bf16, rounds, *, block: bool):
  name = "fp8 block128" if block else "fp8 per-row"
  case = f"{name} m={m} k={k} n={n}"
  params = {"m": m, "k": k, "n": n, "format": "fp8_e4m3", "mode": "block" if block else "row",
            "timing": _timing(m)}
  quant = _quantizer("fp8_e4m3", 128 if block else None)

  def make(i):
    xq, xs = qm.quantize_activations(_x(m, k, i), "fp8_e4m3", block_size=128 if block else None)
    return xq, xs, qm.prepack(quant(_wf(k, n, i)))

  w0 = make(0)[2]
  wbytes = w0.values.size + w0.scales.size * 4
  ours = jax.jit(lambda x, s, w: qm.quantized_matmul(x, w, x_scale=s))
  deq = jax.jit(lambda x, s, w: qm.quantized_matmul(x, w, x_scale=s, implementation="xla"))
  rows = [_row(case, params, "jaxeff", _time(m, ours, make, rounds=rounds), m, k, n,
               wbytes)]
  if block:
    rows.append(_row(case, params, "xla:dequant", _time(m, deq, make, rounds=rounds),
                     m, k, n, wbytes))
  else:
    def xla_fp8(xq, xs, w):
      acc = jax.lax.dot_general(xq, w.values, (((1,), (1,)), ((), ())),
                                preferred_element_type=jnp.float32)
      return (acc * xs * w.scales[:, 0]).astype(jnp.bfloat16)

    rows.append(_row(case, params, "xla:fp8", _time(m, jax.jit(xla_fp8), make,
                                                                rounds=rounds), m, k, n, wbytes))
    rows += _qwix_rows(case, params, m, k, n, jnp.float8_e4m3fn, None, rounds,
                       quantize_x=True)
  rows.append(_row(case, params, "xla:bf16", bf16[0], m, k, n, bf16[1]))
  return rows


def _fp8_train_rows(m, k, n, rounds):
  """fp8_dot forward+backward (row scaling) vs bf16 dot forward+backward."""
  case = f"fp8_dot fwd_bwd m={m} k={k} n={n}"
  params = {"m": m, "k": k, "n": n, "format": "fp8_e4m3", "mode": "fwd_bwd"}

  def step(dot):
    def f(x, w, dy):
      y, vjp = jax.vjp(dot, x, w)
      return y, vjp(dy)
    return jax.jit(f)

  make = lambda i: (_x(m, k, i), _wf(k, n, i).astype(jnp.bfloat16), _x(m, n, i + 7))
  rows = []
  for impl, dot in (("jaxeff", lambda x, w: qm.fp8_dot(x, w, scaling="row")),
                    ("xla:bf16", jnp.dot)):
    t = harness.safe_time(step(dot), make, rounds=rounds)
    rows.append(harness.Row(case, params, impl, t, 3 * 2 * m * k * n / t / 1e12, "TFLOP/s"))
    print(f"  {case:<52} {impl:<16} {harness.fmt_time(t):>10}", flush=True)
  return rows


def run(quick: bool) -> list[harness.Row]:
  rounds = QUICK_ROUNDS if quick else ROUNDS
  rows = []
  k, n = SQUARE
  for m in SQUARE_M:
    bf16 = _bf16_time(m, k, n, rounds)
    # --quick: the formats the targets name (int4 g128 everywhere, int8 at m <= 16)
    fmts = ("int4_g128", "int8") if quick and m <= 16 else WEIGHT_ONLY
    for fmt_name in (("int4_g128",) if m > 256 or (quick and m > 16) else fmts):
      rows += _weight_only_rows(m, k, n, fmt_name, bf16, rounds)
    if m in ACT_M:
      rows += _w8a8_rows(m, k, n, bf16, rounds)
      rows += _fp8_rows(m, k, n, bf16, rounds, block=False)
      rows += _fp8_rows(m, k, n, bf16, rounds, block=True)
  if not quick:
    for k, n in LLM_SHAPES:
      for m in LLM_M:
        bf16 = _bf16_time(m, k, n, rounds)
        for fmt_name in LLM_FORMATS:
          rows += _weight_only_rows(m, k, n, fmt_name, bf16, rounds)
    rows += _fp8_train_rows(4096, 8192, 8192, rounds)
  return rows


# ------------------------------------------------------------------ kernel config sweeps


def _sweep_weight_only(m, k, n, fmt_name, configs, rounds, k_major=False):
  from kernels_pallas.matmul import triton as tr
  fmt, group = WEIGHT_ONLY[fmt_name]
  quant = _quantizer(fmt, group)
  bits = 4 if fmt == "int4" else 8
  rows = []
  for cfg in configs:
    def f(x, w, cfg=cfg):
      x = jnp.pad(x, ((0, -x.shape[0] % cfg.block_m), (0, 0)))
      if k_major:
        return tr.weight_only_matmul(x, w.values, w.scales, w.zeros, bits=bits,
                                     group_size=group, signed=True, k_major=True,
                                     config=cfg)[:m].astype(jnp.bfloat16)
      return tr.weight_only_matmul(x, w.values, w.scales, w.zeros, bits=bits, group_size=group,
                                   signed=True, config=cfg)[:m].astype(jnp.bfloat16)
    if k_major:
      make = lambda i: (_x(m, k, i), qm.prepack(quant(_wf(k, n, i))))
    else:
      make = lambda i: (_x(m, k, i), quant(_wf(k, n, i)))
    t = harness.safe_time(jax.jit(f), make, rounds=rounds)
    rows.append(_row(f"sweep {fmt_name}{' k_major' if k_major else ''} m={m} k={k} n={n}",
                     {"m": m, "config": str(cfg)}, f"jaxeff:{cfg.block_m}x{cfg.block_n}x{cfg.block_k}/s{cfg.split_k}"
                     f"/w{cfg.num_warps}/st{cfg.num_stages}", t, m, k, n,
                     harness.tree_bytes(make(0)[1])))
  return rows


def _sweep_scaled(m, k, n, dtype, configs, rounds):
  from kernels_pallas.matmul import mosaic_gpu as mg
  rows = []
  for cfg in configs:
    def make(i):
      a = _x(m, k, i).astype(dtype) if dtype != jnp.int8 else jax.random.randint(
          jax.random.key(i), (m, k), -127, 128, jnp.int32).astype(jnp.int8)
      b = _x(n, k, i + 3).astype(dtype) if dtype != jnp.int8 else jax.random.randint(
          jax.random.key(i + 3), (n, k), -127, 128, jnp.int32).astype(jnp.int8)
      return a, b, jnp.ones((m,), jnp.float32), jnp.ones((n,), jnp.float32)

    f = jax.jit(functools.partial(mg.scaled_matmul, scale_mode="outer", config=cfg))
    t = harness.safe_time(f, make, rounds=rounds)
    rows.append(_row(f"sweep mosaic {jnp.dtype(dtype).name} m={m} k={k} n={n}", {"m": m},
                     f"jaxeff:{cfg.block_m}x{cfg.block_n}x{cfg.block_k}/st{cfg.num_stages}", t,
                     m, k, n, n * k))
  return rows


def dev_sweep(rounds: int = 10) -> list[harness.Row]:
  """Block-size sweeps of the Triton weight-only kernel, both layouts, K = N = 8192."""
  from kernels_pallas.matmul import triton as tr
  k, n = SQUARE
  rows = []
  C = tr.WeightOnlyConfig
  skinny = [C(16, 128, 128, 8, 4, 4), C(16, 128, 256, 4, 4, 3), C(16, 64, 256, 8, 4, 3),
            C(16, 128, 128, 8, 8, 4), C(16, 256, 128, 4, 8, 3), C(16, 128, 128, 4, 4, 2)]
  for m in (1, 16):
    print(f"  bf16 m={m}: {harness.fmt_time(_bf16_time(m, k, n, rounds)[0])}", flush=True)
    rows += _sweep_weight_only(m, k, n, "int4_g128", skinny, rounds, k_major=True)
  rows += _sweep_weight_only(1, k, n, "int4_g128", skinny[:1], rounds)
  rows += _sweep_weight_only(16, k, n, "int8", skinny[:2] + skinny[3:4], rounds, k_major=True)
  print(f"  bf16 m=128: {harness.fmt_time(_bf16_time(128, k, n, rounds)[0])}", flush=True)
  wide = [C(128, 128, 64, 1, 8, 3), C(128, 128, 128, 2, 8, 3), C(128, 64, 128, 2, 4, 3),
          C(64, 128, 128, 2, 4, 4), C(128, 128, 128, 4, 4, 3)]
  rows += _sweep_weight_only(128, k, n, "int4_g128", wide, rounds, k_major=True)
  return rows
