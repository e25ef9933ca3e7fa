"""RMSNorm / LayerNorm: every implementation against the pure-jnp reference.

One shared body (``_check_norm``) runs the forward and the VJP w.r.t. x, weight and bias
of an implementation against ``jax.vjp`` of the reference on fresh random inputs. On CPU
it runs the reference and each kernel in Pallas interpret mode (where unwritten outputs
are NaN, so a block the kernel skips fails the finiteness check); under the ``gpu``
marker it runs the kernels for real at LLM sizes.
"""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import pytest

from jaxeff import ops
from jaxeff.ops import normalization
from tests.helpers import assert_close, check_op, primitive_names

RMS_EPS = 1e-6
LN_EPS = 1e-5
CPU_IMPLS = ["xla", "mosaic_gpu:interpret", "triton:interpret"]
GPU_IMPLS = [pytest.param(name, marks=pytest.mark.gpu) for name in ("mosaic_gpu", "triton")]
KERNELS = ["mosaic_gpu", "triton"]


def _inputs(key, shape, dtype, *, weight: bool, bias: bool, offset: float = 0.0):
  """x ~ N(offset, 4) in ``dtype``; weight ~ 1 + N(0, 0.01) and bias ~ N(0, 1) in float32."""
  kx, kw, kb = jax.random.split(key, 3)
  features = shape[-1]
  x = (2.0 * jax.random.normal(kx, shape, jnp.float32) + offset).astype(dtype)
  w = 1.0 + 0.1 * jax.random.normal(kw, (features,), jnp.float32) if weight else None
  b = jax.random.normal(kb, (features,), jnp.float32) if bias else None
  return x, w, b


def _check_norm(op: str, implementation: str, shape, dtype, key, *, weight=True, bias=True):
  """Forward and gradients (x, weight, bias) of ``implementation`` vs the reference."""
  if op == "rms_norm":
    x, w, _ = _inputs(key, shape, dtype, weight=weight, bias=False)
    fn = lambda x, w: ops.rms_norm(x, w, eps=RMS_EPS, implementation=implementation)
    ref = lambda x, w: normalization.rms_norm_reference(x, w, eps=RMS_EPS)
    args = (x, w)
  else:
    x, w, b = _inputs(key, shape, dtype, weight=weight, bias=bias, offset=1.5)
    fn = lambda x, w, b: ops.layer_norm(x, w, b, eps=LN_EPS, implementation=implementation)
    ref = lambda x, w, b: normalization.layer_norm_reference(x, w, b, eps=LN_EPS)
    args = (x, w, b)
  grad_argnums = tuple(i for i, a in enumerate(args) if a is not None)
  out, _ = check_op(jax.jit(fn), jax.jit(ref), args, key=key, grad_argnums=grad_argnums,
                    dtype=dtype)
  assert out.shape == x.shape and out.dtype == x.dtype


# --- CPU: reference and kernels in interpret mode (small shapes) -------------------------


@pytest.mark.parametrize("implementation", CPU_IMPLS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rms_norm_3d_odd_rows(implementation, dtype, key):
  # 21 rows: not a multiple of any block; 3-D input flattened to rows.
  _check_norm("rms_norm", implementation, (3, 7, 256), dtype, key)


@pytest.mark.parametrize("implementation", CPU_IMPLS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_layer_norm_odd_rows(implementation, dtype, key):
  _check_norm("layer_norm", implementation, (17, 384), dtype, key)


@pytest.mark.parametrize("implementation", CPU_IMPLS)
@pytest.mark.parametrize("op", ["rms_norm", "layer_norm"])
def test_one_row_without_parameters(implementation, op, key):
  _check_norm(op, implementation, (1, 128), jnp.float32, key, weight=False, bias=False)


@pytest.mark.parametrize("implementation", CPU_IMPLS)
def test_many_blocks_per_program(implementation, key):
  # 1000 rows of 128: dozens of row blocks per persistent program, so the Mosaic GPU
  # kernels' SMEM ring wraps around several times; LayerNorm without bias, float16.
  _check_norm("layer_norm", implementation, (1000, 128), jnp.float16, key, bias=False)


@pytest.mark.parametrize("implementation", ["triton:interpret"])
def test_features_not_multiple_of_128(implementation, key):
  # Triton masks the padded columns; Mosaic GPU refuses this width (tested below).
  _check_norm("layer_norm", implementation, (5, 40), jnp.float32, key)


@pytest.mark.parametrize("implementation", ["mosaic_gpu:interpret", "triton:interpret"])
def test_jit_and_vmap(implementation, key):
  x, w, b = _inputs(key, (2, 5, 256), jnp.float32, weight=True, bias=True, offset=1.0)

  def y_and_dx(impl):
    def f(x):
      y, vjp = jax.vjp(lambda x: ops.layer_norm(x, w, b, implementation=impl), x)
      return y, vjp(jnp.cos(y))[0]
    return jax.jit(jax.vmap(f))

  for got, want in zip(y_and_dx(implementation)(x), y_and_dx("xla")(x)):
    assert_close(got, want)


def test_default_on_cpu_is_the_reference(key):
  if jax.default_backend() == "gpu":
    pytest.skip("a GPU default picks a kernel (test_default_on_gpu_is_a_kernel)")
  x, w, b = _inputs(key, (4, 256), jnp.float32, weight=True, bias=True)
  for fn in (lambda x: ops.rms_norm(x, w), lambda x: ops.layer_norm(x, w, b)):
    names = primitive_names(jax.make_jaxpr(jax.grad(lambda x: fn(x).sum()))(x).jaxpr)
    assert not {"pallas_call", "mpmd_map", "custom_vjp_call"} & names, names


# --- bad inputs -----------------------------------------------------------------------


def test_wrong_weight_shape():
  x = jnp.ones((4, 256))
  with pytest.raises(ValueError, match=r"rms_norm: weight must have shape \[features\] = \(256,\).*got \(255,\)"):
    ops.rms_norm(x, jnp.ones((255,)))
  with pytest.raises(ValueError, match=r"layer_norm: bias must have shape .*got \(2, 256\)"):
    ops.layer_norm(x, jnp.ones((256,)), jnp.ones((2, 256)))


def test_integer_input():
  with pytest.raises(TypeError, match=r"rms_norm: x.dtype must be float32, bfloat16 or float16, got int32"):
    ops.rms_norm(jnp.ones((4, 256), jnp.int32))
  with pytest.raises(TypeError, match=r"layer_norm: weight.dtype must be floating, got int32"):
    ops.layer_norm(jnp.ones((4, 256)), jnp.ones((256,), jnp.int32))


@pytest.mark.parametrize("eps", [0.0, -1e-5])
def test_eps_must_be_positive(eps):
  with pytest.raises(ValueError, match=r"eps must be a positive Python number, got"):
    ops.layer_norm(jnp.ones((4, 256)), eps=eps)


def test_scalar_input():
  with pytest.raises(ValueError, match=r"x must be an array with at least one axis"):
    ops.rms_norm(jnp.float32(1.0))


def test_unknown_implementation():
  with pytest.raises(ValueError, match=r"unknown implementation 'cudnn'; known: \['mosaic_gpu', 'triton', 'xla'\]"):
    ops.rms_norm(jnp.ones((4, 256)), implementation="cudnn")


def test_mosaic_gpu_refuses_features_not_multiple_of_128():
  x = jnp.ones((4, 200), jnp.bfloat16)
  with pytest.raises(NotImplementedError, match=r"mosaic_gpu:interpret: features=200 is not a multiple of 128"):
    ops.rms_norm(x, implementation="mosaic_gpu:interpret")


def test_mosaic_gpu_refuses_rows_too_wide_for_shared_memory():
  x = jnp.ones((2, 65536), jnp.float32)
  with pytest.raises(NotImplementedError, match=r"features=65536 too large for shared memory"):
    ops.layer_norm(x, jnp.ones((65536,)), jnp.ones((65536,)), implementation="mosaic_gpu:interpret")


def test_triton_refuses_rows_wider_than_registers():
  x = jnp.ones((2, 16392), jnp.float32)
  with pytest.raises(NotImplementedError, match=r"triton:interpret: features=16392 > 16384"):
    ops.rms_norm(x, implementation="triton:interpret")


def test_sequence_falls_through_to_a_kernel_that_serves():
  # Mosaic GPU cannot serve 40 features; the sequence moves on to the Triton kernel.
  x, w, b = _inputs(jax.random.key(3), (3, 40), jnp.float32, weight=True, bias=True)
  y = ops.layer_norm(x, w, b, implementation=["mosaic_gpu:interpret", "triton:interpret"])
  assert_close(y, normalization.layer_norm_reference(x, w, b, eps=1e-5))


def test_kernel_on_cpu_without_interpret_says_how():
  if jax.default_backend() == "gpu":
    pytest.skip("runs for real on a GPU")
  with pytest.raises(NotImplementedError, match=r"runs on gpu, not on 'cpu'.*'mosaic_gpu:interpret'"):
    ops.rms_norm(jnp.ones((4, 256)), implementation="mosaic_gpu")


# --- GPU: kernels for real at LLM sizes ---------------------------------------------------


@pytest.mark.parametrize("implementation", GPU_IMPLS)
@pytest.mark.parametrize("op", ["rms_norm", "layer_norm"])
@pytest.mark.parametrize("shape,dtype", [
    ((4096, 4096), jnp.bfloat16),
    ((2, 1000, 2048), jnp.bfloat16),
    ((1021, 8192), jnp.bfloat16),
    ((333, 1024), jnp.float32),
    ((17, 768), jnp.float16),
])
def test_gpu_matches_reference(implementation, op, shape, dtype, key):
  _check_norm(op, implementation, shape, dtype, key)


@pytest.mark.parametrize("implementation", GPU_IMPLS)
def test_gpu_without_parameters_and_one_row(implementation, key):
  _check_norm("rms_norm", implementation, (1, 4096), jnp.bfloat16, key, weight=False)
  _check_norm("layer_norm", implementation, (3, 512), jnp.float32, key, weight=False, bias=False)


@pytest.mark.parametrize("implementation", GPU_IMPLS)
def test_gpu_jit_and_vmap(implementation, key):
  x, w, _ = _inputs(key, (3, 257, 1024), jnp.bfloat16, weight=True, bias=False)
  f = jax.jit(jax.vmap(jax.grad(
      lambda x: ops.rms_norm(x, w, implementation=implementation).astype(jnp.float32).sum())))
  expected = jax.vmap(jax.grad(
      lambda x: normalization.rms_norm_reference(x.astype(jnp.float32), w, eps=1e-6).sum()))(x)
  assert_close(f(x), expected.astype(x.dtype))


@pytest.mark.gpu
def test_default_on_gpu_is_a_kernel(key):
  x, w, _ = _inputs(key, (64, 4096), jnp.bfloat16, weight=True, bias=False)
  names = primitive_names(jax.make_jaxpr(lambda x: ops.rms_norm(x, w))(x).jaxpr)
  assert {"pallas_call", "mpmd_map"} & names, names
