"""Pruning masks and one-shot pruning of a trained parameter tree.

Scores (``w: [K, N]``, ``y = x @ w``; the input features are K):

* magnitude: ``|w|``;
* Wanda (Sun et al., 2023, "A Simple and Effective Pruning Approach for LLMs"):
  ``|w[k, n]| * ||X[:, k]||_2`` with ``X`` the layer's calibration inputs; weights are
  compared within each output (column ``n``), as in the paper.

Masks (True = keep):

* :func:`unstructured_mask`: drop the ``round(sparsity * size)`` lowest scores, over the
  whole matrix (``per_output=False``, magnitude's usual choice) or within each column
  (``per_output=True``, Wanda's); ties are broken by position (lower index dropped first).
* :func:`nm_mask`: keep the ``n`` highest scores of each group of ``m`` consecutive K rows
  of a column (2:4 and friends; ties keep the lower row).
* :func:`channel_mask` / :func:`head_mask`: structured pruning of MLP hidden channels or
  attention heads by an importance score (Wanda-style ``||W|| * ||X||`` of the unit).

:func:`prune` applies a rule to every matching kernel of a Flax parameter tree, with
calibration statistics from :func:`collect_input_norms`; :func:`prune_mlp_channels` and
:func:`prune_heads` zero whole units of a GPT's blocks.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxeff.sparse.formats import parse_nm

METHODS = ("magnitude", "wanda")


def _check_sparsity(sparsity, where: str) -> float:
  if not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
    raise ValueError(f"{where}: sparsity must be a number in [0, 1), got {sparsity!r}")
  return float(sparsity)


def _check_2d(w, where: str):
  if not hasattr(w, "shape") or len(w.shape) != 2:
    raise ValueError(f"{where}: w must be 2-D [K, N], got "
                     f"{getattr(w, 'shape', type(w).__name__)}")


def scores(w: jax.Array, method: str = "magnitude", input_norm: jax.Array | None = None
           ) -> jax.Array:
  """Importance of each weight: ``|w|`` or Wanda's ``|w| * input_norm[:, None]``.

  Args:
    w: ``[K, N]``.
    method: ``"magnitude"`` or ``"wanda"``.
    input_norm: ``[K]`` L2 norms of the input features over the calibration tokens
      (Wanda only).
  """
  _check_2d(w, "scores")
  if method not in METHODS:
    raise ValueError(f"scores: method must be one of {METHODS}, got {method!r}")
  s = jnp.abs(w.astype(jnp.float32))
  if method == "wanda":
    if input_norm is None or tuple(input_norm.shape) != (w.shape[0],):
      raise ValueError(f"scores: wanda needs input_norm of shape ({w.shape[0]},), got "
                       f"{None if input_norm is None else tuple(input_norm.shape)}")
    s = s * input_norm.astype(jnp.float32)[:, None]
  return s


def _drop_lowest(s: jax.Array, count: int) -> jax.Array:
  """Mask of a 1-D score vector keeping all but its ``count`` lowest (stable order)."""
  order = jnp.argsort(s, stable=True)
  keep = jnp.ones(s.shape, bool)
  return keep.at[order[:count]].set(False)


def unstructured_mask(score: jax.Array, sparsity: float, *, per_output: bool = False
                      ) -> jax.Array:
  """Keep-mask dropping the ``sparsity`` fraction of lowest scores.

  Args:
    score: ``[K, N]`` (:func:`scores`).
    sparsity: fraction to drop, in ``[0, 1)``.
    per_output: rank within each column (Wanda) instead of over the whole matrix.

  Returns:
    bool ``[K, N]``; exactly ``round(sparsity * K)`` zeros per column (per_output) or
    ``round(sparsity * K * N)`` in all.
  """
  _check_2d(score, "unstructured_mask")
  sparsity = _check_sparsity(sparsity, "unstructured_mask")
  k, n = score.shape
  if per_output:
    drop = int(round(sparsity * k))
    return jax.vmap(lambda c: _drop_lowest(c, drop), in_axes=1, out_axes=1)(score)
  drop = int(round(sparsity * k * n))
  return _drop_lowest(score.reshape(-1), drop).reshape(k, n)


def nm_mask(score: jax.Array, pattern: str | tuple[int, int] = "2:4") -> jax.Array:
  """Keep-mask with exactly ``n`` kept weights in each group of ``m`` consecutive rows.

  Args:
    score: ``[K, N]`` (``|w|`` for magnitude masks); K divisible by ``m``.
    pattern: ``"2:4"``, ``"1:4"``, ``"2:8"``, ...

  Returns:
    bool ``[K, N]``.
  """
  n, m = parse_nm(pattern)
  _check_2d(score, "nm_mask")
  k, cols = score.shape
  if k % m:
    raise ValueError(f"nm_mask: K = {k} (shape {tuple(score.shape)}) must be divisible by "
                     f"M = {m} for {n}:{m} sparsity")
  g = score.reshape(k // m, m, cols)
  # rank of each entry within its group, highest first; stable: ties keep the lower row
  order = jnp.argsort(-g, axis=1, stable=True)
  ranks = jnp.argsort(order, axis=1, stable=True)
  return (ranks < n).reshape(k, cols)


def magnitude_prune(w: jax.Array, sparsity: float | None = None, *,
                    pattern: str | None = None) -> jax.Array:
  """``w`` with its lowest-magnitude weights zeroed (unstructured ``sparsity`` over the
  matrix, or the N:M ``pattern``)."""
  s = scores(w)
  mask = nm_mask(s, pattern) if pattern else unstructured_mask(s, sparsity)
  return jnp.where(mask, w, 0).astype(w.dtype)


# ------------------------------------------------------------------- model-level pruning


@dataclasses.dataclass(frozen=True)
class PruneRule:
  """Prune every kernel whose ``/``-joined path matches ``pattern``.

  Attributes:
    pattern: regex searched in the parameter path (e.g. ``r"(attn|mlp)/[^/]+_proj/kernel$"``).
    method: ``"magnitude"`` or ``"wanda"``.
    sparsity: unstructured fraction to drop, or None with ``nm``.
    nm: ``"2:4"``-style pattern, or None.
    per_output: rank within output columns (default: True for Wanda, False for magnitude).
  """

  pattern: str
  method: str = "magnitude"
  sparsity: float | None = None
  nm: str | None = None
  per_output: bool | None = None

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"PruneRule: method must be one of {METHODS}, got {self.method!r}")
    if (self.sparsity is None) == (self.nm is None):
      raise ValueError("PruneRule: give exactly one of sparsity (unstructured) and nm, got "
                       f"sparsity={self.sparsity!r} nm={self.nm!r}")
    if self.sparsity is not None:
      _check_sparsity(self.sparsity, "PruneRule")
    else:
      parse_nm(self.nm)


def _flatten(params) -> dict[str, Any]:
  from flax import traverse_util
  from flax.core import unfreeze
  return {"/".join(k): v for k, v in traverse_util.flatten_dict(unfreeze(params)).items()}


def _unflatten(flat: dict[str, Any]):
  from flax import traverse_util
  return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def kernel_in_dims(path: str, kernel: Any) -> int:
  """Leading axes of a Dense / DenseGeneral kernel that are inputs (attention ``o_proj``
  contracts heads and head_dim: 2; everything else 1)."""
  return 2 if path.endswith("o_proj/kernel") and kernel.ndim == 3 else 1


def collect_input_norms(model, params, batches: Sequence[Any], pattern: str = ".*"
                        ) -> dict[str, jax.Array]:
  """L2 norms of each Dense layer's input features over ``batches`` (Wanda's ``||X||``).

  Returns ``{kernel path: [K] float32}`` for the layers whose kernel path matches.
  """
  import flax.linen as nn

  from jaxeff.quant.model import dense_layout

  def batch_sums(params, b):
    sums: dict[str, jax.Array] = {}

    def interceptor(next_fun, args, kwargs, context):
      m = context.module
      if (context.method_name == "__call__" and isinstance(m, (nn.Dense, nn.DenseGeneral))
          and m.has_variable("params", "kernel")):
        path = "/".join(m.path) + "/kernel"
        if re.search(pattern, path):
          x = args[0] if args else kwargs["inputs"]
          in_dims, _ = dense_layout(m, x)
          k = int(np.prod(x.shape[x.ndim - in_dims:]))
          sq = jnp.sum(jnp.square(x.astype(jnp.float32).reshape(-1, k)), axis=0)
          sums[path] = sums.get(path, 0.0) + sq
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
      model.apply({"params": params}, b)
    return sums

  step = jax.jit(batch_sums)
  sums: dict[str, jax.Array] = {}
  for b in batches:
    for k, v in step(params, b).items():
      sums[k] = sums.get(k, 0.0) + v
  return {k: jnp.sqrt(v) for k, v in sums.items()}


@functools.partial(jax.jit, static_argnames=("method", "sparsity", "nm", "per_output"))
def _rule_mask(w2, norm, *, method, sparsity, nm, per_output):
  s = scores(w2, method, norm)
  if nm:
    return nm_mask(s, nm)
  return unstructured_mask(s, sparsity, per_output=per_output)


def prune(params, rules: Sequence[PruneRule], input_norms: dict[str, jax.Array] | None = None
          ) -> tuple[Any, dict[str, float]]:
  """One-shot pruning of a parameter tree.

  Args:
    params: Flax params (Dense / DenseGeneral ``kernel`` leaves).
    rules: the first rule whose pattern matches a path applies.
    input_norms: from :func:`collect_input_norms` (needed by Wanda rules).

  Returns:
    ``(pruned params, {path: achieved sparsity})``; kernels keep their shapes and dtypes.
  """
  flat = _flatten(params)
  report = {}
  for path, w in flat.items():
    rule = next((r for r in rules if re.search(r.pattern, path)), None)
    if rule is None or not hasattr(w, "ndim") or w.ndim < 2:
      continue
    in_dims = kernel_in_dims(path, w)
    k = int(np.prod(w.shape[:in_dims]))
    w2 = w.reshape(k, -1)
    norm = None
    if rule.method == "wanda":
      if input_norms is None or path not in input_norms:
        raise ValueError(f"prune: Wanda rule {rule.pattern!r} needs input norms for {path!r} "
                         "(collect_input_norms)")
      norm = input_norms[path]
    per_output = rule.method == "wanda" if rule.per_output is None else rule.per_output
    mask = _rule_mask(w2, norm, method=rule.method, sparsity=rule.sparsity, nm=rule.nm,
                      per_output=per_output)
    flat[path] = jnp.where(mask, w2, 0).astype(w.dtype).reshape(w.shape)
    report[path] = float(1.0 - jnp.mean(mask))
  return _unflatten(flat), report


# ------------------------------------------------------------------------- structured


def channel_mask(importance: jax.Array, fraction: float) -> jax.Array:
  """Keep-mask over units (channels / heads) dropping the ``fraction`` least important."""
  fraction = _check_sparsity(fraction, "channel_mask")
  if importance.ndim != 1:
    raise ValueError(f"channel_mask: importance must be 1-D [units], got {importance.shape}")
  return _drop_lowest(importance.astype(jnp.float32), int(round(fraction * importance.size)))


def head_mask(importance: jax.Array, fraction: float) -> jax.Array:
  """:func:`channel_mask` over attention heads (``importance: [heads]``)."""
  return channel_mask(importance, fraction)


def _blocks(params):
  return sorted(k for k in params if k.startswith("block_"))


def prune_mlp_channels(params, fraction: float, input_norms: dict[str, jax.Array] | None = None
                       ) -> Any:
  """Zeros the ``fraction`` least important hidden channels of every SwiGLU block.

  Importance of channel ``i``: ``||down[i, :]|| * ||h_i||`` when ``input_norms`` has the
  down projection's input norms (Wanda-style), else ``||gate[:, i]|| * ||up[:, i]|| *
  ||down[i, :]||``. The gate / up columns and down row of a dropped channel are zeroed
  (a later pass can slice them away).
  """
  params = jax.tree.map(lambda a: a, params)
  for b in _blocks(params):
    mlp = dict(params[b]["mlp"])
    g, u, d = (mlp[n]["kernel"] for n in ("gate_proj", "up_proj", "down_proj"))
    key = f"{b}/mlp/down_proj/kernel"
    if input_norms and key in input_norms:
      imp = jnp.linalg.norm(d.astype(jnp.float32), axis=1) * input_norms[key]
    else:
      imp = (jnp.linalg.norm(g.astype(jnp.float32), axis=0)
             * jnp.linalg.norm(u.astype(jnp.float32), axis=0)
             * jnp.linalg.norm(d.astype(jnp.float32), axis=1))
    keep = channel_mask(imp, fraction)
    mlp["gate_proj"] = {"kernel": jnp.where(keep[None, :], g, 0).astype(g.dtype)}
    mlp["up_proj"] = {"kernel": jnp.where(keep[None, :], u, 0).astype(u.dtype)}
    mlp["down_proj"] = {"kernel": jnp.where(keep[:, None], d, 0).astype(d.dtype)}
    params[b] = {**params[b], "mlp": mlp}
  return params


def prune_heads(params, fraction: float) -> Any:
  """Zeros the ``fraction`` least important query heads of every attention block.

  Importance of head ``h``: ``||q_proj[:, h, :]|| * ||o_proj[h, :, :]||``; a dropped
  head's query projection and output-projection rows are zeroed (its output is then 0).
  """
  params = jax.tree.map(lambda a: a, params)
  for b in _blocks(params):
    attn = dict(params[b]["attn"])
    q, o = attn["q_proj"]["kernel"], attn["o_proj"]["kernel"]  # [d, H, hd], [H, hd, d]
    imp = (jnp.sqrt(jnp.sum(jnp.square(q.astype(jnp.float32)), axis=(0, 2)))
           * jnp.sqrt(jnp.sum(jnp.square(o.astype(jnp.float32)), axis=(1, 2))))
    keep = head_mask(imp, fraction)
    q = jnp.where(keep[None, :, None], q, 0).astype(q.dtype)
    o = jnp.where(keep[:, None, None], o, 0).astype(o.dtype)
    attn["q_proj"] = {**attn["q_proj"], "kernel": q}
    attn["o_proj"] = {**attn["o_proj"], "kernel": o}
    params[b] = {**params[b], "attn": attn}
  return params


def sparsity_of(params, pattern: str = r"kernel$") -> float:
  """Fraction of zeros over the kernels whose path matches ``pattern``."""
  flat = _flatten(params)
  zeros = total = 0
  for path, w in flat.items():
    if re.search(pattern, path) and hasattr(w, "size"):
      zeros += int(np.count_nonzero(np.asarray(w) == 0))
      total += int(w.size)
  return zeros / max(total, 1)


__all__ = ["METHODS", "PruneRule", "channel_mask", "collect_input_norms", "head_mask",
           "kernel_in_dims", "magnitude_prune", "nm_mask", "prune", "prune_heads",
           "prune_mlp_channels", "scores", "sparsity_of", "unstructured_mask"]
