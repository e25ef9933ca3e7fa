"""dot_product_attention options beyond the masks: the deterministic backward and the
Mosaic GPU backward's configuration options (``mosaic_gpu.Config``).

``deterministic=True`` must give the same gradients as the reference (interpret mode on
CPU, where the Mosaic GPU backward always adds its dQ partial sums in a fixed order) and
bitwise-identical gradients run to run on GPU, and must never pick cuDNN (its backward
adds dQ with atomics). Backward configurations that are options, not defaults (the alternating-dQ
schedule, K/V in registers, the 240/24 register split) must compute the same gradients
as the reference at real sizes on GPU (the alternating schedule also in interpret mode).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.ops import attention as attn_ops
from jaxeff.ops.attention import dot_product_attention
from kernels_pallas.attention import mosaic_gpu
from tests.helpers import assert_close
from tests.ops.test_attention import _rand


def _grads(fn, q, k, v, d_out):
  return jax.vjp(fn, q, k, v)[1](d_out)


def _reference_grads(q, k, v, d_out, *, is_causal):
  up = lambda x: x.astype(jnp.float32)
  fn = lambda q, k, v: dot_product_attention(q, k, v, is_causal=is_causal, implementation="xla")
  return _grads(fn, up(q), up(k), up(v), up(d_out))


def test_deterministic_reaches_the_mosaic_backward(key, monkeypatch):
  # The interpret-mode backward is always the fixed-order one, so check the wiring: the
  # op hands ``deterministic`` to the Mosaic GPU backward kernel (traced, not run).
  seen = []
  real = mosaic_gpu.backward

  def spy(*args, **kwargs):
    seen.append(kwargs.get("deterministic"))
    return real(*args, **kwargs)

  monkeypatch.setattr(mosaic_gpu, "backward", spy)
  q, k, v, _ = _rand(key, 1, 40, 40, 2, 1, 64, jnp.bfloat16)
  for flag in (True, False):
    fn = lambda q, k, v: dot_product_attention(q, k, v, is_causal=True, deterministic=flag,
                                               implementation="mosaic_gpu:interpret")
    jax.eval_shape(lambda q, k, v: _grads(fn, q, k, v, q), q, k, v)
  assert seen == [True, False]


def test_deterministic_skips_cudnn_and_must_be_bool(key):
  q, k, v, _ = _rand(key, 1, 8, 8, 2, 2, 64, jnp.bfloat16)
  kw = dict(bias=None, mask=None, is_causal=False, segment_ids=None, local_window_size=None,
            logits_soft_cap=None, scale=None)
  spec, _, _ = attn_ops.validate(q, k, v, deterministic=True, **kw)
  why = attn_ops._cudnn_supports(q, k, v, None, None, None, None, spec=spec, return_lse=False)
  assert why is not None and "not deterministic" in why
  spec, _, _ = attn_ops.validate(q, k, v, deterministic=False, **kw)
  assert attn_ops._cudnn_supports(q, k, v, None, None, None, None, spec=spec,
                                  return_lse=False) is None
  with pytest.raises(TypeError, match="deterministic must be a Python bool"):
    dot_product_attention(q, k, v, deterministic=1)


def _config_grads(q, k, v, d_out, *, is_causal, interpret, **changes):
  """Gradients through the Mosaic GPU kernels with ``changes`` applied to the default config."""
  d = q.shape[-1]
  cfg = dataclasses.replace(mosaic_gpu.default_config(d, is_causal), **changes)
  kw = dict(is_causal=is_causal, scale=d ** -0.5, config=cfg, interpret=interpret)
  out, lse = mosaic_gpu.forward(q, k, v, **kw)
  return mosaic_gpu.backward(q, k, v, out, lse, d_out, **kw)


def test_flash_attention_backward_of_key_blocks_sums_to_the_full_gradient(key):
  """Blockwise backward from the whole softmax's (out, lse): the gradients of two key
  halves are the full gradient's dK/dV halves, and their dQs add up to the full dQ."""
  q, k, v, kd = _rand(key, 1, 40, 64, 4, 2, 64, jnp.bfloat16)
  d_out = jax.random.normal(kd, q.shape, jnp.float32).astype(jnp.bfloat16)
  impl = "triton:interpret"
  scale = 64 ** -0.5
  out, lse = attn_ops.dot_product_attention_with_lse(q, k, v, is_causal=True, scale=scale,
                                                     implementation="xla")
  want = _reference_grads(q, k, v, d_out, is_causal=True)
  halves = []
  for lo, hi in ((0, 16), (16, 64)):
    # Causal alignment is to the end of the key range: keys 0..15 precede the earliest
    # query position (24), so that block is unmasked; the end-aligned causal mask of the
    # block 16..63 is the full one's restriction.
    halves.append(attn_ops.flash_attention_backward(
        q, k[:, lo:hi], v[:, lo:hi], out, lse, d_out, is_causal=lo == 16, scale=scale,
        implementation=impl))
  dq = halves[0][0].astype(jnp.float32) + halves[1][0].astype(jnp.float32)
  assert_close(dq, want[0], rtol=3e-2, name="dq")
  assert_close(jnp.concatenate([halves[0][1], halves[1][1]], 1).astype(jnp.float32), want[1],
               rtol=3e-2, name="dk")
  assert_close(jnp.concatenate([halves[0][2], halves[1][2]], 1).astype(jnp.float32), want[2],
               rtol=3e-2, name="dv")
  with pytest.raises(ValueError, match="implementation must be 'mosaic_gpu', 'triton'"):
    attn_ops.flash_attention_backward(q, k, v, out, lse, d_out, scale=scale,
                                      implementation="xla")


def test_alternating_dq_matches_reference_interpret(key):
  # Three key tiles x several query blocks (GQA 2, odd lengths): both warpgroups take
  # turns on dQ.
  q, k, v, k2 = _rand(key, 1, 130, 260, 2, 1, 64, jnp.bfloat16)
  d_out = jax.random.normal(k2, q.shape, jnp.float32).astype(jnp.bfloat16)
  got = jax.jit(lambda *a: _config_grads(*a, is_causal=True, interpret=True,
                                         bwd_dq_alternate=True))(q, k, v, d_out)
  want = _reference_grads(q, k, v, d_out, is_causal=True)
  for name, g, w in zip(("dq", "dk", "dv"), got, want):
    assert_close(g, w.astype(g.dtype), name=name)


# Backward configurations measured on H100: the defaults' pieces and the alternatives
# (split dQ at head_dim 64, alternating dQ at 128); each must match the reference at real sizes.
GPU_CONFIGS = [
    dict(bwd_dq_alternate=True),
    dict(bwd_compute_registers=240, bwd_memory_registers=24, bwd_dq_alternate=False),
    dict(bwd_compute_registers=240, bwd_memory_registers=24, bwd_kv_in_registers=True,
         bwd_dq_alternate=False),
    dict(bwd_compute_registers=240, bwd_memory_registers=24, bwd_kv_in_registers=True,
         bwd_dq_alternate=True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("changes", GPU_CONFIGS,
                         ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("d,is_causal", [(128, True), (64, False), (64, True)])
def test_gpu_backward_configs_match_reference(key, changes, d, is_causal):
  if changes.get("bwd_kv_in_registers") and d > 64:
    pytest.skip("K/V in registers fits the register budget at head_dim 64 only")
  q, k, v, k2 = _rand(key, 2, 1000, 1000, 8, 2, d, jnp.bfloat16)
  d_out = jax.random.normal(k2, q.shape, jnp.float32).astype(jnp.bfloat16)
  got = jax.jit(lambda *a: _config_grads(*a, is_causal=is_causal, interpret=False, **changes))(
      q, k, v, d_out)
  want = _reference_grads(q, k, v, d_out, is_causal=is_causal)
  for name, g, w in zip(("dq", "dk", "dv"), got, want):
    assert_close(g, w.astype(g.dtype), name=name)


@pytest.mark.gpu
def test_gpu_deterministic_backward_is_bitwise_reproducible(key):
  q, k, v, k2 = _rand(key, 1, 1000, 1000, 4, 4, 128, jnp.bfloat16)
  d_out = jax.random.normal(k2, q.shape, jnp.float32).astype(jnp.bfloat16)

  def grads(deterministic):
    fn = lambda q, k, v: dot_product_attention(q, k, v, is_causal=True,
                                               deterministic=deterministic,
                                               implementation="mosaic_gpu")
    return _grads(fn, q, k, v, d_out)

  run = jax.jit(grads, static_argnums=0)
  first, second, fast = run(True), run(True), run(False)
  for a, b, c in zip(first, second, fast):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    assert_close(a, c, name="deterministic vs reduce-add")
