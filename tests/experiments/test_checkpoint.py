"""Orbax checkpoints: round trip, keep-last-K, atomic saves, clear errors for bad folders."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import checkpoint as ckpt


def _tree(key):
  k1, k2 = jax.random.split(key)
  params = {"w": jax.random.normal(k1, (5, 3)), "b": {"c": jax.random.normal(k2, (7,))}}
  opt_state = {"mu": jax.tree.map(lambda x: x * 2, params), "count": jnp.int32(3)}
  return params, opt_state


def _abstract(tree):
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev), tree)


def _save_steps(directory, key, steps, keep=2, every=10):
  c = ckpt.Checkpointer(directory, keep=keep, every=every)
  params, opt_state = _tree(key)
  saved = {}
  for s in steps:
    p = jax.tree.map(lambda x: x + s, params)
    if c.save(s, p, opt_state, {"model": {"n": 1}, "note": "x"}):
      saved[s] = p
  c.close()
  return saved, opt_state


def test_round_trip_keep_last_and_every(tmp_path, key):
  saved, opt_state = _save_steps(tmp_path / "ck", key, [5, 10, 15, 20, 30])
  assert ckpt.complete_steps(tmp_path / "ck") == [20, 30]  # every 10, keep 2
  assert ckpt.latest_step(tmp_path / "ck") == 30
  params, opt, meta = ckpt.restore(tmp_path / "ck", abstract_params=_abstract(saved[30]),
                                   abstract_opt_state=_abstract(opt_state))
  assert meta["step"] == 30 and meta["note"] == "x"
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(saved[30])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert int(opt["count"]) == 3
  p20, none, _ = ckpt.restore(tmp_path / "ck", abstract_params=_abstract(saved[20]), step=20)
  assert none is None
  np.testing.assert_array_equal(np.asarray(p20["w"]), np.asarray(saved[20]["w"]))
  # A run folder (holding checkpoints/) resolves to its checkpoints.
  os.rename(tmp_path / "ck", tmp_path / "checkpoints")
  assert ckpt.latest_step(tmp_path) == 30


def test_relative_paths_restore(tmp_path, key, monkeypatch):
  saved, _ = _save_steps(tmp_path / "run" / "checkpoints", key, [10])
  monkeypatch.chdir(tmp_path)
  params, _, meta = ckpt.restore("run", abstract_params=_abstract(saved[10]))
  assert meta["step"] == 10 and ckpt.read_meta("run")["step"] == 10
  np.testing.assert_array_equal(np.asarray(params["w"]), np.asarray(saved[10]["w"]))


def test_half_written_save_is_ignored(tmp_path, key):
  saved, _ = _save_steps(tmp_path, key, [10])
  # What a crash during the save of step 20 leaves behind: Orbax's temporary folder.
  tmp = tmp_path / "20.orbax-checkpoint-tmp-1234567"
  (tmp / "params").mkdir(parents=True)
  (tmp / "params" / "junk").write_bytes(b"\x00" * 10)
  assert ckpt.latest_step(tmp_path) == 10
  params, _, meta = ckpt.restore(tmp_path, abstract_params=_abstract(saved[10]))
  assert meta["step"] == 10


def test_missing_and_non_checkpoint_directories(tmp_path):
  with pytest.raises(ckpt.CheckpointError, match="does not exist"):
    ckpt.latest_step(tmp_path / "nope")
  (tmp_path / "notes.txt").write_text("hello")
  (tmp_path / "7").mkdir()  # a numbered folder without the items is not a checkpoint
  with pytest.raises(ckpt.CheckpointError, match="is not a checkpoint directory"):
    ckpt.read_meta(tmp_path)
  with pytest.raises(ckpt.CheckpointError, match="is not a checkpoint directory"):
    ckpt.restore(tmp_path / "notes.txt", abstract_params={})


def test_corrupt_checkpoint_gives_a_clear_error(tmp_path, key):
  saved, _ = _save_steps(tmp_path, key, [10])
  for root, _, files in os.walk(tmp_path / "10" / "params"):
    for f in files:
      if "manifest" in f or os.path.basename(root) == "d":
        with open(os.path.join(root, f), "wb") as fh:
          fh.write(b"garbage")
  with pytest.raises(ckpt.CheckpointError, match="is corrupt or does not match"):
    ckpt.restore(tmp_path, abstract_params=_abstract(saved[10]))
  (tmp_path / "10" / "meta" / "metadata").write_text("{not json")
  with pytest.raises(ckpt.CheckpointError, match="is corrupt"):
    ckpt.read_meta(tmp_path)


def test_wrong_step_and_bad_options(tmp_path, key):
  _save_steps(tmp_path, key, [10])
  with pytest.raises(ckpt.CheckpointError, match="has no complete step 5"):
    ckpt.read_meta(tmp_path, step=5)
  with pytest.raises(ValueError, match="keep must be >= 1"):
    ckpt.Checkpointer(tmp_path / "x", keep=0)
