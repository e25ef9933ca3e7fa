"""The GPT of :mod:`jaxeff.models.gpt` as one ``jax.shard_map`` over a 6-axis mesh.

A functional forward over the *same parameter tree* as :class:`jaxeff.models.gpt.GPT`
(``embed``, ``block_<i>`` or stacked ``blocks``, ``final_norm``, ``lm_head``), so one
checkpoint and one seed serve the single-device model and every mesh. Inside the map:

* ``data`` / ``fsdp`` / ``expert``: the batch is split over all three. Parameters whose
  ``embed`` axis maps to ``fsdp`` (:data:`jaxeff.parallel.mesh.DEFAULT_RULES`) are stored
  split and all-gathered just before use, one layer at a time (ZeRO-3 / FSDP; the
  gather's transpose is the gradients' reduce-scatter); the optimizer state, updated
  outside the map with the parameters' shardings, is split the same way.
* ``tensor``: Megatron layers (:mod:`jaxeff.parallel.tensor`): Q/K/V and gate/up are
  column-parallel (heads and hidden units split), ``o_proj`` / ``down_proj`` row-parallel;
  the embedding, the tied or separate output head and the cross-entropy are
  vocabulary-parallel (logits never gathered). Optionally sequence-parallel norm regions
  and collective matmuls.
* ``sequence``: tokens laid out zig-zag (:func:`jaxeff.parallel.sequence.sequence_permutation`)
  and split; attention by ring attention (or Ulysses all-to-all); RoPE uses each token's
  global position.
* ``pipeline``: the layers split into stages, run by the GPipe schedule over microbatches
  (:func:`jaxeff.parallel.pipeline.gpipe`); the embedding and head run on every stage.

The loss is the mean next-token cross-entropy over all tokens, equal (to float
tolerance) to ``optax.softmax_cross_entropy_with_integer_labels(GPT.apply(...)).mean()``.
Gradients are ``jax.grad`` of it (``shard_map``'s transpose inserts the reductions).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxeff.models.gpt import GPTConfig
from jaxeff.nn.rope import apply_rope
from jaxeff.ops.attention import dot_product_attention
from jaxeff.ops.normalization import rms_norm
from jaxeff.parallel import mesh as mesh_lib
from jaxeff.parallel import pipeline as pipeline_lib
from jaxeff.parallel import sequence as seq_lib
from jaxeff.parallel import tensor as tp

CONTEXT_KINDS = ("ring", "ulysses")


@dataclasses.dataclass(frozen=True)
class ParallelOptions:
  """How the mesh axes are used (besides their sizes).

  Attributes:
    sequence_parallel: Megatron sequence parallelism: norms and residuals split along the
      sequence over ``tensor`` (all-gather / reduce-scatter instead of all-reduce).
    collective_matmul: overlap those all-gathers / reduce-scatters with the matmuls
      (ppermute rings; needs ``sequence_parallel``).
    context: ``"ring"`` (ring attention, zig-zag layout) or ``"ulysses"`` (all-to-all).
    bidirectional_ring: ring attention sends K/V both ways.
    microbatches: pipeline microbatches per step (the local batch must divide by it);
      0 = as many as pipeline stages.
    rules: logical-axis rules (None: :data:`jaxeff.parallel.mesh.DEFAULT_RULES`).
    check_vma: ``jax.shard_map``'s varying-axes type checking. None = on for CPU (pure XLA)
      and off on GPU/TPU, where jaxeff's Pallas kernels run inside the map and their
      ``pallas_call`` output shapes carry no varying-axes types yet. Off, JAX's transpose
      psums the gradients of replicated inputs instead (same gradients).
  """

  sequence_parallel: bool = False
  collective_matmul: bool = False
  context: str = "ring"
  bidirectional_ring: bool = False
  microbatches: int = 0
  rules: tuple[tuple[str, Any], ...] | None = None
  check_vma: bool | None = None

  def __post_init__(self):
    if self.context not in CONTEXT_KINDS:
      raise ValueError(f"ParallelOptions: context must be one of {CONTEXT_KINDS}, got "
                       f"{self.context!r}")
    if self.collective_matmul and not self.sequence_parallel:
      raise ValueError("ParallelOptions: collective_matmul=True needs sequence_parallel=True "
                       "(it overlaps the sequence all-gather / reduce-scatter)")
    if not isinstance(self.microbatches, int) or self.microbatches < 0:
      raise ValueError(f"ParallelOptions: microbatches must be an int >= 0, got "
                       f"{self.microbatches!r}")

  @property
  def vma(self) -> bool:
    if self.check_vma is not None:
      return self.check_vma
    return mesh_lib.default_check_vma()

  @property
  def rule_dict(self) -> dict[str, Any]:
    return dict(mesh_lib.DEFAULT_RULES) if self.rules is None else dict(self.rules)


# ----------------------------------------------------------------------------- parameters

_LEAF_AXES: dict[tuple[str, str], tuple[str | None, ...]] = {
    ("embed", "embedding"): ("vocab", "embed"),
    ("lm_head", "kernel"): ("embed", "vocab"),
    ("q_proj", "kernel"): ("embed", "heads", "head_dim"),
    ("k_proj", "kernel"): ("embed", "kv_heads", "head_dim"),
    ("v_proj", "kernel"): ("embed", "kv_heads", "head_dim"),
    ("qkv_proj", "kernel"): ("embed", None, "head_dim"),
    ("o_proj", "kernel"): ("heads", "head_dim", "embed"),
    ("gate_proj", "kernel"): ("embed", "mlp"),
    ("up_proj", "kernel"): ("embed", "mlp"),
    ("gate_up_proj", "kernel"): ("embed", None),
    ("down_proj", "kernel"): ("mlp", "embed"),
}


def _path_names(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def logical_axes(path: tuple[str, ...], ndim: int) -> tuple[str | None, ...]:
  """Logical axis names of the GPT parameter at ``path`` (e.g. ``("blocks", "attn",
  "q_proj", "kernel")``); unknown leaves are replicated."""
  stacked = bool(path) and path[0] == "blocks"
  if path[-1] == "scale":
    axes = ("norm",)
  else:
    axes = _LEAF_AXES.get(tuple(path[-2:]), (None,) * (ndim - stacked))
  axes = (("layers",) if stacked else ()) + axes
  if len(axes) != ndim:
    return (None,) * ndim
  return axes


def param_specs(params: Any, mesh: Mesh, options: ParallelOptions = ParallelOptions()) -> Any:
  """PartitionSpec per parameter (a tree like ``params``; arrays or ShapeDtypeStructs).

  Raises ValueError naming the parameter when a mesh axis does not divide the dimension
  it would split (e.g. kv heads over ``tensor``).
  """
  rules = options.rule_dict

  def spec(path, leaf):
    names = _path_names(path)
    s = mesh_lib.logical_spec(logical_axes(names, leaf.ndim), rules, mesh)
    mesh_lib.check_divisible("parameter " + "/".join(names), leaf.shape, s, mesh)
    return s

  return jax.tree_util.tree_map_with_path(spec, params)


def param_shardings(params: Any, mesh: Mesh,
                    options: ParallelOptions = ParallelOptions()) -> Any:
  """NamedSharding per parameter (see :func:`param_specs`)."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(params, mesh, options))


def _canonical(params: Mapping[str, Any], config: GPTConfig, stack: bool) -> dict[str, Any]:
  """Unfused projections; with ``stack`` the blocks stacked on a leading layer axis."""
  params = dict(params)

  def unfuse(block):
    block = dict(block)
    attn, mlp = dict(block["attn"]), dict(block["mlp"])
    if "qkv_proj" in attn:
      n, k = config.num_heads, config.kv_heads
      w = attn.pop("qkv_proj")["kernel"]
      axis = w.ndim - 2
      q, kk, v = jnp.split(w, [n, n + k], axis=axis)
      attn.update(q_proj={"kernel": q}, k_proj={"kernel": kk}, v_proj={"kernel": v})
    if "gate_up_proj" in mlp:
      g, u = jnp.split(mlp.pop("gate_up_proj")["kernel"], 2, axis=-1)
      mlp.update(gate_proj={"kernel": g}, up_proj={"kernel": u})
    block.update(attn=attn, mlp=mlp)
    return block

  if "blocks" in params:
    params["blocks"] = unfuse(params["blocks"])
  else:
    names = [f"block_{i}" for i in range(config.num_layers)]
    blocks = [unfuse(params.pop(n)) for n in names]
    if stack:
      params["blocks"] = jax.tree.map(lambda *a: jnp.stack(a), *blocks)
    else:
      params.update(zip(names, blocks))
  return params


# ----------------------------------------------------------------------------- the plan


@dataclasses.dataclass(frozen=True)
class _Plan:
  config: GPTConfig
  options: ParallelOptions
  sizes: tuple[tuple[str, int], ...]
  batch_axes: tuple[str, ...]
  layout: str

  def size(self, axis: str) -> int:
    return dict(self.sizes)[axis]


def _plan(config: GPTConfig, mesh: Mesh, options: ParallelOptions) -> _Plan:
  sizes = mesh_lib.mesh_sizes(mesh)
  missing = [a for a in mesh_lib.AXES if a not in sizes]
  if missing:
    raise ValueError(f"parallel GPT: the mesh must have the axes {list(mesh_lib.AXES)} "
                     f"(use jaxeff.parallel.mesh.make_mesh); missing {missing}")
  rules = options.rule_dict
  batch_rule = rules.get("batch")
  batch_axes = tuple(a for a in ((batch_rule,) if isinstance(batch_rule, str) else
                                 tuple(batch_rule or ())) if sizes[a] > 1)
  if sizes["sequence"] > 1 and config.local_window_size is not None:
    raise ValueError("parallel GPT: local_window_size is not supported with a sequence axis "
                     f"of size {sizes['sequence']} (ring/Ulysses attention attend globally)")
  if sizes["pipeline"] > 1 and config.num_layers % sizes["pipeline"]:
    raise ValueError(f"parallel GPT: num_layers ({config.num_layers}) must be divisible by "
                     f"the pipeline axis size ({sizes['pipeline']})")
  t = sizes["tensor"]
  for what, n in (("num_heads", config.num_heads), ("num_kv_heads", config.kv_heads),
                  ("mlp_hidden", config.mlp_hidden), ("vocab_size", config.vocab_size)):
    if n % t:
      raise ValueError(f"parallel GPT: {what} ({n}) must be divisible by the tensor axis "
                       f"size ({t})")
  if sizes["fsdp"] > 1 and config.d_model % sizes["fsdp"]:
    raise ValueError(f"parallel GPT: d_model ({config.d_model}) must be divisible by the "
                     f"fsdp axis size ({sizes['fsdp']})")
  layout = "zigzag" if options.context == "ring" else "contiguous"
  return _Plan(config, options, tuple(sizes.items()), batch_axes, layout)


def check_shapes(config: GPTConfig, mesh: Mesh, options: ParallelOptions, batch: int,
                 seq_len: int) -> None:
  """Raises ValueError when the batch or sequence does not split over the mesh."""
  plan = _plan(config, mesh, options)
  nb = math.prod(plan.size(a) for a in plan.batch_axes)
  if batch % nb:
    raise ValueError(f"parallel GPT: batch size {batch} must be divisible by the batch axes "
                     f"{plan.batch_axes} of total size {nb}")
  sp = plan.size("sequence")
  parts = sp * (2 if plan.layout == "zigzag" and sp > 1 else 1)
  tpn = plan.size("tensor") if options.sequence_parallel else 1
  if seq_len % (parts * tpn):
    raise ValueError(f"parallel GPT: sequence length {seq_len} must be divisible by "
                     f"{parts * tpn} (sequence axis {sp}"
                     + (", two zig-zag chunks per device" if parts > sp else "")
                     + (f", sequence-parallel over tensor {tpn}" if tpn > 1 else "") + ")")
  if options.context == "ulysses" and sp > 1:
    heads_local = config.kv_heads // plan.size("tensor")
    if heads_local % sp:
      raise ValueError(f"parallel GPT: Ulysses needs the kv heads per tensor shard "
                       f"({heads_local}) divisible by the sequence axis size ({sp})")
  pp = plan.size("pipeline")
  if pp > 1:
    m = options.microbatches or pp
    if (batch // nb) % m:
      raise ValueError(f"parallel GPT: the per-device batch ({batch // nb}) must be divisible "
                       f"by the number of pipeline microbatches ({m})")


# ----------------------------------------------------------------------------- inside the map


def _fsdp_dims(specs: Any) -> Any:
  """Per leaf: the array axis split over ``fsdp`` (or None)."""
  def dim(s):
    for i, a in enumerate(tuple(s)):
      if a == "fsdp" or (isinstance(a, tuple) and "fsdp" in a):
        return i
    return None
  return jax.tree.map(dim, specs, is_leaf=lambda x: isinstance(x, P))


def _gather(tree, dims, offset: int = 0):
  """All-gathers every leaf over ``fsdp`` along its split axis (ZeRO-3 parameter fetch)."""
  return jax.tree.map(
      lambda a, d: a if d is None else lax.all_gather(a, "fsdp", axis=d - offset, tiled=True),
      tree, dims)


def _block_fn(plan: _Plan, dims: Any, offset: int):
  c, o = plan.config, plan.options
  dtype = c.compute_dtype
  sp = o.sequence_parallel and plan.size("tensor") > 1
  cm = o.collective_matmul and sp
  norm_impl = getattr(c, "norm_implementation", None)
  seq_n = plan.size("sequence")

  def attention(q, k, v, seg):
    if seq_n == 1:
      return dot_product_attention(
          q, k, v, is_causal=True, segment_ids=seg, local_window_size=c.local_window_size,
          logits_soft_cap=c.logits_soft_cap, implementation=c.attention_implementation)
    if o.context == "ulysses":
      return seq_lib.ulysses_attention(
          q, k, v, axis_name="sequence", is_causal=True, segment_ids=seg,
          logits_soft_cap=c.logits_soft_cap, implementation=c.attention_implementation)
    return seq_lib.ring_attention(
        q, k, v, axis_name="sequence", is_causal=True, segment_ids=seg, layout=plan.layout,
        bidirectional=o.bidirectional_ring, logits_soft_cap=c.logits_soft_cap,
        implementation=c.attention_implementation)

  def col(h, kernels):
    """One column-parallel matmul for several kernels [d, ...] (one gather of ``h``)."""
    if not sp:  # nothing to share: separate matmuls, no concatenated weight copy
      return [tp.column_parallel_dense(h, w, dtype=dtype) for w in kernels]
    flat = [w.reshape(w.shape[0], -1) for w in kernels]
    y = tp.column_parallel_dense(h, jnp.concatenate(flat, axis=1) if len(flat) > 1 else flat[0],
                                 sequence_parallel=sp, collective_matmul=cm, dtype=dtype)
    outs, start = [], 0
    for w, f in zip(kernels, flat):
      outs.append(y[..., start:start + f.shape[1]].reshape(*y.shape[:-1], *w.shape[1:]))
      start += f.shape[1]
    return outs

  def block(p, x, positions, seg):
    p = _gather(p, dims, offset)
    a, m = p["attn"], p["mlp"]
    h = rms_norm(x, p["attn_norm"]["scale"], eps=c.norm_eps, implementation=norm_impl)
    q, k, v = col(h, [a["q_proj"]["kernel"], a["k_proj"]["kernel"], a["v_proj"]["kernel"]])
    q = apply_rope(q, positions, base=c.rope_base)
    k = apply_rope(k, positions, base=c.rope_base)
    out = attention(q, k, v, seg)
    x = x + tp.row_parallel_dense(out, a["o_proj"]["kernel"], sequence_parallel=sp,
                                  collective_matmul=cm, dtype=dtype)
    h = rms_norm(x, p["mlp_norm"]["scale"], eps=c.norm_eps, implementation=norm_impl)
    gate, up = col(h, [m["gate_proj"]["kernel"], m["up_proj"]["kernel"]])
    x = x + tp.row_parallel_dense(jax.nn.silu(gate) * up, m["down_proj"]["kernel"],
                                  sequence_parallel=sp, collective_matmul=cm, dtype=dtype)
    return x

  return block


def _body(plan: _Plan, dims: Any, return_logits: bool):
  c, o = plan.config, plan.options
  dtype = c.compute_dtype
  sp = o.sequence_parallel and plan.size("tensor") > 1
  pp = plan.size("pipeline")
  norm_impl = getattr(c, "norm_implementation", None)

  def body(params, tokens, targets, positions, seg):
    emb = _gather(params["embed"], dims["embed"])["embedding"]
    x = tp.vocab_parallel_embed(tokens, emb, sequence_parallel=sp, dtype=dtype)
    stacked = "blocks" in params
    if pp > 1:
      blk = _block_fn(plan, dims["blocks"], 1)
      if c.remat:
        blk = jax.checkpoint(blk)

      def stage(local_layers, xm):
        return lax.scan(lambda h, lp: (blk(lp, h, positions, None), None), xm, local_layers)[0]

      m = o.microbatches or pp
      xs = x.reshape(m, x.shape[0] // m, *x.shape[1:])
      x = pipeline_lib.gpipe(stage, params["blocks"], xs, axis_name="pipeline")
      x = x.reshape(-1, *x.shape[2:])
    elif stacked:
      blk = _block_fn(plan, dims["blocks"], 1)
      if c.remat:
        blk = jax.checkpoint(blk)
      x = lax.scan(lambda h, lp: (blk(lp, h, positions, seg), None), x, params["blocks"])[0]
    else:
      for i in range(c.num_layers):
        blk = _block_fn(plan, dims[f"block_{i}"], 0)
        if c.remat:
          blk = jax.checkpoint(blk, prevent_cse=True)
        x = blk(params[f"block_{i}"], x, positions, seg)
    x = rms_norm(x, params["final_norm"]["scale"], eps=c.norm_eps, implementation=norm_impl)
    if sp:
      x = lax.all_gather(x, "tensor", axis=1, tiled=True)
    if c.tie_embeddings:
      logits = tp._mm(x, emb.T, dtype)
    else:
      head = _gather(params["lm_head"], dims["lm_head"])["kernel"]
      logits = tp._mm(x, head, dtype)
    logits = logits.astype(jnp.float32)
    if return_logits:
      return logits
    loss = tp.vocab_parallel_cross_entropy(logits, targets, axis_name="tensor")
    total = jnp.sum(loss)
    split = plan.batch_axes + (("sequence",) if plan.size("sequence") > 1 else ())
    return lax.psum(total, split) if split else total

  return body


def _build(config: GPTConfig, mesh: Mesh, options: ParallelOptions, return_logits: bool):
  plan = _plan(config, mesh, options)
  stack = plan.size("pipeline") > 1
  ba = plan.batch_axes or None
  ba = ba[0] if ba is not None and len(ba) == 1 else ba
  seq_axis = "sequence" if plan.size("sequence") > 1 else None
  tok_spec = P(ba, seq_axis)
  pos_spec = P(seq_axis)

  def run(params, tokens, targets=None, segment_ids=None):
    if not hasattr(tokens, "ndim") or tokens.ndim != 2:
      raise ValueError(f"parallel GPT: tokens must be [batch, seq], got "
                       f"{getattr(tokens, 'shape', tokens)}")
    b, s = tokens.shape
    check_shapes(config, mesh, options, b, s)
    if segment_ids is not None and stack:
      raise ValueError("parallel GPT: segment_ids are not supported with a pipeline axis")
    cparams = _canonical(params, config, stack)
    specs = param_specs(cparams, mesh, options)
    dims = _fsdp_dims(specs)
    perm = seq_lib.sequence_permutation(s, plan.size("sequence"), plan.layout)
    identity = bool(np.all(perm == np.arange(s)))
    permute = (lambda a: a) if identity else (lambda a: jnp.take(a, jnp.asarray(perm), axis=1))  # noqa: E731
    positions = jnp.asarray(perm, jnp.int32)
    tokens = permute(tokens)
    tgt = permute(targets) if targets is not None else jnp.zeros_like(tokens)
    seg = None if segment_ids is None else permute(segment_ids.astype(jnp.int32))
    body = _body(plan, dims, return_logits)
    in_specs = (specs, tok_spec, tok_spec, pos_spec, None if seg is None else tok_spec)
    if return_logits:
      out_specs = P(ba, seq_axis, "tensor" if plan.size("tensor") > 1 else None)
    else:
      out_specs = P()
    f = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                      check_vma=options.vma)
    out = f(cparams, tokens, tgt, positions, seg)
    if return_logits:
      return out if identity else jnp.take(out, jnp.asarray(np.argsort(perm)), axis=1)
    return out / (b * s)

  return run


def make_loss_fn(config: GPTConfig, mesh: Mesh,
                 options: ParallelOptions = ParallelOptions()) -> Callable[..., jax.Array]:
  """``loss(params, tokens, targets, segment_ids=None) -> mean cross-entropy`` (jit-able).

  Args of the returned function:
    params: the :class:`jaxeff.models.gpt.GPT` parameter tree (``["params"]``), placed
      with :func:`param_shardings` (or anything; jit reshards).
    tokens / targets: int ``[batch, seq]``; segment_ids: optional int ``[batch, seq]``.

  Raises ValueError (at trace time) for a config or shape the mesh cannot split.
  """
  return _build(config, mesh, options, return_logits=False)


def make_logits_fn(config: GPTConfig, mesh: Mesh,
                   options: ParallelOptions = ParallelOptions()) -> Callable[..., jax.Array]:
  """``logits(params, tokens, segment_ids=None) -> [batch, seq, vocab]`` float32 (the
  vocabulary split over ``tensor`` as a sharded array; for checks and evaluation)."""
  run = _build(config, mesh, options, return_logits=True)
  return lambda params, tokens, segment_ids=None: run(params, tokens, None, segment_ids)
