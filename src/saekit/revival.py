"""Dead-latent revival losses: AuxK and the pre-activation revival (docs/design.md, "AuxK").

Both read the encoding's pre-activations through :class:`~saekit.encoding.Preacts`, so the
fast path's sparse backward and the reference path's dense autograd give the same numbers.
Nothing here syncs with the host; shapes are fixed (k_aux), so a step can be captured in a
CUDA graph.
"""

from __future__ import annotations

import torch
from torch import Tensor

from saekit.encoding import Preacts
from saekit.kernels import CodeLayout, auxk_select, sparse_decode

AUXK_NORMALIZERS = ("residual", "none")


def auxk_loss(
    preacts: Preacts,
    residual_ND: Tensor,
    W_dec_MD: Tensor,
    dead_mask_M: Tensor,
    *,
    k_aux: int | None = None,
    alpha: float = 1 / 32,
    normalizer: str = "residual",
) -> Tensor:
    """AuxK (Gao et al. 2024, appendix A.2/B.1): dead latents learn to explain the residual.

    e = stopgrad(residual) (pass x_n − x̂_n); candidates = ReLU(pre) on dead latents, −∞
    elsewhere; z_aux = top-k_aux of the candidates, k_aux = max(1, min(d // 2, M)) by default,
    a FIXED shape: an entry that is not dead or not positive contributes 0, so nothing syncs.
    ê = z_aux W_dec with NO b_dec (e already accounts for it; adding it double-counts, see
    sparsify PR #134, docs/references/auxk-bdec-double-count-fix.txt).
    L_aux = α · min(n_dead / k_aux, 1) · mean_n ‖ê − e‖² / V with V = mean_n ‖e − ē‖²
    ("residual", OpenAI) or 1 ("none"). Gradients reach W_dec and, through the selected
    pre-activations, W_enc and b_enc (and b_dec through the encoder input, legitimately).
    Returns a 0-d tensor, exactly 0 when no latent is dead.
    """
    if normalizer not in AUXK_NORMALIZERS:
        raise ValueError(f"auxk normalizer must be one of {AUXK_NORMALIZERS}, got {normalizer!r}")
    d = residual_ND.shape[-1]
    e_ND = residual_ND.detach().reshape(-1, d)
    n_tokens, d_sae = preacts.detached.shape
    k_aux = max(1, min(d // 2, d_sae) if k_aux is None else min(k_aux, d_sae))
    latent_Nk, keep_Nk = auxk_select(preacts.detached, dead_mask_M, k_aux)
    layout = CodeLayout.fixed_k(latent_Nk, d_sae)
    pre_E = preacts.at(layout.token, layout.latent)
    z_E = torch.where(keep_Nk.reshape(-1), pre_E, torch.zeros_like(pre_E))
    e_hat_ND = sparse_decode(z_E, layout.latent, layout.token, W_dec_MD, n_tokens, layout)
    mse = (e_hat_ND - e_ND).pow(2).sum(-1).mean()
    if normalizer == "residual":
        variance = (e_ND - e_ND.mean(0)).pow(2).sum(-1).mean()
        mse = mse / variance.clamp_min(torch.finfo(variance.dtype).tiny)
    n_dead = dead_mask_M.to(device=mse.device, dtype=mse.dtype).sum()
    return alpha * (n_dead / k_aux).clamp(max=1.0) * mse


def input_target(x_n_ND: Tensor, b_dec_D: Tensor) -> Tensor:
    """The target of the "input" revival: stopgrad(x_n − b_dec), the centred input itself.

    AuxK's target, the residual x_n − x̂_n, is what the live latents get wrong, so a latent
    revived by it may learn a live latent's error instead of a feature ("residual peeking",
    SAELens question #666). Fitting the input with dead latents alone (the same top-k_aux
    selection and decode as :func:`auxk_loss`, without b_dec) gives every dead latent a
    gradient toward directions the data has, whatever the live latents currently miss.
    docs/research.md measures what the revived latents become under each signal.
    """
    return (x_n_ND - b_dec_D).detach()


def dead_preact_loss(
    preacts: Preacts, dead_mask_M: Tensor, theta: Tensor, dec_norms_M: Tensor
) -> Tensor:
    """L = mean_n Σ_{i dead} ReLU(θ − pre_ni) · ‖W_dec,i‖ / max(n_dead, 1): revival without a
    residual target, normalised per dead latent.

    The normalisation keeps L at the scale of one latent's threshold gap (≈ θ, O(1) in the
    normalised space where E‖x_n‖² = d) however many latents are dead: unnormalised, hundreds of
    dead latents gave a term ~1000 against a reconstruction of ~50, whose gradient took the
    whole clipped norm and the SAE diverged. Each dead latent's encoder row has its own Adam
    moments, so the 1/n_dead factor does not slow its revival.

    AuxK asks dead latents to fit the live latents' residual, so a revived latent may become an
    error-correction term for an undertrained live one (SAELens question #666). This loss only
    pushes a dead latent's pre-activation up toward the firing threshold θ, through the encoder
    (θ and the decoder norms are detached), much as JumpReLU's threshold gradient does; what the
    latent then encodes is decided by the reconstruction loss once it fires.

    θ: the activation's ``firing_threshold``: [N, 1] per token (TopK), 0-d per batch
    (BatchTopK), or [M] per latent (JumpReLU).
    """
    pre_NM = preacts.dense()
    weight_M = dead_mask_M.to(pre_NM.dtype) * dec_norms_M.detach()
    gap_NM = torch.relu(theta.detach() - pre_NM)
    n_dead = dead_mask_M.to(pre_NM.dtype).sum().clamp_min(1.0)
    return (gap_NM * weight_M).sum(-1).mean() / n_dead
