"""AuxK's decode as dense GEMMs over C gathered columns (the dead-latent candidates).

When few latents can be dead, C is small and four [N, C]·[C, d] GEMMs cost less than four
gather-bound sparse passes over N·k_aux entries (GEMMs run ~20× more multiply-adds per second
than row gathers on the project's CPU; benchmarks/README.md). Exact: the same selection and the
same sums as the sparse path, in a different order.
"""

from __future__ import annotations

import torch
from torch import Tensor


class _ColumnsDecodeFn(torch.autograd.Function):
    """ê = z_SC W_dec[C] with z_SC = pre at the kept entries (dead, selected, > 0), else 0.

    The rows S are the tokens AuxK looks at (all, or a subsample), with encoder inputs
    x_c = x_n[S] − b_dec. Backward: g_z = (g W_dec[C]ᵀ)·1[z > 0] is the gradient of pre at the
    kept entries; dW_dec[C] = z_SCᵀ g; dW_enc[C] = g_zᵀ x_c; db_enc[C] = Σ_s g_z;
    db_dec = −db_enc·W_enc (as in kernels.sparse); dx_n[S] = g_z W_enc[C].
    """

    @staticmethod
    def forward(ctx, z_SC, cols_C, x_n_SD, b_dec_D, W_enc_MD, b_enc_M, W_dec_MD):
        W_dec_CD = W_dec_MD.detach().index_select(0, cols_C)
        ctx.save_for_backward(z_SC, cols_C, x_n_SD, b_dec_D, W_enc_MD, W_dec_CD)
        ctx.d_sae = W_dec_MD.shape[0]
        ctx.has_b_enc = b_enc_M is not None
        return z_SC @ W_dec_CD

    @staticmethod
    def backward(ctx, grad_SD: Tensor):
        z_SC, cols_C, x_n_SD, b_dec_D, W_enc_MD, W_dec_CD = ctx.saved_tensors
        need_x, need_b_dec, need_W_enc, need_b_enc, need_W_dec = ctx.needs_input_grad[2:7]
        # a transcoder's decoder is [M, d_out], its encoder [M, d_in]: the widths differ
        M, d_in, d_out = ctx.d_sae, W_enc_MD.shape[1], W_dec_CD.shape[1]
        grad_SD = grad_SD.to(W_dec_CD.dtype)
        z_SC = z_SC.to(W_dec_CD.dtype)  # bf16 under autocast: the backward runs in W's dtype
        grad_x = grad_b_dec = grad_W_enc = grad_b_enc = grad_W_dec = None
        if need_W_dec:
            grad_W_dec = grad_SD.new_zeros(M, d_out).index_copy_(0, cols_C, z_SC.T @ grad_SD)
        if need_x or need_b_dec or need_W_enc or need_b_enc:
            g_pre_SC = (grad_SD @ W_dec_CD.T).mul_(z_SC > 0)
            db_enc_M = grad_SD.new_zeros(M).index_copy_(0, cols_C, g_pre_SC.sum(0))
            grad_b_enc = db_enc_M if need_b_enc and ctx.has_b_enc else None
            if need_b_dec:
                grad_b_dec = -(db_enc_M @ W_enc_MD.detach())
            if need_W_enc:
                x_c_SD = (x_n_SD - b_dec_D).detach()
                grad_W_enc = grad_SD.new_zeros(M, d_in).index_copy_(0, cols_C, g_pre_SC.T @ x_c_SD)
            if need_x:
                grad_x = g_pre_SC @ W_enc_MD.detach().index_select(0, cols_C)
        return None, None, grad_x, grad_b_dec, grad_W_enc, grad_b_enc, grad_W_dec


def columns_decode(
    pre_SC: Tensor,
    index_Sk: Tensor,
    keep_Sk: Tensor,
    cols_C: Tensor,
    x_n_SD: Tensor,
    b_dec_D: Tensor,
    W_enc_MD: Tensor,
    b_enc_M: Tensor | None,
    W_dec_MD: Tensor,
) -> Tensor:
    """ê [S, d] of AuxK from the selection ``index_Sk`` (positions in cols_C) of the detached
    pre restricted to those columns, ``pre_SC``; gradients as the sparse path's."""
    with torch.no_grad():
        kept_Sk = pre_SC.gather(1, index_Sk).masked_fill_(~keep_Sk, 0.0)
        z_SC = torch.zeros_like(pre_SC).scatter_(1, index_Sk, kept_Sk)
    return _ColumnsDecodeFn.apply(z_SC, cols_C, x_n_SD, b_dec_D, W_enc_MD, b_enc_M, W_dec_MD)
