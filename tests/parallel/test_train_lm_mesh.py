"""train_lm --mesh: the shard_map train step equals the one-device step; CLI errors."""

from __future__ import annotations

import jax
import numpy as np

from experiments import train_lm
from jaxeff.models import gpt
from tests.parallel import _compile

MODEL = gpt.PRESETS["tiny"].replace(num_layers=1, d_model=32, mlp_hidden=48,
                                    attention_implementation="xla")


def test_mesh_train_steps_equal_single_device_steps(key):
  tokens = jax.random.randint(key, (8, 17), 0, 256)
  batch = {"inputs": np.asarray(tokens[:, :-1]), "targets": np.asarray(tokens[:, 1:])}
  results = []
  for mesh_text in (None, "data=2,tensor=2,sequence=2"):
    cfg = train_lm.preset_config("tiny", warmup_steps=0, lr=3e-3, mesh=mesh_text)
    mesh = train_lm.make_mesh(jax.devices()[:1]) if mesh_text is None else train_lm.build_mesh(cfg)
    progs = train_lm.programs(MODEL, cfg, mesh)
    state = progs.init(jax.random.key(0))
    step = progs.train_step.lower(state, batch).compile(compiler_options=_compile.options())
    metrics = []
    for _ in range(2):
      state, m = step(state, batch)
      metrics.append(jax.device_get(m))
    results.append((jax.device_get(state.params), metrics))
  (p1, m1), (p8, m8) = results
  for a, b in zip(m8, m1):
    for k in ("loss", "grad_norm", "lr"):
      np.testing.assert_allclose(a[k], b[k], rtol=2e-5)
  for a, b in zip(jax.tree.leaves(p8), jax.tree.leaves(p1)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=3e-5)  # see test_train_lm (Adam noise)


def _error(capsys, argv):
  code = train_lm.main(argv)
  err = capsys.readouterr().err
  assert code == 2, err
  assert err.startswith("train_lm: error: ") and err.count("\n") == 1, err
  return err


def test_mesh_cli_errors(capsys, tmp_path):
  base = ["--preset", "tiny", "--steps", "2", "--out", str(tmp_path / "r"), "--batch-size", "8",
          "--seq-len", "32"]
  assert "--mesh: mesh: unknown axis 'model'" in _error(capsys, base + ["--mesh", "model=2"])
  assert "multiply to 4, but there are 8 devices" in _error(
      capsys, base + ["--mesh", "data=2,tensor=2"])
  assert "num_kv_heads (2) must be divisible by the tensor axis size (4)" in _error(
      capsys, base + ["--mesh", "data=2,tensor=4"])
  assert "sequence length 30 must be divisible by 4" in _error(
      capsys, base + ["--mesh", "data=4,sequence=2", "--seq-len", "30"])
  assert "batch size 4 must be divisible by the batch axes" in _error(
      capsys, base + ["--mesh", "data=8", "--batch-size", "4"])
  assert "needs sequence_parallel=True" in _error(
      capsys, base + ["--mesh", "data=4,tensor=2", "--collective-matmul"])
  cfg = train_lm.parse_args(["--preset", "tiny", "--mesh", "data=2,tensor=2,sequence=2",
                             "--sequence-parallel", "--context", "ulysses", "--microbatches", "2"])
  assert cfg.mesh == "data=2,tensor=2,sequence=2" and cfg.sequence_parallel
  assert cfg.parallel_options().context == "ulysses" and cfg.microbatches == 2
