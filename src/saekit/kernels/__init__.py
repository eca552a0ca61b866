"""Fast paths for the TopK family; a plain-torch reference beside every one.

``primitives``: the bag sum and row dot every sparse product is made of. ``layout``: the index
structures of a code. ``sparse``: sparse decode, the encoder's sparse backward
(:class:`~saekit.kernels.sparse.SparsePreacts`) and the fixed-shape selections.
``triton_kernels``: optional GPU kernels for the two primitives, used only with triton and CUDA.
Nothing here knows about activations: they call these functions from their own ``encode``.
"""

from saekit.kernels.layout import BACKENDS, CodeLayout
from saekit.kernels.primitives import bag_sum, row_dot
from saekit.kernels.sparse import (
    SparsePreacts,
    auxk_select,
    batchtopk_select,
    sparse_decode,
    sparse_decode_reference,
    topk_select,
)

__all__ = [
    "BACKENDS",
    "CodeLayout",
    "SparsePreacts",
    "auxk_select",
    "bag_sum",
    "batchtopk_select",
    "row_dot",
    "sparse_decode",
    "sparse_decode_reference",
    "topk_select",
]
