"""The latents of an SAE in another order (frequency-sorted Matryoshka levels,
``matryoshka.sort_every``): every per-latent tensor moved alike, so the SAE computes the same
function with its latents renumbered."""

from __future__ import annotations

import torch
from torch import Tensor

from saekit.model.sae import SAE


def latent_state_keys(sae: SAE) -> list[str]:
    """State-dict keys of the per-latent tensors (latents on dim 0): W_enc, b_enc, W_dec and
    the activation's tensors of dim ≥ 1 (a 0-d one, BatchTopK's θ, is global): the rule of
    saekit.train.latent_parts.latent_axes (a test keeps the two equal)."""
    act = sae.activation.state_dict()
    return ["W_enc", "b_enc", "W_dec"] + [f"activation.{k}" for k, v in act.items() if v.dim()]


@torch.no_grad()
def permute_latents_(sae: SAE, perm: Tensor) -> list[Tensor]:
    """New latent j := old latent perm[j] in every per-latent tensor, in place (the same
    objects, which an optimizer holds): the same function. Returns those tensors."""
    M, tensors = sae.cfg.d_sae, sae.state_dict(keep_vars=True)
    if perm.shape != (M,) or perm.dtype != torch.int64:
        raise ValueError(f"permute_latents_ takes an int64 permutation of shape ({M},)")
    moved = [tensors[key] for key in latent_state_keys(sae)]
    for key, t in zip(latent_state_keys(sae), moved, strict=True):
        if t.shape[0] != M:  # an activation tensor of dim ≥ 1 that is not per-latent
            raise ValueError(f"{key} of shape {tuple(t.shape)} is not per-latent (d_sae {M})")
        t.copy_(t.index_select(0, perm.to(t.device)))
    return moved
