"""Fast paths for the TopK family; a plain-torch reference beside every one.

``primitives``: the bag sum and row dot every sparse product is made of. ``layout``: the index
structures of a code. ``sparse``: sparse decode and the encoder's sparse backward
(:class:`~saekit.kernels.sparse.SparsePreacts`). ``select``: the fixed-shape selections.
``columns``: AuxK's decode as dense GEMMs over a few gathered columns.
``triton_kernels``: optional GPU kernels for the two primitives, used only with triton and CUDA.
Nothing here knows about activations: they call these functions from their own ``encode``.
"""

from saekit.kernels.layout import BACKENDS, CodeLayout
from saekit.kernels.primitives import bag_sum, row_dot
from saekit.kernels.select import (
    auxk_select,
    batchtopk_candidates,
    batchtopk_flat,
    batchtopk_select,
    topk_select,
)
from saekit.kernels.sparse import SparsePreacts, sparse_decode, sparse_decode_reference

__all__ = [
    "BACKENDS",
    "CodeLayout",
    "SparsePreacts",
    "auxk_select",
    "bag_sum",
    "batchtopk_candidates",
    "batchtopk_flat",
    "batchtopk_select",
    "row_dot",
    "sparse_decode",
    "sparse_decode_reference",
    "topk_select",
]
