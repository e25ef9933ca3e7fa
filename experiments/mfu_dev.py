"""Where the GPT train step spends its time: one variant per process, timed the same way.

Development script for the end-to-end target (TARGETS.md: GPT ~350M, batch 8 x seq 2048,
bf16, >= 50% MFU on one H100). Each variant is one jitted, state-donating step (forward,
backward, AdamW) timed as a median over rounds of consecutive steps; variants differ in one
thing at a time so their differences attribute the step time:

* ``gpt``: :class:`jaxeff.models.gpt.GPT` with options ``scan``, ``norm=<impl>``,
  ``attn=<impl>``, ``remat``, ``fused`` (fused QKV / gate-up projections);
* ``plain``: a minimal Linen model of the same shape (jnp RMSNorm, jnp RoPE, cuDNN
  attention through ``jax.nn.dot_product_attention``), the kind of model the baseline of
  TARGETS.md was measured on;
* ``fwd`` / ``grad`` modes: forward only, forward+backward without the optimizer.

Usage: ``python -m experiments.mfu_dev [--out FILE] VARIANT [VARIANT ...]`` where a variant
is ``name:key=value,...`` e.g. ``gpt:scan=0,norm=xla`` or ``plain:mode=grad``. Environment
``XLA_FLAGS`` applies to the child process running the variant (``xla_flags=...`` key,
with ``;`` between flags).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

PRESET = "gpt-350m"
BATCH, SEQ = 8, 2048


def _parse(spec: str) -> tuple[str, dict[str, str]]:
  name, _, rest = spec.partition(":")
  opts = dict(kv.split("=", 1) for kv in rest.split(",") if kv)
  return name, opts


def _plain_model(c):
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  dt = jnp.bfloat16

  def rms(x, name, mod):
    scale = mod.param(name, nn.initializers.ones, (x.shape[-1],), jnp.float32)
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + 1e-6) * scale
    return y.astype(dt)

  def rope(x, pos):
    h = x.shape[-1]
    inv = 1.0 / (10000.0 ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
    ang = pos[:, None].astype(jnp.float32) * inv[None]
    cos, sin = jnp.cos(ang)[None, :, None], jnp.sin(ang)[None, :, None]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, -1)
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).astype(dt)

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
      n, h = c.num_heads, c.dim_per_head
      dense = lambda f, name: nn.DenseGeneral(f, use_bias=False, dtype=dt, name=name)
      y = rms(x, "n1", self)
      q, k, v = (dense((n, h), s)(y) for s in ("q", "k", "v"))
      pos = jnp.arange(x.shape[1])
      q, k = rope(q, pos), rope(k, pos)
      o = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
      x = x + nn.DenseGeneral(c.d_model, axis=(-2, -1), use_bias=False, dtype=dt, name="o")(o)
      y = rms(x, "n2", self)
      g = nn.Dense(c.mlp_hidden, use_bias=False, dtype=dt, name="g")(y)
      u = nn.Dense(c.mlp_hidden, use_bias=False, dtype=dt, name="u")(y)
      return x + nn.Dense(c.d_model, use_bias=False, dtype=dt, name="d")(nn.silu(g) * u)

  class Plain(nn.Module):
    @nn.compact
    def __call__(self, tokens):
      x = nn.Embed(c.vocab_size, c.d_model, dtype=dt)(tokens)
      for i in range(c.num_layers):
        x = Block(name=f"b{i}")(x)
      x = rms(x, "nf", self)
      return nn.Dense(c.vocab_size, use_bias=False, dtype=dt)(x).astype(jnp.float32)

  return Plain()


def run_variant(spec: str) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  from jaxeff.models import gpt

  name, opts = _parse(spec)
  base = gpt.PRESETS[PRESET]
  if "layers" in opts:
    base = base.replace(num_layers=int(opts["layers"]))
  batch, seq = int(opts.get("batch", BATCH)), int(opts.get("seq", SEQ))
  if name == "plain":
    model = _plain_model(base)
  elif name == "gpt":
    changes = dict(scan_layers=opts.get("scan", "1") == "1", remat=opts.get("remat", "0") == "1")
    attn = opts.get("attn", "default")
    changes["attention_implementation"] = None if attn == "default" else attn
    cfg = base.replace(**changes)
    if "norm" in opts:
      cfg = cfg.replace(norm_implementation=opts["norm"])
    if opts.get("fused") == "1":
      cfg = cfg.replace(fused_projections=True)
    model = gpt.GPT(cfg)
  else:
    raise ValueError(f"unknown variant {name!r}")
  mode = opts.get("mode", "train")
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-4, weight_decay=0.1))
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  opt_state = jax.jit(tx.init)(params)

  def loss_fn(p, b):
    logits = model.apply({"params": p}, b["inputs"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, b["targets"]).mean()

  if mode == "train":
    def step(state, b):
      p, o = state
      loss, g = jax.value_and_grad(loss_fn)(p, b)
      u, o = tx.update(g, o, p)
      return (optax.apply_updates(p, u), o), loss
    state = (params, opt_state)
  elif mode == "grad":
    def step(state, b):
      loss, g = jax.value_and_grad(loss_fn)(state, b)
      return jax.tree.map(lambda x, y: x + 1e-9 * y.astype(x.dtype), state, g), loss
    state = params
  elif mode == "fwd":
    def step(state, b):
      return state, loss_fn(state, b)
    state = params
  else:
    raise ValueError(f"unknown mode {mode!r}")
  fn = jax.jit(step, donate_argnums=(0,) if mode != "fwd" else ())
  rng = np.random.default_rng(0)
  batches = []
  for _ in range(3):
    t = rng.integers(0, 256, (batch, seq + 1), dtype=np.int32)
    batches.append({"inputs": jnp.asarray(t[:, :-1]), "targets": jnp.asarray(t[:, 1:])})
  t0 = time.perf_counter()
  fn = fn.lower(state, batches[0]).compile()
  compile_s = time.perf_counter() - t0
  for i in range(3):
    state, loss = fn(state, batches[i % 3])
  jax.block_until_ready(loss)
  times = []
  for r in range(8):
    t0 = time.perf_counter()
    for j in range(5):
      state, loss = fn(state, batches[j % 3])
    jax.block_until_ready((state, loss))
    times.append((time.perf_counter() - t0) / 5)
  med = statistics.median(times)
  profile = None
  if os.environ.get("MFU_DEV_PROFILE"):
    profile = _profile(fn, state, batches, os.environ["MFU_DEV_PROFILE"], spec)
    state = profile.pop("state")
  fpt = gpt.flops_per_token(base, seq)
  frac = {"train": 1.0, "grad": 1.0, "fwd": 1 / 3}[mode]
  mfu = fpt * frac * batch * seq / med / 989e12
  return dict(variant=spec, ms=med * 1e3, tokens_per_s=batch * seq / med, mfu=mfu,
              compile_s=compile_s, loss=float(loss), device=jax.devices()[0].device_kind,
              profile=profile)


def _profile(fn, state, batches, root: str, spec: str, steps: int = 3) -> dict:
  """Traces ``steps`` steps and sums device-event time by name (per profiler line).

  Returns ``{"lines": {line: total_ms}, "top": [[line, name, ms_per_step, count], ...]}``
  for the device planes (``/device:GPU:*``; the host plane on CPU).
  """
  import collections
  import glob
  import re

  import jax
  from jax._src.lib import _profile_data

  d = os.path.join(root, re.sub(r"[^A-Za-z0-9_.=-]", "_", spec))
  with jax.profiler.trace(d):
    for i in range(steps):
      state, loss = fn(state, batches[i % len(batches)])
    jax.block_until_ready((state, loss))
  files = sorted(glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True))
  data = _profile_data.ProfileData.from_file(files[-1])
  totals, lines = collections.Counter(), collections.Counter()
  counts = collections.Counter()
  planes = [p for p in data.planes if p.name.startswith("/device:GPU")]
  if not planes:
    planes = [p for p in data.planes if "host" in p.name.lower()][:1]
  for plane in planes:
    for line in plane.lines:
      for ev in line.events:
        key = (line.name, ev.name)
        totals[key] += ev.duration_ns
        counts[key] += 1
        lines[line.name] += ev.duration_ns
  top = [[ln, name[:120], ns / 1e6 / steps, counts[(ln, name)] // steps]
         for (ln, name), ns in totals.most_common(80)]
  return {"state": state, "lines": {k: v / 1e6 / steps for k, v in lines.items()}, "top": top}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("variants", nargs="+")
  ap.add_argument("--out", default=None)
  ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.child:
    print("RESULT " + json.dumps(run_variant(args.variants[0])), flush=True)
    return 0
  results = []
  for spec in args.variants:
    _, opts = _parse(spec)
    env = dict(os.environ)
    if "xla_flags" in opts:
      env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + opts["xla_flags"].replace(";", " "))
    try:
      p = subprocess.run([sys.executable, "-m", "experiments.mfu_dev", "--child", spec], env=env,
                         capture_output=True, text=True,
                         timeout=float(os.environ.get("MFU_DEV_TIMEOUT_S", "200")))
    except subprocess.TimeoutExpired:
      p = None
    line = None if p is None else next(
        (l for l in p.stdout.splitlines() if l.startswith("RESULT ")), None)
    if p is None:
      res = dict(variant=spec, error=["timed out"])
    elif line is None:
      res = dict(variant=spec, error=(p.stderr or p.stdout).strip().splitlines()[-3:])
    else:
      res = json.loads(line[7:])
    results.append(res)
    if args.out:  # after every variant: a call cut short keeps what it measured
      with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    if "error" in res:
      print(f"{spec:50s} ERROR {res['error']}", flush=True)
    else:
      print(f"{spec:50s} {res['ms']:8.2f} ms {res['tokens_per_s'] / 1e3:7.1f}k tok/s "
            f"MFU {100 * res['mfu']:5.1f}%  compile {res['compile_s']:.0f}s", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
