"""Re-ordering latents in place, with the optimizer state moved along.

Matryoshka SAEs may re-sort latents by usage so that the most used sit in the shortest prefix
(DESIGN.md, "Matryoshka"). A permutation must move every per-latent tensor together: the
encoder and decoder rows, b_enc, the activation's per-latent parameters and buffers (JumpReLU
``log_threshold``, ProLU ``bias``) and the optimizer's per-parameter state (Adam's ``exp_avg``,
``exp_avg_sq``, ``max_exp_avg_sq``); forgetting the moments gives a latent another latent's
step size (noted against the Matryoshka reference in STYLE.md).

Convention: after ``permute_latents_(sae, opt, perm)`` new latent j is old latent ``perm[j]``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from saekit.model.sae import SAE


def per_latent_tensors(sae: SAE) -> list[Tensor]:
    """Every parameter and buffer whose leading dimension indexes latents."""
    d_sae = sae.cfg.d_sae
    tensors: list[Tensor] = [sae.W_enc, sae.b_enc, sae.W_dec]
    for t in [*sae.activation.parameters(), *sae.activation.buffers()]:
        if t.ndim >= 1 and t.shape[0] == d_sae:  # activation tensors are per latent or scalar
            tensors.append(t)
    return tensors


@torch.no_grad()
def permute_latents_(
    sae: SAE,
    optimizer: torch.optim.Optimizer | None,
    perm: Tensor,
    others: Iterable[Tensor] = (),
) -> None:
    """Re-order latents in place: new latent j is old latent ``perm[j]``.

    Moves the SAE's per-latent tensors, every optimizer state tensor of those parameters whose
    shape is the parameter's (moments), and ``others`` (e.g. the trainer's tokens-since-fired
    counters, leading dimension M). Scalar state such as Adam's ``step`` is left alone.
    """
    d_sae = sae.cfg.d_sae
    perm = perm.to(device=sae.W_enc.device, dtype=torch.long)
    if perm.shape != (d_sae,):
        raise ValueError(f"perm must have shape ({d_sae},), got {tuple(perm.shape)}")
    tensors = per_latent_tensors(sae)
    for t in [*tensors, *others]:
        t.copy_(t[perm.to(t.device)])
    if optimizer is None:
        return
    params = {id(t) for t in tensors if isinstance(t, nn.Parameter)}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in params or p not in optimizer.state:
                continue
            for value in optimizer.state[p].values():
                if isinstance(value, Tensor) and value.shape == p.shape:
                    value.copy_(value[perm.to(value.device)])


def resort_latents_by_usage(
    sae: SAE,
    optimizer: torch.optim.Optimizer | None,
    usage_M: Tensor,
    others: Iterable[Tensor] = (),
) -> Tensor:
    """Sort latents by decreasing usage (e.g. firing counts) in place; return the permutation.

    Ties keep their current order (stable sort), so a re-sort of sorted usage is the identity.
    Permute any other per-latent state with the returned ``perm`` or pass it in ``others``.
    """
    perm = torch.sort(usage_M.detach(), descending=True, stable=True).indices
    permute_latents_(sae, optimizer, perm, others)
    return perm
