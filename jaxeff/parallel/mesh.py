"""Device meshes and logical-axis rules for ``shard_map`` parallelism.

A :class:`MeshConfig` names the size of each of the six parallel axes (``data``,
``fsdp``, ``pipeline``, ``expert``, ``sequence``, ``tensor``; ``-1`` = the devices left
over) and :func:`make_mesh` lays the devices out with ``tensor`` innermost (the fastest
links: NVLink / ICI neighbours) and ``data`` outermost (the slowest: across hosts), as in
MaxText. Every axis is always present in the mesh (size 1 when unused), so code can name
any axis in a collective; a size-1 axis costs nothing (XLA drops collectives over one
device).

Logical-axis rules (:data:`DEFAULT_RULES`) map the names of parameter and activation
axes (``"batch"``, ``"embed"``, ``"heads"``, ``"mlp"``, ``"vocab"``, ...) to mesh axes in
one place, as in Flax's ``logical_axis_rules`` and MaxText; :func:`logical_spec` turns
a tuple of logical names into a ``PartitionSpec`` and :func:`check_divisible` says which
array dimension a mesh axis does not divide.

Multi-host (GPU clusters, TPU pods): call :func:`initialize_distributed` (a wrapper of
``jax.distributed.initialize``) in every process before any device is touched; the mesh
then spans ``jax.devices()`` of all processes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# Outermost to innermost: the order devices are laid out in (see module docstring).
AXES: tuple[str, ...] = ("data", "pipeline", "fsdp", "expert", "sequence", "tensor")

# Logical axis name -> mesh axis (or tuple of mesh axes, or None = replicated).
DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
    # activations
    "batch": ("data", "fsdp", "expert"),
    "seq": "sequence",
    "act_embed": None,
    "act_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
    # parameters
    "layers": "pipeline",
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "norm": None,
    "expert": "expert",
}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Sizes of the parallel axes; ``-1`` (at most one axis) takes the devices left over.

  Attributes:
    data: pure data parallelism (parameters replicated, gradients all-reduced).
    fsdp: data parallelism with parameters and optimizer state sharded (ZeRO-3).
    pipeline: pipeline stages (layers split into consecutive groups).
    expert: expert parallelism (MoE experts split; batch split like ``data`` elsewhere).
    sequence: context parallelism (sequence split; ring or all-to-all attention).
    tensor: Megatron tensor parallelism (heads, MLP hidden units and vocabulary split).
  """

  data: int = -1
  pipeline: int = 1
  fsdp: int = 1
  expert: int = 1
  sequence: int = 1
  tensor: int = 1

  def __post_init__(self):
    for name in AXES:
      v = getattr(self, name)
      if not isinstance(v, int) or isinstance(v, bool) or (v < 1 and v != -1):
        raise ValueError(f"MeshConfig: {name} must be a positive int or -1 (the rest), "
                         f"got {v!r}")
    rest = [a for a in AXES if getattr(self, a) == -1]
    if len(rest) > 1:
      raise ValueError(f"MeshConfig: at most one axis may be -1 (the rest), got {rest}")

  @classmethod
  def parse(cls, text: str) -> MeshConfig:
    """``"data=2,tensor=2,sequence=2"`` -> MeshConfig (unnamed axes: size 1, ``data`` the
    rest unless another axis is ``-1`` or ``data`` is given)."""
    if not isinstance(text, str) or not text.strip():
      raise ValueError(f"mesh: expected 'axis=size,...' with axes from {list(AXES)}, "
                       f"got {text!r}")
    sizes: dict[str, int] = {}
    for part in text.split(","):
      part = part.strip()
      if "=" not in part:
        raise ValueError(f"mesh: expected 'axis=size' entries separated by commas, got "
                         f"{part!r} in {text!r}")
      name, value = (s.strip() for s in part.split("=", 1))
      if name not in AXES:
        raise ValueError(f"mesh: unknown axis {name!r}; known axes: {list(AXES)}")
      if name in sizes:
        raise ValueError(f"mesh: axis {name!r} given twice in {text!r}")
      try:
        sizes[name] = int(value)
      except ValueError:
        raise ValueError(f"mesh: size of axis {name!r} must be an integer (or -1 for the "
                         f"rest), got {value!r}") from None
    return cls.from_dict(sizes)

  @classmethod
  def from_dict(cls, sizes: Mapping[str, int]) -> MeshConfig:
    """Axis sizes by name; unnamed axes are 1 except ``data`` (the rest, if none is -1)."""
    unknown = sorted(set(sizes) - set(AXES))
    if unknown:
      raise ValueError(f"mesh: unknown axis {unknown[0]!r}; known axes: {list(AXES)}")
    full = {a: 1 for a in AXES}
    if "data" not in sizes and -1 not in sizes.values():
      full["data"] = -1
    full.update(sizes)
    return cls(**full)

  def to_dict(self) -> dict[str, int]:
    return {a: getattr(self, a) for a in AXES}

  def resolve(self, num_devices: int) -> dict[str, int]:
    """Concrete sizes for ``num_devices`` devices (raises ValueError if they do not fit)."""
    sizes = self.to_dict()
    fixed = math.prod(v for v in sizes.values() if v != -1)
    rest = [a for a, v in sizes.items() if v == -1]
    if rest:
      if num_devices % fixed:
        raise ValueError(
            f"mesh: the fixed axis sizes {self._fmt({a: v for a, v in sizes.items() if v != -1})} (product {fixed}) do not divide "
            f"the number of devices ({num_devices}), so '{rest[0]}=-1' cannot take the rest")
      sizes[rest[0]] = num_devices // fixed
    elif fixed != num_devices:
      raise ValueError(f"mesh: the axis sizes {self._fmt(sizes)} multiply to {fixed}, but "
                       f"there are {num_devices} devices; make the product {num_devices} "
                       "(or give one axis -1)")
    return sizes

  @staticmethod
  def _fmt(sizes):
    return ",".join(f"{a}={v}" for a, v in sizes.items() if v != 1) or "all 1"


def make_mesh(config: MeshConfig | str | Mapping[str, int] | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A :class:`jax.sharding.Mesh` with all of :data:`AXES` over ``devices``.

  Args:
    config: a :class:`MeshConfig`, its text form (``"data=2,tensor=4"``) or a dict of
      sizes; None = all devices on ``data``.
    devices: default ``jax.devices()`` (every device of every process). With one process
      the device order is the topology-aware one of ``jax.make_mesh``.

  Returns:
    a mesh of shape ``[data, pipeline, fsdp, expert, sequence, tensor]``.
  """
  if config is None:
    config = MeshConfig()
  elif isinstance(config, str):
    config = MeshConfig.parse(config)
  elif isinstance(config, Mapping):
    config = MeshConfig.from_dict(config)
  elif not isinstance(config, MeshConfig):
    raise TypeError(f"make_mesh: config must be a MeshConfig, a string or a dict, got "
                    f"{type(config).__name__}")
  devices = list(jax.devices() if devices is None else devices)
  sizes = config.resolve(len(devices))
  shape = tuple(sizes[a] for a in AXES)
  if devices == list(jax.devices()) and jax.process_count() == 1:
    try:
      return jax.make_mesh(shape, AXES, devices=devices,
                           axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))
    except (TypeError, ValueError, NotImplementedError):
      pass
  return Mesh(np.asarray(devices, dtype=object).reshape(shape), AXES)


def initialize_distributed(**kwargs) -> None:
  """Joins a multi-process job (``jax.distributed.initialize(**kwargs)``), once.

  Without arguments JAX reads the cluster from the environment: TPU pods, SLURM
  (``srun``), Open MPI (``mpirun``), or ``JAX_COORDINATOR_ADDRESS`` /
  ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``. Call it before any device is touched.
  """
  if jax.distributed.is_initialized():
    return
  jax.distributed.initialize(**kwargs)


def mesh_sizes(mesh: Mesh) -> dict[str, int]:
  """``{axis: size}`` of ``mesh``."""
  return dict(zip(mesh.axis_names, mesh.devices.shape))


def axis_size(mesh: Mesh, axis: str | tuple[str, ...] | None) -> int:
  """Number of devices along a mesh axis (or a tuple of axes; None = 1)."""
  if axis is None:
    return 1
  names = (axis,) if isinstance(axis, str) else tuple(axis)
  sizes = mesh_sizes(mesh)
  for a in names:
    if a not in sizes:
      raise ValueError(f"mesh: unknown axis {a!r}; the mesh has {list(sizes)}")
  return math.prod(sizes[a] for a in names)


def logical_spec(logical_axes: Sequence[str | None],
                 rules: Mapping[str, str | tuple[str, ...] | None] | None = None,
                 mesh: Mesh | None = None) -> P:
  """PartitionSpec of an array whose axes have the given logical names.

  Mesh axes of size 1 (when ``mesh`` is given) are left out, and a mesh axis already
  used by an earlier array axis is not used again.
  """
  rules = DEFAULT_RULES if rules is None else rules
  used: set[str] = set()
  out = []
  for name in logical_axes:
    if name is None:
      out.append(None)
      continue
    if name not in rules:
      raise ValueError(f"logical_spec: no rule for logical axis {name!r}; known: "
                       f"{sorted(rules)}")
    target = rules[name]
    names = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
    keep = []
    for a in names:
      if a not in AXES:
        raise ValueError(f"logical_spec: rule {name!r} -> {a!r} names an unknown mesh axis; "
                         f"known: {list(AXES)}")
      if a in used or (mesh is not None and axis_size(mesh, a) == 1):
        continue
      keep.append(a)
      used.add(a)
    out.append(None if not keep else keep[0] if len(keep) == 1 else tuple(keep))
  while out and out[-1] is None:
    out.pop()
  return P(*out)


def check_divisible(name: str, shape: Sequence[int], spec: P, mesh: Mesh) -> None:
  """Raises ValueError naming ``name`` when a mesh axis of ``spec`` does not divide the
  array dimension it shards."""
  for dim, (n, axes) in enumerate(zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)))):
    size = axis_size(mesh, axes)
    if n % size:
      raise ValueError(f"{name}: dimension {dim} of shape {tuple(shape)} has size {n}, which "
                       f"mesh axis {axes!r} of size {size} does not divide")


def sharding(mesh: Mesh, spec: P) -> NamedSharding:
  return NamedSharding(mesh, spec)


# ----------------------------------------------------------------------------- inside shard_map


def default_check_vma() -> bool:
  """``jax.shard_map``'s ``check_vma`` for maps that run jaxeff's Pallas kernels: on for
  CPU (pure XLA), off on GPU/TPU, where ``pallas_call`` output shapes carry no
  varying-axes types yet. Off, JAX's transpose psums the gradients of replicated inputs
  instead (same gradients)."""
  return jax.default_backend() == "cpu"


def varying_axes(x) -> frozenset:
  """The manual mesh axes ``x`` varies over inside ``shard_map`` (empty outside)."""
  t = jax.typeof(x)
  vma = getattr(t, "vma", None)
  if vma is None:
    mat = getattr(t, "manual_axis_type", None)
    vma = getattr(mat, "varying", ()) if mat is not None else ()
  return frozenset(vma)


def _pvary(x, axes) -> jax.Array:
  missing = tuple(a for a in axes if a not in varying_axes(x))
  return jax.lax.pcast(x, missing, to="varying") if missing else x


def pvary_like(ref, x) -> jax.Array:
  """``x`` made varying over the manual axes ``ref`` varies over (no-op at run time).

  ``lax.cond`` / ``lax.switch`` branches and ``scan`` carries must agree on these types.
  """
  return _pvary(x, varying_axes(ref))


def pvary_to(tree, axes) -> Any:
  """Every leaf of ``tree`` made varying over ``axes`` (no-op at run time)."""
  return jax.tree.map(lambda a: _pvary(a, tuple(axes)), tree)


def union_varying_axes(*trees) -> frozenset:
  """The manual axes any leaf of ``trees`` varies over."""
  out = frozenset()
  for a in jax.tree.leaves(trees):
    out |= varying_axes(a)
  return out
