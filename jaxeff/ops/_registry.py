"""Implementation registry shared by every op family in :mod:`jaxeff.ops`.

An op lists its implementations in order of preference (fastest first, the pure-jnp
reference ``"xla"`` last). Each implementation declares the platforms it runs on and a
``supports`` predicate that returns ``None`` when it can serve a call or a short reason
when it cannot. :func:`dispatch` resolves the user's ``implementation=`` argument:

* ``None``: the first registered implementation that supports the call on the current
  platform; the reference always does.
* ``"name"``: exactly that implementation, or ``NotImplementedError`` with the reason.
* a sequence of names: tried in order; ``NotImplementedError`` listing every reason if
  none can serve the call.

A name may carry the suffix ``":interpret"`` (e.g. ``"mosaic_gpu:interpret"``) to run a
kernel in its Pallas interpret mode on any platform, which is how kernels are tested on
CPU. Interpret mode is never picked automatically.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax

INTERPRET_SUFFIX = ":interpret"


@dataclasses.dataclass(frozen=True)
class Implementation:
  """One way to compute an op.

  Attributes:
    name: the user-facing name (``"xla"``, ``"mosaic_gpu"``, ``"cudnn"``, ...).
    fn: called as ``fn(*args, interpret=bool, **kwargs)`` when ``interpretable`` else
      ``fn(*args, **kwargs)``.
    platforms: platforms where it runs for real (``jax.default_backend()`` values);
      empty means every platform.
    supports: ``supports(*args, **kwargs) -> str | None``; ``None`` when the call can be
      served, else the reason it cannot.
    interpretable: whether ``name:interpret`` is allowed (Pallas kernels).
    device_kinds: substrings of ``jax.devices()[0].device_kind`` required for real runs
      (e.g. ``("H100", "H200", "H800", "H20", "GH200")`` for Hopper-only kernels); empty
      means any device of the platform.
  """

  name: str
  fn: Callable[..., Any]
  platforms: tuple[str, ...] = ()
  supports: Callable[..., str | None] | None = None
  interpretable: bool = False
  device_kinds: tuple[str, ...] = ()


HOPPER_KINDS = ("H100", "H200", "H800", "H20", "GH200")


def current_platform() -> str:
  return jax.default_backend()


def _device_kind() -> str:
  try:
    return jax.devices()[0].device_kind
  except Exception:  # pragma: no cover - no devices at all
    return ""


def _why_not(impl: Implementation, interpret: bool, args, kwargs) -> str | None:
  if interpret:
    if not impl.interpretable:
      return f"{impl.name!r} has no interpret mode"
  else:
    platform = current_platform()
    if impl.platforms and platform not in impl.platforms:
      return (f"{impl.name!r} runs on {'/'.join(impl.platforms)}, not on {platform!r}"
              f" (use {impl.name + INTERPRET_SUFFIX!r} to interpret it)"
              if impl.interpretable else
              f"{impl.name!r} runs on {'/'.join(impl.platforms)}, not on {platform!r}")
    if impl.device_kinds:
      kind = _device_kind()
      if not any(k in kind for k in impl.device_kinds):
        return f"{impl.name!r} needs one of {impl.device_kinds}, found device {kind!r}"
  if impl.supports is not None:
    return impl.supports(*args, **kwargs)
  return None


def dispatch(op: str, registry: Sequence[Implementation],
             implementation: str | Sequence[str] | None, *args, **kwargs):
  """Runs the implementation of ``op`` that ``implementation`` selects (module docstring)."""
  by_name = {impl.name: impl for impl in registry}
  if implementation is None:
    names, explicit = [impl.name for impl in registry], False
  elif isinstance(implementation, str):
    names, explicit = [implementation], True
  elif isinstance(implementation, Sequence) and implementation and all(
      isinstance(n, str) for n in implementation):
    names, explicit = list(implementation), True
  else:
    raise TypeError(
        f"{op}: implementation must be None, a name or a non-empty sequence of names from "
        f"{sorted(by_name)}, got {implementation!r}")
  reasons = []
  for full_name in names:
    name, interpret = full_name, False
    if full_name.endswith(INTERPRET_SUFFIX):
      name, interpret = full_name[: -len(INTERPRET_SUFFIX)], True
    impl = by_name.get(name)
    if impl is None:
      raise ValueError(
          f"{op}: unknown implementation {full_name!r}; known: {sorted(by_name)}"
          f" (kernels also accept the suffix {INTERPRET_SUFFIX!r})")
    why = _why_not(impl, interpret, args, kwargs)
    if why is None:
      if impl.interpretable:  # a kernel: lowered once per signature (see lower_once)
        return lower_once(impl.fn, *args, interpret=interpret, **kwargs)
      return impl.fn(*args, **kwargs)
    reasons.append(f"{full_name}: {why}")
  if explicit:
    raise NotImplementedError(f"{op}: no requested implementation can serve this call: "
                              + "; ".join(reasons))
  # Unreachable when the registry ends with the reference, which serves every valid call.
  raise NotImplementedError(f"{op}: no implementation can serve this call: "
                            + "; ".join(reasons))


def names(registry: Sequence[Implementation]) -> list[str]:
  return [impl.name for impl in registry]


@functools.lru_cache(maxsize=None)
def _jitted(fn: Callable, static: tuple) -> Callable:
  return jax.jit(functools.partial(fn, **dict(static)))


def lower_once(fn: Callable, *args, **static):
  """``fn(*args, **static)`` through a ``jax.jit`` cached on ``(fn, static)``.

  A kernel called at many sites of one program (the unrolled layers of a model) is then
  lowered once: JAX lowers a nested jitted function once per distinct signature and calls
  it from every site, where inlining each ``pallas_call`` would trace and lower the kernel
  anew at every site (~1 s each for the flash-attention kernels, so minutes for a deep
  unrolled model). ``args`` are arrays, None or pytrees of them; ``static`` values should
  be hashable (a call with an unhashable one, e.g. an array passed by keyword, runs
  ``fn`` directly).
  """
  items = tuple(sorted(static.items()))
  try:
    hash(items)
  except TypeError:
    return fn(*args, **static)
  return _jitted(fn, items)(*args)
