"""Sparsity: weight formats (Flash-LLM tiled bitmap, sliced ELL, N:M, BSR), pruning
(magnitude, Wanda, N:M, structured), sparse training schedules (SR-STE, mask decay,
gradual magnitude pruning) and CATS activation-sparsity calibration. The products are in
:mod:`jaxeff.ops.sparse_matmul`."""

from jaxeff.sparse.activation import activation_sparsity, calibrate_cats_threshold
from jaxeff.sparse.formats import (
    AUTO_ELL_BREAK_EVEN,
    BlockSparse,
    EllSparse,
    NMSparse,
    TiledSparse,
    auto_format,
    bsr_from_block_mask,
    compress,
    compress_bsr,
    compress_ell,
    compress_nm,
    decompress,
    is_sparse,
    parse_nm,
    sparsify,
)
from jaxeff.sparse.pruning import (
    PruneRule,
    channel_mask,
    collect_input_norms,
    head_mask,
    magnitude_prune,
    nm_mask,
    prune,
    prune_heads,
    prune_mlp_channels,
    scores,
    sparsity_of,
    unstructured_mask,
)
from jaxeff.sparse.training import (
    decayed_mask_weight,
    gmp_sparsity,
    mask_decay_factor,
    srste_weight,
)
