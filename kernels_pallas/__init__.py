"""Raw Pallas kernels, one package per op family and one file per backend.

Depends on jax only (never on jaxeff). Inputs are assumed validated by ``jaxeff.ops``.
"""
