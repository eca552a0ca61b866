"""The two sparse primitives every fast path is built from (see :mod:`saekit.kernels`).

    bag sum  out[b] = Σ_{e in bag b} w_e · W[row_e]      decode, dx_c (bags = tokens),
                                                           dW_dec, dW_enc (bags = latents)
    row dot  out[e] = A[token_e] · B[latent_e]           grad of values, pre at coordinates

``F.embedding_bag`` computes a bag sum in one pass (FBGEMM on CPU); aten's embedding-bag
per-sample-weight gradient is exactly a row dot. Neither builds an [nnz, d] buffer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def bag_sum(
    weights_E: Tensor, rows_E: Tensor, offsets_B: Tensor, W_RD: Tensor, backend: str = "torch"
) -> Tensor:
    """out[b] = Σ_{e in bag b} w_e · W[row_e]; bag b is entries [offsets[b], offsets[b+1]).

    Not differentiable by itself (the autograd functions below call it in their forward and
    backward); detached inputs select embedding_bag's forward-only kernel.
    """
    if backend == "triton" and W_RD.is_cuda:
        from saekit.kernels import triton_kernels

        return triton_kernels.bag_sum(weights_E.detach(), rows_E, offsets_B, W_RD.detach())
    with torch.autocast(W_RD.device.type, enabled=False):  # a gather: no lower precision
        return F.embedding_bag(
            rows_E,
            W_RD.detach(),
            offsets_B,
            mode="sum",
            per_sample_weights=weights_E.detach().to(W_RD.dtype),
        )


def row_dot(
    A_ND: Tensor,
    B_MD: Tensor,
    token_E: Tensor,
    latent_E: Tensor,
    offsets_N: Tensor,
    backend: str = "torch",
) -> Tensor:
    """out[e] = A[token_e] · B[latent_e] without gathering [nnz, d] (a sampled matmul)."""
    A_ND, B_MD = A_ND.detach().contiguous(), B_MD.detach().contiguous()
    if backend == "triton" and A_ND.is_cuda:
        from saekit.kernels import triton_kernels

        return triton_kernels.row_dot(A_ND, B_MD, token_E, latent_E)
    if B_MD.dtype != A_ND.dtype:
        B_MD = B_MD.to(A_ND.dtype)
    try:
        # aten's per-sample-weights gradient of embedding_bag is exactly this product.
        with torch.autocast(A_ND.device.type, enabled=False):
            return torch.ops.aten._embedding_bag_per_sample_weights_backward(
                A_ND, B_MD, latent_E, offsets_N, token_E, 0, -1
            )
    except (RuntimeError, AttributeError):  # pragma: no cover - op missing on this build
        return _row_dot_chunked(A_ND, B_MD, token_E, latent_E)


def _row_dot_chunked(A_ND: Tensor, B_MD: Tensor, token_E: Tensor, latent_E: Tensor) -> Tensor:
    out_E = A_ND.new_empty(token_E.shape)
    chunk = max(1, (1 << 22) // max(1, A_ND.shape[1]))  # ≤ 16 MiB of fp32 rows at a time
    for start in range(0, token_E.numel(), chunk):
        sl = slice(start, start + chunk)
        out_E[sl] = (A_ND[token_E[sl]] * B_MD[latent_E[sl]]).sum(-1)
    return out_E
