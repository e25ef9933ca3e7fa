"""jaxeff.parallel: the shard_map overhead on one device and multi-device scaling.

One device (always): the jitted, state-donating ``train_step`` of :mod:`experiments.train_lm`
for the plain Flax GPT (``flax``: the model's own ``apply``, no ``shard_map``) against the
same model, parameters and optimizer through :mod:`jaxeff.parallel.gpt` on a mesh whose
six axes all have size 1 (``jaxeff:shard_map``). Target: overhead < 3%.

Several devices (only when ``jax.device_count() > 1``; the cases of the multi-GPU issue,
for ``n`` = 2, 4, 8 up to the device count, so one command measures everything):

* data / FSDP weak scaling: the train step with a fixed per-device batch on ``data=n``
  and ``fsdp=n`` meshes vs the same step on one device (efficiency = t_1 / t_n);
* tensor parallelism: the Megatron MLP input projection with the sequence all-gather
  overlapped by :func:`jaxeff.parallel.tensor.all_gather_matmul` vs
  ``all_gather`` then matmul (``xla:all_gather+matmul``), and likewise the row-parallel
  output with :func:`~jaxeff.parallel.tensor.matmul_reduce_scatter` vs matmul then
  ``psum_scatter``;
* ring attention (causal, zig-zag): 32k tokens per device, the total growing to
  ``n * 32k``; the baseline is one device's flash attention on 32k tokens timed ``n``
  times (the same per-device FLOPs), so the ratio is the per-GPU efficiency;
* pipeline: GPipe and 1F1B over ``n`` stages of a 4-layer MLP stack, measured bubble
  ``1 - M t_stage / t_step`` vs the theoretical ``(n - 1) / (M + n - 1)``;
* expert parallelism: the MoE layer (8 experts, top-2) forward+backward with a fixed
  number of tokens per device, experts split over ``n`` devices (all-to-all dispatch),
  against one device with its own tokens (weak-scaling efficiency).

NVLink multicast stays off (``NCCL_NVLS_ENABLE=0`` is set here unless already set).
``--quick`` times a 4-layer model and fewer rounds. On CPU a tiny model runs so the suite
can be smoke-tested (``JAXEFF_BENCH_DEADLINE_S`` starts no new case past that time).
"""

from __future__ import annotations

import os

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")

import gc  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from experiments import train_lm  # noqa: E402
from experiments.bench import harness  # noqa: E402
from jaxeff.models import gpt  # noqa: E402
from jaxeff.parallel import mesh as pmesh  # noqa: E402
from jaxeff.parallel import pipeline as pl  # noqa: E402
from jaxeff.parallel import sequence as sq  # noqa: E402
from jaxeff.parallel import tensor as tp  # noqa: E402

PLOT_X = "devices"
PRESET = "gpt-125m"
GPU_SHAPE = dict(batch=4, seq=2048)
CPU_SHAPE = dict(batch=4, seq=64)
ROUNDS, QUICK_ROUNDS, STEPS_PER_ROUND = 10, 4, 5
# Per case: (full GPU, --quick GPU, CPU smoke test with fake devices).
SHAPES = {
    "collective_matmul": ((8192, 8192, 4 * 8192), (4096, 4096, 4 * 4096), (64, 32, 128)),
    "ring": ((32768, 16, 128), (8192, 16, 128), (64, 2, 16)),
    "pipeline": ((4096, 2048, 4), (2048, 1024, 2), (32, 8, 2)),
    "weak": (dict(batch=4, seq=2048), dict(batch=4, seq=2048), dict(batch=2, seq=32)),
    # (tokens per device, d_model, expert hidden); 8 experts, top-2 (the moe suite's layer)
    "expert": ((16384, 2048, 1408), (4096, 2048, 1408), (64, 32, 64)),
}


def _shape(case: str, quick: bool):
  full, fast, cpu = SHAPES[case]
  if jax.default_backend() == "cpu":
    return cpu
  return fast if quick else full


GPT_1P3B = gpt.GPTConfig(vocab_size=32000, num_layers=24, d_model=2048, num_heads=16,
                         mlp_hidden=5632, max_seq_len=2048, tie_embeddings=False,
                         dtype="bfloat16", scan_layers=True)


def time_train_step(config: gpt.GPTConfig, mesh_text: str | None, devices, *, batch: int,
                    seq: int, rounds: int) -> tuple[float, float]:
  """``(median s/step, compile s)`` of train_lm's step on ``devices`` (``mesh_text`` None:
  the plain model; else the jaxeff.parallel path on that mesh)."""
  cfg = train_lm.preset_config(PRESET, steps=1000, warmup_steps=10, batch_size=batch,
                               seq_len=seq, mesh=mesh_text)
  mesh = (train_lm.make_mesh(devices) if mesh_text is None
          else pmesh.make_mesh(mesh_text, devices))
  progs = train_lm.programs(config, cfg, mesh)
  sharding = progs.batch_sharding or NamedSharding(mesh, P(train_lm.DATA_AXIS))
  rng = np.random.default_rng(0)
  batches = []
  for _ in range(4):
    tokens = rng.integers(0, min(config.vocab_size, 256), (batch, seq + 1), dtype=np.int32)
    batches.append(jax.device_put({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]},
                                  sharding))
  state = progs.init(jax.random.key(0))
  t0 = time.perf_counter()
  lowered = progs.train_step.lower(state, batches[0])
  lower_s = time.perf_counter() - t0
  step = lowered.compile()
  compile_s = time.perf_counter() - t0
  print(f"    {mesh_text or 'plain model'}: lowered in {lower_s:.1f} s, compiled in "
        f"{compile_s - lower_s:.1f} s", flush=True)
  for i in range(2):
    state, metrics = step(state, batches[i])
  jax.block_until_ready((state, metrics))
  per_step = []
  for r in range(rounds):
    t0 = time.perf_counter()
    for j in range(STEPS_PER_ROUND):
      state, metrics = step(state, batches[(r + j) % 4])
    jax.block_until_ready((state, metrics))
    per_step.append((time.perf_counter() - t0) / STEPS_PER_ROUND)
  if not np.isfinite(float(metrics["loss"])):
    raise FloatingPointError(f"non-finite loss {float(metrics['loss'])}")
  del state, metrics, batches, step
  gc.collect()
  return statistics.median(per_step), compile_s


def _safe(fn, *args, **kw):
  try:
    return fn(*args, **kw)
  except Exception as e:  # OOM or a case this machine cannot run: reported, not fatal
    msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
    print(f"  ! {type(e).__name__}: {msg}")
    return float("nan"), float("nan")


def _train_row(case, name, config, impl, median_s, compile_s, tokens, devices, **extra):
  peak = train_lm.peak_flops(jax.devices()[0])
  fpt = gpt.flops_per_token(config, extra.pop("seq"))
  tps = tokens / median_s
  mfu = tps * fpt / (peak * devices) if peak else None
  print(f"  {case:<44} {impl:<18} {harness.fmt_time(median_s):>11}/step {tps:12,.0f} tok/s"
        f"  MFU {'n/a' if mfu is None or mfu != mfu else f'{mfu:.1%}'}")
  return harness.Row(case=case, params=dict(model=name, layers=config.num_layers,
                                            d_model=config.d_model, devices=devices,
                                            dtype=config.dtype, mode="train_step", **extra),
                     implementation=impl, median_s=median_s, throughput=tps, unit="tokens/s",
                     extra=dict(mfu=mfu, compile_s=compile_s))


def overhead_rows(quick: bool) -> list[harness.Row]:
  on_gpu = jax.default_backend() == "gpu"
  config = gpt.PRESETS[PRESET] if on_gpu else gpt.PRESETS["tiny"]
  if quick and on_gpu:
    config = config.replace(num_layers=4)
  shape = GPU_SHAPE if on_gpu else CPU_SHAPE
  one = jax.devices()[:1]
  case = f"overhead {PRESET if on_gpu else 'tiny'} L{config.num_layers} b{shape['batch']} " \
         f"s{shape['seq']}"
  rows = []
  times = {}
  for impl, mesh_text in (("flax", None), ("jaxeff:shard_map", "data=1")):
    t, c = _safe(time_train_step, config, mesh_text, one, batch=shape["batch"],
                 seq=shape["seq"], rounds=QUICK_ROUNDS if quick else ROUNDS)
    times[impl] = t
    rows.append(_train_row(case, PRESET, config, impl, t, c, shape["batch"] * shape["seq"], 1,
                           batch=shape["batch"], seq=shape["seq"]))
  overhead = times["jaxeff:shard_map"] / times["flax"] - 1
  rows[-1].extra["overhead_vs_flax"] = overhead
  print(f"  shard_map path at mesh size 1: {overhead:+.2%} vs the plain model (target < +3%)")
  return rows


def weak_scaling_rows(quick: bool, counts) -> list[harness.Row]:
  rows = []
  on_gpu = jax.default_backend() == "gpu"
  models = [("gpt-350m", gpt.PRESETS["gpt-350m"])] if on_gpu else [("tiny", gpt.PRESETS["tiny"])]
  if not quick and on_gpu:
    models.append(("gpt-1.3b", GPT_1P3B))
  per_device = _shape("weak", quick)
  for name, config in models:
    if quick and on_gpu:
      config = config.replace(num_layers=4)
    base, _ = _safe(time_train_step, config, None, jax.devices()[:1], **per_device,
                    rounds=QUICK_ROUNDS if quick else ROUNDS)
    for n in counts:
      case = f"weak {name} L{config.num_layers} b{per_device['batch']}/gpu n{n}"
      b = per_device["batch"] * n
      rows.append(_train_row(case, name, config, "1gpu", base, float("nan"),
                             per_device["batch"] * per_device["seq"], 1, seq=per_device["seq"],
                             batch_per_device=per_device["batch"]))
      for axis in ("data", "fsdp"):
        t, c = _safe(time_train_step, config, f"{axis}={n}", jax.devices()[:n], batch=b,
                     seq=per_device["seq"], rounds=QUICK_ROUNDS if quick else ROUNDS)
        row = _train_row(case, name, config, f"jaxeff:{axis}", t, c, b * per_device["seq"], n,
                         seq=per_device["seq"], batch_per_device=per_device["batch"])
        row.extra["weak_scaling_efficiency"] = base / t
        rows.append(row)
  return rows


def _time(fn, *args, rounds):
  return harness.safe_time(fn, lambda i: args, rounds=rounds)


def collective_matmul_rows(quick: bool, counts) -> list[harness.Row]:
  rows = []
  tokens, d, f = _shape("collective_matmul", quick)
  for n in counts:
    mesh = pmesh.make_mesh(f"tensor={n}", jax.devices()[:n])
    x = jax.device_put(jnp.ones((tokens, d), jnp.bfloat16) * 0.01,
                       NamedSharding(mesh, P("tensor")))
    w1 = jax.device_put(jnp.ones((d, f), jnp.bfloat16) * 0.01,
                        NamedSharding(mesh, P(None, "tensor")))
    w2 = jax.device_put(jnp.ones((f, d), jnp.bfloat16) * 0.01,
                        NamedSharding(mesh, P("tensor")))
    h = jax.device_put(jnp.ones((tokens, f), jnp.bfloat16) * 0.01,
                       NamedSharding(mesh, P(None, "tensor")))

    def sm(body, specs, out):
      return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=out))

    variants = {
        ("all_gather_matmul", "jaxeff:collective_matmul"): sm(
            lambda x, w: tp.all_gather_matmul(x, w, axis_name="tensor", gather_axis=0),
            (P("tensor"), P(None, "tensor")), P(None, "tensor")),
        ("all_gather_matmul", "xla:all_gather+matmul"): sm(
            lambda x, w: jax.lax.all_gather(x, "tensor", axis=0, tiled=True) @ w,
            (P("tensor"), P(None, "tensor")), P(None, "tensor")),
        ("matmul_reduce_scatter", "jaxeff:collective_matmul"): sm(
            lambda h, w: tp.matmul_reduce_scatter(h, w, axis_name="tensor", scatter_axis=0),
            (P(None, "tensor"), P("tensor")), P("tensor")),
        ("matmul_reduce_scatter", "xla:matmul+psum_scatter"): sm(
            lambda h, w: jax.lax.psum_scatter(h @ w, "tensor", scatter_dimension=0, tiled=True),
            (P(None, "tensor"), P("tensor")), P("tensor")),
    }
    flops = 2.0 * tokens * d * f / n  # per device
    for (op, impl), fn in variants.items():
      args = (x, w1) if op == "all_gather_matmul" else (h, w2)
      t = _time(fn, *args, rounds=10 if quick else 30)
      rows.append(harness.Row(case=f"{op} m{tokens} k{d if op[0] == 'a' else f} n{n}",
                              params=dict(op=op, m=tokens, k=d, n=f, devices=n, dtype="bfloat16",
                                          mode="fwd"),
                              implementation=impl, median_s=t, throughput=flops / t / 1e12,
                              unit="TFLOP/s/gpu"))
      print(f"  {op:<22} n{n} {impl:<26} {harness.fmt_time(t):>11} {flops / t / 1e12:8.1f} "
            "TFLOP/s/gpu")
  return rows


def ring_attention_rows(quick: bool, counts) -> list[harness.Row]:
  from jaxeff.ops.attention import dot_product_attention
  rows = []
  local, heads, hd = _shape("ring", quick)
  rounds = 5 if quick else 10
  key = jax.random.key(0)
  one = jax.devices()[0]
  dtype = jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
  q1 = jax.device_put(jax.random.normal(key, (1, local, heads, hd), dtype), one)

  def flash_fwd(q):
    return dot_product_attention(q, q, q, is_causal=True)

  def flash_fb(q):
    return jax.grad(lambda q: jnp.sum(flash_fwd(q).astype(jnp.float32)))(q)

  base = {"fwd": _time(jax.jit(flash_fwd), q1, rounds=rounds),
          "fwd_bwd": _time(jax.jit(flash_fb), q1, rounds=rounds)}
  flops1 = 4.0 * heads * local * local * hd / 2  # causal fwd on one device
  # A named kernel lets the ring backward run the kernel's backward directly.
  impl = "mosaic_gpu" if any(k in one.device_kind for k in ("H100", "H200", "H800")) else None
  for n in counts:
    total = local * n
    mesh = pmesh.make_mesh(f"sequence={n}", jax.devices()[:n])
    qn = jax.device_put(jax.random.normal(key, (1, total, heads, hd), dtype),
                        NamedSharding(mesh, P(None, "sequence")))  # already zig-zag ordered

    def ring(q):  # check_vma=False: Pallas kernels inside the map (notes/parallel.md)
      return jax.shard_map(lambda q: sq.ring_attention(q, q, q, axis_name="sequence",
                                                       is_causal=True, implementation=impl),
                           mesh=mesh, in_specs=P(None, "sequence"),
                           out_specs=P(None, "sequence"), check_vma=False)(q)

    fns = {"fwd": jax.jit(ring),
           "fwd_bwd": jax.jit(jax.grad(lambda q: jnp.sum(ring(q).astype(jnp.float32))))}
    for mode, fn in fns.items():
      mult = 1.0 if mode == "fwd" else 3.5
      per_gpu = flops1 * n * mult  # n^2 blocks-worth of causal work shared by n devices
      t = _time(fn, qn, rounds=rounds)
      case = f"ring causal {mode} s{total} h{heads} d{hd} n{n}"
      params = dict(seq=total, seq_per_device=local, heads=heads, head_dim=hd, causal=True,
                    devices=n, dtype=jnp.dtype(dtype).name, mode=mode)
      rows.append(harness.Row(case=case, params=params, implementation="flash:1gpu x n",
                              median_s=base[mode] * n, throughput=per_gpu / (base[mode] * n) / 1e12,
                              unit="TFLOP/s/gpu", extra=dict(one_gpu_s=base[mode])))
      rows.append(harness.Row(case=case, params=params, implementation="jaxeff:ring",
                              median_s=t, throughput=per_gpu / t / 1e12, unit="TFLOP/s/gpu",
                              extra=dict(per_gpu_efficiency=base[mode] * n / t)))
      print(f"  ring {mode:<8} n{n} s{total:>7}: {per_gpu / t / 1e12:7.1f} TFLOP/s/gpu, "
            f"{base[mode] * n / t:.1%} of 1-GPU flash (target >= 85%)")
  return rows


def pipeline_rows(quick: bool, counts) -> list[harness.Row]:
  rows = []
  d, mb, layers_per_stage = _shape("pipeline", quick)
  m = 8
  key = jax.random.key(0)

  def stage(w, x):
    return jax.lax.scan(lambda x, wi: (jnp.tanh(x @ wi), None), x, w)[0]

  def loss_fn(y, t):
    return jnp.mean((y.astype(jnp.float32) - t) ** 2)

  w1 = jax.random.normal(key, (layers_per_stage, d, d), jnp.bfloat16) * 0.01
  x1 = jax.random.normal(key, (mb, d), jnp.bfloat16)
  t_f = _time(jax.jit(stage), w1, x1, rounds=20)
  t_fb = _time(jax.jit(jax.grad(lambda w, x: loss_fn(stage(w, x), 0.0))), w1, x1, rounds=20)
  for n in counts:
    mesh = pmesh.make_mesh(f"pipeline={n}", jax.devices()[:n])
    w = jax.device_put(jax.random.normal(key, (n * layers_per_stage, d, d), jnp.bfloat16) * 0.01,
                       NamedSharding(mesh, P("pipeline")))
    xs = jax.device_put(jax.random.normal(key, (m, mb, d), jnp.bfloat16),
                        NamedSharding(mesh, P()))
    tg = jnp.zeros((m, mb, d), jnp.float32)

    def gpipe_loss(w, xs):
      ys = jax.shard_map(lambda w, xs: pl.gpipe(stage, w, xs), mesh=mesh,
                         in_specs=(P("pipeline"), P()), out_specs=P(), check_vma=False)(w, xs)
      return jnp.mean(jax.vmap(loss_fn)(ys, tg))

    ofob = jax.shard_map(lambda w, xs, tg: pl.one_f_one_b(stage, loss_fn, w, xs, tg),
                         mesh=mesh, in_specs=(P("pipeline"), P(), P()),
                         out_specs=(P(), P("pipeline")), check_vma=False)
    cases = {"gpipe": (jax.jit(jax.value_and_grad(gpipe_loss)), (w, xs)),
             "1f1b": (jax.jit(ofob), (w, xs, tg))}
    theory = pl.bubble_fraction("1f1b", n, m)
    ideal = m * t_fb
    for name, (fn, args) in cases.items():
      t = _time(fn, *args, rounds=10)
      measured = 1 - ideal / t
      case = f"pipeline {name} p{n} M{m} d{d}"
      params = dict(schedule=name, devices=n, microbatches=m, d_model=d, microbatch=mb,
                    layers_per_stage=layers_per_stage, mode="fwd_bwd")
      rows.append(harness.Row(case=case, params=params, implementation="ideal (M x stage)",
                              median_s=ideal, throughput=m / ideal, unit="microbatches/s"))
      rows.append(harness.Row(case=case, params=params, implementation=f"jaxeff:{name}",
                              median_s=t, throughput=m / t, unit="microbatches/s",
                              extra=dict(bubble_measured=measured, bubble_theory=theory,
                                         stage_fwd_s=t_f, stage_fwd_bwd_s=t_fb)))
      print(f"  pipeline {name:<5} p{n} M{m}: bubble measured {measured:.1%}, theory "
            f"{theory:.1%}")
  return rows


def expert_parallel_rows(quick: bool, counts) -> list[harness.Row]:
  """The MoE layer (8 experts, top-2) forward+backward, weak scaling: a fixed number of
  tokens per device, experts split over an ``expert`` axis of ``n`` devices (all-to-all
  dispatch), against the same layer on one device with one device's tokens
  (efficiency = n t_1 / t_n per device, i.e. t_1 / t_n)."""
  from jaxeff.nn.moe import MoE

  tokens, d, h = _shape("expert", quick)
  on_gpu = jax.default_backend() == "gpu"
  dtype = jnp.bfloat16 if on_gpu else jnp.float32
  impl = "mosaic_gpu" if on_gpu else None
  kw = dict(num_experts=8, experts_per_token=2, hidden_dim=h, dtype=dtype, param_dtype=dtype,
            implementation=impl)

  def step_time(layer, n, devices):
    x = jax.random.normal(jax.random.key(1), (n * tokens, d), jnp.float32).astype(dtype)
    variables = jax.jit(layer.init)(jax.random.key(0), x[:tokens])
    if n > 1:
      mesh = layer.mesh
      x = jax.device_put(x, NamedSharding(mesh, P(mesh.axis_names)))
      variables = jax.device_put(variables, NamedSharding(mesh, P()))

    def loss(v, x):
      y, aux = layer.apply(v, x)
      return jnp.mean(y.astype(jnp.float32) ** 2) + sum(aux.values(), 0.0)

    return _time(jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), variables, x,
                 rounds=QUICK_ROUNDS if quick else ROUNDS)

  rows = []
  t1 = step_time(MoE(**kw), 1, jax.devices()[:1])
  params = dict(experts=8, k=2, d_model=d, hidden=h, tokens_per_device=tokens, mode="fwd_bwd")
  for n in counts:
    mesh = pmesh.make_mesh(f"expert={n}", jax.devices()[:n])
    tn = step_time(MoE(**kw, mesh=mesh, expert_axis="expert"), n, jax.devices()[:n])
    case = f"expert-parallel MoE n{n} tokens/gpu {tokens} d{d}"
    rows.append(harness.Row(case=case, params=dict(params, devices=1),
                            implementation="one device (its tokens)", median_s=t1,
                            throughput=tokens / t1, unit="tokens/s"))
    rows.append(harness.Row(case=case, params=dict(params, devices=n),
                            implementation="jaxeff:expert_parallel", median_s=tn,
                            throughput=n * tokens / tn, unit="tokens/s",
                            extra=dict(efficiency=t1 / tn)))
    print(f"  expert-parallel MoE n{n}: {n * tokens / tn:12,.0f} tokens/s, weak-scaling "
          f"efficiency {t1 / tn:.1%}")
  return rows


def run(quick: bool = False) -> list[harness.Row]:
  deadline = time.perf_counter() + float(os.environ.get("JAXEFF_BENCH_DEADLINE_S", "inf"))
  rows = overhead_rows(quick)
  count = jax.device_count()
  if count == 1:
    print("parallel suite: one device: the scaling cases need several; skipped")
    return rows
  counts = [n for n in (2, 4, 8) if n <= count]
  for fn in (collective_matmul_rows, ring_attention_rows, pipeline_rows, expert_parallel_rows,
             weak_scaling_rows):
    if time.perf_counter() > deadline:
      print(f"parallel suite: deadline reached, {fn.__name__} not run")
      continue
    try:
      rows += fn(quick, counts)
    except Exception as e:  # keep the other cases' rows
      print(f"  ! {fn.__name__}: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
  return rows
