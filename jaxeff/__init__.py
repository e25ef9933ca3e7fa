"""jaxeff: fast, pure-functional building blocks for efficient deep learning in JAX.

Layers: :mod:`jaxeff.ops` (functional ops with kernels and references),
:mod:`jaxeff.nn` (Flax Linen modules), :mod:`jaxeff.models` (whole models).
Raw Pallas kernels live in the separate top-level package ``kernels_pallas``.
"""

__version__ = "0.1.0"
