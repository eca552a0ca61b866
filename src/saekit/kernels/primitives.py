"""The two sparse primitives every fast path is built from (see :mod:`saekit.kernels`).

    bag sum  out[b] = Σ_{e in bag b} w_e · W[row_e]      decode, dx_c (bags = tokens),
                                                           dW_dec, dW_enc (bags = latents)
    row dot  out[e] = A[token_e] · B[latent_e]           grad of values, pre at coordinates

``F.embedding_bag`` computes a bag sum in one pass (FBGEMM on CPU); aten's embedding-bag
per-sample-weight gradient is exactly a row dot. Neither builds an [nnz, d] buffer.
"""

from __future__ import annotations

import warnings

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
    weights_E, W_RD = weights_E.detach().to(W_RD.dtype), W_RD.detach()
    with torch.autocast(W_RD.device.type, enabled=False):  # a gather: no lower precision
        if _tiled(weights_E, W_RD):
            return _bag_sum_tiled(weights_E, rows_E, offsets_B, W_RD)
        return F.embedding_bag(rows_E, W_RD, offsets_B, mode="sum", per_sample_weights=weights_E)


TILE_COLUMNS = 64
TILE_MIN_USES = 128
"""CPU bag sums that read each row of W ≥ 128 times on average (AuxK's N·k_aux entries over
the dead columns) run on 64-column slices of W: a slice of a few thousand rows stays in the
core's L2 cache while every entry reads it, where whole rows came from L3. 1.3–1.5× faster on
the project's CPU at 256 uses a row; no gain at 16–32 uses, where copying W into slices costs
more than it saves (benchmarks/README.md, "Bag sums")."""


def _tiled(weights_E: Tensor, W_RD: Tensor) -> bool:
    n_rows, width = W_RD.shape
    return (
        W_RD.device.type == "cpu"
        and width >= 2 * TILE_COLUMNS
        and weights_E.numel() >= TILE_MIN_USES * n_rows
    )


def _bag_sum_tiled(weights_E: Tensor, rows_E: Tensor, offsets_B: Tensor, W_RD: Tensor) -> Tensor:
    """The bag sum one 64-column slice of W at a time (the last slice may be narrower)."""
    slices = [
        F.embedding_bag(
            rows_E, W_RD[:, start : start + TILE_COLUMNS].contiguous(), offsets_B, mode="sum",
            per_sample_weights=weights_E,
        )
        for start in range(0, W_RD.shape[1], TILE_COLUMNS)
    ]  # fmt: skip
    return torch.cat(slices, dim=1)


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
    if A_ND.device.type == "cpu" and A_ND.dtype in SAMPLED_DTYPES:
        return _row_dot_sampled(A_ND, B_MD, latent_E, offsets_N)
    try:
        # aten's per-sample-weights gradient of embedding_bag is exactly this product.
        with torch.autocast(A_ND.device.type, enabled=False):
            return torch.ops.aten._embedding_bag_per_sample_weights_backward(
                A_ND, B_MD, latent_E, offsets_N, token_E, 0, -1
            )
    except (RuntimeError, AttributeError):  # pragma: no cover - op missing on this build
        return _row_dot_chunked(A_ND, B_MD, token_E, latent_E)


SAMPLED_DTYPES = (torch.float32, torch.float64)


def _row_dot_sampled(A_ND: Tensor, B_MD: Tensor, latent_E: Tensor, offsets_N: Tensor) -> Tensor:
    """The CPU row dot: ``torch.sparse.sampled_addmm`` computes (A Bᵀ) at the coordinates of a
    CSR pattern (row = token, column = latent), a vectorised dot per entry. aten's
    per-sample-weight gradient calls a BLAS dot per entry instead, 1.2–1.6× slower on the
    project's CPU (benchmarks/README.md, "Row dot"). Entries keep their order: the kernel reads
    each entry's column on its own, so columns need not be sorted or distinct within a token.
    """
    n_entries = latent_E.numel()
    crow = torch.cat([offsets_N, offsets_N.new_full((1,), n_entries)]).to(torch.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        pattern = torch.sparse_csr_tensor(
            crow,
            latent_E.to(torch.int64),
            A_ND.new_zeros(n_entries),
            size=(A_ND.shape[0], B_MD.shape[0]),
            check_invariants=False,
        )
        return torch.sparse.sampled_addmm(pattern, A_ND, B_MD.T, beta=0.0).values()


def _row_dot_chunked(A_ND: Tensor, B_MD: Tensor, token_E: Tensor, latent_E: Tensor) -> Tensor:
    out_E = A_ND.new_empty(token_E.shape)
    chunk = max(1, (1 << 22) // max(1, A_ND.shape[1]))  # ≤ 16 MiB of fp32 rows at a time
    for start in range(0, token_E.numel(), chunk):
        sl = slice(start, start + chunk)
        out_E[sl] = (A_ND[token_E[sl]] * B_MD[latent_E[sl]]).sum(-1)
    return out_E
