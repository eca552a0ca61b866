"""Ground-truth recovery on synthetic data: how well decoder rows match the true directions.

- per-feature max |cos| between a true direction and any decoder row, its mean, and the share of
  true features recovered above 0.9;
- MCC: mean matched |cos| under a Hungarian (one-to-one) assignment of latents to features;
- absorption on hierarchical data: among tokens where a child feature is active, the share
  where the parent's best-matching latent does not fire while a firing child latent's decoder
  row carries the parent direction (Chanin et al., "A is for Absorption", 2024).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor


def cosine_matrix(true_FD: Tensor, W_dec_MD: Tensor) -> Tensor:
    """[F, M] cosine similarity between true directions and decoder rows (float64)."""
    t = true_FD.double()
    w = W_dec_MD.detach().double().cpu()
    t = t / t.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    w = w / w.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return t @ w.T


@dataclass
class RecoveryResult:
    mean_max_cos: float
    """Mean over true features of the max |cos| with any decoder row."""
    recovered_share: float
    """Share of true features whose max |cos| exceeds ``threshold``."""
    mcc: float
    """Mean |cos| of a one-to-one (Hungarian) matching of features to latents."""
    threshold: float


def recovery(true_FD: Tensor, W_dec_MD: Tensor, threshold: float = 0.9) -> RecoveryResult:
    abs_cos = cosine_matrix(true_FD, W_dec_MD).abs()
    max_cos = abs_cos.max(dim=1).values
    rows, cols = linear_sum_assignment(abs_cos.numpy(), maximize=True)
    # With fewer latents than features, unmatched features count as 0 in the MCC.
    mcc = float(abs_cos.numpy()[rows, cols].sum() / abs_cos.shape[0])
    return RecoveryResult(
        mean_max_cos=float(max_cos.mean()),
        recovered_share=float((max_cos > threshold).double().mean()),
        mcc=mcc,
        threshold=threshold,
    )


@torch.no_grad()
def absorption_counts(
    true_FD: Tensor,
    parent_of_F: Tensor,
    coefficients_NF: Tensor,
    z_NM: Tensor,
    W_dec_MD: Tensor,
    carry_threshold: float = 0.3,
) -> tuple[int, int]:
    """(absorbed, total) over (token, active child) pairs of one batch; rate = absorbed / total.

    For each parent p: its latent is the decoder row with the largest cos to p's direction. A
    pair is "absorbed" when p's latent is zero on that token while some other firing latent's
    decoder row has cos > ``carry_threshold`` with p's direction (it carries the parent).
    """
    cos_FM = cosine_matrix(true_FD, W_dec_MD).float()
    z = z_NM.detach().float().cpu()
    coeffs = coefficients_NF.cpu()
    children = torch.nonzero(parent_of_F >= 0).flatten()
    if children.numel() == 0:
        raise ValueError("absorption needs hierarchical data (no feature has a parent)")
    absorbed = total = 0
    for child in children.tolist():
        parent = int(parent_of_F[child])
        tokens = coeffs[:, child] > 0
        parent_latent = int(cos_FM[parent].argmax())
        carriers = cos_FM[parent] > carry_threshold
        carriers[parent_latent] = False
        z_tok = z[tokens]
        parent_silent = z_tok[:, parent_latent] == 0
        carrier_fires = (z_tok[:, carriers] != 0).any(dim=1)
        absorbed += int((parent_silent & carrier_fires).sum())
        total += int(tokens.sum())
    return absorbed, total
