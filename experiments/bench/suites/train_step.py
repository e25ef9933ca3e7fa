"""End-to-end GPT training step: tokens/s and MFU by attention implementation.

The jitted, state-donating ``train_step`` of :mod:`experiments.train_lm` (forward, backward,
AdamW update) for the ``gpt-125m`` preset (12 layers, d 768, 12 heads of 64, SwiGLU 2048,
vocab 32000, bf16 compute) at seq 2048, with attention through
:func:`jaxeff.ops.dot_product_attention` as:

* ``xla``: the pure-jnp reference (materialises the scores);
* ``cudnn``: ``jax.nn.dot_product_attention(implementation="cudnn")``;
* ``jaxeff``: ``implementation=None``, whatever jaxeff picks on the device (its flash
  kernels where registered, the best baseline otherwise).

Every other layer is the same in all three (RMSNorm, SwiGLU, embeddings: jaxeff's choice).
Timing chains the donated state through consecutive steps (each round closed by
``block_until_ready``) over a few rotating batches, median over rounds. FLOPs per token are
``6 N + 12 L d S`` (N without embeddings, no causal discount) and MFU divides by the
device's dense bf16 peak (989 TFLOP/s on H100; MFU is omitted where the peak is unknown).
``--quick`` keeps 4 layers and fewer rounds. On CPU a tiny model runs so the suite can be
smoke-tested (``cudnn`` then fails and is reported as such). ``JAXEFF_BENCH_DEADLINE_S``
(seconds) starts no new implementation past that time and keeps the rows done.
"""

from __future__ import annotations

import gc
import os
import statistics
import time

import jax
import numpy as np

from experiments import train_lm
from experiments.bench import harness
from jaxeff.models import gpt

# Row implementation -> GPTConfig changes. Every variant has the same layers except where
# named: "jaxeff:scan" (optional, below) is jaxeff with ``scan_layers=True``.
IMPLEMENTATIONS = {"xla": dict(attention_implementation="xla"),
                   "cudnn": dict(attention_implementation="cudnn"),
                   "jaxeff": dict(attention_implementation=None)}
PRESET = "gpt-125m"
GPU_SHAPE = dict(batch=4, seq=2048)   # batch x seq = 8k tokens: XLA attention still fits
CPU_SHAPE = dict(batch=8, seq=64)
ROUNDS, QUICK_ROUNDS = 10, 4
STEPS_PER_ROUND = 5
N_BATCHES = 4


def _config(on_gpu: bool, quick: bool) -> tuple[gpt.GPTConfig, dict]:
  if on_gpu:
    config = gpt.PRESETS[PRESET]
    if quick:
      config = config.replace(num_layers=4)
    return config, dict(GPU_SHAPE)
  return gpt.PRESETS["tiny"], dict(CPU_SHAPE)


def time_train_step(config: gpt.GPTConfig, *, batch: int, seq: int, rounds: int,
                    steps_per_round: int = STEPS_PER_ROUND) -> tuple[float, float]:
  """``(median seconds per step, compile seconds)`` of the train step of ``config``."""
  mesh = train_lm.make_mesh()
  batch = -(-batch // mesh.size) * mesh.size
  cfg = train_lm.preset_config(PRESET, steps=1000, warmup_steps=10, batch_size=batch, seq_len=seq)
  progs = train_lm.programs(config, cfg, mesh)
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(train_lm.DATA_AXIS))
  rng = np.random.default_rng(0)
  batches = []
  for _ in range(N_BATCHES):
    tokens = rng.integers(0, min(config.vocab_size, 256), (batch, seq + 1), dtype=np.int32)
    batches.append(jax.device_put({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}, sharding))
  state = progs.init(jax.random.key(0))
  t0 = time.perf_counter()
  step = progs.train_step.lower(state, batches[0]).compile()
  compile_s = time.perf_counter() - t0
  for i in range(2):  # warm-up
    state, metrics = step(state, batches[i % N_BATCHES])
  jax.block_until_ready((state, metrics))
  per_step = []
  for r in range(rounds):
    t0 = time.perf_counter()
    for j in range(steps_per_round):
      state, metrics = step(state, batches[(r * steps_per_round + j) % N_BATCHES])
    jax.block_until_ready((state, metrics))
    per_step.append((time.perf_counter() - t0) / steps_per_round)
  if not np.isfinite(float(metrics["loss"])):
    raise FloatingPointError(f"non-finite loss {float(metrics['loss'])}")
  del state, metrics, batches
  gc.collect()
  return statistics.median(per_step), compile_s


# TARGETS.md's end-to-end shape: the ~350M model at batch 8 x seq 2048. XLA attention runs
# out of memory there, so only cuDNN and jaxeff are timed.
# The large case runs first (it is the one the targets name).
LARGE_PRESET, LARGE_SHAPE = "gpt-350m", dict(batch=8, seq=2048)
# ``JAXEFF_TRAIN_STEP_SCAN=1`` adds the scanned-layers row (each 350M compile takes ~80 s
# on H100; the scan cost is profiled in notes/experiments.md).
LARGE_IMPLEMENTATIONS = {"cudnn": IMPLEMENTATIONS["cudnn"], "jaxeff": IMPLEMENTATIONS["jaxeff"]}
if os.environ.get("JAXEFF_TRAIN_STEP_SCAN") == "1":
  LARGE_IMPLEMENTATIONS["jaxeff:scan"] = dict(attention_implementation=None, scan_layers=True)


def run(quick: bool = False) -> list[harness.Row]:
  on_gpu = jax.default_backend() == "gpu"
  base, shape = _config(on_gpu, quick)
  deadline = time.perf_counter() + float(os.environ.get("JAXEFF_BENCH_DEADLINE_S", "inf"))
  rows = []
  if on_gpu and not quick:
    rows += _run_case(LARGE_PRESET, gpt.PRESETS[LARGE_PRESET], dict(LARGE_SHAPE),
                      LARGE_IMPLEMENTATIONS, quick, deadline)
  rows += _run_case(PRESET if on_gpu else "tiny", base, shape, IMPLEMENTATIONS, quick, deadline)
  return rows


def _run_case(name: str, base: gpt.GPTConfig, shape: dict, implementations: dict, quick: bool,
              deadline: float) -> list[harness.Row]:
  batch, seq = shape["batch"], shape["seq"]
  peak = train_lm.peak_flops(jax.devices()[0])
  fpt = gpt.flops_per_token(base, seq)
  case = f"{name} L{base.num_layers} b{batch} s{seq} {base.dtype}"
  rows = []
  for impl_name, impl in implementations.items():
    if time.perf_counter() > deadline:
      print(f"train_step suite: deadline reached, {impl_name} not timed")
      continue
    config = base.replace(**impl)
    try:
      median_s, compile_s = time_train_step(config, batch=batch, seq=seq,
                                            rounds=QUICK_ROUNDS if quick else ROUNDS)
    except Exception as e:  # a baseline that cannot run here (cuDNN on CPU, OOM) is reported
      msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
      print(f"  ! {impl_name}: {type(e).__name__}: {msg}")
      median_s, compile_s = float("nan"), float("nan")
    tokens_per_s = batch * seq / median_s
    tflops = tokens_per_s * fpt / 1e12
    mfu = tokens_per_s * fpt / peak if peak else None
    rows.append(harness.Row(
        case=case,
        params=dict(model=name, layers=base.num_layers, d_model=base.d_model,
                    heads=base.num_heads, kv_heads=base.kv_heads, head_dim=base.dim_per_head,
                    mlp_hidden=base.mlp_hidden, vocab=base.vocab_size, batch=batch, seq=seq,
                    dtype=base.dtype, causal=True, mode="train_step"),
        implementation=impl_name, median_s=median_s, throughput=tokens_per_s, unit="tokens/s",
        extra=dict(mfu=mfu, model_tflops=tflops, flops_per_token=fpt,
                   params_non_embedding=gpt.num_params(base, non_embedding=True),
                   num_params=gpt.num_params(base), compile_s=compile_s)))
    print(f"  {impl_name:<7} {harness.fmt_time(median_s):>11}/step  {tokens_per_s:12,.0f} tokens/s"
          f"  MFU {'n/a' if mfu is None or mfu != mfu else f'{mfu:.1%}'}"
          f"  (compile {compile_s:.1f}s)")
  return rows
