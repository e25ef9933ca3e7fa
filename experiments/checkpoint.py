"""Orbax checkpoints of a training run: atomic saves every N steps, keep the last K.

A checkpoint directory holds one folder per saved step (``<dir>/<step>/``) with three
items: ``params`` and ``opt_state`` (Orbax ``StandardSave``: arrays with their shardings)
and ``meta`` (JSON: step, model and training config, data fingerprint). Orbax writes each
step into a temporary folder and renames it when complete, so a crash mid-save leaves the
previous steps intact and the half-written folder is ignored.

Restoring validates first and turns every way a folder can be wrong (missing, not a
checkpoint, a step folder without its items, unreadable arrays) into one
:class:`CheckpointError` with a one-line message.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import jax

ITEMS = ("params", "opt_state", "meta")
_STEP_MARKER = "_CHECKPOINT_METADATA"


class CheckpointError(ValueError):
  """A checkpoint directory that is missing, not a checkpoint, or corrupt."""


def _ocp():
  import orbax.checkpoint as ocp  # deferred: importing Orbax costs about a second
  logging.getLogger("absl").setLevel(logging.ERROR)
  return ocp


def resolve_dir(path: str | os.PathLike) -> Path:
  """``path`` itself, or ``path/checkpoints`` when ``path`` is a run folder (absolute:
  Orbax refuses relative paths)."""
  p = Path(path).absolute()
  if (p / "checkpoints").is_dir():
    return p / "checkpoints"
  return p


def complete_steps(directory: Path) -> list[int]:
  """Steps whose folder holds every item (a finished, renamed Orbax save), ascending."""
  if not directory.is_dir():
    return []
  steps = []
  for child in directory.iterdir():
    if child.is_dir() and child.name.isdigit() and all((child / i).is_dir() for i in ITEMS):
      steps.append(int(child.name))
  return sorted(steps)


class Checkpointer:
  """Saves and restores ``(params, opt_state, meta)`` under ``directory``.

  Args:
    directory: the checkpoint folder (created on the first save).
    keep: how many of the most recent steps to keep.
    every: save when ``step % every == 0`` (``save(..., force=True)`` always saves).
  """

  def __init__(self, directory: str | os.PathLike, *, keep: int = 3, every: int = 1000):
    if keep < 1:
      raise ValueError(f"keep must be >= 1, got {keep}")
    if every < 1:
      raise ValueError(f"every must be >= 1, got {every}")
    ocp = _ocp()
    self.directory = Path(directory).absolute()
    self.every = every
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=False)
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

  def should_save(self, step: int) -> bool:
    return step % self.every == 0

  def save(self, step: int, params: Any, opt_state: Any, meta: dict[str, Any], *,
           force: bool = False) -> bool:
    """Writes step ``step`` if due (or ``force``); returns whether it saved."""
    if not (force or self.should_save(step)) or step in self._manager.all_steps():
      return False
    ocp = _ocp()
    self._manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
        meta=ocp.args.JsonSave(dict(meta, step=step))), force=True)
    self._manager.wait_until_finished()
    return True

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def latest_step(path: str | os.PathLike) -> int:
  """The newest complete step in a checkpoint (or run) folder; CheckpointError if none."""
  directory = resolve_dir(path)
  if not directory.exists():
    raise CheckpointError(f"checkpoint directory {str(path)!r} does not exist")
  if not directory.is_dir():
    raise CheckpointError(f"{str(path)!r} is not a checkpoint directory (it is a file)")
  steps = complete_steps(directory)
  if not steps:
    raise CheckpointError(
        f"{str(path)!r} is not a checkpoint directory (no complete step folders like "
        f"'<dir>/1000/' holding {', '.join(ITEMS)})")
  return steps[-1]


def _step_dir(path, step):
  directory = resolve_dir(path)
  if step is None:
    step = latest_step(path)
  elif step not in complete_steps(directory):
    raise CheckpointError(f"{str(path)!r} has no complete step {step}; complete steps: "
                          f"{complete_steps(directory) or 'none'}")
  return directory, step


def _one_line(e: Exception) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0][:200] if text else ''}"


def read_meta(path: str | os.PathLike, step: int | None = None) -> dict[str, Any]:
  """The JSON metadata of ``step`` (default: the newest complete step)."""
  directory, step = _step_dir(path, step)
  ocp = _ocp()
  try:
    with ocp.CheckpointManager(directory, item_names=ITEMS, options=ocp.CheckpointManagerOptions(
        create=False, enable_async_checkpointing=False)) as manager:
      meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  except Exception as e:
    raise CheckpointError(f"checkpoint {directory / str(step)} is corrupt: its metadata cannot "
                          f"be read ({_one_line(e)})") from None
  if not isinstance(meta, dict) or "model" not in meta:
    raise CheckpointError(f"checkpoint {directory / str(step)} is corrupt: its metadata has no "
                          "model config")
  return meta


def restore(path: str | os.PathLike, *, abstract_params: Any, abstract_opt_state: Any = None,
            step: int | None = None) -> tuple[Any, Any, dict[str, Any]]:
  """Restores ``(params, opt_state or None, meta)`` of ``step`` (default: the newest).

  Args:
    path: a checkpoint folder or a run folder holding ``checkpoints/``.
    abstract_params / abstract_opt_state: trees of ``jax.ShapeDtypeStruct`` with the
      target shardings (``abstract_opt_state=None`` skips the optimizer state).
    step: which step; None means the newest complete one.

  Raises:
    CheckpointError: missing directory, not a checkpoint, or unreadable/corrupt arrays.
  """
  directory, step = _step_dir(path, step)
  meta = read_meta(directory, step)
  ocp = _ocp()
  items = {"params": ocp.args.StandardRestore(abstract_params)}
  if abstract_opt_state is not None:
    items["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
  try:
    with ocp.CheckpointManager(directory, item_names=ITEMS, options=ocp.CheckpointManagerOptions(
        create=False, enable_async_checkpointing=False)) as manager:
      out = manager.restore(step, args=ocp.args.Composite(**items))
    params = out["params"]
    opt_state = out["opt_state"] if abstract_opt_state is not None else None
    jax.block_until_ready((params, opt_state))
  except Exception as e:
    raise CheckpointError(f"checkpoint {directory / str(step)} is corrupt or does not match the "
                          f"model ({_one_line(e)})") from None
  return params, opt_state, meta
