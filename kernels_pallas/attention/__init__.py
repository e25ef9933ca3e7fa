"""Flash attention kernels (FlashAttention-2 algorithm, FlashAttention-3 Hopper techniques).

* ``mosaic_gpu``: Hopper (H100/H200) forward and backward in Pallas Mosaic GPU.
* ``triton``: portable forward and backward in Pallas' Triton lowering (any CUDA GPU,
  interpretable on CPU).
* ``common``: the masking and block-sparsity math both share.

Each backend exposes ``forward(q, k, v, q_seg, kv_seg, *, ...) -> (out, lse)`` and
``backward(q, k, v, out, lse, d_out, q_seg, kv_seg, d_lse, *, ...) -> (dq, dk, dv)``.
"""
