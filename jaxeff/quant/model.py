"""Model-level quantization: regex rules over parameter paths, calibration, mixed precision.

In the manner of qwix (Google's JAX quantization library): a list of :class:`QuantRule`
s maps parameter paths (``"block_0/attn/q_proj/kernel"``, the ``/``-joined keys of the
params tree; ``re.search``, first matching rule wins) to a method and a format.
:func:`quantize` returns the params tree with every matched ``kernel`` replaced by a
:class:`~jaxeff.quant.formats.QArray` of the kernel viewed as ``[K, N]`` (``K`` = the
contracted input dims, ``N`` = the features) and, where the method needs it, a sibling
``act_quant`` leaf (:class:`~jaxeff.quant.formats.ActQuant`: AWQ / SmoothQuant input
scales, W8A8 activation format). :func:`jaxeff.nn.quant.quantized_inference` then runs the
unchanged model on it.

Methods: ``"rtn"`` (round to nearest), ``"awq"`` (:mod:`jaxeff.quant.awq`), ``"gptq"``
(:mod:`jaxeff.quant.gptq`), ``"smoothquant"`` (W8A8, :mod:`jaxeff.quant.smoothquant`),
``"adadim"`` (per-OC vs per-IC grouping, :mod:`jaxeff.quant.rtn`) and ``"none"`` (keep the
float weight; put it first to exclude paths).

Calibration (AWQ, GPTQ, SmoothQuant, AdaDim and mixed precision need it): the float model
runs on ``calibration_batches`` under a ``flax.linen.intercept_methods`` interceptor that
records, for each matched ``Dense`` / ``DenseGeneral``, its input's ``X^T X`` (GPTQ),
per-channel ``max |x|`` (SmoothQuant) and a token sample (AWQ). All layers are calibrated
on the float model's activations in one pass (not sequentially on the quantized
predecessors as the GPTQ/AWQ reference scripts do).

Mixed precision (:func:`mixed_precision_rules`, in the spirit of MixLLM / FlexQ): every
matched layer's output error ``||X dW||^2`` is measured at each candidate format; layers
are promoted from the low to the high format in order of error saved per extra bit until
the average bits per weight reach the budget (:func:`jaxeff.quant.mixed_precision.allocate_bits`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxeff.quant import awq, formats, gptq, mixed_precision, rtn, smoothquant

METHODS = ("rtn", "awq", "gptq", "smoothquant", "adadim", "none")
_CALIBRATED = {"awq": "sample", "gptq": "xtx", "smoothquant": "absmax", "adadim": "xtx"}


@dataclasses.dataclass(frozen=True)
class QuantRule:
  """One rule: parameters whose path matches ``pattern`` are quantized so.

  Attributes:
    pattern: regex searched in the ``/``-joined parameter path (only ``kernel`` leaves of
      ``Dense`` / ``DenseGeneral`` layers are quantized).
    method: one of :data:`METHODS`.
    fmt: weight format (:data:`formats.FORMATS`).
    group_size: scale group along ``K`` (None: per output channel).
    symmetric: symmetric or asymmetric weight codes.
    act_fmt: per-token activation format (``"int8"`` / ``"fp8_e4m3"``) for W8A8 layers, or
      None (weight-only). ``"smoothquant"`` defaults it to ``"int8"``.
    alpha: SmoothQuant migration strength.
    damp / act_order: GPTQ options.
    in_dims: leading kernel dims that are contracted (``K``); None = from the model's
      layer (``DenseGeneral.axis``) when a model is given, else 1.
  """

  pattern: str
  method: str = "rtn"
  fmt: str = "int4"
  group_size: int | None = 128
  symmetric: bool = True
  act_fmt: str | None = None
  alpha: float = 0.5
  damp: float = 0.01
  act_order: bool = False
  in_dims: int | None = None

  def __post_init__(self):
    try:
      re.compile(self.pattern)
    except (re.error, TypeError) as e:
      raise ValueError(f"pattern: invalid regex {self.pattern!r}: {e}") from None
    if self.method not in METHODS:
      raise ValueError(f"method: unsupported quantization method {self.method!r}; expected "
                       f"one of {METHODS}")
    formats.format_spec(self.fmt)
    if self.method == "smoothquant" and self.act_fmt is None:
      object.__setattr__(self, "act_fmt", "int8")
    if self.act_fmt is not None:
      spec = formats.format_spec(self.act_fmt, name="act_fmt")
      if spec.packed:
        raise ValueError(f"act_fmt: activations are quantized to int8 or fp8, got "
                         f"{self.act_fmt!r}")
    if self.group_size is not None and (not isinstance(self.group_size, int)
                                        or self.group_size <= 0):
      raise ValueError(f"group_size: expected a positive int or None, got {self.group_size!r}")
    if not self.symmetric and formats.FORMATS[self.fmt].kind == "float":
      raise ValueError(f"symmetric: {self.fmt} is symmetric only")


def as_rule(rule: QuantRule | Sequence | dict) -> QuantRule:
  """A :class:`QuantRule` from itself, a dict of its fields, or a tuple
  ``(pattern, method, fmt, group_size, ...)`` in field order."""
  if isinstance(rule, QuantRule):
    return rule
  if isinstance(rule, dict):
    return QuantRule(**rule)
  if isinstance(rule, (tuple, list)) and rule and isinstance(rule[0], str):
    return QuantRule(*rule)
  raise TypeError(f"rules: expected QuantRule, dict or (pattern, method, fmt, ...) tuple, got "
                  f"{rule!r}")


def path_str(key: Sequence) -> str:
  """``("block_0", "attn", "q_proj", "kernel") -> "block_0/attn/q_proj/kernel"``."""
  return "/".join(str(k) for k in key)


def match_rule(path: str, rules: Sequence[QuantRule]) -> QuantRule | None:
  """The first rule whose pattern is found in ``path`` (None if none or ``"none"``)."""
  for r in rules:
    if re.search(r.pattern, path):
      return None if r.method == "none" else r
  return None


def trailing_axes(axis: int | Sequence[int], ndim: int, name: str) -> tuple[int, ...]:
  """Normalised contracted axes, which must be the trailing ones (quantized layers)."""
  axes = (axis,) if isinstance(axis, int) else tuple(axis)
  axes = tuple(a % ndim for a in axes)
  if axes != tuple(range(ndim - len(axes), ndim)):
    raise ValueError(f"{name}: quantized layers contract trailing input axes; got axis "
                     f"{axis} for an input of rank {ndim}")
  return axes


def dense_layout(module, x: jax.Array) -> tuple[int, tuple[int, ...]]:
  """``(in_dims, features)`` of a ``flax.linen.Dense`` / ``DenseGeneral`` called on ``x``."""
  import flax.linen as nn

  if isinstance(module, nn.DenseGeneral):
    if module.batch_dims:
      raise ValueError(f"{path_str(module.path)}: DenseGeneral with batch_dims is not "
                       "supported by quantized layers")
    axes = trailing_axes(module.axis, x.ndim, path_str(module.path))
    feats = module.features
    return len(axes), ((feats,) if isinstance(feats, int) else tuple(feats))
  return 1, (module.features,)


def _flatten(params) -> dict[tuple, Any]:
  from flax import traverse_util
  from flax.core import unfreeze
  return traverse_util.flatten_dict(unfreeze(params))


def _unflatten(flat: dict[tuple, Any]):
  from flax import traverse_util
  return traverse_util.unflatten_dict(flat)


def _dense_interceptor(on_call):
  """An interceptor calling ``on_call(module, x)`` before every Dense / DenseGeneral."""
  import flax.linen as nn

  def interceptor(next_fun, args, kwargs, context):
    m = context.module
    if context.method_name == "__call__" and isinstance(m, (nn.Dense, nn.DenseGeneral)):
      on_call(m, args[0] if args else kwargs["inputs"])
    return next_fun(*args, **kwargs)

  return interceptor


def trace_layouts(model, params, example_input, **apply_kwargs) -> dict[tuple, int]:
  """``{kernel key: in_dims}`` of every Dense / DenseGeneral of ``model`` (shape-only trace)."""
  import flax.linen as nn

  layouts = {}

  def record(m, x):
    layouts[tuple(m.path) + ("kernel",)] = dense_layout(m, x)[0]

  with nn.intercept_methods(_dense_interceptor(record)):
    jax.eval_shape(lambda p, b: model.apply({"params": p}, b, **apply_kwargs), params,
                   example_input)
  return layouts


def calibrate(model, params, batches: Iterable, needs: dict[tuple, set[str]], *,
              max_tokens: int = 1024, **apply_kwargs) -> dict[tuple, dict[str, jax.Array]]:
  """Runs the float model on ``batches`` and collects input statistics of the layers in
  ``needs`` (``{kernel key: {"xtx", "absmax", "sample"}}``).

  Returns ``{kernel key: {"xtx": [K, K], "absmax": [K], "sample": [<=max_tokens, K],
  "tokens": count}}`` (float32 numpy-backed arrays).
  """
  import flax.linen as nn

  batches = list(batches)
  if not batches:
    raise ValueError("calibration_batches: got an empty iterable")
  per_batch = -(-max_tokens // len(batches))

  def record(m, x):
    key = tuple(m.path) + ("kernel",)
    if key not in needs:
      return
    in_dims, _ = dense_layout(m, x)
    x2 = x.reshape(-1, math.prod(x.shape[x.ndim - in_dims:])).astype(jnp.float32)
    if "xtx" in needs[key]:
      m.sow("quant_calib", "xtx", x2.T @ x2)
    if "absmax" in needs[key]:
      m.sow("quant_calib", "absmax", jnp.max(jnp.abs(x2), axis=0))
    if "sample" in needs[key]:
      stride = max(x2.shape[0] // per_batch, 1)
      m.sow("quant_calib", "sample", x2[::stride][:per_batch])
    m.sow("quant_calib", "tokens", jnp.asarray(x2.shape[0], jnp.float32))

  @jax.jit
  def run(p, b):
    with nn.intercept_methods(_dense_interceptor(record)):
      _, state = model.apply({"params": p}, b, mutable=["quant_calib"], **apply_kwargs)
    return state.get("quant_calib", {})

  stats: dict[tuple, dict[str, Any]] = {}
  for b in batches:
    flat = _flatten(run(params, b))
    for key, vals in flat.items():
      layer, stat = key[:-1] + ("kernel",), key[-1]
      acc = stats.setdefault(layer, {})
      for v in vals:  # one entry per call of the layer
        if stat in ("xtx", "tokens"):
          acc[stat] = acc.get(stat, 0) + v
        elif stat == "absmax":
          acc[stat] = v if stat not in acc else jnp.maximum(acc[stat], v)
        else:
          acc[stat] = v if stat not in acc else jnp.concatenate([acc[stat], v])[:max_tokens]
  return stats


def _needs_for(rules, flat, extra: Iterable[str] = ()) -> dict[tuple, set[str]]:
  needs = {}
  for key, leaf in flat.items():
    if key[-1] != "kernel" or getattr(leaf, "ndim", 0) < 2:
      continue
    r = match_rule(path_str(key), rules)
    if r is None:
      continue
    want = set(extra)
    if r.method in _CALIBRATED:
      want.add(_CALIBRATED[r.method])
    if want:
      needs[key] = want
  return needs


def quantize_weight(w: jax.Array, rule: QuantRule, stats: dict | None = None,
                    path: str = "w") -> tuple[formats.QArray, formats.ActQuant | None]:
  """Quantizes one ``[K, N]`` weight by ``rule`` (``stats`` from :func:`calibrate`)."""
  k = w.shape[0]
  if rule.group_size is not None and k % rule.group_size:
    raise ValueError(f"group_size: {rule.group_size} does not divide K = {k} of {path} "
                     f"(shape {tuple(w.shape)})")
  if rule.method in _CALIBRATED and (stats is None or _CALIBRATED[rule.method] not in stats):
    raise ValueError(f"calibration_batches: method {rule.method!r} for {path} needs "
                     "calibration data (pass model= and calibration_batches=)")
  act = None
  if rule.method == "rtn":
    qa = rtn.rtn_quantize(w, rule.fmt, group_size=rule.group_size, symmetric=rule.symmetric)
  elif rule.method == "adadim":
    qa = rtn.adadim_quantize(w, rule.fmt, group_size=rule.group_size,
                             symmetric=rule.symmetric, h=stats["xtx"])
  elif rule.method == "gptq":
    qa = gptq.gptq_quantize(w, stats["xtx"], rule.fmt, group_size=rule.group_size,
                            symmetric=rule.symmetric, damp=rule.damp, act_order=rule.act_order)
  elif rule.method == "awq":
    qa, act = awq.awq_quantize(w, stats["sample"], rule.fmt, group_size=rule.group_size,
                               symmetric=rule.symmetric)
  elif rule.method == "smoothquant":
    qa, act = smoothquant.smoothquant_quantize(w, stats["absmax"], alpha=rule.alpha,
                                               w_fmt=rule.fmt, act_fmt=rule.act_fmt,
                                               group_size=rule.group_size)
  else:
    raise ValueError(f"method: unsupported quantization method {rule.method!r}")
  if rule.act_fmt is not None:
    act = formats.ActQuant(None if act is None else act.input_scale, rule.act_fmt)
  return qa, act


def quantize(params: Any, rules: Sequence, calibration_batches: Iterable | None = None, *,
             model=None, example_input=None, max_calib_tokens: int = 1024,
             apply_kwargs: dict | None = None, log=None) -> Any:
  """Quantizes the ``kernel`` leaves of ``params`` matched by ``rules`` (module docstring).

  Args:
    params: the float params tree (``model.init(...)["params"]``).
    rules: :class:`QuantRule` s (or ``(pattern, method, fmt, group_size, ...)`` tuples /
      dicts), first match wins.
    calibration_batches: model inputs (e.g. int tokens ``[batch, seq]``) for calibrated
      methods.
    model: the Flax module (``model.apply({"params": params}, batch, **apply_kwargs)``);
      needed for calibration and for the ``[K, N]`` layout of ``DenseGeneral`` kernels.
    example_input: an input to trace layouts with when no calibration batches are given.
    max_calib_tokens: token sample per layer for AWQ.
    log: optional ``print``-like progress callback.

  Returns:
    The params tree with QArray kernels and ``act_quant`` siblings where needed.
  """
  rules = [as_rule(r) for r in rules]
  apply_kwargs = apply_kwargs or {}
  flat = _flatten(params)
  calib = None if calibration_batches is None else list(calibration_batches)
  layouts = {}
  if model is not None and (calib or example_input is not None):
    layouts = trace_layouts(model, params, calib[0] if calib else example_input, **apply_kwargs)
  needs = _needs_for(rules, flat)
  stats = {}
  if needs and calib:
    if model is None:
      raise ValueError("model: calibration needs the Flax module that owns params")
    stats = calibrate(model, params, calib, needs, max_tokens=max_calib_tokens, **apply_kwargs)
  out = {}
  for key, leaf in flat.items():
    out[key] = leaf
    if key[-1] != "kernel" or getattr(leaf, "ndim", 0) < 2:
      continue
    path = path_str(key)
    rule = match_rule(path, rules)
    if rule is None:
      continue
    in_dims = rule.in_dims or layouts.get(key, 1)
    k = math.prod(leaf.shape[:in_dims])
    qa, act = quantize_weight(jnp.asarray(leaf, jnp.float32).reshape(k, -1), rule,
                              stats.get(key), path)
    out[key] = qa
    if act is not None:
      out[key[:-1] + ("act_quant",)] = act
    if log:
      log(f"  {path}: {tuple(leaf.shape)} -> {rule.method} {rule.fmt} g{rule.group_size}"
          + (f" a:{rule.act_fmt}" if rule.act_fmt else ""))
  return _unflatten(out)


def model_bytes(params: Any) -> int:
  """Storage bytes of a (possibly quantized) params tree (QArray values + scales + zeros)."""
  return int(sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
                 for x in jax.tree.leaves(params)))


def mixed_precision_rules(params: Any, model, calibration_batches: Iterable, *,
                          pattern: str = r"kernel$", budget_bits: float = 5.0,
                          candidates: Sequence[tuple[str, int | None]] = (("int4", 128),
                                                                           ("int8", None)),
                          method: str = "rtn", max_calib_tokens: int = 1024,
                          apply_kwargs: dict | None = None
                          ) -> tuple[list[QuantRule], dict[str, Any]]:
  """Per-layer formats under an average bits-per-weight budget (module docstring).

  Args:
    pattern: which kernels take part (others are left alone).
    budget_bits: average code bits per weight over the matched kernels (4 <= b <= 8 for
      the default candidates).
    candidates: ``(fmt, group_size)`` options, cheapest first.
    method: ``"rtn"`` or ``"gptq"`` for the rules returned.

  Returns:
    ``(rules, report)``: one explicit rule per matched layer (exact-path regexes) and
    ``{"bits": {path: fmt}, "errors": {path: {fmt: err}}, "average_bits": float}``.
  """
  if method not in ("rtn", "gptq"):
    raise ValueError(f"method: mixed precision supports 'rtn' or 'gptq', got {method!r}")
  apply_kwargs = apply_kwargs or {}
  flat = _flatten(params)
  calib = list(calibration_batches)
  layouts = trace_layouts(model, params, calib[0], **apply_kwargs)
  keys = [k for k, v in flat.items()
          if k[-1] == "kernel" and getattr(v, "ndim", 0) >= 2 and re.search(pattern, path_str(k))]
  if not keys:
    raise ValueError(f"pattern: {pattern!r} matches no kernel")
  stats = calibrate(model, params, calib, {k: {"xtx"} for k in keys},
                    max_tokens=max_calib_tokens, **apply_kwargs)
  sizes, errors, cand_bits = {}, {}, {}
  for fmt, g in candidates:
    cand_bits[fmt] = formats.format_spec(fmt).bits
  for key in keys:
    path = path_str(key)
    leaf = flat[key]
    w = jnp.asarray(leaf, jnp.float32).reshape(math.prod(leaf.shape[:layouts.get(key, 1)]), -1)
    h = stats[key]["xtx"]
    sizes[path] = w.size
    errors[path] = {}
    for fmt, g in candidates:
      rule = QuantRule(re.escape(path), method, fmt, g)
      qa, _ = quantize_weight(w, rule, stats[key], path)
      errors[path][fmt] = float(rtn.output_error(w, formats.dequantize(qa), h)
                                / stats[key]["tokens"])
  choice = mixed_precision.allocate_bits(sizes, errors, cand_bits, budget_bits)
  group = dict(candidates)
  rules = [QuantRule(re.escape(p) + "$", method, fmt, group[fmt]) for p, fmt in choice.items()]
  avg = sum(cand_bits[f] * sizes[p] for p, f in choice.items()) / sum(sizes.values())
  return rules, {"bits": choice, "errors": errors, "average_bits": avg}


__all__ = ["METHODS", "QuantRule", "as_rule", "calibrate", "dense_layout", "match_rule",
           "mixed_precision_rules", "model_bytes", "path_str", "quantize", "quantize_weight",
           "trace_layouts", "trailing_axes"]
