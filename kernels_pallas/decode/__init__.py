"""Decode attention kernels: split-KV (FlashDecoding) with a stream-K partition (Lean Attention).

* ``mosaic_gpu``: Hopper (H100/H200) kernel in Pallas Mosaic GPU: persistent CTAs, TMA page
  copies, wgmma, in-kernel dequantization.
* ``triton``: portable kernel in Pallas' Triton lowering (any CUDA GPU, interpretable on CPU).
* ``common``: KV quantization formats, the work partition and the log-sum-exp merge both share.

Each backend exposes ``decode_attention(query, k_pages, v_pages, page_table, lengths,
k_scale, v_scale, *, fmt, window, scale, soft_cap, config, interpret) -> (out, lse)`` over a
paged cache (contiguous caches are passed as pages with an identity table), plus
``supports(...)`` and ``contiguous_page_size(capacity)``.
"""
