"""``jit`` for the parallel tests: on CPU, XLA's cheap backend passes (compile time
dominates these tiny multi-device programs; results are the same computations)."""

from __future__ import annotations

import jax

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def options() -> dict | None:
  return FAST_COMPILE if jax.default_backend() == "cpu" else None


def jit(fn, **kw):
  return jax.jit(fn, compiler_options=options(), **kw)
