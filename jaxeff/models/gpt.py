"""Decoder-only transformer language model (GPT; Radford et al., 2018/2019) in Flax Linen.

LLaMA-style block (Touvron et al., 2023): pre-norm RMSNorm, grouped-query causal
self-attention with rotary embeddings (:class:`jaxeff.nn.MultiHeadAttention`, attention
through :func:`jaxeff.ops.dot_product_attention`), pre-norm RMSNorm and a SwiGLU MLP, each
added to the residual stream; a final RMSNorm and a tied (or separate) output head.
Residual projections are initialised with std ``init_std / sqrt(2 * num_layers)`` (GPT-2).

One frozen :class:`GPTConfig` describes the model; :data:`PRESETS` holds the named sizes.
FLOPs per token follow the convention of the project's targets (Kaplan et al., 2020;
PaLM's MFU): ``6 * N + 12 * L * d_attn * S``, with ``N`` the parameters outside the token
embedding and the output head, ``d_attn = num_heads * head_dim``, no causal discount.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxeff import kv_cache as paged
from jaxeff.nn import KVCache, MultiHeadAttention, RMSNorm, SwiGLU
from jaxeff.nn.moe import MoE

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class GPTConfig:
  """Shape and numerics of a :class:`GPT`.

  Attributes:
    vocab_size: token vocabulary (256 for bytes).
    num_layers / d_model: depth and residual width.
    num_heads / num_kv_heads / head_dim: query heads, key/value heads (GQA; None = MHA)
      and width per head (None = ``d_model // num_heads``).
    mlp_hidden: SwiGLU hidden width.
    max_seq_len: longest sequence the model is configured for (training and KV cache).
    rope_base: RoPE frequency base.
    norm_eps: RMSNorm epsilon.
    tie_embeddings: share the token embedding with the output head.
    dtype: computation dtype, ``"float32"`` or ``"bfloat16"`` (parameters stay float32).
    remat: recompute each block's activations in the backward pass (``jax.checkpoint``).
    scan_layers: run the blocks with ``nn.scan`` over parameters stacked on a leading
      ``[num_layers]`` axis (one compiled block instead of ``num_layers``: much faster
      compiles of deep models; KV caches are then one stacked :class:`KVCache`; the paged
      cache is not supported with it).
    attention_implementation: passed to :func:`jaxeff.ops.dot_product_attention`.
    decode_implementation: passed to :func:`jaxeff.ops.decode_attention` (paged decode) and
      to the masked attention of contiguous-cache calls; None = fastest available.
    norm_implementation: passed to :func:`jaxeff.ops.rms_norm`; None = fastest available.
    fused_projections: one fused QKV projection and one fused gate/up projection per block
      (wider matmuls; a different parameter tree, see :class:`jaxeff.nn.MultiHeadAttention`).
    num_experts: 0 for dense SwiGLU MLPs; otherwise every ``moe_every``-th block's MLP is a
      :class:`jaxeff.nn.MoE` of ``num_experts`` SwiGLU experts (width ``moe_hidden``,
      default ``mlp_hidden``), ``experts_per_token`` routed per token, an optional shared
      expert of width ``moe_shared_hidden``, dropless unless ``moe_capacity_factor``; its
      load-balancing and router z-losses are sown into ``"intermediates"``.
    moe_implementation: passed to :func:`jaxeff.ops.grouped_matmul`.
    logits_soft_cap: attention logit soft cap, or None.
    local_window_size: sliding-window size to the left, or None for full causal attention.
    init_std: standard deviation of the weight initialisation.
  """

  vocab_size: int = 256
  num_layers: int = 4
  d_model: int = 256
  num_heads: int = 4
  num_kv_heads: int | None = None
  head_dim: int | None = None
  mlp_hidden: int = 688
  max_seq_len: int = 1024
  rope_base: float = 10000.0
  norm_eps: float = 1e-6
  tie_embeddings: bool = True
  dtype: str = "float32"
  remat: bool = False
  scan_layers: bool = False
  attention_implementation: str | None = None
  decode_implementation: str | None = None
  norm_implementation: str | None = None
  fused_projections: bool = False
  num_experts: int = 0
  experts_per_token: int = 2
  moe_hidden: int | None = None
  moe_every: int = 1
  moe_shared_hidden: int = 0
  moe_capacity_factor: float | None = None
  moe_implementation: str | None = None
  logits_soft_cap: float | None = None
  local_window_size: int | None = None
  init_std: float = 0.02

  def __post_init__(self):
    for name in ("tie_embeddings", "remat", "scan_layers", "fused_projections"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"GPTConfig: {name} must be a bool, got {getattr(self, name)!r}")
    positive = ("vocab_size", "num_layers", "d_model", "num_heads", "mlp_hidden", "max_seq_len")
    for name in positive:
      v = getattr(self, name)
      if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ValueError(f"GPTConfig: {name} must be a positive int, got {v!r}")
    if self.num_heads % self.kv_heads:
      raise ValueError(f"GPTConfig: num_heads ({self.num_heads}) must be a multiple of "
                       f"num_kv_heads ({self.kv_heads})")
    if self.head_dim is None and self.d_model % self.num_heads:
      raise ValueError(f"GPTConfig: d_model ({self.d_model}) must be divisible by num_heads "
                       f"({self.num_heads}) when head_dim is not given")
    if self.dim_per_head % 8:
      raise ValueError(f"GPTConfig: head_dim must be a multiple of 8, got {self.dim_per_head}")
    if self.num_experts < 0 or (self.num_experts and not 1 <= self.experts_per_token
                                 <= self.num_experts):
      raise ValueError(f"GPTConfig: experts_per_token ({self.experts_per_token}) must be in "
                       f"[1, num_experts ({self.num_experts})], and num_experts >= 0")
    if self.moe_every < 1 or (self.num_experts and self.scan_layers and self.moe_every != 1):
      raise ValueError(f"GPTConfig: moe_every must be >= 1 (and 1 with scan_layers), got "
                       f"{self.moe_every}")
    if self.dtype not in DTYPES:
      raise ValueError(f"GPTConfig: dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
    if self.local_window_size is not None and self.local_window_size < 0:
      raise ValueError(f"GPTConfig: local_window_size must be >= 0, got {self.local_window_size}")
    if self.logits_soft_cap is not None and not self.logits_soft_cap > 0:
      raise ValueError(f"GPTConfig: logits_soft_cap must be > 0, got {self.logits_soft_cap}")
    if not self.init_std > 0 or not self.norm_eps > 0 or not self.rope_base > 1:
      raise ValueError("GPTConfig: init_std and norm_eps must be > 0 and rope_base > 1, got "
                       f"{self.init_std}, {self.norm_eps}, {self.rope_base}")

  @property
  def kv_heads(self) -> int:
    return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

  @property
  def dim_per_head(self) -> int:
    return self.d_model // self.num_heads if self.head_dim is None else self.head_dim

  def is_moe_layer(self, i: int) -> bool:
    """Whether block ``i`` has an MoE MLP."""
    return self.num_experts > 0 and i % self.moe_every == self.moe_every - 1

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]

  def replace(self, **changes) -> GPTConfig:
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> GPTConfig:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"GPTConfig: unknown fields {unknown}; known: {sorted(names)}")
    return cls(**d)


PRESETS: dict[str, GPTConfig] = {
    # Unit tests: compiles and runs in well under a second on CPU.
    "tiny": GPTConfig(vocab_size=256, num_layers=2, d_model=64, num_heads=4, num_kv_heads=2,
                      mlp_hidden=160, max_seq_len=128),
    # The default CPU experiment (`make run`): trains in a few minutes on 2 cores.
    "cpu-small": GPTConfig(vocab_size=256, num_layers=4, d_model=128, num_heads=4,
                           num_kv_heads=2, mlp_hidden=384, max_seq_len=256),
    # Mixture of experts: 8 experts, 2 per token, every block (tests / CPU experiment).
    "moe-tiny": GPTConfig(vocab_size=256, num_layers=2, d_model=64, num_heads=4, num_kv_heads=2,
                          mlp_hidden=160, max_seq_len=128, num_experts=4, moe_hidden=80),
    "moe-cpu-small": GPTConfig(vocab_size=256, num_layers=4, d_model=128, num_heads=4,
                               num_kv_heads=2, mlp_hidden=384, max_seq_len=256, num_experts=8,
                               moe_hidden=192),
    # GPU sizes (vocab 32000 as in the project's end-to-end baseline; byte data uses 256 of it).
    # Unrolled layers: on H100 the scanned step of gpt-350m spent ~25% of its time copying
    # per-layer slices out of the stacked parameters and residuals (notes/experiments.md);
    # `scan_layers=True` compiles faster and is still available.
    "gpt-125m": GPTConfig(vocab_size=32000, num_layers=12, d_model=768, num_heads=12,
                          mlp_hidden=2048, max_seq_len=2048, tie_embeddings=False,
                          dtype="bfloat16"),
    "gpt-350m": GPTConfig(vocab_size=32000, num_layers=24, d_model=1024, num_heads=16,
                          mlp_hidden=2816, max_seq_len=2048, tie_embeddings=False,
                          dtype="bfloat16"),
    # Serving-speed shape (1.36B parameters, 2.7 GB in bf16): large enough that decoding at
    # batch 1-8 streams weights rather than waits on kernel launches.
    "gpt-1b": GPTConfig(vocab_size=32000, num_layers=24, d_model=2048, num_heads=16,
                        mlp_hidden=5632, max_seq_len=2048, tie_embeddings=False,
                        dtype="bfloat16"),
}


def get_config(name: str, **overrides) -> GPTConfig:
  """The preset ``name`` with fields replaced by ``overrides``."""
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
  return PRESETS[name].replace(**overrides)


def num_params(config: GPTConfig, *, non_embedding: bool = False, active: bool = False) -> int:
  """Parameter count; ``non_embedding`` leaves out the token embedding and output head;
  ``active`` counts only the ``experts_per_token`` experts a token uses (MoE)."""
  c = config
  h, n, k = c.dim_per_head, c.num_heads, c.kv_heads
  attn = c.d_model * h * (n + 2 * k) + n * h * c.d_model
  dense_mlp = 3 * c.d_model * c.mlp_hidden
  moe_layers = sum(map(c.is_moe_layer, range(c.num_layers)))
  experts = c.experts_per_token if active else c.num_experts
  moe_mlp = (c.d_model * c.num_experts + experts * 3 * c.d_model * (c.moe_hidden or c.mlp_hidden)
             + 3 * c.d_model * c.moe_shared_hidden)
  per_layer = attn + 2 * c.d_model  # two RMSNorm scales
  body = (c.num_layers * per_layer + (c.num_layers - moe_layers) * dense_mlp
          + moe_layers * moe_mlp + c.d_model)  # final norm
  if non_embedding:
    return body
  embed = c.vocab_size * c.d_model
  return body + embed * (1 if c.tie_embeddings else 2)


def flops_per_token(config: GPTConfig, seq_len: int) -> float:
  """Training FLOPs per token: ``6 * N + 12 * L * d_attn * S`` (module docstring)."""
  return 6.0 * num_params(config, non_embedding=True, active=True) + 12.0 * config.num_layers * (
      config.num_heads * config.dim_per_head) * seq_len


class Block(nn.Module):
  """Pre-norm transformer block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

  config: GPTConfig
  moe: bool = False  # an MoE MLP (jaxeff.nn.MoE) instead of the dense SwiGLU

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array | None,
               segment_ids: jax.Array | None, kv_cache: KVCache | None,
               paged_cache: paged.PagedKVCache | None = None, layer: int = 0,
               num_new: jax.Array | None = None):
    c = self.config
    init = nn.initializers.normal(c.init_std)
    out_init = nn.initializers.normal(c.init_std / math.sqrt(2 * c.num_layers))
    attn = MultiHeadAttention(
        num_heads=c.num_heads, head_dim=c.dim_per_head, num_kv_heads=c.kv_heads,
        is_causal=True, rope_base=c.rope_base, local_window_size=c.local_window_size,
        logits_soft_cap=c.logits_soft_cap, dtype=c.compute_dtype, kernel_init=init,
        out_init=out_init, implementation=c.attention_implementation,
        decode_implementation=c.decode_implementation, fused_qkv=c.fused_projections,
        name="attn")
    h = RMSNorm(eps=c.norm_eps, implementation=c.norm_implementation, name="attn_norm")(x)
    if paged_cache is not None:
      h, new_cache = attn(h, positions=positions, paged_cache=paged_cache, layer=layer,
                          num_new=num_new)
    elif kv_cache is None:
      h, new_cache = attn(h, positions=positions, segment_ids=segment_ids), None
    else:
      h, new_cache = attn(h, positions=positions, kv_cache=kv_cache)
    x = x + h
    h = RMSNorm(eps=c.norm_eps, implementation=c.norm_implementation, name="mlp_norm")(x)
    if self.moe:
      y, _ = MoE(c.num_experts, c.experts_per_token, c.moe_hidden or c.mlp_hidden,
                 shared_hidden_dim=c.moe_shared_hidden, capacity_factor=c.moe_capacity_factor,
                 dtype=c.compute_dtype, kernel_init=init, out_init=out_init,
                 implementation=c.moe_implementation, name="moe")(h)
      x = x + y
    else:
      x = x + SwiGLU(c.mlp_hidden, dtype=c.compute_dtype, kernel_init=init, out_init=out_init,
                     fused=c.fused_projections, name="mlp")(h)
    return x, new_cache


class GPT(nn.Module):
  """Decoder-only LM: int tokens ``[batch, seq]`` -> float32 logits ``[batch, seq, vocab]``."""

  config: GPTConfig

  @nn.compact
  def __call__(self, tokens: jax.Array, *, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None,
               kv_caches: Sequence[KVCache] | KVCache | None = None,
               paged_cache: paged.PagedKVCache | None = None,
               num_new: jax.Array | None = None):
    """Runs the model.

    Args:
      tokens: int ``[batch, seq]``.
      positions: int ``[batch, seq]`` absolute positions; default ``arange(seq)``. With
        ``kv_caches`` they are also where the new keys/values are written.
      segment_ids: int ``[batch, seq]`` for packed sequences (no cache).
      kv_caches: from :func:`init_kv_caches`: one :class:`KVCache` per layer, or with
        ``scan_layers`` one KVCache of ``[num_layers, batch, max_len, kv_heads, head_dim]``.
      paged_cache: a :class:`jaxeff.kv_cache.PagedKVCache` from :func:`init_paged_cache`,
        already grown by ``kv_cache.reserve(paged_cache, num_new)``; ``seq > 1`` is a
        prefill of empty sequences (right-padded prompts), ``seq == 1`` one decode step at
        positions ``paged_cache.lengths - 1`` (see :class:`jaxeff.nn.MultiHeadAttention`).
        Not supported with ``scan_layers``.
      num_new: int ``[batch]`` as passed to ``reserve`` (with ``paged_cache``).

    Returns:
      logits ``[batch, seq, vocab]`` float32, or ``(logits, new_kv_caches)`` /
      ``(logits, new_paged_cache)`` with a cache.
    """
    c = self.config
    if not hasattr(tokens, "ndim") or tokens.ndim != 2:
      raise ValueError(f"GPT: tokens must be [batch, seq], got {getattr(tokens, 'shape', tokens)}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise TypeError(f"GPT: tokens must be integer, got {tokens.dtype}")
    if kv_caches is not None:
      n = kv_caches.key.shape[0] if isinstance(kv_caches, KVCache) else len(kv_caches)
      if isinstance(kv_caches, KVCache) != c.scan_layers or n != c.num_layers:
        raise ValueError(
            f"GPT: kv_caches must be {'one stacked KVCache' if c.scan_layers else 'a sequence'} "
            f"holding one cache per layer ({c.num_layers}); got "
            f"{type(kv_caches).__name__} of {n} (use init_kv_caches)")
    if paged_cache is not None:
      if kv_caches is not None:
        raise ValueError("GPT: pass either kv_caches or paged_cache, not both")
      if c.scan_layers:
        raise ValueError("GPT: paged_cache is not supported with scan_layers=True (use the "
                         "contiguous kv_caches, or a config with scan_layers=False)")
      if not isinstance(paged_cache, paged.PagedKVCache):
        raise TypeError(f"GPT: paged_cache must be a jaxeff.kv_cache.PagedKVCache, got "
                        f"{type(paged_cache).__name__}")
      if paged_cache.num_layers != c.num_layers:
        raise ValueError(f"GPT: paged_cache must hold num_layers={c.num_layers} layers, got "
                         f"{paged_cache.num_layers} (use init_paged_cache)")
    embed = nn.Embed(c.vocab_size, c.d_model, dtype=c.compute_dtype,
                     embedding_init=nn.initializers.normal(c.init_std), name="embed")
    x = embed(tokens)
    block = nn.remat(Block, prevent_cse=not c.scan_layers) if c.remat else Block
    if c.scan_layers:
      blocks = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                       in_axes=(nn.broadcast, nn.broadcast, 0), length=c.num_layers)
      x, new_caches = blocks(c, c.num_experts > 0, name="blocks")(x, positions, segment_ids,
                                                                  kv_caches)
    else:
      new_caches = []
      for i in range(c.num_layers):
        if paged_cache is not None:
          x, paged_cache = block(c, c.is_moe_layer(i), name=f"block_{i}")(
              x, positions, segment_ids, None, paged_cache, i, num_new)
          continue
        x, cache = block(c, c.is_moe_layer(i), name=f"block_{i}")(
            x, positions, segment_ids, None if kv_caches is None else kv_caches[i])
        new_caches.append(cache)
      new_caches = tuple(new_caches)
    x = RMSNorm(eps=c.norm_eps, implementation=c.norm_implementation, name="final_norm")(x)
    if c.tie_embeddings:
      logits = embed.attend(x)
    else:
      logits = nn.Dense(c.vocab_size, use_bias=False, dtype=c.compute_dtype,
                        kernel_init=nn.initializers.normal(c.init_std), name="lm_head")(x)
    logits = logits.astype(jnp.float32)
    if paged_cache is not None:
      return logits, paged_cache
    return logits if kv_caches is None else (logits, new_caches)


def init_kv_caches(config: GPTConfig, batch: int, max_len: int) -> tuple[KVCache, ...] | KVCache:
  """Empty caches ``[batch, max_len, kv_heads, head_dim]`` in the compute dtype.

  One per layer, or (``scan_layers``) one with a leading ``[num_layers]`` axis.
  """
  cache = KVCache.zeros(batch, max_len, config.kv_heads, config.dim_per_head,
                        config.compute_dtype)
  if config.scan_layers:
    return jax.tree.map(lambda a: jnp.broadcast_to(a, (config.num_layers, *a.shape)), cache)
  return tuple(cache for _ in range(config.num_layers))


def init_paged_cache(config: GPTConfig, max_seqs: int, max_len: int, *, page_size: int = 16,
                     quant: str | None = None,
                     num_pages: int | None = None) -> paged.PagedKVCache:
  """An empty :class:`jaxeff.kv_cache.PagedKVCache` for every layer of ``config``.

  Args:
    max_seqs: sequences (the batch).
    max_len: tokens one sequence may hold (rounded up to whole pages).
    page_size: tokens per page (a power of two).
    quant: None (store the compute dtype), ``"int8"``, ``"fp8"`` or ``"int4"``.
    num_pages: pages in the pool; default enough for every sequence at ``max_len``.
  """
  if not isinstance(page_size, int) or page_size < 1 or page_size & (page_size - 1):
    raise ValueError(f"init_paged_cache: page_size must be a positive power of two, got "
                     f"{page_size!r}")
  if config.scan_layers:
    raise ValueError("init_paged_cache: the paged cache is not supported with "
                     "scan_layers=True (use init_kv_caches)")
  pages_per_seq = -(-max_len // page_size)
  return paged.create(num_layers=config.num_layers,
                      num_pages=num_pages or max_seqs * pages_per_seq, page_size=page_size,
                      kv_heads=config.kv_heads, head_dim=config.dim_per_head,
                      max_seqs=max_seqs, pages_per_seq=pages_per_seq,
                      dtype=config.compute_dtype, quant=quant)


def init_params(config: GPTConfig, key: jax.Array, seq_len: int = 8) -> Any:
  """Fresh parameters (float32) of ``GPT(config)``."""
  tokens = jnp.zeros((1, seq_len), jnp.int32)
  return GPT(config).init(key, tokens)["params"]
