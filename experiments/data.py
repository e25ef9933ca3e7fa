"""Byte-level text data for the LM experiments: corpus, train/validation split, batches.

The default corpus is text every machine with Python has: the ``*.py`` sources of the
standard library (``sysconfig.get_paths()["stdlib"]``, without ``site-packages``), read
at run time in sorted path order and joined with a ``# file: <path>`` header each. Any
text file, or a directory (its files in sorted order, recursively), can replace it.

Tokens are bytes (vocabulary 256). The split is fixed: the byte stream is cut into
blocks of ``split_block`` bytes and every ``round(1 / val_fraction)``-th block goes to
validation, so both splits sample the whole corpus and never share a byte.

Training batches are a pure function of ``(seed, step)``: window offsets come from a
counter-based generator keyed by both, so a run resumed at step ``s`` sees exactly the
batches the uninterrupted run would have seen. Validation windows are fixed,
non-overlapping and spread evenly over the validation split.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sysconfig
from pathlib import Path

import numpy as np

VOCAB_SIZE = 256
SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


class DataError(ValueError):
  """A data path or corpus that cannot be used (reported as one line by the scripts)."""


def stdlib_files() -> list[Path]:
  """The standard library's ``*.py`` files, sorted by path relative to the stdlib root."""
  root = Path(sysconfig.get_paths()["stdlib"])
  files = [p for p in root.rglob("*.py")
           if not SKIP_DIRS.intersection(p.relative_to(root).parts[:-1]) and p.is_file()]
  return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _join(files: list[Path], root: Path) -> bytes:
  parts = []
  for f in files:
    text = f.read_bytes()
    if text:
      parts.append(b"# file: " + f.relative_to(root).as_posix().encode() + b"\n" + text + b"\n")
  return b"".join(parts)


def load_corpus(path: str | os.PathLike | None = None) -> tuple[bytes, str]:
  """Reads the corpus: ``path`` (a text file or a directory) or, if None, the stdlib.

  Returns:
    ``(data, description)``.

  Raises:
    DataError: ``path`` does not exist, or the corpus is empty.
  """
  if path is None:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_files()
    data, desc = _join(files, root), f"Python stdlib sources ({root}, {len(files)} files)"
  else:
    p = Path(path)
    if not p.exists():
      raise DataError(f"--data: path {str(path)!r} does not exist (give a text file or a "
                      "directory of text files)")
    if p.is_dir():
      files = sorted((f for f in p.rglob("*") if f.is_file()
                      and not any(part.startswith(".") for part in f.relative_to(p).parts)),
                     key=lambda f: f.relative_to(p).as_posix())
      data, desc = _join(files, p), f"{p} ({len(files)} files)"
    else:
      data, desc = p.read_bytes(), str(p)
  if not data:
    raise DataError(f"--data: the corpus {desc} is empty")
  return data, desc


def split_train_val(tokens: np.ndarray, *, val_fraction: float = 0.05,
                    split_block: int = 65536) -> tuple[np.ndarray, np.ndarray]:
  """Deterministic disjoint split of ``tokens [n]`` into ``(train, val)``.

  The stream is cut into blocks of ``split_block`` tokens; block ``i`` is validation when
  ``i % round(1/val_fraction) == round(1/val_fraction) - 1``. A corpus shorter than two
  blocks is split by halving the block size until each split gets a block.
  """
  if not 0 < val_fraction < 1:
    raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
  if split_block < 1:
    raise ValueError(f"split_block must be >= 1, got {split_block}")
  every = max(2, round(1 / val_fraction))
  n = len(tokens)
  while split_block > 1 and n < every * split_block:
    split_block //= 2
  block_id = np.arange(n) // split_block
  is_val = (block_id % every) == every - 1
  return tokens[~is_val], tokens[is_val]


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Byte tokens of a corpus split into ``train`` and ``val`` (uint8 arrays)."""

  train: np.ndarray
  val: np.ndarray
  description: str
  fingerprint: str  # sha256 of the corpus bytes (first 16 hex digits)

  @property
  def vocab_size(self) -> int:
    return VOCAB_SIZE

  def check_seq_len(self, seq_len: int) -> None:
    """Raises DataError when a split is too short for one window of ``seq_len + 1`` tokens."""
    for name, split in (("training", self.train), ("validation", self.val)):
      if len(split) < seq_len + 1:
        raise DataError(
            f"the {name} split of {self.description} has {len(split)} bytes, fewer than "
            f"seq_len + 1 = {seq_len + 1}; use a larger corpus or a smaller --seq-len")


def load_dataset(path: str | os.PathLike | None = None, *, val_fraction: float = 0.05,
                 split_block: int = 65536) -> Dataset:
  """Loads and splits a corpus (see :func:`load_corpus`, :func:`split_train_val`)."""
  data, desc = load_corpus(path)
  tokens = np.frombuffer(data, dtype=np.uint8)
  train, val = split_train_val(tokens, val_fraction=val_fraction, split_block=split_block)
  if len(train) == 0 or len(val) == 0:
    raise DataError(f"--data: the corpus {desc} has only {len(tokens)} bytes, too few to split "
                    "into training and validation")
  return Dataset(train=train, val=val, description=desc,
                 fingerprint=hashlib.sha256(data).hexdigest()[:16])


def _windows(split: np.ndarray, starts: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
  idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
  w = split[idx].astype(np.int32)
  return {"inputs": w[:, :-1], "targets": w[:, 1:]}


def train_batch(dataset: Dataset, step: int, *, batch_size: int, seq_len: int,
                seed: int = 0) -> dict[str, np.ndarray]:
  """The training batch of ``step``: ``inputs``/``targets`` int32 ``[batch, seq_len]``.

  A pure function of ``(seed, step)`` (Philox counter-based generator), so it can resume
  from any step.
  """
  rng = np.random.Generator(np.random.Philox(key=[seed, step]))
  starts = rng.integers(0, len(dataset.train) - seq_len, size=batch_size)
  return _windows(dataset.train, starts, seq_len)


def val_batches(dataset: Dataset, *, num_batches: int, batch_size: int,
                seq_len: int) -> list[dict[str, np.ndarray]]:
  """Fixed validation batches: ``num_batches * batch_size`` windows spread over ``val``.

  Windows do not overlap when the split is long enough; a short split yields overlapping
  (still deterministic) windows.
  """
  total = num_batches * batch_size
  last = len(dataset.val) - seq_len - 1
  starts = np.linspace(0, last, total).round().astype(np.int64)
  return [_windows(dataset.val, starts[i * batch_size:(i + 1) * batch_size], seq_len)
          for i in range(num_batches)]
