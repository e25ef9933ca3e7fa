"""grouped_matmul vs the per-group reference: every implementation, group sizes with
zeros, one giant group and tiles straddling groups, transpose_rhs, both gradients, the
transposed product, quantized experts and bad inputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.ops.grouped_matmul import (grouped_matmul, grouped_matmul_reference,
                                       transposed_grouped_matmul)
from kernels_pallas.moe import common
from tests.helpers import assert_close, check_op

INTERPRETED = ["mosaic_gpu:interpret", "triton:interpret"]


def _sizes(key, m, groups, kind):
  if kind == "zeros_and_tiny":  # empty groups first, inside and last, a 1-row group
    assert groups >= 5
    cut = int(jax.random.randint(key, (), 1, m - 1))
    return jnp.asarray([0, cut, 0, 1, m - 1 - cut] + [0] * (groups - 5), jnp.int32)
  if kind == "giant":  # all rows in one middle group
    return jnp.zeros((groups,), jnp.int32).at[groups // 2].set(m)
  cuts = np.sort(np.asarray(jax.random.randint(key, (groups - 1,), 0, m + 1)))
  return jnp.asarray(np.diff(np.concatenate([[0], cuts, [m]])), jnp.int32)


def _inputs(key, m, k, n, groups, dtype, transpose_rhs, kind="random"):
  k1, k2, k3 = jax.random.split(key, 3)
  lhs = jax.random.normal(k1, (m, k), jnp.float32).astype(dtype)
  shape = (groups, n, k) if transpose_rhs else (groups, k, n)
  rhs = (jax.random.normal(k2, shape, jnp.float32) / np.sqrt(k)).astype(dtype)
  return lhs, rhs, _sizes(k3, m, groups, kind)


def test_work_items_cover_every_row_once(key):
  m, block = 203, 32
  for kind in ("random", "zeros_and_tiny", "giant"):
    sizes = _sizes(jax.random.fold_in(key, len(kind)), m, 7, kind)
    items = jax.jit(common.work_items, static_argnums=(1, 2))(sizes, m, block)
    owner = np.full(m, -1)
    ends = np.cumsum(np.asarray(sizes))
    for g, b, lo, s in zip(*(np.asarray(a) for a in (items.group, items.block, items.lo,
                                                     items.size))):
      rows = np.arange(b * block + lo, b * block + lo + s)
      assert (owner[rows] == -1).all()
      owner[rows] = g
    assert (owner == np.searchsorted(ends, np.arange(m), side="right")).all(), kind


def test_xla_matches_reference(key):
  lhs, rhs, sizes = _inputs(key, 37, 24, 20, 7, jnp.float32, False, "zeros_and_tiny")
  check_op(lambda a, b: grouped_matmul(a, b, sizes, implementation="xla"),
           lambda a, b: grouped_matmul_reference(a, b, sizes), (lhs, rhs), key=key,
           grad_argnums=(0, 1))


# The backward of one layout runs the forward kernel with the other layout and the
# transposed kernel, so one layout per kernel covers all three products.
@pytest.mark.parametrize("implementation,transpose_rhs", [("mosaic_gpu:interpret", False),
                                                          ("triton:interpret", True)])
def test_kernel_forward_and_gradients(key, implementation, transpose_rhs):
  # m, k and n not multiples of the tiles; empty, 1-row and straddling groups.
  lhs, rhs, sizes = _inputs(key, 97, 40, 24, 5, jnp.bfloat16, transpose_rhs, "zeros_and_tiny")
  fn = jax.jit(lambda a, b: grouped_matmul(a, b, sizes, transpose_rhs=transpose_rhs,
                                           implementation=implementation))
  ref = lambda a, b: grouped_matmul_reference(a, b, sizes, transpose_rhs=transpose_rhs)
  check_op(fn, ref, (lhs, rhs), key=key, grad_argnums=(0, 1))


@pytest.mark.parametrize("implementation", INTERPRETED)
def test_kernel_giant_group_and_uncovered_rows(key, implementation):
  # One group spanning two row tiles, float32 output; under jit the sum is not checked
  # and, as with lax.ragged_dot, rows past the groups come out zero.
  lhs, rhs, _ = _inputs(key, 100, 64, 64, 3, jnp.bfloat16, False)
  sizes = jnp.array([0, 90, 0], jnp.int32)
  out = jax.jit(lambda s: grouped_matmul(lhs, rhs, s, preferred_element_type=jnp.float32,
                                         implementation=implementation))(sizes)
  assert out.dtype == jnp.float32
  expected = grouped_matmul_reference(lhs, rhs, sizes, preferred_element_type=jnp.float32)
  assert_close(out[:90], expected[:90], dtype=jnp.bfloat16)
  assert (np.asarray(out[90:]) == 0).all()


# The kernels' transposed products are covered by test_kernel_forward_and_gradients.
@pytest.mark.parametrize("implementation", ["xla"])
def test_transposed_grouped_matmul(key, implementation):
  k1, k2 = jax.random.split(key)
  m, k, n = 90, 40, 24
  lhs = jax.random.normal(k1, (m, k), jnp.float32).astype(jnp.bfloat16)
  rhs = jax.random.normal(k2, (m, n), jnp.float32).astype(jnp.bfloat16)
  sizes = jnp.array([0, 33, 1, 0, 56], jnp.int32)
  out = transposed_grouped_matmul(lhs, rhs, sizes, preferred_element_type=jnp.float32,
                                  implementation=implementation)
  ends = np.cumsum(sizes)
  l32, r32 = np.asarray(lhs, np.float32), np.asarray(rhs, np.float32)
  expected = np.stack([l32[e - s:e].T @ r32[e - s:e] for s, e in zip(np.asarray(sizes), ends)])
  assert_close(out, jnp.asarray(expected), dtype=jnp.bfloat16)
  assert (np.asarray(out[0]) == 0).all() and (np.asarray(out[3]) == 0).all()


def test_quantized_experts(key):
  from jaxeff.quant.formats import quantize_tensor
  lhs, rhs, sizes = _inputs(key, 33, 32, 16, 3, jnp.float32, False)
  q = quantize_tensor(rhs, "int8", axis=1)
  out = grouped_matmul(lhs, q, sizes)
  assert_close(out, grouped_matmul_reference(lhs, q.dequantize(jnp.float32), sizes))
  assert float(jnp.linalg.norm(out - grouped_matmul_reference(lhs, rhs, sizes))) > 0


def test_default_dispatch_is_reference_on_cpu(key):
  lhs, rhs, sizes = _inputs(key, 16, 8, 8, 2, jnp.bfloat16, False)
  with pytest.raises(NotImplementedError, match="runs on gpu"):
    grouped_matmul(lhs, rhs, sizes, implementation="mosaic_gpu")
  assert_close(grouped_matmul(lhs, rhs, sizes), grouped_matmul_reference(lhs, rhs, sizes))


def test_float32_kernel_call_is_refused(key):
  lhs, rhs, sizes = _inputs(key, 16, 8, 8, 2, jnp.float32, False)
  with pytest.raises(NotImplementedError, match="bfloat16 / float16"):
    grouped_matmul(lhs, rhs, sizes, implementation="triton:interpret")


def test_bad_inputs(key):
  lhs, rhs, sizes = _inputs(key, 12, 8, 6, 3, jnp.float32, False)
  with pytest.raises(ValueError, match="sum to 11 but lhs has m=12"):
    grouped_matmul(lhs, rhs, sizes.at[0].add(-1) if sizes[0] > 0 else sizes.at[1].add(-1))
  with pytest.raises(ValueError, match="non-negative"):
    grouped_matmul(lhs, rhs, jnp.array([13, -1, 0], jnp.int32))
  with pytest.raises(ValueError, match="group_sizes has 2 groups but rhs has 3"):
    grouped_matmul(lhs, rhs, jnp.array([6, 6], jnp.int32))
  with pytest.raises(ValueError, match="lhs must be 2-D"):
    grouped_matmul(lhs[None], rhs, sizes)
  with pytest.raises(ValueError, match="rhs must be 3-D"):
    grouped_matmul(lhs, rhs[0], sizes)
  with pytest.raises(ValueError, match="contracts k=8 but rhs"):
    grouped_matmul(lhs, rhs, sizes, transpose_rhs=True)
  with pytest.raises(TypeError, match="group_sizes must be an integer array"):
    grouped_matmul(lhs, rhs, sizes.astype(jnp.float32))


@pytest.mark.gpu
@pytest.mark.parametrize("implementation", ["mosaic_gpu", "triton"])
@pytest.mark.parametrize("groups,k,n,kind", [(8, 4096, 4096, "random"), (64, 1536, 2048, "random"),
                                             (8, 2048, 1024, "zeros_and_tiny"),
                                             (16, 1024, 2048, "giant")])
@pytest.mark.parametrize("transpose_rhs", [False, True])
def test_gpu_real_sizes(key, implementation, groups, k, n, kind, transpose_rhs):
  if implementation == "mosaic_gpu" and "H100" not in jax.devices()[0].device_kind and (
      "H200" not in jax.devices()[0].device_kind):
    pytest.skip("Mosaic GPU kernel needs Hopper")
  lhs, rhs, sizes = _inputs(key, 4093, k, n, groups, jnp.bfloat16, transpose_rhs, kind)
  fn = jax.jit(lambda a, b: grouped_matmul(a, b, sizes, transpose_rhs=transpose_rhs,
                                           implementation=implementation))
  ref = jax.jit(lambda a, b: grouped_matmul(a, b, sizes, transpose_rhs=transpose_rhs,
                                            implementation="xla"))
  check_op(fn, ref, (lhs, rhs), key=key, grad_argnums=(0, 1))


def test_triton_kernels_lower_for_cuda():
  # Interpret mode never builds Triton IR; this builds it for an abstract H100 and runs the
  # MLIR verifier on it (it caught a data-dependent loop bound that lowered as i1).
  from kernels_pallas.moe import triton as T
  from tests.helpers import lower_for_cuda

  sds, bf = jax.ShapeDtypeStruct, jnp.bfloat16
  m, k, n, g = 256, 512, 256, 4
  gs = sds((g,), jnp.int32)
  lower_for_cuda(lambda l, r, s: T.grouped_matmul(l, r, s, m=m), sds((m, k), bf),
                 sds((g, k, n), bf), gs)
  lower_for_cuda(lambda l, r, s: T.grouped_matmul(l, r, s, m=m, transpose_rhs=True),
                 sds((m, k), bf), sds((g, n, k), bf), gs)
  lower_for_cuda(T.transposed_grouped_matmul, sds((m, k), bf), sds((m, n), bf), gs)
