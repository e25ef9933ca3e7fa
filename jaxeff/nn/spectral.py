"""Spectral token mixers and layers as Flax Linen modules.

* :class:`FFTConv`: a learned per-channel long convolution (explicit filter) with a skip
  term, through :func:`jaxeff.ops.fft_conv.fft_conv`.
* :class:`HyenaOperator` (Poli et al., 2023, "Hyena Hierarchy"): projections, a short
  causal depthwise convolution, and ``order`` gated long convolutions whose filters are
  *implicit*: a small MLP with sine activations over positional features
  ``[t, cos(2 pi f t), sin(2 pi f t)]``, times an exponential decay window
  ``exp(-|delta_c| t)`` (decay rates spread over channels between ``fast_decay`` and
  ``slow_decay``).
* :class:`GlobalFilter` (GFNet; Rao et al., 2021): ``y = irfft2(rfft2(x) * W)`` with a
  learnable complex filter ``W [h, w // 2 + 1, channels]`` (a global circular convolution).
* :class:`AdaptiveFrequencyFilter` (AFF; Huang et al., 2023): the frequency filter is
  predicted from the input's spectrum by a per-frequency MLP: ``y = irfft2(X * m(X))``.
* :class:`SpectralDense` (Sparse Spectral Training; Zhao et al., 2024): ``W = U diag(s) V^T``
  with ``U [in, rank]``, ``V [features, rank]`` orthonormal columns. The update rule lives
  in :func:`sst_mask_gradients` (each step: every singular value is updated, only
  ``num_active`` singular vector pairs, sampled with probability proportional to their
  singular values without replacement, get gradients) and
  :func:`sst_reorthogonalize` (every few hundred steps: re-diagonalise ``U diag(s) V^T``
  exactly by two QRs and an ``rank x rank`` SVD, so the columns are orthonormal again and
  ``W`` is unchanged). A train step calls the first on the gradients before the optimizer
  and the second every ``T`` steps on the parameters.

Inputs are channels-last (``[batch, seq, channels]`` / ``[batch, h, w, channels]``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxeff.ops.fft_conv import fft_conv


class FFTConv(nn.Module):
  """Per-channel causal long convolution: ``x [batch, seq, channels] -> same``.

  ``y = conv(k, x) + d * x`` with a learned filter ``k [channels, filter_len]`` and skip
  weight ``d [channels]``; ``filter_len <= seq`` at call time.
  """

  filter_len: int
  causal: bool = True
  implementation: str | None = None
  kernel_init: Callable = nn.initializers.normal(0.02)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if x.ndim != 3:
      raise ValueError(f"FFTConv: x must be [batch, seq, channels], got {x.shape}")
    channels = x.shape[-1]
    k = self.param("kernel", self.kernel_init, (channels, self.filter_len), jnp.float32)
    d = self.param("skip", nn.initializers.ones, (channels,), jnp.float32)
    u = jnp.swapaxes(x, 1, 2)
    y = fft_conv(u, k, causal=self.causal, implementation=self.implementation)
    return (jnp.swapaxes(y, 1, 2) + x * d.astype(x.dtype)).astype(x.dtype)


def positional_features(seq: int, max_len: int, emb_dim: int) -> jax.Array:
  """``[seq, emb_dim]``: ``t = i / max_len`` and ``(emb_dim - 1) / 2`` cos/sin pairs."""
  bands = (emb_dim - 1) // 2
  t = jnp.arange(seq, dtype=jnp.float32)[:, None] / max_len
  f = jnp.arange(1, bands + 1, dtype=jnp.float32)[None, :]
  angle = 2 * math.pi * f * t * (max_len / (max_len + 1))
  return jnp.concatenate([t, jnp.cos(angle), jnp.sin(angle)], axis=-1)


class ImplicitFilter(nn.Module):
  """Hyena's implicit long filters: ``[order, channels, seq]`` from positions alone."""

  channels: int
  order: int
  max_len: int
  emb_dim: int = 33
  hidden: int = 64
  num_inner: int = 2
  sine_freq: float = 1.0
  fast_decay: float = 0.3
  slow_decay: float = 1.5
  target: float = 1e-2

  @nn.compact
  def __call__(self, seq: int) -> jax.Array:
    z = positional_features(seq, self.max_len, self.emb_dim)
    h = z
    for i in range(self.num_inner):
      h = nn.Dense(self.hidden, name=f"dense_{i}")(h)
      freq = self.param(f"freq_{i}", nn.initializers.constant(self.sine_freq), (self.hidden,))
      h = jnp.sin(freq * h)
    h = nn.Dense(self.order * self.channels, use_bias=False, name="out")(h)  # [seq, o * c]
    # Exponential modulation: channel c decays to `target` by a fraction in [fast, slow].
    t = jnp.arange(seq, dtype=jnp.float32)[:, None] / self.max_len
    deltas = jnp.linspace(math.log(self.target) / self.fast_decay,
                          math.log(self.target) / self.slow_decay, self.channels)
    window = jnp.exp(-t * jnp.abs(deltas)[None, :])  # [seq, channels]
    h = h.reshape(seq, self.order, self.channels) * window[:, None, :]
    return jnp.transpose(h, (1, 2, 0))


def causal_depthwise_conv(x: jax.Array, w: jax.Array) -> jax.Array:
  """``y[b, t, c] = sum_j w[j, c] x[b, t - j, c]``; x ``[batch, seq, channels]``, w ``[width, channels]``."""
  y = x * w[0]
  for j in range(1, w.shape[0]):
    y = y + jnp.pad(x, ((0, 0), (j, 0), (0, 0)))[:, : x.shape[1]] * w[j]
  return y


class HyenaOperator(nn.Module):
  """Hyena operator of order ``order``: ``[batch, seq, d_model] -> [batch, seq, d_model]``.

  ``(x_1, ..., x_order, v) = short_conv(in_proj(u))``; ``z = v``; for each ``o``:
  ``z = x_o * (conv(h_o, z) + bias_o * z)`` (one gated :func:`fft_conv`); ``out_proj(z)``.
  """

  d_model: int
  max_len: int
  order: int = 2
  filter_hidden: int = 64
  emb_dim: int = 33
  short_filter: int = 3
  dtype: Any = jnp.float32
  implementation: str | None = None

  @nn.compact
  def __call__(self, u: jax.Array) -> jax.Array:
    batch, seq, d = u.shape
    if d != self.d_model:
      raise ValueError(f"HyenaOperator: u must be [batch, seq, d_model={self.d_model}], "
                       f"got {u.shape}")
    if seq > self.max_len:
      raise ValueError(f"HyenaOperator: seq={seq} exceeds max_len={self.max_len}")
    proj = nn.Dense((self.order + 1) * d, dtype=self.dtype, name="in_proj")(u)
    w = self.param("short_filter", nn.initializers.normal(0.3),
                   (self.short_filter, (self.order + 1) * d), jnp.float32)
    proj = causal_depthwise_conv(proj, w.astype(proj.dtype))
    parts = jnp.split(jnp.swapaxes(proj, 1, 2), self.order + 1, axis=1)  # [b, d, seq] each
    *xs, v = parts
    h = ImplicitFilter(d, self.order, self.max_len, emb_dim=self.emb_dim,
                       hidden=self.filter_hidden, name="filter")(seq)
    bias = self.param("bias", nn.initializers.normal(1.0), (self.order, d), jnp.float32)
    z = v
    for o in range(self.order):
      skip = z * bias[o][None, :, None].astype(z.dtype)
      z = fft_conv(z, h[o], gate=(None, xs[o]), implementation=self.implementation) + xs[o] * skip
    y = jnp.swapaxes(z, 1, 2)
    return nn.Dense(d, dtype=self.dtype, name="out_proj")(y)


def _complex_param(module: nn.Module, name: str, shape, std: float) -> jax.Array:
  w = module.param(name, nn.initializers.normal(std), (2, *shape), jnp.float32)
  return jax.lax.complex(w[0], w[1])


class GlobalFilter(nn.Module):
  """GFNet global filter: ``x [batch, h, w, channels] -> irfft2(rfft2(x) * W)`` (same shape)."""

  std: float = 0.02

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if x.ndim != 4:
      raise ValueError(f"GlobalFilter: x must be [batch, h, w, channels], got {x.shape}")
    _, h, w, c = x.shape
    weight = _complex_param(self, "filter", (h, w // 2 + 1, c), self.std)
    spec = jnp.fft.rfft2(x.astype(jnp.float32), axes=(1, 2), norm="ortho")
    y = jnp.fft.irfft2(spec * weight, s=(h, w), axes=(1, 2), norm="ortho")
    return y.astype(x.dtype)


class AdaptiveFrequencyFilter(nn.Module):
  """AFF token mixer: ``x [batch, h, w, channels]``; the filter ``m(X)`` is an MLP of the
  spectrum ``X = rfft2(x)`` (real and imaginary parts as ``2 * channels`` features per
  frequency): ``y = irfft2(X * (m_re + i m_im))``."""

  hidden: int = 64

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if x.ndim != 4:
      raise ValueError(f"AdaptiveFrequencyFilter: x must be [batch, h, w, channels], got "
                       f"{x.shape}")
    _, h, w, c = x.shape
    spec = jnp.fft.rfft2(x.astype(jnp.float32), axes=(1, 2), norm="ortho")
    feats = jnp.concatenate([spec.real, spec.imag], axis=-1)
    m = nn.Dense(2 * c, name="mask_out")(nn.relu(nn.Dense(self.hidden, name="mask_in")(feats)))
    mask = jax.lax.complex(1.0 + m[..., :c], m[..., c:])
    y = jnp.fft.irfft2(spec * mask, s=(h, w), axes=(1, 2), norm="ortho")
    return y.astype(x.dtype)


class SpectralDense(nn.Module):
  """``y = x @ U diag(s) V^T + b``: ``x [..., in] -> [..., features]`` (module docstring).

  Initialised as random orthonormal ``U``, ``V`` and equal singular values
  ``sqrt(features / rank)``, so ``||W||_F^2 = features`` as for a LeCun-normal dense layer.
  """

  features: int
  rank: int
  use_bias: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d_in = x.shape[-1]
    if not 1 <= self.rank <= min(d_in, self.features):
      raise ValueError(f"SpectralDense: rank must be in [1, min(in={d_in}, "
                       f"features={self.features})], got {self.rank}")
    ortho = nn.initializers.orthogonal()
    u = self.param("U", ortho, (d_in, self.rank), jnp.float32)
    v = self.param("V", ortho, (self.features, self.rank), jnp.float32)
    sigma = math.sqrt(self.features / self.rank)
    s = self.param("s", nn.initializers.constant(sigma), (self.rank,), jnp.float32)
    y = ((x.astype(self.dtype) @ u.astype(self.dtype)) * s.astype(self.dtype)) @ v.T.astype(
        self.dtype)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32
                         ).astype(self.dtype)
    return y


def _is_sst(tree) -> bool:
  return isinstance(tree, dict) and {"U", "s", "V"} <= set(tree)


def _map_sst(fn: Callable, params, *rest):
  """Applies ``fn(subtree, *rest_subtrees)`` to every SpectralDense parameter dict."""
  if _is_sst(params):
    return fn(params, *rest)
  if isinstance(params, dict):
    return {k: _map_sst(fn, params[k], *(r[k] for r in rest)) for k in params}
  return params


def sst_sample(s: jax.Array, key: jax.Array, num_active: int) -> jax.Array:
  """``[rank]`` 0/1 mask of ``num_active`` indices drawn without replacement with
  probability proportional to ``|s|``."""
  rank = s.shape[0]
  p = jnp.abs(s) / jnp.sum(jnp.abs(s))
  idx = jax.random.choice(key, rank, (min(num_active, rank),), replace=False, p=p)
  return jnp.zeros((rank,), jnp.float32).at[idx].set(1.0)


def sst_mask_gradients(grads, params, key: jax.Array, num_active: int):
  """Sparse Spectral Training's gradient rule for every :class:`SpectralDense` in ``params``.

  ``s`` keeps its whole gradient; ``U`` and ``V`` keep gradients only in ``num_active``
  columns sampled (per layer, fresh each step) in proportion to the singular values.
  Other parameters are untouched. Call on the gradients before the optimizer update.
  """
  counter = [0]

  def mask(g, p):
    counter[0] += 1
    m = sst_sample(p["s"], jax.random.fold_in(key, counter[0]), num_active)
    return {**g, "U": g["U"] * m, "V": g["V"] * m}

  return _map_sst(lambda g, p: mask(g, p), grads, params)


def sst_reorthogonalize(params):
  """Re-diagonalises every ``U diag(s) V^T`` (``W`` unchanged, columns orthonormal again).

  ``U = Q_u R_u``, ``V = Q_v R_v``, ``R_u diag(s) R_v^T = A diag(s') B^T`` (an ``rank x
  rank`` SVD), so ``U' = Q_u A``, ``V' = Q_v B``: ``O((in + features) rank^2)``.
  """

  def fix(p):
    qu, ru = jnp.linalg.qr(p["U"])
    qv, rv = jnp.linalg.qr(p["V"])
    a, s, bt = jnp.linalg.svd(ru * p["s"][None, :] @ rv.T)
    return {**p, "U": qu @ a, "s": s, "V": qv @ bt.T}

  return _map_sst(fix, params)


__all__ = ["AdaptiveFrequencyFilter", "FFTConv", "GlobalFilter", "HyenaOperator",
           "ImplicitFilter", "SpectralDense", "causal_depthwise_conv", "positional_features",
           "sst_mask_gradients", "sst_reorthogonalize", "sst_sample"]
