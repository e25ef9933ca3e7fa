"""Long per-channel convolution ``y = conv(k, u)`` (causal), the FlashFFTConv benchmark.

Cases: batch 64 x 768 channels at N = 256 .. 64K and batch 1 x 768 at N = 1M, filter as
long as the input. At N >= 32K the batch shrinks so ``batch * N <= 64 * 16K`` (the
float32 baselines' complex spectra of 64 x 768 x 2N would need > 80 GB); ``params`` says
the batch used. On the CPU backend the sizes shrink automatically (smoke runs).

Implementations, in the same process:

* ``jnp.fft``: the float32 ``jnp.fft.rfft`` / ``irfft`` convolution (fft_conv's reference);
* ``jax.scipy.signal``: ``jax.scipy.signal.fftconvolve`` (float32, mode "full", cut);
* ``jaxeff``: ``fft_conv`` with bfloat16 inputs and its default implementation;
* ``jaxeff:monarch_xla`` / ``jaxeff:triton``: each Monarch path named (bf16);
* ``jaxeff:monarch_xla_fp32``: the Monarch path with float32 operands (``HIGHEST``).

Every row carries ``rel_err``: ``||y - y64|| / ||y64||`` against a float64 NumPy FFT
convolution of the first 2 batch rows x 8 channels of the same inputs. Throughput is
``batch * channels * N`` output samples per second (G/s). ``mode`` ``"fwd_bwd"`` rows (N
1K-16K, full runs) time the forward plus the gradients w.r.t. ``u`` and ``k``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import jax.scipy.signal as jss
import numpy as np

from experiments.bench import harness
from jaxeff.ops.fft_conv import fft_conv, fft_conv_reference

PLOT_X = "seq"
CHANNELS = 768
GPU_CASES = [(64, n) for n in (256, 1024, 4096, 8192, 16384)] + [(16, 32768), (16, 65536),
                                                                 (1, 2 ** 20)]
GPU_QUICK_CASES = [(64, 1024), (64, 4096), (64, 16384)]
GPU_FWD_BWD_SEQS = (1024, 4096, 16384)
CPU_CHANNELS = 16
CPU_CASES = [(4, 256), (4, 2048)]
CPU_QUICK_CASES = [(4, 256)]
ROUNDS, QUICK_ROUNDS = 10, 3
ERR_ROWS, ERR_CHANNELS = 2, 8

IMPLEMENTATIONS = {  # row name -> (input dtype, fft_conv implementation or baseline)
    "jnp.fft": (jnp.float32, "xla"),
    "jax.scipy.signal": (jnp.float32, "scipy"),
    "jaxeff": (jnp.bfloat16, None),
    "jaxeff:monarch_xla": (jnp.bfloat16, "monarch_xla"),
    "jaxeff:triton": (jnp.bfloat16, "triton"),
    "jaxeff:monarch_xla_fp32": (jnp.float32, "monarch_xla"),
}


def _scipy_conv(u, k):
  seq = u.shape[-1]
  conv = jax.vmap(lambda ub: jss.fftconvolve(ub, k.astype(jnp.float32), mode="full", axes=-1))
  return conv(u.astype(jnp.float32))[..., :seq]


def _conv(impl):
  if impl == "scipy":
    return _scipy_conv
  return lambda u, k: fft_conv(u, k, implementation=impl)


def _step(impl, mode):
  conv = _conv(impl)
  if mode == "fwd":
    return jax.jit(lambda u, k, dy: conv(u, k))

  def fwd_bwd(u, k, dy):
    y, vjp = jax.vjp(conv, u, k)
    return y, vjp(dy.astype(y.dtype))

  return jax.jit(fwd_bwd)


def _make_args(batch, channels, seq, dtype, i):
  ku, kk, kd = jax.random.split(jax.random.key(1000 + i), 3)
  u = jax.random.normal(ku, (batch, channels, seq), jnp.float32).astype(dtype)
  k = jax.random.normal(kk, (channels, seq), jnp.float32) / np.sqrt(seq)
  dy = jax.random.normal(kd, (batch, channels, seq), jnp.float32).astype(dtype)
  return u, k, dy


def _float64_conv(u, k):
  u = np.asarray(u, np.float64)
  k = np.asarray(k, np.float64)
  n = u.shape[-1] + k.shape[-1] - 1
  return np.fft.irfft(np.fft.rfft(u, n) * np.fft.rfft(k, n), n)[..., : u.shape[-1]]


def _rel_err(step, batch, channels, seq, dtype) -> float:
  """Error of the forward on the first rows/channels of input set 0 vs float64."""
  try:
    u, k, dy = _make_args(batch, channels, seq, dtype, 0)
    out = step(u, k, dy)
    y = out[0] if isinstance(out, tuple) else out
    y = np.asarray(y[:ERR_ROWS, :ERR_CHANNELS].astype(jnp.float32), np.float64)
    ref = _float64_conv(np.asarray(u[:ERR_ROWS, :ERR_CHANNELS].astype(jnp.float32)),
                        np.asarray(k[:ERR_CHANNELS]))
    return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
  except Exception as e:  # reported as NaN; the timing reports the failure too
    print(f"  ! error check failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
    return float("nan")


def run(quick: bool) -> list[harness.Row]:
  on_gpu = jax.default_backend() == "gpu"
  if on_gpu:
    channels, cases = CHANNELS, GPU_QUICK_CASES if quick else GPU_CASES
  else:
    channels, cases = CPU_CHANNELS, CPU_QUICK_CASES if quick else CPU_CASES
  rounds = QUICK_ROUNDS if quick else ROUNDS
  rows = []
  for batch, seq in cases:
    modes = ["fwd"]
    if not quick and (seq in GPU_FWD_BWD_SEQS or not on_gpu):
      modes.append("fwd_bwd")
    for mode in modes:
      case = f"fft_conv causal {mode} batch={batch} channels={channels} seq={seq}"
      for name, (dtype, impl) in IMPLEMENTATIONS.items():
        if name == "jax.scipy.signal" and mode == "fwd_bwd" and seq > 4096:
          continue  # the slowest baseline; its fwd rows show it
        if name == "jaxeff:triton" and not on_gpu:
          continue  # a GPU kernel (interpret mode is for tests, not timing)
        params = {"mode": mode, "batch": batch, "channels": channels, "seq": seq,
                  "filter_len": seq, "causal": True, "dtype": jnp.dtype(dtype).name}
        step = _step(impl, mode)
        make = functools.partial(_make_args, batch, channels, seq, dtype)
        t = harness.safe_time(step, make, rounds=rounds, warmup=2, max_sets=2)
        err = _rel_err(step, batch, channels, seq, dtype) if t == t else float("nan")
        rows.append(harness.Row(case, params, name, t, batch * channels * seq / t / 1e9,
                                "G/s", extra={"rel_err": err}))
        print(f"  {case:<62} {name:<24} {harness.fmt_time(t):>10}  err {err:.1e}", flush=True)
  return rows
