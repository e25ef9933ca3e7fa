"""Benchmark harness: timing returns positive medians, results follow the schema."""

import json

import jax
import jax.numpy as jnp
import pytest

from experiments.bench import harness
from experiments.bench.__main__ import available, main


def test_time_fn_positive_and_rotates_inputs():
  seen = []

  def make_args(i):
    seen.append(i)
    return (jax.random.normal(jax.random.key(i), (64, 64)),)

  t = harness.time_fn(jax.jit(lambda x: x @ x), make_args, rounds=3, inner=2, warmup=1)
  assert t > 0
  assert len(seen) > 1, "small inputs must be rotated over several sets"


def test_chained_program_keeps_every_call_and_its_values():
  # Every call of the chain must run on its own input set (none merged or dropped) and the
  # zero offset must not change a value; int8 and fp8 first arguments are offset too.
  calls = []

  def fn(x, w):
    calls.append(1)  # once per traced call
    return (x.astype(jnp.float32) @ w.astype(jnp.float32)) * 2

  sets = tuple((jax.random.normal(jax.random.key(i), (3, 5)).astype(dt),
                jax.random.normal(jax.random.key(10 + i), (5, 4)))
               for i, dt in enumerate((jnp.bfloat16, jnp.int8, jnp.float8_e4m3fn)))
  program = harness.chained_program(fn, n_sets=3, calls=6)
  out = program(sets, jnp.zeros((), jnp.float32))
  assert len(calls) == 6
  want = fn(*sets[2])
  assert float(out) == float(want.reshape(-1)[0])
  hlo = program.lower(sets, jnp.zeros((), jnp.float32)).as_text()
  assert hlo.count("dot_general") == 6


def test_chained_timing_is_positive():
  t = harness.time_fn(jax.jit(lambda x, w: x @ w),
                      lambda i: (jax.random.normal(jax.random.key(i), (8, 64)),
                                 jax.random.normal(jax.random.key(i + 1), (64, 64))),
                      rounds=2, warmup=1, chain=True)
  assert 0 < t < 1


def test_safe_time_reports_failure_as_nan(capsys):
  def boom(x):
    raise RuntimeError("no such kernel")
  t = harness.safe_time(boom, lambda i: (jnp.ones(3),), rounds=1, inner=1, warmup=1)
  assert t != t  # nan
  assert "no such kernel" in capsys.readouterr().out


def test_write_results_schema(tmp_path):
  rows = [harness.Row("n=8", {"n": 8}, "jaxeff", 1e-3, 2.0, "GB/s"),
          harness.Row("n=8", {"n": 8}, "xla", 2e-3, 1.0, "GB/s")]
  path = harness.write_results("demo", rows, tmp_path, plot_x="n")
  data = json.loads(path.read_text())
  assert set(data) >= {"suite", "device", "jax_version", "date", "rows"}
  assert data["suite"] == "demo" and data["jax_version"] == jax.__version__
  assert data["rows"][0] == {"case": "n=8", "params": {"n": 8}, "implementation": "jaxeff",
                             "median_s": 1e-3, "throughput": 2.0, "unit": "GB/s"}
  assert (tmp_path / "demo.png").stat().st_size > 0


def test_print_table_shows_ratio(capsys):
  rows = [harness.Row("c", {}, "jaxeff", 1e-3, 2.0, "GB/s"),
          harness.Row("c", {}, "xla", 3e-3, 1.0, "GB/s")]
  harness.print_table("demo", rows)
  assert "3.00x" in capsys.readouterr().out


def test_cli_rejects_unknown_suite():
  with pytest.raises(SystemExit):
    main(["no_such_suite"])


def test_suites_are_discovered():
  assert {"attention", "decode", "rms_norm", "train_step"} <= set(available())


def test_failed_timing_is_written_as_null(tmp_path):
  rows = [harness.Row("c", {}, "cudnn", float("nan"), float("nan"), "TFLOP/s")]
  data = json.loads(harness.write_results("demo", rows, tmp_path).read_text())
  assert data["rows"][0]["median_s"] is None and data["rows"][0]["throughput"] is None


def test_rel_err_any_float_dtype_and_non_finite():
  import numpy as np
  a = jnp.array([1.0, 2.0, 3.0], jnp.bfloat16)
  assert harness.rel_err(a, np.array([1.0, 2.0, 3.0])) == 0.0
  assert abs(harness.rel_err(a * 2, np.array([1.0, 2.0, 3.0])) - 1.0) < 1e-12
  assert harness.rel_err(jnp.ones(4, jnp.float8_e4m3fn), np.full(4, 0.5)) == 1.0
  assert np.isnan(harness.rel_err(np.array([np.inf, 1.0]), np.ones(2)))


def test_ptxas_summary_picks_register_spill_and_serialisation_lines(tmp_path):
  report = tmp_path / "ptxas" / "kernel_0.ptxas"
  report.parent.mkdir()
  report.write_text("ptxas info    : Compiling entry function 'k'\n"
                    "ptxas info    : Used 232 registers, 16 bytes spill stores, "
                    "16 bytes spill loads\n"
                    "ptxas info    : Function properties for k\n"
                    "ptxas warning : wgmma.mma_async instructions are serialized due to ...\n")
  lines = harness.ptxas_summary(tmp_path / "ptxas")
  assert lines == ["kernel_0.ptxas: ptxas info    : Used 232 registers, 16 bytes spill stores, "
                   "16 bytes spill loads",
                   "kernel_0.ptxas: ptxas warning : wgmma.mma_async instructions are serialized "
                   "due to ..."]
  assert harness.ptxas_summary(tmp_path / "missing") == []
  env = harness.ptxas_env(tmp_path / "dump")
  assert env["MOSAIC_GPU_DUMP_PTXAS"] == "1" and env["MOSAIC_GPU_DUMP_TO"] == str(tmp_path / "dump")
