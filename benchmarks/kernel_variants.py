"""Kernel variants kept for speed work, not used by the library (benchmarks/bench_step.py rows).

- :func:`batchtopk_select_candidates`: BatchTopK from each token's top-c plus N/16 full rows;
  exact only when its ``exact`` flag says so (the library's selection is always exact).
- :func:`auxk_loss_dense_columns`: AuxK's decode and backward as dense GEMMs over the dead
  columns (exact while n_dead ≤ n_cols), faster on CPU when k_aux is large.

Moved here from saekit.kernels when the activations took over the fast paths (issue 10); the
speed issue decides whether either returns to the library as a config choice.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from saekit.kernels import SparsePreacts


def batchtopk_select_candidates(
    pre_NM: Tensor, k: int, per_token: int | None = None, full_rows: int | None = None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The k·N largest entries of pre over the batch: (values [k·N], flat index [k·N] sorted, so
    token-major, and ``exact``: None, or a 0-d bool tensor when the candidate path ran).

    ``per_token=None``: one top-k over the flattened [N·M] (exact; what ``activations.BatchTopK``
    does; fast on GPU, a single-threaded partial sort of N·M entries on CPU).

    ``per_token=c``: candidates = each token's top-c, plus ALL M entries of the ``full_rows``
    tokens (default N/16) whose c-th largest value is highest; then one top-k·N over the
    candidates. Exact whenever at most ``full_rows`` tokens hold ≥ c of the batch's top k·N
    (an entry missed lies below its token's c-th value, which is then ≥ the threshold, so that
    token is a full row). ``exact`` checks this without a host sync: (full_rows+1)-th largest
    c-th value < the batch threshold. Several times cheaper on CPU (c = 4k: one per-token top-c).
    """
    n_tokens, d_sae = pre_NM.shape
    n_keep = k * n_tokens
    per_token = d_sae if per_token is None else min(d_sae, max(per_token, k))
    full_rows = max(1, n_tokens // 16) if full_rows is None else full_rows
    if per_token >= d_sae or full_rows >= n_tokens:
        top = pre_NM.reshape(-1).topk(n_keep, sorted=False)
        flat_E, order = top.indices.sort()
        return top.values[order], flat_E, None
    device = pre_NM.device
    top = pre_NM.topk(per_token, dim=-1, sorted=False)  # [N, c]
    last_N = top.values.min(-1).values  # each token's c-th largest
    ranked = last_N.topk(full_rows + 1)
    rows_R, next_last = ranked.indices[:full_rows], ranked.values[full_rows]
    is_full_N = torch.zeros(n_tokens, dtype=torch.bool, device=device).index_fill_(0, rows_R, True)
    cand_values = torch.cat(
        [
            top.values.masked_fill(is_full_N.unsqueeze(1), -math.inf).reshape(-1),  # [N·c]
            pre_NM.index_select(0, rows_R).reshape(-1),  # [R·M]
        ]
    )
    tokens_N = torch.arange(n_tokens, device=device).unsqueeze(1)
    cand_flat = torch.cat(
        [
            (tokens_N * d_sae + top.indices).reshape(-1),
            (rows_R.unsqueeze(1) * d_sae + torch.arange(d_sae, device=device)).reshape(-1),
        ]
    )
    chosen = cand_values.topk(n_keep, sorted=False)
    flat_E, order = cand_flat[chosen.indices].sort()
    values_E = chosen.values[order]
    exact = next_last < chosen.values.min()
    return values_E, flat_E, exact


class _AuxKDenseFn(torch.autograd.Function):
    """ê = z_aux W_dec restricted to C gathered columns, as dense [N, C] GEMMs.

    z_NC holds the kept AuxK values (pre at the selected dead entries, > 0) and zeros. Backward:
    g_z = (g W_dec[C]ᵀ)·1[z > 0] is the gradient of pre at the kept entries; dW_dec[C] = z_NCᵀ g;
    dW_enc[C] = g_zᵀ x_c; db_enc[C] = Σ_n g_z; db_dec = −db_enc·W_enc. Four N·C·d GEMMs: on CPU
    cheaper than four sparse passes over N·k_aux entries once C ≤ M (GEMMs run ~20× more MACs
    per second than row gathers).
    """

    @staticmethod
    def forward(ctx, z_NC, cols_C, x_n_ND, b_dec_D, W_enc_MD, b_enc_M, W_dec_MD):
        W_dec_CD = W_dec_MD.detach().index_select(0, cols_C)
        ctx.save_for_backward(z_NC, cols_C, x_n_ND, b_dec_D, W_enc_MD, W_dec_CD)
        ctx.d_sae = W_dec_MD.shape[0]
        return z_NC @ W_dec_CD

    @staticmethod
    def backward(ctx, grad_ND: Tensor):
        z_NC, cols_C, x_n_ND, b_dec_D, W_enc_MD, W_dec_CD = ctx.saved_tensors
        need_x, need_b_dec, need_W_enc, need_b_enc, need_W_dec = ctx.needs_input_grad[2:7]
        M, d = ctx.d_sae, W_enc_MD.shape[1]
        grad_ND = grad_ND.to(W_dec_CD.dtype)
        grad_x = grad_b_dec = grad_W_enc = grad_b_enc = grad_W_dec = None
        if need_W_dec:
            grad_W_dec = grad_ND.new_zeros(M, d).index_copy_(0, cols_C, z_NC.T @ grad_ND)
        if need_x or need_b_dec or need_W_enc or need_b_enc:
            g_pre_NC = (grad_ND @ W_dec_CD.T).mul_(z_NC > 0)  # [N, C]
            db_enc_M = grad_ND.new_zeros(M).index_copy_(0, cols_C, g_pre_NC.sum(0))
            grad_b_enc = db_enc_M if need_b_enc else None
            if need_b_dec:
                grad_b_dec = -(db_enc_M @ W_enc_MD)
            if need_W_enc:
                x_c_ND = (x_n_ND - b_dec_D).detach()
                grad_W_enc = grad_ND.new_zeros(M, d).index_copy_(0, cols_C, g_pre_NC.T @ x_c_ND)
            if need_x:
                grad_x = g_pre_NC @ W_enc_MD.detach().index_select(0, cols_C)
        return None, None, grad_x, grad_b_dec, grad_W_enc, grad_b_enc, grad_W_dec


def _auxk_decode_dense(
    preacts: SparsePreacts, W_dec_MD: Tensor, dead_mask_M: Tensor, k_aux: int, n_cols: int | None
) -> Tensor:
    """ê of AuxK through :class:`_AuxKDenseFn`; same selection as :func:`auxk_select`."""
    pre_NM = preacts.detached
    n_tokens, d_sae = pre_NM.shape
    with torch.no_grad():
        cols_C, cand_NC = dead_candidates(pre_NM, dead_mask_M, k_aux, n_cols)
        if cols_C is None:
            cols_C = torch.arange(d_sae, device=pre_NM.device)
        top = cand_NC.topk(k_aux, dim=-1, sorted=False)
        # kept = dead and positive; the rest (ReLU'd or −∞) become exact zeros.
        z_NC = torch.zeros_like(cand_NC).scatter_(1, top.indices, top.values.clamp_min(0))
        del cand_NC, top
    return _AuxKDenseFn.apply(
        z_NC, cols_C, preacts.x_n_ND, preacts.b_dec_D, preacts.W_enc_MD, preacts.b_enc_M, W_dec_MD
    )


def auxk_loss_dense_columns(
    preacts: SparsePreacts,
    residual_ND: Tensor,
    W_dec_MD: Tensor,
    dead_mask_M: Tensor,
    *,
    k_aux: int | None = None,
    alpha: float = 1 / 32,
    n_cols: int | None = None,
) -> Tensor:
    """AuxK (residual normaliser) with ê and its backward as GEMMs over gathered columns; the
    same value as ``saekit.revival.auxk_loss`` when n_dead ≤ n_cols (or n_cols is None)."""
    d_sae = preacts.detached.shape[1]
    d = residual_ND.shape[-1]
    k_aux = min(d // 2, d_sae) if k_aux is None else min(k_aux, d_sae)
    e_ND = residual_ND.detach().reshape(-1, d)
    e_hat_ND = _auxk_decode_dense(preacts, W_dec_MD, dead_mask_M, k_aux, n_cols)
    mse = (e_hat_ND - e_ND).pow(2).sum(-1).mean()
    variance = (e_ND - e_ND.mean(0)).pow(2).sum(-1).mean()
    mse = mse / variance.clamp_min(torch.finfo(variance.dtype).tiny)
    n_dead = dead_mask_M.to(device=mse.device, dtype=mse.dtype).sum()
    return alpha * (n_dead / k_aux).clamp(max=1.0) * mse


def dead_candidates(
    pre_NM: Tensor, dead_mask_M: Tensor, k_aux: int, n_cols: int | None = None
) -> tuple[Tensor | None, Tensor]:
    """(cols_C, cand_NC): AuxK's candidate pre-activations, −∞ where the latent is not dead.

    ``n_cols`` None (or ≥ M): all M columns, ``cols_C`` None. Otherwise a fixed-shape gather of
    n_cols columns, dead ones first (``topk`` of the dead mask), sorted. No host sync.
    """
    d_sae = pre_NM.shape[1]
    dead_M = dead_mask_M.to(device=pre_NM.device, dtype=torch.bool)
    pre_NM = pre_NM.detach()
    if n_cols is None or n_cols >= d_sae:
        return None, pre_NM.masked_fill(~dead_M, -math.inf)
    n_cols = max(n_cols, k_aux)
    cols_C = torch.topk(dead_M.to(pre_NM.dtype), n_cols, sorted=False).indices.sort().values
    cand_NC = pre_NM.index_select(1, cols_C)
    cand_NC.masked_fill_(~dead_M[cols_C], -math.inf)
    return cols_C, cand_NC
