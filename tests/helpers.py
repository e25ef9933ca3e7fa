"""Shared "kernel vs reference" checks used by every op's test body.

``assert_close`` compares by relative Frobenius norm with a tolerance from the dtype
(ARCHITECTURE.md: float32 ~1e-5, bf16 ~1e-2) and rejects NaN/Inf outright, which is how
unwritten (NaN-poisoned, see interpret mode's ``uninitialized_memory="nan"``) outputs are
caught. ``check_op`` runs an implementation and the reference on the same fresh random
inputs, forward and (optionally) the VJP with a random cotangent.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.extend.core  # noqa: F401  (jaxprs_in_params)
import jax.numpy as jnp
import numpy as np

from jaxeff.ops import fft_conv

# Relative-norm tolerances by the lowest-precision dtype involved.
TOLERANCE = {
    jnp.dtype(jnp.float64): 1e-10,
    jnp.dtype(jnp.float32): 2e-5,
    jnp.dtype(jnp.bfloat16): 1.5e-2,
    jnp.dtype(jnp.float16): 4e-3,
}


def tolerance(dtype) -> float:
  return TOLERANCE[jnp.dtype(dtype)]


def rel_err(actual, expected) -> float:
  a = np.asarray(jnp.asarray(actual, jnp.float32), np.float64)
  e = np.asarray(jnp.asarray(expected, jnp.float32), np.float64)
  denom = np.linalg.norm(e.ravel())
  return float(np.linalg.norm((a - e).ravel()) / max(denom, 1e-30))


def assert_close(actual, expected, *, dtype=None, rtol: float | None = None, name="output"):
  """Asserts shape/dtype agreement, all-finite values and relative-norm closeness."""
  actual, expected = jnp.asarray(actual), jnp.asarray(expected)
  assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
  assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
  finite = np.isfinite(np.asarray(actual, np.float32))
  assert finite.all(), (f"{name}: {int((~finite).sum())} non-finite values "
                        f"(unwritten outputs are NaN-poisoned in interpret mode)")
  tol = rtol if rtol is not None else tolerance(dtype if dtype is not None else actual.dtype)
  err = rel_err(actual, expected)
  assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e}"


def random_like(key, tree):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return treedef.unflatten([
      jax.random.normal(k, x.shape, jnp.float32).astype(x.dtype) for k, x in zip(keys, leaves)
  ])


def check_op(fn: Callable, ref: Callable, args: Sequence, *, key, grad_argnums=(),
             dtype=None, rtol: float | None = None, grad_rtol: float | None = None):
  """Compares ``fn(*args)`` with ``ref(*args)``, and their VJPs w.r.t. ``grad_argnums``.

  The reference runs in float32 on upcast inputs when inputs are low precision, so the
  tolerance measures the kernel's error, not the reference's.
  """
  if dtype is None:  # the least precise floating input sets the tolerance
    floats = [a.dtype for a in args if hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.floating)]
    dtype = max(floats, key=tolerance) if floats else jnp.float32
  out = fn(*args)

  def upcast(a):
    return a.astype(jnp.float32) if hasattr(a, "dtype") and jnp.issubdtype(
        a.dtype, jnp.floating) and a.dtype != jnp.float64 else a

  ref_args = [upcast(a) for a in args]
  expected = jax.tree.map(lambda e, o: e.astype(o.dtype), ref(*ref_args), out)
  for i, (o, e) in enumerate(zip(jax.tree.leaves(out), jax.tree.leaves(expected))):
    assert_close(o, e, dtype=dtype, rtol=rtol, name=f"output[{i}]")
  if not grad_argnums:
    return out

  def restrict(f, all_args):
    def g(*diff):
      full = list(all_args)
      for i, d in zip(grad_argnums, diff):
        full[i] = d
      return f(*full)
    return g

  diff_args = [args[i] for i in grad_argnums]
  out_k, vjp_k = jax.vjp(restrict(fn, args), *diff_args)
  cot = random_like(jax.random.fold_in(key, 1), out_k)
  grads = vjp_k(cot)
  _, vjp_r = jax.vjp(restrict(ref, ref_args), *[ref_args[i] for i in grad_argnums])
  ref_grads = vjp_r(jax.tree.map(upcast, cot))
  for i, g, rg in zip(grad_argnums, grads, ref_grads):
    assert_close(g, rg.astype(g.dtype), dtype=dtype,
                 rtol=grad_rtol if grad_rtol is not None else rtol, name=f"grad[arg {i}]")
  return out, grads


def primitive_names(jaxpr) -> set[str]:
  """Every primitive in ``jaxpr`` and its sub-jaxprs (e.g. to check a kernel was called)."""
  names = set()
  for eqn in jaxpr.eqns:
    names.add(eqn.primitive.name)
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      names |= primitive_names(sub)
  return names


H100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132,
                                   platform="cuda")


def lower_for_cuda(fn: Callable, *args, verify_triton: bool = True) -> str:
  """Lowers ``jit(fn)(*args)`` for an abstract H100 on a CPU-only machine; returns the text.

  ``args`` may be ``jax.ShapeDtypeStruct``s. With ``verify_triton`` every Triton module a
  Pallas call builds is run through the MLIR verifier, which the GPU compiler runs too: an
  invalid module (for example an ``scf.for`` whose bounds have different types) fails here
  instead of on the GPU. Interpret mode never builds Triton IR, so this is the only CPU
  check of the IR itself.
  """
  from jax._src.pallas.triton import pallas_call_registration as registration

  original = registration.lowering.lower_jaxpr_to_triton_module
  failures = []

  def checked(*a, **k):
    result = original(*a, **k)
    try:
      result.module.operation.verify()
    except Exception as e:  # the MLIR verifier raises with the diagnostics
      failures.append(str(e))
    return result

  if verify_triton:
    registration.lowering.lower_jaxpr_to_triton_module = checked
  try:
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=H100)
    with jax.sharding.use_abstract_mesh(mesh):
      text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  finally:
    registration.lowering.lower_jaxpr_to_triton_module = original
  assert not failures, "invalid Triton module:\n" + "\n".join(f[:1500] for f in failures)
  return text


def fft_conv_vjp(impl: str, u, k, x, v, dy, *, causal: bool):
  """``(y, (du, dk, dx, dv))`` of ``jaxeff.ops.fft_conv(u, k, gate=(x, v))`` through the
  implementation ``impl`` (``x``, ``v`` None: ungated; their cotangents are then None)."""
  f = lambda u, k, x, v: fft_conv(u, k, causal=causal, gate=(x, v), implementation=impl)
  y, vjp = jax.vjp(f, u, k, x, v)
  return y, vjp(dy)


def assert_grads_match(grads, grads_ref, tol: float, case, names=("du", "dk", "dx", "dv")):
  """Each gradient has the reference's shape and dtype and is within ``tol`` of it
  (relative error); a None reference needs a None gradient."""
  for name, g, r in zip(names, grads, grads_ref):
    if r is None:
      assert g is None, name
      continue
    assert g.shape == r.shape and g.dtype == r.dtype, name
    assert rel_err(g, r) < tol, (case, name, rel_err(g, r))
