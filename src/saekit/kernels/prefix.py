"""Squared errors of every prefix of a sum, from one pass:
mse_j = mean_n ‖r_n − Σ_{j' ≤ j} δ_{j',n}‖² for j = 1..P.

The Matryoshka loss (:mod:`saekit.objective.matryoshka`, blocks of latents) and HierarchicalTopK
(:mod:`saekit.activations.hierarchical_topk`, each token's rank positions) both reduce to it.
"""

from __future__ import annotations

import torch
from torch import Tensor


class _PrefixMSE(torch.autograd.Function):
    """mse_j = mean_n ‖r_n − Σ_{j' ≤ j} δ_{j',n}‖² for every j, r = x_n − b_dec: [P].

    The same numbers as cumsum + squared error, but with running sums over [N, d] buffers in
    both directions instead of a cumsum over [P, N, d] (whose backward flips it twice).
    Backward, with e_j = r − Σ_{j' ≤ j} δ_j' and G_j = Σ_{j' ≥ j} g_j' e_j':
    ∂/∂δ_j = −(2/N)·G_j and ∂/∂r = (2/N)·G_0; e_j = e_{j+1} + δ_{j+1} walks back from e_{P−1}.

    ``detach_inner``: prefix j's sum is sg(Σ_{j' < j} δ_j') + δ_j (sg: stop-gradient), the same
    values; δ_j then reaches mse_j alone, ∂/∂δ_j = −(2/N)·g_j e_j, while ∂/∂r = (2/N)·G_0 is
    unchanged (r is in every prefix's error, never detached).
    """

    @staticmethod
    def forward(ctx, delta_PND: Tensor, r_ND: Tensor, detach_inner: bool = False) -> Tensor:
        ctx.detach_inner = detach_inner
        n_tokens = r_ND.shape[0]
        err_ND = r_ND.clone()
        mse = []
        for delta_ND in delta_PND:
            err_ND -= delta_ND
            mse.append(err_ND.pow(2).sum() / n_tokens)
        ctx.save_for_backward(delta_PND, err_ND)  # err_ND is e_{P−1}
        return torch.stack(mse)

    @staticmethod
    def backward(ctx, grad_P: Tensor):
        delta_PND, last_err_ND = ctx.saved_tensors
        n_prefixes, n_tokens = delta_PND.shape[:2]
        err_ND = last_err_ND.clone()
        acc_ND = torch.zeros_like(err_ND)
        grad_delta_PND = torch.empty_like(delta_PND)
        for j in range(n_prefixes - 1, -1, -1):
            if j < n_prefixes - 1:
                err_ND += delta_PND[j + 1]
            acc_ND.add_(err_ND, alpha=grad_P[j])  # G_j; grad_P stays a tensor: no host sync
            if ctx.detach_inner:  # g_j e_j: δ_j is live in prefix j only
                torch.mul(err_ND, grad_P[j] * (-2.0 / n_tokens), out=grad_delta_PND[j])
            else:
                torch.mul(acc_ND, -2.0 / n_tokens, out=grad_delta_PND[j])
        return grad_delta_PND, acc_ND * (2.0 / n_tokens), None


def prefix_mse(delta_PND: Tensor, r_ND: Tensor, detach_inner: bool = False) -> Tensor:
    """[P]: mean_n ‖r − Σ_{j' ≤ j} δ_j'‖² for every j, by the running sums of _PrefixMSE (also
    HierarchicalTopK's, whose blocks are each token's rank positions). ``detach_inner``: the
    gradient of sg(Σ_{j' < j} δ_j') + δ_j in prefix j (_PrefixMSE), the values unchanged."""
    return _PrefixMSE.apply(delta_PND, r_ND, detach_inner)
