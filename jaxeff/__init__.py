"""jaxeff: fast, pure-functional building blocks for efficient deep learning in JAX.

Layers: :mod:`jaxeff.ops` (functional ops with kernels and references),
:mod:`jaxeff.nn` (Flax Linen modules), :mod:`jaxeff.models` (whole models),
:mod:`jaxeff.quant` (quantization formats and algorithms), :mod:`jaxeff.sparse` (sparse
formats and pruning), :mod:`jaxeff.spectral` (matmul-based FFTs), :mod:`jaxeff.kv_cache`
(paged KV cache and compression), :mod:`jaxeff.parallel` (``shard_map`` parallelism).
Raw Pallas kernels live in the separate top-level package ``kernels_pallas``.
"""

__version__ = "0.1.0"
