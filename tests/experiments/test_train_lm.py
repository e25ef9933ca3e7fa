"""train_lm: the jitted step, data parallelism, exact resume, the CLI and its errors."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import data, train_lm
from jaxeff.models import gpt

FAST = ["--preset", "tiny", "--batch-size", "8", "--seq-len", "32", "--log-every", "1",
        "--eval-every", "100", "--eval-batches", "1", "--checkpoint-every", "100"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  rng = np.random.default_rng(0)
  words = ["def", "return", "self", "import", "class", "for", "in", "if", "x", "y", "(", ")", ":"]
  lines = [" ".join(rng.choice(words, size=8)) for _ in range(4000)]
  path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
  path.write_text("\n".join(lines))
  return str(path)


def _setup(devices):
  """Fresh state and the jitted step of the tiny model on a mesh of ``devices``."""
  mesh = train_lm.make_mesh(devices)
  cfg = train_lm.preset_config("tiny", warmup_steps=0, lr=3e-3)
  progs = train_lm.programs(gpt.PRESETS["tiny"], cfg, mesh)
  return progs.init(jax.random.key(0)), progs.train_step


def _batch(key, b=8, s=24):
  tokens = jax.random.randint(key, (b, s + 1), 0, 256)
  return {"inputs": np.asarray(tokens[:, :-1]), "targets": np.asarray(tokens[:, 1:])}


def test_train_step_reduces_loss_on_a_fixed_batch(key):
  state, step = _setup(jax.devices()[:1])
  batch = _batch(key)
  losses = []
  for _ in range(12):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert losses[0] > 5.0 and losses[-1] < losses[0] - 1.0, losses
  assert int(state.step) == 12
  assert np.isfinite(float(metrics["grad_norm"])) and float(metrics["lr"]) > 0


def test_moe_and_hyena_presets_train(key):
  """The MoE GPT (aux losses logged and optimized) and the Hyena LM train through the same
  step; Hyena has no KV cache, so it refuses an end-of-run sample."""
  mesh = train_lm.make_mesh(jax.devices()[:1])
  batch = _batch(key)
  for preset in ("moe-tiny", "hyena-tiny"):
    cfg = train_lm.preset_config(preset, warmup_steps=0, lr=3e-3)
    model_cfg = cfg.model_config()
    progs = train_lm.programs(model_cfg, cfg, mesh)
    state = progs.init(jax.random.key(0))
    losses = []
    for _ in range(8):
      state, metrics = progs.train_step(state, batch)
      losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 0.3, (preset, losses)
    if preset == "moe-tiny":
      assert float(metrics["moe_load_balancing"]) >= 2 * (1.0 - 1e-4)  # 2 MoE layers, each >= 1
      assert np.isfinite(float(metrics["moe_router_z"]))
    else:
      assert "moe_load_balancing" not in metrics
      with pytest.raises(train_lm.ConfigError, match="Hyena presets have no KV cache"):
        train_lm.validate(train_lm.preset_config(preset, sample_tokens=8), model_cfg, 1)
      with pytest.raises(train_lm.ConfigError, match="is a Hyena model"):
        train_lm.preset_config(preset, attention="xla").model_config()


def test_data_parallel_step_equals_single_device_step(key):
  assert len(jax.devices()) == 8
  batch = _batch(key)
  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    state, step = _setup(devices)
    for _ in range(2):
      state, metrics = step(state, batch)
    assert state.params["embed"]["embedding"].sharding.mesh.size == len(devices)
    results.append((jax.device_get(state.params), jax.device_get(metrics)))
  (p1, m1), (p8, m8) = results
  for k in ("loss", "grad_norm", "lr"):
    np.testing.assert_allclose(m8[k], m1[k], rtol=1e-5)
  # Adam divides by sqrt(v): reduction-order noise of ~1e-7 in a gradient near zero can move
  # its update by a fraction of the learning rate, hence the absolute tolerance (lr = 3e-3).
  for a, b in zip(jax.tree.leaves(p8), jax.tree.leaves(p1)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=3e-5)


def _losses(run):
  lines = [json.loads(ln) for ln in open(os.path.join(run, "metrics.jsonl"))]
  return {r["step"]: r["loss"] for r in lines if "loss" in r}


@pytest.fixture(scope="module")
def straight_run(corpus, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("runs") / "straight")
  assert train_lm.main(FAST + ["--data", corpus, "--steps", "8", "--out", out,
                               "--sample-tokens", "12", "--sample-prompt", "def "]) == 0
  return out


def test_end_to_end_run_writes_everything(straight_run):
  summary = json.load(open(os.path.join(straight_run, "summary.json")))
  assert summary["finished"] and summary["step"] == 8 and summary["num_devices"] == 8
  assert summary["val_loss"] > 0 and summary["val_ppl"] == pytest.approx(np.exp(summary["val_loss"]))
  assert summary["final_train_loss"] < summary["first_train_loss"]
  assert summary["sample"].startswith("def ")
  assert os.path.isdir(os.path.join(straight_run, "checkpoints", "8"))
  config = json.load(open(os.path.join(straight_run, "config.json")))
  assert config["model"]["num_layers"] == 2 and config["train"]["steps"] == 8


def test_resume_gives_the_identical_loss_curve(straight_run, corpus, tmp_path):
  out = str(tmp_path / "resumed")
  args = FAST + ["--data", corpus, "--steps", "8", "--sample-tokens", "0"]
  assert train_lm.main(args + ["--out", out, "--stop-at", "4"]) == 0
  first = _losses(out)
  assert sorted(first) == [1, 2, 3, 4]
  assert not json.load(open(os.path.join(out, "summary.json")))["finished"]
  assert train_lm.main(["--resume", out]) == 0
  resumed, straight = _losses(out), _losses(straight_run)
  assert sorted(resumed) == list(range(1, 9))
  np.testing.assert_array_equal([resumed[s] for s in range(1, 9)],
                                [straight[s] for s in range(1, 9)])
  summary = json.load(open(os.path.join(out, "summary.json")))
  assert summary["finished"] and summary["step"] == 8


def _error(capsys, argv):
  code = train_lm.main(argv)
  err = capsys.readouterr().err
  assert code == 2, err
  assert err.startswith("train_lm: error: ") and err.count("\n") == 1, err
  return err


def test_cli_errors(capsys, corpus, tmp_path):
  base = FAST + ["--data", corpus, "--steps", "8", "--out", str(tmp_path / "r")]
  assert "does not exist" in _error(capsys, FAST + ["--data", str(tmp_path / "missing.txt")])
  (tmp_path / "empty.txt").write_text("")
  assert "is empty" in _error(capsys, FAST + ["--data", str(tmp_path / "empty.txt")])
  assert "unknown preset 'huge'" in _error(capsys, ["--preset", "huge"])
  assert "not divisible by the number of devices (8)" in _error(
      capsys, base + ["--batch-size", "12"])
  assert "--seq-len: got 4096" in _error(capsys, base + ["--seq-len", "4096"])
  assert "--seq-len: got 0" in _error(capsys, base + ["--seq-len", "0"])
  assert "--lr: got -1.0" in _error(capsys, base + ["--lr", "-1"])
  assert "--steps: got 0" in _error(capsys, base + ["--steps", "0"])
  assert "--warmup-steps: got 50" in _error(capsys, base + ["--warmup-steps", "50"])
  assert "num_layers must be a positive int" in _error(capsys, base + ["--model", "num_layers=0"])
  assert "unknown model field 'layers'" in _error(capsys, base + ["--model", "layers=3"])
  assert "dtype must be one of" in _error(capsys, base + ["--dtype", "float16"])
  (tmp_path / "notckpt").mkdir()
  (tmp_path / "notckpt" / "x.txt").write_text("hi")
  assert "is not a checkpoint directory" in _error(capsys, ["--resume", str(tmp_path / "notckpt")])
  assert "does not exist" in _error(capsys, ["--resume", str(tmp_path / "gone")])


def test_corrupt_checkpoint_and_model_mismatch_errors(capsys, straight_run, tmp_path):
  import shutil
  run = tmp_path / "copy"
  shutil.copytree(straight_run, run)
  assert "model differs" in _error(capsys, ["--resume", str(run), "--model", "num_layers=3"])
  for root, _, files in os.walk(run / "checkpoints" / "8" / "params"):
    for f in files:
      with open(os.path.join(root, f), "wb") as fh:
        fh.write(b"garbage")
  assert "is corrupt" in _error(capsys, ["--resume", str(run), "--steps", "10"])


def test_flops_and_mfu_helpers():
  cpu = jax.devices("cpu")[0]
  assert train_lm.peak_flops(cpu) is None
  assert train_lm.PEAK_FLOPS["H100"] == 989e12
  assert data.VOCAB_SIZE == 256
  assert train_lm.cross_entropy(jnp.zeros((1, 3, 256)), jnp.zeros((1, 3), jnp.int32)) == (
      pytest.approx(np.log(256), rel=1e-6))


def test_put_batch_multi_process_path_matches_device_put(monkeypatch):
  """The pod path (each process supplies its own shards) places the same global batch."""
  import jax
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P
  from experiments import train_lm as tl

  mesh = tl.make_mesh()
  sharding = NamedSharding(mesh, P(tl.DATA_AXIS))
  rng = np.random.default_rng(3)
  batch = {"inputs": rng.integers(0, 256, (16, 9), dtype=np.int32),
           "targets": rng.integers(0, 256, (16, 9), dtype=np.int32)}
  single = tl.put_batch(batch, sharding)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  multi = tl.put_batch(batch, sharding)
  for k in batch:
    assert multi[k].sharding == sharding
    np.testing.assert_array_equal(np.asarray(multi[k]), batch[k])
    np.testing.assert_array_equal(np.asarray(single[k]), batch[k])
