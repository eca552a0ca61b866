"""Optional Triton kernels for the two sparse primitives of :mod:`saekit.kernels.sparse`.

    bag sum  out[b] = Σ_{e in bag b} w_e · W[row_e]     (decode, dx, dW_dec, dW_enc)
    row dot  out[e] = A[token_e] · B[latent_e]          (grad of values, pre at coordinates)

One program per (bag, block of d) accumulates in fp32 registers, so neither kernel writes an
[nnz, d] buffer or takes an atomic: bags by latent use the :class:`CodeLayout` permutation.
Imported only when triton is installed; ``AVAILABLE`` says whether it is. Untested on this
project's CPU machines (no triton, no GPU): tests/kernels/test_kernels.py compares them with the
torch path and skips without triton or CUDA.
"""

from __future__ import annotations

import torch
from torch import Tensor

from saekit.kernels.layout import CodeLayout

try:  # pragma: no cover - exercised only where triton and a GPU exist
    import triton
    import triton.language as tl

    AVAILABLE = True
except ImportError:  # pragma: no cover
    triton = tl = None
    AVAILABLE = False


if AVAILABLE:  # pragma: no cover

    @triton.jit
    def _bag_sum_kernel(
        w_ptr,
        rows_ptr,
        bounds_ptr,
        W_ptr,
        out_ptr,
        D,
        stride_W,
        stride_out,
        BLOCK_D: tl.constexpr,
    ):
        bag = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask = cols < D
        start = tl.load(bounds_ptr + bag)
        end = tl.load(bounds_ptr + bag + 1)
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for e in range(start, end):
            row = tl.load(rows_ptr + e)
            w = tl.load(w_ptr + e).to(tl.float32)
            acc += w * tl.load(W_ptr + row * stride_W + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + bag * stride_out + cols, acc, mask=mask)

    @triton.jit
    def _row_dot_kernel(
        A_ptr,
        B_ptr,
        token_ptr,
        latent_ptr,
        out_ptr,
        nnz,
        D,
        stride_A,
        stride_B,
        BLOCK_E: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        entries = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
        emask = entries < nnz
        token = tl.load(token_ptr + entries, mask=emask, other=0)
        latent = tl.load(latent_ptr + entries, mask=emask, other=0)
        acc = tl.zeros((BLOCK_E,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            m = emask[:, None] & (cols[None, :] < D)
            a = tl.load(A_ptr + token[:, None] * stride_A + cols[None, :], mask=m, other=0.0)
            b = tl.load(B_ptr + latent[:, None] * stride_B + cols[None, :], mask=m, other=0.0)
            acc += tl.sum(a.to(tl.float32) * b.to(tl.float32), axis=1)
        tl.store(out_ptr + entries, acc, mask=emask)


def _bounds(offsets_B: Tensor, nnz: int) -> Tensor:
    return torch.cat([offsets_B, offsets_B.new_full((1,), nnz)])


def bag_sum(weights_E: Tensor, rows_E: Tensor, offsets_B: Tensor, W_RD: Tensor) -> Tensor:
    """Triton twin of :func:`saekit.kernels.sparse.bag_sum` (fp32 accumulation)."""
    W_RD = W_RD.contiguous()
    n_bags, D = offsets_B.numel(), W_RD.shape[1]
    out = torch.empty(n_bags, D, device=W_RD.device, dtype=torch.float32)
    block_d = min(256, triton.next_power_of_2(D))
    grid = (n_bags, triton.cdiv(D, block_d))
    _bag_sum_kernel[grid](
        weights_E.contiguous(),
        rows_E.contiguous(),
        _bounds(offsets_B, rows_E.numel()),
        W_RD,
        out,
        D,
        W_RD.stride(0),
        out.stride(0),
        BLOCK_D=block_d,
    )
    return out.to(W_RD.dtype)


def row_dot(A_ND: Tensor, B_MD: Tensor, token_E: Tensor, latent_E: Tensor) -> Tensor:
    """Triton twin of :func:`saekit.kernels.sparse.row_dot`."""
    A_ND, B_MD = A_ND.contiguous(), B_MD.contiguous()
    nnz, D = token_E.numel(), A_ND.shape[1]
    out = torch.empty(nnz, device=A_ND.device, dtype=torch.float32)
    block_e, block_d = 64, min(128, triton.next_power_of_2(D))
    _row_dot_kernel[(triton.cdiv(nnz, block_e),)](
        A_ND,
        B_MD,
        token_E.contiguous(),
        latent_E.contiguous(),
        out,
        nnz,
        D,
        A_ND.stride(0),
        B_MD.stride(0),
        BLOCK_E=block_e,
        BLOCK_D=block_d,
    )
    return out.to(A_ND.dtype)


def decode(values_E: Tensor, W_dec_MD: Tensor, layout: CodeLayout) -> Tensor:
    """[N, d] = Σ values·W_dec[latent] by token (no b_dec)."""
    return bag_sum(values_E, layout.latent, layout.token_offsets, W_dec_MD)
