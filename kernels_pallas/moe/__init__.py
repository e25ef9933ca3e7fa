"""Grouped (ragged) matmul kernels for mixture-of-experts layers.

Shared work-item math lives in :mod:`kernels_pallas.moe.common`; one file per backend:
:mod:`kernels_pallas.moe.mosaic_gpu` (Hopper TMA + wgmma, persistent grid) and
:mod:`kernels_pallas.moe.triton` (portable Pallas-Triton).
"""
