"""Matching Pursuit SAE (Costa et al. 2025, arXiv 2506.03093): tied, greedy iterative encode.

The decoder rows are the dictionary; there is no separate encoder (W_enc and b_enc stay at their
initial values, untrained). With unit atoms u_i = W_dec,i / ‖W_dec,i‖ and r⁰ = x_n − b_dec:

    for t = 1..k:   j = argmax_i ⟨r, u_i⟩     c = ReLU(⟨r, u_j⟩)     r ← r − c·u_j
                    (a token stops early once ‖r‖ ≤ τ·‖r⁰‖; c = 0 when nothing correlates)
    z_j = Σ_{t: j_t = j} c_t / ‖W_dec,j‖     so  x̂ = z W_dec + b_dec = x_n − r

Stopping rules: at most ``k`` steps (so L0 ≤ k), and the optional relative residual threshold
τ. Relative, so folding the dataset scale into the weights on save (which multiplies every
residual by s) leaves the code exact; SAELens' ``residual_threshold`` is absolute, so an export
maps only τ = 0. An atom may be chosen twice; its coefficients add up. Codes are non-negative,
as in SAELens' "matching_pursuit". The gradient is autograd through the k steps: the
selections are constants, c and the residual updates are differentiable in W_dec and b_dec.

Cost: one [N, d]·[d, M] correlation per step without autograd (a loop over k steps, not over
tokens) and a differentiable O(N·d) update per step; the latents are dense [N, M].

Revival: AuxK, with the first step's correlations ⟨r⁰, u_i⟩ as the pre-activations (the
encoding's ``preacts``): dead atoms that correlate with the input learn to fit the residual.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from saekit.activations.base import Activation, ActivationConfig
from saekit.core.configs import check_finite
from saekit.core.encoding import EncoderView, Encoding, Preacts


@dataclass
class MatchingPursuitConfig(ActivationConfig):
    kind = "matching_pursuit"
    k: int
    """Most pursuit steps per token (so L0 ≤ k)."""
    residual_threshold: float = 0.0
    """τ: a token stops once ‖r‖ ≤ τ·‖x_n − b_dec‖ (relative; 0: only k stops it)."""

    def __post_init__(self) -> None:
        if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k <= 0:
            raise ValueError(f"k must be a positive integer, got {self.k!r}")
        check_finite("residual_threshold", self.residual_threshold, 0.0)
        if self.residual_threshold >= 1.0:
            raise ValueError(
                f"residual_threshold must be below 1 (relative to ‖x_n − b_dec‖), got "
                f"{self.residual_threshold!r}"
            )

    def name_parts(self) -> list[str]:
        return ["mp", f"k{self.k}"]


class MatchingPursuit(Activation):
    config_class = MatchingPursuitConfig
    unit_norm_decoder = True
    revival_signals = frozenset({"auxk"})
    uses_encoder_bias = False
    uses_encoder_weights = False

    def encode(self, view: EncoderView, x_n_ND: Tensor) -> Encoding:
        norms_M = view.W_dec.norm(dim=-1)
        u_MD = view.W_dec / norms_M.unsqueeze(1)
        r_ND = x_n_ND - view.b_dec
        pre_NM = r_ND @ u_MD.T  # the first step's correlations
        stop_N = None
        if self.cfg.residual_threshold > 0:
            stop_N = self.cfg.residual_threshold * r_ND.detach().norm(dim=-1)
        u_detached = u_MD.detach()
        latent_steps, coef_steps = [], []
        for step in range(self.cfg.k):
            with torch.no_grad():
                corr_NM = pre_NM.detach() if step == 0 else r_ND.detach() @ u_detached.T
                j_N = corr_NM.argmax(-1)
            u_j_ND = u_MD[j_N]
            c_N = torch.relu((r_ND * u_j_ND).sum(-1))
            if stop_N is not None:
                c_N = c_N * (r_ND.detach().norm(dim=-1) > stop_N).to(c_N.dtype)
            r_ND = r_ND - c_N.unsqueeze(1) * u_j_ND
            latent_steps.append(j_N)
            coef_steps.append(c_N)
        latent_Nk = torch.stack(latent_steps, 1)
        coef_Nk = torch.stack(coef_steps, 1)
        z_NM = torch.zeros_like(pre_NM).scatter_add(1, latent_Nk, coef_Nk / norms_M[latent_Nk])
        return Encoding(z_NM, Preacts(pre_NM))
