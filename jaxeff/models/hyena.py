"""Hyena language model (Poli et al., 2023, "Hyena Hierarchy") in Flax Linen.

The GPT block of :mod:`jaxeff.models.gpt` with attention replaced by a
:class:`jaxeff.nn.spectral.HyenaOperator` (gated long convolutions with implicit
filters through :func:`jaxeff.ops.fft_conv.fft_conv`): pre-norm RMSNorm, Hyena mixer,
pre-norm RMSNorm, SwiGLU MLP, residual adds; final RMSNorm and a tied (or separate) head.
Every operation is causal, so logits at position ``t`` depend on tokens ``<= t`` only.

Same interface as :class:`jaxeff.models.gpt.GPT` for training: ``HyenaLM(config)`` maps
int tokens ``[batch, seq]`` to float32 logits ``[batch, seq, vocab]``; :data:`PRESETS`,
:func:`get_config`, :func:`num_params`, :func:`flops_per_token`, :func:`init_params`.
No KV cache (generation recomputes the prefix).

FLOPs per token (training, forward + backward = 3x forward): ``6 * N`` for the
parameters outside the embedding and head, plus for each layer and each of the ``order``
long convolutions over ``d_model`` channels two FFTs of size ``2 S`` and a pointwise
complex product per token: ``3 * (2 * 5 * 2 log2(2 S) + 6) * d_model`` (the usual
``5 n log2 n`` real FLOPs of a complex FFT of size n, spread over the ``S`` tokens it serves;
the implicit-filter MLP and the filter FFT run once per sequence and are left out).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxeff.nn import RMSNorm, SwiGLU
from jaxeff.nn.spectral import HyenaOperator

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class HyenaConfig:
  """Shape and numerics of a :class:`HyenaLM`.

  Attributes:
    vocab_size: token vocabulary (256 for bytes).
    num_layers / d_model: depth and residual width.
    order: Hyena recurrence depth (long convolutions per layer).
    filter_hidden / filter_emb_dim: implicit-filter MLP width and positional features.
    short_filter: width of the short causal depthwise convolution.
    mlp_hidden: SwiGLU hidden width.
    max_seq_len: longest sequence (the implicit filters' time axis is ``t / max_seq_len``).
    norm_eps: RMSNorm epsilon.
    tie_embeddings: share the token embedding with the output head.
    dtype: computation dtype, ``"float32"`` or ``"bfloat16"`` (parameters stay float32);
      with bfloat16 the long convolutions take the tensor-core Monarch paths.
    fft_conv_implementation: passed to :func:`jaxeff.ops.fft_conv.fft_conv`.
    remat: recompute each block's activations in the backward pass.
    init_std: weight initialisation standard deviation.
  """

  vocab_size: int = 256
  num_layers: int = 4
  d_model: int = 256
  order: int = 2
  filter_hidden: int = 64
  filter_emb_dim: int = 33
  short_filter: int = 3
  mlp_hidden: int = 688
  max_seq_len: int = 1024
  norm_eps: float = 1e-6
  tie_embeddings: bool = True
  dtype: str = "float32"
  fft_conv_implementation: str | None = None
  remat: bool = False
  init_std: float = 0.02

  def __post_init__(self):
    positive = ("vocab_size", "num_layers", "d_model", "order", "filter_hidden",
                "filter_emb_dim", "short_filter", "mlp_hidden", "max_seq_len")
    for name in positive:
      v = getattr(self, name)
      if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ValueError(f"HyenaConfig: {name} must be a positive int, got {v!r}")
    if self.filter_emb_dim % 2 == 0 or self.filter_emb_dim < 3:
      raise ValueError(f"HyenaConfig: filter_emb_dim must be odd and >= 3 (t plus cos/sin "
                       f"pairs), got {self.filter_emb_dim}")
    if self.dtype not in DTYPES:
      raise ValueError(f"HyenaConfig: dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
    for name in ("tie_embeddings", "remat"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"HyenaConfig: {name} must be a bool, got {getattr(self, name)!r}")

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]

  def replace(self, **changes) -> HyenaConfig:
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> HyenaConfig:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"HyenaConfig: unknown fields {unknown}; known: {sorted(names)}")
    return cls(**d)


PRESETS: dict[str, HyenaConfig] = {
    # Unit tests: compiles and runs in seconds on CPU.
    "hyena-tiny": HyenaConfig(num_layers=2, d_model=32, filter_hidden=16, filter_emb_dim=5,
                              mlp_hidden=64, max_seq_len=128),
    # A CPU experiment comparable to gpt "cpu-small".
    "hyena-cpu-small": HyenaConfig(num_layers=4, d_model=128, filter_hidden=32,
                                   mlp_hidden=384, max_seq_len=256),
    # GPU: ~164M non-embedding parameters at seq 8k (the end-to-end comparison with GPT).
    "hyena-160m": HyenaConfig(vocab_size=32000, num_layers=18, d_model=864, filter_hidden=64,
                              mlp_hidden=2304, max_seq_len=8192, tie_embeddings=False,
                              dtype="bfloat16"),
}


def get_config(name: str, **overrides) -> HyenaConfig:
  """The preset ``name`` with fields replaced by ``overrides``."""
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
  return PRESETS[name].replace(**overrides)


def num_params(config: HyenaConfig, *, non_embedding: bool = False) -> int:
  """Parameter count; ``non_embedding`` leaves out the token embedding and output head."""
  c = config
  d = c.d_model
  proj = d * (c.order + 1) * d + (c.order + 1) * d + d * d + d  # in/out projections + biases
  short = c.short_filter * (c.order + 1) * d
  h = c.filter_hidden
  filt = c.filter_emb_dim * h + h + h  # dense_0 + freq_0
  filt += h * h + h + h  # dense_1 + freq_1
  filt += h * c.order * d  # out
  mixer = proj + short + filt + c.order * d  # + bias
  per_layer = mixer + 3 * d * c.mlp_hidden + 2 * d
  body = c.num_layers * per_layer + d
  if non_embedding:
    return body
  return body + c.vocab_size * d * (1 if c.tie_embeddings else 2)


def flops_per_token(config: HyenaConfig, seq_len: int) -> float:
  """Training FLOPs per token (module docstring)."""
  conv = 3.0 * (2 * 5 * 2 * math.log2(2 * seq_len) + 6) * config.d_model
  return 6.0 * num_params(config, non_embedding=True) + config.num_layers * config.order * conv


class Block(nn.Module):
  """``x + hyena(norm(x))`` then ``x + mlp(norm(x))``."""

  config: HyenaConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    init = nn.initializers.normal(c.init_std)
    out_init = nn.initializers.normal(c.init_std / math.sqrt(2 * c.num_layers))
    h = RMSNorm(eps=c.norm_eps, name="mixer_norm")(x)
    x = x + HyenaOperator(c.d_model, c.max_seq_len, order=c.order,
                          filter_hidden=c.filter_hidden, emb_dim=c.filter_emb_dim,
                          short_filter=c.short_filter, dtype=c.compute_dtype,
                          implementation=c.fft_conv_implementation, name="hyena")(h)
    h = RMSNorm(eps=c.norm_eps, name="mlp_norm")(x)
    return x + SwiGLU(c.mlp_hidden, dtype=c.compute_dtype, kernel_init=init, out_init=out_init,
                      name="mlp")(h)


class HyenaLM(nn.Module):
  """Hyena LM: int tokens ``[batch, seq]`` -> float32 logits ``[batch, seq, vocab]``."""

  config: HyenaConfig

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    c = self.config
    if not hasattr(tokens, "ndim") or tokens.ndim != 2:
      raise ValueError(f"HyenaLM: tokens must be [batch, seq], got "
                       f"{getattr(tokens, 'shape', tokens)}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise TypeError(f"HyenaLM: tokens must be integer, got {tokens.dtype}")
    if tokens.shape[1] > c.max_seq_len:
      raise ValueError(f"HyenaLM: seq={tokens.shape[1]} exceeds max_seq_len={c.max_seq_len}")
    embed = nn.Embed(c.vocab_size, c.d_model, dtype=c.compute_dtype,
                     embedding_init=nn.initializers.normal(c.init_std), name="embed")
    x = embed(tokens)
    block = nn.remat(Block) if c.remat else Block
    for i in range(c.num_layers):
      x = block(c, name=f"block_{i}")(x)
    x = RMSNorm(eps=c.norm_eps, name="final_norm")(x)
    if c.tie_embeddings:
      logits = embed.attend(x)
    else:
      logits = nn.Dense(c.vocab_size, use_bias=False, dtype=c.compute_dtype,
                        kernel_init=nn.initializers.normal(c.init_std), name="lm_head")(x)
    return logits.astype(jnp.float32)


def init_params(config: HyenaConfig, key: jax.Array, seq_len: int = 8) -> Any:
  """Fresh parameters (float32) of ``HyenaLM(config)``."""
  return HyenaLM(config).init(key, jnp.zeros((1, seq_len), jnp.int32))["params"]


__all__ = ["HyenaConfig", "HyenaLM", "PRESETS", "flops_per_token", "get_config", "init_params",
           "num_params"]
