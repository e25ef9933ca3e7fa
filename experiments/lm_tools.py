"""Helpers shared by the model-compression experiments (quantize_lm, sparsify_lm): a trained
checkpoint to start from, the unrolled parameter layout, and validation perplexity."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxeff.models import gpt


def unstack_layers(config: gpt.GPTConfig, params):
  """Params of a ``scan_layers`` model -> the unrolled model's (``blocks`` -> ``block_i``)."""
  if not config.scan_layers:
    return config, params
  params = dict(params)
  blocks = params.pop("blocks")
  for i in range(config.num_layers):
    params[f"block_{i}"] = jax.tree.map(lambda a, i=i: a[i], blocks)
  return config.replace(scan_layers=False), params


def train_checkpoint(name: str, preset: str, steps: int | None, log: Callable[[str], None]) -> str:
  """Trains (or reuses) ``runs/<name>-<preset>`` with :mod:`experiments.train_lm` and
  returns its folder."""
  from experiments import train_lm

  out = Path("runs") / f"{name}-{preset}"
  if (out / "summary.json").exists():
    log(f"{name}: reusing the trained model in {out}")
    return str(out)
  changes = {"out": str(out)}
  if steps:
    changes["steps"] = steps
  cfg = train_lm.preset_config(preset, **changes)
  log(f"{name}: training {preset} for {cfg.steps} steps into {out}")
  train_lm.train(cfg, log=lambda s: log("  " + s))
  return str(out)


def perplexity(model, params, batches: Iterable[dict]) -> float:
  """``exp`` of the mean next-token cross-entropy of ``model`` over ``batches`` of
  ``{"inputs", "targets"}`` int ``[batch, seq]`` (equal-sized batches)."""
  @jax.jit
  def loss(p, inputs, targets):
    logits = model.apply({"params": p}, inputs)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))

  return float(math.exp(np.mean([float(loss(params, b["inputs"], b["targets"]))
                                 for b in batches])))
