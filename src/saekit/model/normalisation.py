"""The input transform of the normalised space: the dataset scale s and optional whitening.

    x_n = x / s                       (always; s = sqrt(E‖x‖² / d), so E‖x_n‖² = d)
    x_n = (x / s − μ) · M             (with ``whitening: {kind: zca, eps}``)

μ and Σ are the mean and covariance of x / s, estimated once from the first tokens of the stream
(with s, before training), kept in float64 and never re-estimated on resume (they are buffers of
the SAE, so a training checkpoint carries them). ZCA whitening (Bell & Sejnowski 1997; Kessy,
Lewin & Strimmer, "Optimal whitening and decorrelation", arXiv 1512.00809): with Σ = E Λ Eᵀ,

    M = E (Λ + ε)^(-1/2) Eᵀ,    M⁻¹ = E (Λ + ε)^(1/2) Eᵀ,

the whitening that stays closest to the input (it minimises E‖x_n − x/s‖² among whitenings), so
decoder rows keep pointing along the input's own directions. ε is absolute in the scaled space,
where the eigenvalues average (d − ‖μ‖²)/d ≤ 1; it bounds the gain on near-null directions.
SAEs on whitened activations: arXiv 2511.13981 (PCA whitening; SAELens ``covariance_whitening``).

Folding (``fold_whitening``, then the scale): pre = (x_n − b_dec) W_encᵀ + b_enc and
x̂ = s·((z W_dec + b_dec) M⁻¹ + μ) are affine in x and in z, so

    W_enc ← W_enc Mᵀ / s,   W_dec ← s · W_dec M⁻¹,   b_dec ← s · (b_dec M⁻¹ + μ),   b_enc, θ kept

gives the same pre-activations (hence the same latents, TopK selection included) from raw x.
TopK's unit-norm decoder rows are a constraint of the training space: the fold runs after the
last renormalisation and the saved rows are s·W_dec,i M⁻¹, not unit norm; renormalising them
would rescale latents and change which ones TopK keeps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from saekit.core.configs import KindConfig, check_finite


class WhiteningConfig(KindConfig):
    """An input whitening of the scaled activations (saved in the SAE's config)."""

    family = "whitening"


@dataclass
class ZCAWhitening(WhiteningConfig):
    kind = "zca"
    eps: float = 1e-3
    """ε added to each eigenvalue of the scaled input's covariance (absolute; see module doc)."""

    def __post_init__(self) -> None:
        check_finite("eps", self.eps, 0.0, strict=True)


class Whitening(NamedTuple):
    """μ [d], M [d, d] and M⁻¹ [d, d] in float64."""

    mean: Tensor
    matrix: Tensor
    inverse: Tensor


def estimate_scale(x: Tensor) -> float:
    """s = sqrt(E‖x‖² / d), so that E‖x / s‖² = d: the one home of the dataset scale."""
    x = x.reshape(-1, x.shape[-1]).double()
    return float((x.pow(2).sum(-1).mean() / x.shape[-1]).sqrt())


def estimate_whitening(x_n: Tensor, cfg: ZCAWhitening) -> Whitening:
    """μ, M = E (Λ + ε)^(-1/2) Eᵀ and M⁻¹ from scaled activations x / s [N, d] (float64)."""
    x = x_n.reshape(-1, x_n.shape[-1]).double()
    if x.shape[0] < 2:
        raise ValueError(
            f"whitening needs at least 2 tokens to estimate a covariance, got {len(x)}"
        )
    mean = x.mean(0)
    centred = x - mean
    cov = centred.T @ centred / (x.shape[0] - 1)
    eigenvalues, E = torch.linalg.eigh(cov)
    # eigh can return tiny negative eigenvalues for a (numerically) singular covariance
    lam = eigenvalues.clamp_min(0) + cfg.eps
    matrix = (E * lam.rsqrt()) @ E.T
    inverse = (E * lam.sqrt()) @ E.T
    return Whitening(mean, matrix, inverse)


def whiten(x_n: Tensor, w: Whitening) -> Tensor:
    """(x / s − μ) · M in x_n's dtype."""
    return (x_n - w.mean.to(x_n.dtype)) @ w.matrix.to(x_n.dtype)


def unwhiten(x_hat_w: Tensor, w: Whitening) -> Tensor:
    """x̂_w · M⁻¹ + μ: back to the scaled space."""
    return x_hat_w @ w.inverse.to(x_hat_w.dtype) + w.mean.to(x_hat_w.dtype)


@torch.no_grad()
def fold_whitening(
    W_enc: Tensor, W_dec: Tensor, b_dec: Tensor, w: Whitening
) -> tuple[Tensor, Tensor, Tensor]:
    """W_enc Mᵀ, W_dec M⁻¹, b_dec M⁻¹ + μ: the SAE that takes x / s (module doc; the scale is
    folded after), computed in float64 and returned in the weights' dtype."""
    dtype = W_enc.dtype
    W_enc_MD = W_enc.double() @ w.matrix.T
    W_dec_MD = W_dec.double() @ w.inverse
    b_dec_D = b_dec.double() @ w.inverse + w.mean
    return W_enc_MD.to(dtype), W_dec_MD.to(dtype), b_dec_D.to(dtype)
