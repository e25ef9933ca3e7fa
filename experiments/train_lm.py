"""Train a byte-level GPT language model (the project's main experiment).

``python -m experiments.train_lm --preset cpu-small [--data PATH] [--steps N] ...``

The loop follows MaxText: one pure ``train_step(state, batch) -> (state, metrics)`` jitted
once with explicit ``in_shardings``/``out_shardings`` over a data-parallel mesh of all local
devices (axis ``"data"``: parameters and optimizer state replicated, batches split along
the batch axis) and the state donated.

``--mesh data=2,tensor=2,sequence=2`` (any of ``data``, ``fsdp``, ``pipeline``, ``expert``,
``sequence``, ``tensor``; ``-1`` = the rest) trains the same model (same parameter tree,
same seed, the same loss curve to float tolerance) through :mod:`jaxeff.parallel.gpt`: a
``shard_map`` with FSDP, Megatron tensor, ring-attention sequence and GPipe pipeline
parallelism, parameters and optimizer state sharded by the logical-axis rules of
:mod:`jaxeff.parallel.mesh` (``--sequence-parallel``, ``--collective-matmul``,
``--context ring|ulysses``, ``--microbatches N`` tune it). AdamW (Loshchilov & Hutter, 2019) with linear
warm-up and cosine decay and global-norm gradient clipping; bf16 compute optional.

A run folder (``--out``, default ``runs/<preset>-<time>``) receives ``config.json``,
``metrics.jsonl`` (one JSON object per step and per evaluation), Orbax checkpoints
(``checkpoints/<step>``, every ``--checkpoint-every`` steps and at the end, the last
``--keep-checkpoints`` kept), ``sample.txt`` and ``summary.json``. ``--resume RUN`` continues
a run from its newest checkpoint with the same configuration (flags given again override
it, e.g. ``--steps``); batches depend only on the step, so the loss curve after a restart
is the one an uninterrupted run draws.

Bad input (missing data, empty corpus, unknown preset, batch not divisible by the number
of devices, sequence length out of range, a folder that is not a checkpoint or is corrupt,
values out of range) is reported as one line and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from experiments import checkpoint as ckpt
from experiments import data as data_lib
from experiments import generate as gen
from jaxeff.models import gpt, hyena
from jaxeff.parallel import gpt as pgpt
from jaxeff.parallel import mesh as pmesh
from jaxeff.parallel import pipeline as pipeline_lib

DATA_AXIS = "data"

# Dense bf16 peak FLOP/s by device kind substring (for MFU); None elsewhere (CPU: "n/a").
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "GH200": 989e12, "A100": 312e12}


class ConfigError(ValueError):
  """A command-line/config value that cannot be used (reported as one line)."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything a training run needs; presets fill the values not given on the CLI."""

  preset: str = "cpu-small"
  data: str | None = None  # None: the Python standard library's sources
  steps: int = 200
  batch_size: int = 64
  seq_len: int = 64
  lr: float = 3e-3
  min_lr_ratio: float = 0.1
  warmup_steps: int = 20
  weight_decay: float = 0.1
  beta1: float = 0.9
  beta2: float = 0.95
  grad_clip: float = 1.0
  moe_aux_weight: float = 0.01  # MoE presets: load-balancing loss weight (Switch)
  moe_z_weight: float = 1e-3  # MoE presets: router z-loss weight (ST-MoE)
  dtype: str | None = None  # overrides the model preset's compute dtype
  remat: bool | None = None
  attention: str | None = None  # attention implementation (None: jaxeff picks)
  model_overrides: tuple[tuple[str, Any], ...] = ()
  seed: int = 0
  val_fraction: float = 0.05
  eval_every: int = 100
  eval_batches: int = 4
  log_every: int = 20
  checkpoint_every: int = 100
  keep_checkpoints: int = 3
  out: str | None = None
  resume: str | None = None
  stop_at: int | None = None  # stop early (checkpointed) after this step, like a preemption
  sample_prompt: str = "def "
  sample_tokens: int = 200
  sample_temperature: float = 0.8
  mesh: str | None = None  # "data=2,tensor=2,...": the shard_map path (None: data parallel)
  sequence_parallel: bool = False
  collective_matmul: bool = False
  context: str = "ring"
  microbatches: int = 0

  def parallel_options(self) -> pgpt.ParallelOptions:
    """The :class:`jaxeff.parallel.gpt.ParallelOptions` of a ``--mesh`` run."""
    try:
      return pgpt.ParallelOptions(sequence_parallel=self.sequence_parallel,
                                  collective_matmul=self.collective_matmul,
                                  context=self.context, microbatches=self.microbatches)
    except ValueError as e:
      raise ConfigError(f"--mesh options: {e}") from None

  def model_config(self) -> gpt.GPTConfig:
    """The model preset with this run's overrides applied."""
    base = family(self.preset).PRESETS[self.preset]
    changes = dict(self.model_overrides)
    if self.dtype is not None:
      changes["dtype"] = self.dtype
    if self.remat is not None:
      changes["remat"] = self.remat
    if self.attention is not None:
      if isinstance(base, hyena.HyenaConfig):
        raise ConfigError(f"--attention: preset {self.preset!r} is a Hyena model (no attention)")
      changes["attention_implementation"] = None if self.attention == "auto" else self.attention
    return base.replace(**changes)


# Training defaults per preset (the model shape comes from jaxeff.models.gpt.PRESETS).
TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(steps=40, batch_size=8, seq_len=64, lr=3e-3, warmup_steps=5, eval_every=20,
                 eval_batches=2, log_every=10, checkpoint_every=20, sample_tokens=32),
    "cpu-small": dict(steps=200, batch_size=64, seq_len=64, lr=3e-3, warmup_steps=20,
                      eval_every=100, eval_batches=4, log_every=20, checkpoint_every=100),
    "gpt-125m": dict(steps=2000, batch_size=16, seq_len=2048, lr=6e-4, warmup_steps=200,
                     eval_every=500, eval_batches=8, log_every=10, checkpoint_every=1000),
    "gpt-350m": dict(steps=2000, batch_size=8, seq_len=2048, lr=3e-4, warmup_steps=200,
                     eval_every=500, eval_batches=8, log_every=10, checkpoint_every=1000),
}
# Mixture-of-experts GPT and Hyena presets train like their dense / GPT counterparts
# (Hyena has no KV cache for the end-of-run sample).
TRAIN_PRESETS["moe-tiny"] = dict(TRAIN_PRESETS["tiny"])
TRAIN_PRESETS["moe-cpu-small"] = dict(TRAIN_PRESETS["cpu-small"])
TRAIN_PRESETS["hyena-tiny"] = dict(TRAIN_PRESETS["tiny"], sample_tokens=0)
TRAIN_PRESETS["hyena-cpu-small"] = dict(TRAIN_PRESETS["cpu-small"], sample_tokens=0)
TRAIN_PRESETS["hyena-160m"] = dict(steps=2000, batch_size=8, seq_len=8192, lr=6e-4,
                                   warmup_steps=200, eval_every=500, eval_batches=8,
                                   log_every=10, checkpoint_every=1000, sample_tokens=0)


def family(preset: str):
  """The model module of a preset: :mod:`jaxeff.models.hyena` for ``hyena-*`` presets,
  :mod:`jaxeff.models.gpt` otherwise (same interface: ``PRESETS``, ``num_params``,
  ``flops_per_token``, a config with ``to_dict``/``from_dict``/``replace``)."""
  return hyena if preset.startswith("hyena") else gpt


def make_model(model_cfg):
  """The Flax module of a model config (GPT or Hyena)."""
  return hyena.HyenaLM(model_cfg) if isinstance(model_cfg, hyena.HyenaConfig) else gpt.GPT(model_cfg)


def preset_config(preset: str, **changes) -> TrainConfig:
  """A :class:`TrainConfig` from a preset name and explicit changes."""
  if preset not in TRAIN_PRESETS or preset not in family(preset).PRESETS:
    raise ConfigError(f"--preset: unknown preset {preset!r}; choose one of "
                      f"{sorted(TRAIN_PRESETS)}")
  values = {**TRAIN_PRESETS[preset], **changes}
  if "steps" in changes and "warmup_steps" not in changes:  # short runs: warm up for 10%
    values["warmup_steps"] = min(values["warmup_steps"], max(changes["steps"] // 10, 0))
  return TrainConfig(preset=preset, **values)


def validate(cfg: TrainConfig, model_cfg: gpt.GPTConfig, num_devices: int) -> None:
  """Raises ConfigError (one line, naming the flag) for values out of range."""
  def need(ok, flag, value, expected):
    if not ok:
      raise ConfigError(f"{flag}: got {value!r}, expected {expected}")

  need(cfg.steps >= 1, "--steps", cfg.steps, "an integer >= 1")
  need(cfg.batch_size >= 1, "--batch-size", cfg.batch_size, "an integer >= 1")
  need(1 <= cfg.seq_len <= model_cfg.max_seq_len, "--seq-len", cfg.seq_len,
       f"1 <= seq_len <= {model_cfg.max_seq_len} (max_seq_len of preset {cfg.preset!r})")
  need(cfg.lr > 0 and math.isfinite(cfg.lr), "--lr", cfg.lr, "a positive number")
  need(0 <= cfg.min_lr_ratio <= 1, "--min-lr-ratio", cfg.min_lr_ratio, "a number in [0, 1]")
  need(0 <= cfg.warmup_steps <= cfg.steps, "--warmup-steps", cfg.warmup_steps,
       f"0 <= warmup_steps <= steps ({cfg.steps})")
  need(cfg.weight_decay >= 0, "--weight-decay", cfg.weight_decay, "a number >= 0")
  need(0 <= cfg.beta1 < 1 and 0 <= cfg.beta2 < 1, "--beta1/--beta2", (cfg.beta1, cfg.beta2),
       "numbers in [0, 1)")
  need(cfg.grad_clip > 0, "--grad-clip", cfg.grad_clip, "a positive number")
  need(0 < cfg.val_fraction < 1, "--val-fraction", cfg.val_fraction, "a number in (0, 1)")
  for flag, v in (("--eval-every", cfg.eval_every), ("--eval-batches", cfg.eval_batches),
                  ("--log-every", cfg.log_every), ("--checkpoint-every", cfg.checkpoint_every),
                  ("--keep-checkpoints", cfg.keep_checkpoints)):
    need(v >= 1, flag, v, "an integer >= 1")
  need(cfg.stop_at is None or 1 <= cfg.stop_at <= cfg.steps, "--stop-at", cfg.stop_at,
       f"1 <= stop_at <= steps ({cfg.steps})")
  need(cfg.sample_tokens >= 0, "--sample-tokens", cfg.sample_tokens, "an integer >= 0")
  need(cfg.sample_temperature >= 0, "--sample-temperature", cfg.sample_temperature,
       "a number >= 0 (0 = greedy)")
  need(model_cfg.vocab_size >= data_lib.VOCAB_SIZE, "--model vocab_size", model_cfg.vocab_size,
       f">= {data_lib.VOCAB_SIZE} for byte tokens")
  if cfg.mesh is None and cfg.batch_size % num_devices:
    raise ConfigError(f"--batch-size: {cfg.batch_size} is not divisible by the number of devices "
                      f"({num_devices}) of the data-parallel mesh; use a multiple of "
                      f"{num_devices}")
  if cfg.sample_tokens and not isinstance(model_cfg, gpt.GPTConfig):
    raise ConfigError("--sample-tokens: Hyena presets have no KV cache to sample with; "
                      "use --sample-tokens 0")
  if cfg.sample_tokens and not cfg.sample_prompt.encode():
    raise ConfigError("--sample-prompt: must not be empty when --sample-tokens > 0")


# ----------------------------------------------------------------------------- the step


@flax.struct.dataclass
class TrainState:
  """Step counter, parameters and optimizer state (a pytree; donated to each step)."""

  step: jax.Array
  params: Any
  opt_state: Any


def make_optimizer(cfg: TrainConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with warm-up + cosine decay and global-norm clipping; no decay on vectors."""
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.lr, warmup_steps=cfg.warmup_steps,
      decay_steps=max(cfg.steps, cfg.warmup_steps + 1), end_value=cfg.lr * cfg.min_lr_ratio)
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
  tx = optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip),
      optax.adamw(schedule, b1=cfg.beta1, b2=cfg.beta2, weight_decay=cfg.weight_decay,
                  mask=decay_mask))
  return tx, schedule


def validate_mesh(cfg: TrainConfig, model_cfg: gpt.GPTConfig, mesh: Mesh) -> None:
  """Raises ConfigError when the ``--mesh`` run cannot split the model or the batch."""
  try:
    if not isinstance(model_cfg, gpt.GPTConfig) or model_cfg.num_experts:
      raise ValueError("--mesh supports dense GPT presets only (not Hyena or MoE models yet)")
    pgpt.check_shapes(model_cfg, mesh, cfg.parallel_options(), cfg.batch_size, cfg.seq_len)
    shapes = jax.eval_shape(lambda: make_model(model_cfg).init(
        jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    pgpt.param_specs(shapes, mesh, cfg.parallel_options())
  except ValueError as e:
    raise ConfigError(f"--mesh {cfg.mesh}: {e}") from None


def build_mesh(cfg: TrainConfig) -> Mesh:
  """The run's mesh: data parallel over all devices, or ``--mesh`` (jaxeff.parallel)."""
  if cfg.mesh is None:
    return make_mesh()
  try:
    return pmesh.make_mesh(cfg.mesh)
  except ValueError as e:
    raise ConfigError(f"--mesh: {e}") from None


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D data-parallel mesh over ``devices`` (default: every device of every process;
  with one process, all local devices)."""
  devices = list(devices) if devices is not None else jax.devices()
  return Mesh(np.array(devices), (DATA_AXIS,))


def put_batch(batch, sharding: NamedSharding):
  """Places a host batch (the same global batch on every process) on ``sharding``.

  With several processes (a pod) each process supplies only the shards its own devices
  hold; batches are a function of the step alone, so every process agrees on them.
  """
  if jax.process_count() == 1:
    return jax.device_put(batch, sharding)
  return jax.tree.map(
      lambda x: jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx]), batch)


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean next-token cross-entropy (nats): logits ``[b, s, vocab]``, targets ``[b, s]``."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def _init_tree(model: gpt.GPT, tx: optax.GradientTransformation, key: jax.Array) -> TrainState:
  params = model.init(key, jnp.zeros((1, 8), jnp.int32))["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def abstract_state(model: gpt.GPT, tx: optax.GradientTransformation, mesh: Mesh,
                   shardings: TrainState | None = None) -> TrainState:
  """Shapes, dtypes and shardings (default: replicated) of a fresh :class:`TrainState`."""
  replicated = NamedSharding(mesh, P())
  shapes = jax.eval_shape(lambda: _init_tree(model, tx, jax.random.key(0)))
  if shardings is None:
    shardings = jax.tree.map(lambda _: replicated, shapes)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      shapes, shardings)


def state_shardings(model: gpt.GPT, tx: optax.GradientTransformation, mesh: Mesh,
                    options: pgpt.ParallelOptions) -> TrainState:
  """Shardings of a :class:`TrainState` on a ``--mesh``: parameters by the logical-axis
  rules, each optimizer-state tree like its parameters (ZeRO), the rest replicated."""
  replicated = NamedSharding(mesh, P())
  shapes = jax.eval_shape(lambda: _init_tree(model, tx, jax.random.key(0)))
  params = pgpt.param_shardings(shapes.params, mesh, options)
  opt = optax.tree_map_params(tx, lambda _, s: s, shapes.opt_state, params,
                              transform_non_params=lambda _: replicated)
  return TrainState(step=replicated, params=params, opt_state=opt)


def moe_losses(intermediates) -> tuple[jax.Array, jax.Array]:
  """Sums of the MoE layers' sown ``load_balancing_loss`` and ``router_z_loss``."""
  lb, z = jnp.float32(0), jnp.float32(0)
  for path, v in jax.tree_util.tree_leaves_with_path(intermediates):
    name = jax.tree_util.keystr(path)
    if "load_balancing_loss" in name:
      lb = lb + v
    elif "router_z_loss" in name:
      z = z + v
  return lb, z


def make_train_step(model: gpt.GPT, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    mesh: Mesh, aux_weights: tuple[float, float] = (0.0, 0.0)):
  """``train_step(state, batch) -> (state, metrics)`` jitted over ``mesh``, state donated.

  ``batch``: ``{"inputs", "targets"}`` int32 ``[batch, seq]`` split over the ``data`` axis.
  ``metrics``: scalar ``loss`` (mean nats/token), ``grad_norm`` (before clipping), ``lr``;
  for MoE models also the summed ``moe_load_balancing`` and ``moe_router_z`` losses, which
  enter the optimized loss with ``aux_weights`` (the logged ``loss`` is cross-entropy).
  """
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P(DATA_AXIS))
  is_moe = bool(getattr(model.config, "num_experts", 0))

  def train_step(state: TrainState, batch: dict[str, jax.Array]):
    def loss_fn(params):
      if not is_moe:
        logits = model.apply({"params": params}, batch["inputs"])
        loss = cross_entropy(logits, batch["targets"])
        return loss, (loss, jnp.float32(0), jnp.float32(0))
      logits, inter = model.apply({"params": params}, batch["inputs"], mutable=["intermediates"])
      ce = cross_entropy(logits, batch["targets"])
      lb, z = moe_losses(inter)
      return ce + aux_weights[0] * lb + aux_weights[1] * z, (ce, lb, z)

    (_, (loss, lb, z)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32)))
                             for g in jax.tree.leaves(grads)))
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state.step)}
    if is_moe:
      metrics.update(moe_load_balancing=lb, moe_router_z=z)
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return jax.jit(train_step, in_shardings=(replicated, batch_sharding),
                 out_shardings=(replicated, replicated), donate_argnums=(0,))


def make_eval_step(model: gpt.GPT, mesh: Mesh):
  """``eval_step(params, batch) -> mean loss`` of one batch, jitted over ``mesh``."""
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P(DATA_AXIS))

  def eval_step(params, batch):
    return cross_entropy(model.apply({"params": params}, batch["inputs"]), batch["targets"])

  return jax.jit(eval_step, in_shardings=(replicated, batch_sharding), out_shardings=replicated)


OPTIMIZER_FIELDS = ("steps", "lr", "min_lr_ratio", "warmup_steps", "weight_decay", "beta1", "beta2",
                    "grad_clip", "moe_aux_weight", "moe_z_weight")


@dataclasses.dataclass(frozen=True)
class Programs:
  """The model, optimizer and jitted programs of one (model, optimizer, mesh) setting."""

  model: gpt.GPT
  tx: optax.GradientTransformation
  init: Any        # key -> TrainState (replicated)
  train_step: Any  # (state, batch) -> (state, metrics)
  eval_step: Any   # (params, batch) -> loss
  state_shardings: Any = None     # TrainState of NamedShardings (None: replicated)
  batch_sharding: Any = None      # NamedSharding of a batch (None: split over "data")


def programs(model_cfg: gpt.GPTConfig, cfg: TrainConfig, mesh: Mesh) -> Programs:
  """Builds (once per process and setting) the jitted init/train/eval programs.

  Reusing the same jitted functions lets JAX reuse their compilations when a process
  trains the same setting again (a resumed run, tests).
  """
  opt_values = tuple(getattr(cfg, f) for f in OPTIMIZER_FIELDS)
  if cfg.mesh is not None:
    return _parallel_programs(model_cfg, opt_values, mesh, cfg.parallel_options())
  return _programs(model_cfg, opt_values, mesh)


def _loss_and_grads(loss_fn, params, batch):
  return jax.value_and_grad(loss_fn)(params, batch["inputs"], batch["targets"])


@functools.lru_cache(maxsize=8)
def _parallel_programs(model_cfg: gpt.GPTConfig, opt_values: tuple, mesh: Mesh,
                       options: pgpt.ParallelOptions) -> Programs:
  """Programs of a ``--mesh`` run: the loss of :func:`jaxeff.parallel.gpt.make_loss_fn`."""
  model = make_model(model_cfg)
  train_cfg = TrainConfig(**dict(zip(OPTIMIZER_FIELDS, opt_values)))
  tx, schedule = make_optimizer(train_cfg)
  loss_fn = pgpt.make_loss_fn(model_cfg, mesh, options)
  shardings = state_shardings(model, tx, mesh, options)
  replicated = NamedSharding(mesh, P())
  batch_axes = tuple(a for a in ("data", "fsdp", "expert") if pmesh.axis_size(mesh, a) > 1)
  batch_sharding = NamedSharding(mesh, P(batch_axes or None))

  def train_step(state: TrainState, batch: dict[str, jax.Array]):
    loss, grads = _loss_and_grads(loss_fn, state.params, batch)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32)))
                             for g in jax.tree.leaves(grads)))
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state.step)}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  def eval_step(params, batch):
    return loss_fn(params, batch["inputs"], batch["targets"])

  init = jax.jit(lambda key: _init_tree(model, tx, key), out_shardings=shardings)
  return Programs(
      model=model, tx=tx, init=init,
      train_step=jax.jit(train_step, in_shardings=(shardings, batch_sharding),
                         out_shardings=(shardings, replicated), donate_argnums=(0,)),
      eval_step=jax.jit(eval_step, in_shardings=(shardings.params, batch_sharding),
                        out_shardings=replicated),
      state_shardings=shardings, batch_sharding=batch_sharding)


@functools.lru_cache(maxsize=8)
def _programs(model_cfg: gpt.GPTConfig, opt_values: tuple, mesh: Mesh) -> Programs:
  model = make_model(model_cfg)
  opt = dict(zip(OPTIMIZER_FIELDS, opt_values))
  tx, schedule = make_optimizer(TrainConfig(**opt))
  init = jax.jit(lambda key: _init_tree(model, tx, key), out_shardings=NamedSharding(mesh, P()))
  return Programs(model=model, tx=tx, init=init,
                  train_step=make_train_step(model, tx, schedule, mesh, aux_weights=(
                      opt["moe_aux_weight"], opt["moe_z_weight"])),
                  eval_step=make_eval_step(model, mesh))


def peak_flops(device: jax.Device) -> float | None:
  """Dense bf16 peak FLOP/s of ``device`` when known, else None."""
  if device.platform == "cpu":
    return None
  return next((v for k, v in PEAK_FLOPS.items() if k in device.device_kind), None)


# ----------------------------------------------------------------------------- the run


def _fmt_count(x: float) -> str:
  for unit, div in (("M", 1e6), ("k", 1e3)):
    if abs(x) >= div:
      return f"{x / div:.1f}{unit}"
  return f"{x:.0f}"


def _fmt_time(s: float) -> str:
  s = int(round(s))
  return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _bar(frac: float, width: int = 20) -> str:
  n = int(round(frac * width))
  return "[" + "#" * n + "." * (width - n) + "]"


def _write_json(path: Path, obj: Any) -> None:
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n")
  os.replace(tmp, path)


def _trim_metrics(path: Path, last_step: int) -> None:
  """Drops lines past ``last_step`` (written after the checkpoint a run resumes from)."""
  if not path.exists():
    return
  keep = [ln for ln in path.read_text().splitlines()
          if ln.strip() and json.loads(ln).get("step", 0) <= last_step]
  path.write_text("".join(ln + "\n" for ln in keep))


def evaluate(eval_step, params, batches, batch_sharding) -> float:
  losses = [eval_step(params, put_batch(b, batch_sharding)) for b in batches]
  return float(np.mean(jax.device_get(losses)))


def train(cfg: TrainConfig, *, log=print) -> dict[str, Any]:
  """Runs training as configured and returns the summary (also written to summary.json)."""
  t_start = time.perf_counter()
  model_cfg = cfg.model_config()
  mesh = build_mesh(cfg)
  validate(cfg, model_cfg, mesh.size)
  if cfg.mesh is not None:
    validate_mesh(cfg, model_cfg, mesh)

  start_step, resume_dir = 0, None
  if cfg.resume is not None:
    resume_dir = ckpt.resolve_dir(cfg.resume)
    meta = ckpt.read_meta(cfg.resume)
    saved = type(model_cfg).from_dict(meta["model"])
    if saved != model_cfg:
      diff = [f"{k}: {v} (checkpoint) vs {getattr(model_cfg, k)}"
              for k, v in saved.to_dict().items() if getattr(model_cfg, k) != v]
      raise ConfigError(f"--resume: the checkpoint's model differs from this run's: "
                        f"{'; '.join(diff)}")
    start_step = int(meta["step"])

  dataset = data_lib.load_dataset(cfg.data, val_fraction=cfg.val_fraction)
  dataset.check_seq_len(cfg.seq_len)

  if cfg.out:
    out = Path(cfg.out)
  elif resume_dir is not None and resume_dir.name == "checkpoints":
    out = resume_dir.parent  # continue in the resumed run's folder
  else:
    out = Path("runs") / f"{cfg.preset}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"
  out.mkdir(parents=True, exist_ok=True)
  ckpt_dir = out / "checkpoints"
  progs = programs(model_cfg, cfg, mesh)
  model, tx = progs.model, progs.tx
  replicated = NamedSharding(mesh, P())
  batch_sharding = progs.batch_sharding or NamedSharding(mesh, P(DATA_AXIS))

  if cfg.resume is not None:
    target = abstract_state(model, tx, mesh, progs.state_shardings)
    params, opt_state, _ = ckpt.restore(cfg.resume, abstract_params=target.params,
                                        abstract_opt_state=target.opt_state, step=start_step)
    state = TrainState(step=jax.device_put(jnp.int32(start_step), replicated), params=params,
                       opt_state=opt_state)
  else:
    state = progs.init(jax.random.key(cfg.seed))

  device = jax.devices()[0]
  fam = family(cfg.preset)
  n_params = fam.num_params(model_cfg)
  fpt = fam.flops_per_token(model_cfg, cfg.seq_len)
  peak = peak_flops(device)
  run_info = {"train": dataclasses.asdict(cfg), "model": model_cfg.to_dict(),
              "data": {"description": dataset.description, "fingerprint": dataset.fingerprint,
                       "train_bytes": len(dataset.train), "val_bytes": len(dataset.val)},
              "device": device.device_kind, "num_devices": mesh.size,
              "mesh": pmesh.mesh_sizes(mesh) if cfg.mesh is not None else None,
              "jax_version": jax.__version__, "params": n_params,
              "params_non_embedding": fam.num_params(model_cfg, non_embedding=True),
              "flops_per_token": fpt}
  _write_json(out / "config.json", run_info)
  metrics_path = out / "metrics.jsonl"
  if cfg.resume is not None:
    _trim_metrics(metrics_path, start_step)
  elif metrics_path.exists():
    metrics_path.unlink()
  checkpointer = ckpt.Checkpointer(ckpt_dir, keep=cfg.keep_checkpoints, every=cfg.checkpoint_every)
  meta = {"model": model_cfg.to_dict(), "train": dataclasses.asdict(cfg),
          "data_fingerprint": dataset.fingerprint}

  if isinstance(model_cfg, gpt.GPTConfig):
    shape = (f"{model_cfg.num_layers} layers, d {model_cfg.d_model}, {model_cfg.num_heads} "
             f"heads / {model_cfg.kv_heads} kv of {model_cfg.dim_per_head}"
             + (f", {model_cfg.num_experts} experts top-{model_cfg.experts_per_token}"
                if model_cfg.num_experts else ""))
  else:
    shape = f"Hyena, {model_cfg.num_layers} layers, d {model_cfg.d_model}, order {model_cfg.order}"
  log(f"train_lm: preset {cfg.preset}, {n_params / 1e6:.2f}M params ({shape}), {model_cfg.dtype}")
  log(f"  data: {dataset.description}: {len(dataset.train):,} train / {len(dataset.val):,} "
      f"val bytes")
  mesh_text = "" if cfg.mesh is None else " (mesh " + ",".join(
      f"{a}={n}" for a, n in pmesh.mesh_sizes(mesh).items() if n > 1) + ")"
  stages = pmesh.axis_size(mesh, "pipeline") if cfg.mesh is not None else 1
  if stages > 1:
    micro = cfg.microbatches or stages
    bubble = pipeline_lib.bubble_fraction("gpipe", stages, micro)
    run_info["pipeline"] = {"schedule": "gpipe", "stages": stages, "microbatches": micro,
                            "bubble_fraction": bubble}
    _write_json(out / "config.json", run_info)
    mesh_text += f"; GPipe {stages} stages x {micro} microbatches, bubble {bubble:.1%}"
  log(f"  {cfg.steps} steps x batch {cfg.batch_size} x seq {cfg.seq_len} on {mesh.size} x "
      f"{device.device_kind}{mesh_text}; run folder {out}"
      + (f"; resuming at step {start_step}" if start_step else ""))

  eval_step = progs.eval_step
  val = data_lib.val_batches(dataset, num_batches=cfg.eval_batches, batch_size=cfg.batch_size,
                             seq_len=cfg.seq_len)
  get_batch = lambda s: put_batch(data_lib.train_batch(  # noqa: E731
      dataset, s, batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=cfg.seed), batch_sharding)

  t0 = time.perf_counter()
  train_step = progs.train_step.lower(state, get_batch(start_step)).compile()
  compile_s = time.perf_counter() - t0
  log(f"  compiled train_step in {compile_s:.1f}s (state and data ready after "
      f"{t0 - t_start:.1f}s)")

  tokens_per_step = cfg.batch_size * cfg.seq_len
  end_step = cfg.stop_at if cfg.stop_at is not None else cfg.steps
  history: list[dict[str, Any]] = []
  pending: list[tuple[int, dict]] = []
  train_time, window_t0, window_steps = 0.0, time.perf_counter(), 0
  val_loss = None
  step = start_step
  interrupted = False
  with open(metrics_path, "a") as mf:
    def flush():
      nonlocal window_t0, window_steps, train_time
      host = jax.device_get([m for _, m in pending])
      dt = time.perf_counter() - window_t0
      train_time += dt
      tps = window_steps * tokens_per_step / dt if dt > 0 else math.nan
      mfu = tps * fpt / (peak * mesh.size) if peak else None
      for (s, _), m in zip(pending, host):
        rec = {"step": s, **{k: float(v) for k, v in m.items()}}
        history.append(rec)
        if s == pending[-1][0]:
          rec.update(tokens_per_s=tps, mfu=mfu, elapsed_s=time.perf_counter() - t_start)
        mf.write(json.dumps(rec) + "\n")
      mf.flush()
      last = history[-1]
      log(f"step {last['step']:>6}/{cfg.steps} {_bar(last['step'] / cfg.steps)} "
          f"loss {last['loss']:.4f}  lr {last['lr']:.2e}  {_fmt_count(tps)} tok/s  "
          f"MFU {'n/a' if mfu is None else f'{mfu:.1%}'}  "
          f"eta {_fmt_time((cfg.steps - last['step']) * dt / max(window_steps, 1))}")
      pending.clear()
      window_t0, window_steps = time.perf_counter(), 0

    try:
      for step in range(start_step, end_step):
        state, metrics = train_step(state, get_batch(step))
        pending.append((step + 1, metrics))
        window_steps += 1
        done = step + 1
        if done % cfg.log_every == 0 or done == end_step:
          flush()
        if done % cfg.eval_every == 0 and done != cfg.steps:
          t_eval = time.perf_counter()
          val_loss = evaluate(eval_step, state.params, val, batch_sharding)
          mf.write(json.dumps({"step": done, "val_loss": val_loss,
                               "val_ppl": math.exp(val_loss)}) + "\n")
          mf.flush()
          log(f"  eval @ {done}: val loss {val_loss:.4f}  ppl {math.exp(val_loss):.3f}")
          window_t0 += time.perf_counter() - t_eval
        if done != end_step and checkpointer.should_save(done):
          t_ck = time.perf_counter()
          checkpointer.save(done, state.params, state.opt_state, meta)
          window_t0 += time.perf_counter() - t_ck
      step = end_step
    except KeyboardInterrupt:
      interrupted = True
      if pending:
        flush()
      step = int(jax.device_get(state.step))
      log(f"  interrupted: saving a checkpoint at step {step} (resume with --resume {out})")
    finished = step == cfg.steps
    if finished:
      val_loss = evaluate(eval_step, state.params, val, batch_sharding)
      mf.write(json.dumps({"step": step, "val_loss": val_loss,
                           "val_ppl": math.exp(val_loss)}) + "\n")
  checkpointer.save(step, state.params, state.opt_state, meta, force=True)
  checkpointer.close()

  recent = [h["loss"] for h in history[-cfg.log_every:]]
  summary = {
      "run_folder": str(out), "checkpoint": str(ckpt_dir / str(step)), "step": step,
      "finished": finished, "interrupted": interrupted,
      "final_train_loss": float(np.mean(recent)) if recent else None,
      "last_train_loss": history[-1]["loss"] if history else None,
      "first_train_loss": history[0]["loss"] if history else None,
      "val_loss": val_loss if finished else None,
      "val_ppl": math.exp(val_loss) if finished and val_loss is not None else None,
      "tokens_per_s": (step - start_step) * tokens_per_step / train_time if train_time else None,
      "compile_s": compile_s, "params": n_params, "device": device.device_kind,
      "num_devices": mesh.size,
  }
  if summary["tokens_per_s"] and peak:
    summary["mfu"] = summary["tokens_per_s"] * fpt / (peak * mesh.size)

  if finished and cfg.sample_tokens > 0:
    prompt = list(cfg.sample_prompt.encode())
    sample_params = state.params
    if cfg.mesh is not None:  # generation runs unsharded: gather the parameters
      sample_params = jax.jit(lambda p: p, out_shardings=replicated)(state.params)
    res = gen.generate(model_cfg, sample_params, [prompt], gen.SamplingConfig(
        max_new_tokens=cfg.sample_tokens, temperature=cfg.sample_temperature, seed=cfg.seed))
    text = cfg.sample_prompt + gen.decode_bytes(res.tokens[0])
    (out / "sample.txt").write_text(text + "\n")
    summary.update(sample=text, sample_tokens_per_s=res.tokens_per_s,
                   sample_time_to_first_token_s=res.time_to_first_token_s)
    log(f"--- sample (temperature {cfg.sample_temperature}, {res.tokens_per_s:,.0f} tokens/s, "
        f"first token {res.time_to_first_token_s * 1e3:.0f} ms) ---")
    log(text)
    log("---")
  summary["wall_s"] = time.perf_counter() - t_start
  _write_json(out / "summary.json", summary)

  log("summary:")
  if summary["final_train_loss"] is not None:
    log(f"  train loss   {summary['first_train_loss']:.4f} -> {summary['final_train_loss']:.4f} "
        f"(mean of the last {len(recent)} steps)")
  if summary["val_loss"] is not None:
    log(f"  val loss     {summary['val_loss']:.4f} nats/byte, perplexity {summary['val_ppl']:.3f}"
        f" ({summary['val_loss'] / math.log(2):.3f} bits/byte)")
  if summary["tokens_per_s"]:
    mfu = summary.get("mfu")
    log(f"  throughput   {summary['tokens_per_s']:,.0f} tokens/s, MFU "
        f"{'n/a' if mfu is None else f'{mfu:.1%}'} (compile {compile_s:.1f}s)")
  log(f"  wall time    {_fmt_time(summary['wall_s'])}; step {step}/{cfg.steps}"
      + ("" if finished else " (stopped early; continue with --resume)"))
  log(f"  run folder   {out} (checkpoint {summary['checkpoint']})")
  return summary


# ----------------------------------------------------------------------------- CLI

_FLAGS = {  # dest: (type, help)
    "data": (str, "text file or directory (default: the Python stdlib sources)"),
    "steps": (int, "total training steps"),
    "batch_size": (int, "global batch size (split over the devices)"),
    "seq_len": (int, "tokens per sequence"),
    "lr": (float, "peak learning rate"),
    "min_lr_ratio": (float, "final learning rate as a fraction of --lr"),
    "warmup_steps": (int, "linear warm-up steps"),
    "weight_decay": (float, "AdamW weight decay (matrices only)"),
    "beta1": (float, "AdamW beta1"),
    "beta2": (float, "AdamW beta2"),
    "grad_clip": (float, "global gradient-norm clip"),
    "moe_aux_weight": (float, "MoE presets: weight of the load-balancing loss"),
    "moe_z_weight": (float, "MoE presets: weight of the router z-loss"),
    "dtype": (str, "compute dtype: float32 or bfloat16 (default: the preset's)"),
    "attention": (str, "attention implementation: auto, xla, cudnn, ... (default: auto)"),
    "seed": (int, "initialisation and data-order seed"),
    "val_fraction": (float, "fraction of the corpus held out for validation"),
    "eval_every": (int, "validate every N steps"),
    "eval_batches": (int, "validation batches per evaluation"),
    "log_every": (int, "print a progress line every N steps"),
    "checkpoint_every": (int, "save a checkpoint every N steps"),
    "keep_checkpoints": (int, "keep the last K checkpoints"),
    "out": (str, "run folder (default: runs/<preset>-<time>)"),
    "stop_at": (int, "stop after this step with a checkpoint (as a preemption would)"),
    "sample_prompt": (str, "prompt for the sample generated at the end"),
    "sample_tokens": (int, "tokens to generate at the end (0: none)"),
    "sample_temperature": (float, "sampling temperature (0: greedy)"),
    "mesh": (str, "parallel mesh, e.g. data=2,tensor=2,sequence=2 (axes data, fsdp, "
                  "pipeline, expert, sequence, tensor; -1 = the rest): jaxeff.parallel"),
    "context": (str, "with --mesh: sequence-parallel attention, ring or ulysses"),
    "microbatches": (int, "with --mesh: pipeline microbatches (default: pipeline size)"),
}


def _parse_override(text: str, config_cls: type = gpt.GPTConfig) -> tuple[str, Any]:
  if "=" not in text:
    raise ConfigError(f"--model: expected KEY=VALUE, got {text!r}")
  k, v = text.split("=", 1)
  fields = {f.name: f for f in dataclasses.fields(config_cls)}
  if k not in fields:
    raise ConfigError(f"--model: unknown model field {k!r}; known: {sorted(fields)}")
  if v.lower() in ("none", "null"):
    return k, None
  if v.lower() in ("true", "false"):
    return k, v.lower() == "true"
  for cast in (int, float):
    try:
      return k, cast(v)
    except ValueError:
      pass
  return k, v


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
  """CLI flags -> TrainConfig (preset defaults, or the resumed run's config, for the rest)."""
  p = argparse.ArgumentParser(prog="python -m experiments.train_lm", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", default=None,
                 help=f"one of {sorted(TRAIN_PRESETS)} (default: cpu-small)")
  for dest, (typ, help_) in _FLAGS.items():
    p.add_argument("--" + dest.replace("_", "-"), dest=dest, type=typ, default=None, help=help_)
  p.add_argument("--remat", action=argparse.BooleanOptionalAction, default=None,
                 help="recompute block activations in the backward pass")
  p.add_argument("--sequence-parallel", action=argparse.BooleanOptionalAction, default=None,
                 help="with --mesh: Megatron sequence parallelism over the tensor axis")
  p.add_argument("--collective-matmul", action=argparse.BooleanOptionalAction, default=None,
                 help="with --mesh --sequence-parallel: overlap collectives with matmuls")
  p.add_argument("--model", action="append", default=None, metavar="KEY=VALUE",
                 help="override a model config field (repeatable), e.g. --model num_layers=2")
  p.add_argument("--resume", nargs="?", const="", default=None, metavar="RUN",
                 help="continue from the newest checkpoint of RUN (a run or checkpoint folder; "
                      "alone: the --out folder)")
  p.add_argument("--distributed", action="store_true", default=None,
                 help="multi-host run (pods): call jax.distributed.initialize() first, which "
                      "reads the cluster from the environment (TPU pods, SLURM, "
                      "JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID)")
  args = p.parse_args(argv)
  given = {k: v for k, v in vars(args).items()
           if v is not None and k not in ("preset", "model", "resume", "distributed")}
  if args.model is not None:
    config_cls = type(next(iter(family(args.preset or "cpu-small").PRESETS.values())))
    given["model_overrides"] = tuple(_parse_override(t, config_cls) for t in args.model)
  if args.resume is not None:
    where = args.resume or args.out
    if not where:
      raise ConfigError("--resume: give the run folder to resume (or --out)")
    meta = ckpt.read_meta(where)
    saved = dict(meta.get("train", {}))
    saved["model_overrides"] = tuple(tuple(x) for x in saved.get("model_overrides", ()))
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    saved = {k: v for k, v in saved.items() if k in names}
    preset = args.preset or saved.get("preset", "cpu-small")
    if preset not in TRAIN_PRESETS:
      raise ConfigError(f"--preset: unknown preset {preset!r}; choose one of "
                        f"{sorted(TRAIN_PRESETS)}")
    # Flags given again override the saved run; out and stop_at are never inherited.
    merged = {**saved, "out": None, "stop_at": None, **given, "preset": preset, "resume": where}
    return TrainConfig(**merged)
  preset = args.preset or "cpu-small"
  return preset_config(preset, **given)


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if "--distributed" in argv:  # before anything touches a device
    jax.distributed.initialize()
  try:
    cfg = parse_args(argv)
    train(cfg)
  except (ConfigError, data_lib.DataError, ckpt.CheckpointError) as e:
    print(f"train_lm: error: {e}", file=sys.stderr)
    return 2
  except ValueError as e:  # model config values out of range (GPTConfig validation)
    if str(e).startswith("GPTConfig:"):
      print(f"train_lm: error: {e}", file=sys.stderr)
      return 2
    raise
  return 0


if __name__ == "__main__":
  sys.exit(main())
