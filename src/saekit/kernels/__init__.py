"""Fast paths for the TopK family; a plain-torch reference beside every one.

``sparse``: torch fast paths (CPU and GPU): sparse decode, sparse encoder backward, fused TopK /
BatchTopK / AuxK selection, and :func:`~saekit.kernels.sparse.fast_forward`.
``triton_kernels``: optional GPU kernels, used only when triton and CUDA are present.
"""

from saekit.kernels.sparse import (
    CodeLayout,
    DenseEncoding,
    FastForward,
    attach_preacts,
    auxk_loss_fast,
    auxk_select,
    bag_sum,
    batchtopk_fast,
    batchtopk_select,
    decode_code,
    differentiable_pre,
    encode_dense,
    fast_forward,
    preacts_at,
    row_dot,
    sparse_decode,
    sparse_decode_reference,
    sparse_preacts,
    sparse_preacts_reference,
    topk_fast,
)

__all__ = [
    "CodeLayout",
    "DenseEncoding",
    "FastForward",
    "attach_preacts",
    "auxk_loss_fast",
    "auxk_select",
    "bag_sum",
    "batchtopk_fast",
    "batchtopk_select",
    "decode_code",
    "differentiable_pre",
    "encode_dense",
    "fast_forward",
    "preacts_at",
    "row_dot",
    "sparse_decode",
    "sparse_decode_reference",
    "sparse_preacts",
    "sparse_preacts_reference",
    "topk_fast",
]
