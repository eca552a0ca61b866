"""Compose one SAE's training loss from the pure functions in :mod:`saekit.losses`.

loss = reconstruction (plain, or Matryoshka over prefixes) + λ·penalty + α·revival.
Every term lives in the normalised space; nothing here syncs with the host.
"""

from __future__ import annotations

from torch import Tensor

from saekit import losses
from saekit.activations import SparseCode
from saekit.sae import SAE, ForwardOutput
from saekit.train.config import SAETrainConfig


def revival_threshold(sae: SAE, latents: Tensor | SparseCode) -> Tensor:
    """θ of the pre-activation revival loss: the token's (TopK), the batch's (BatchTopK) smallest
    kept activation, or the per-latent JumpReLU threshold."""
    act = sae.cfg.activation
    if act == "jumprelu":
        return sae.activation.threshold.detach()
    if isinstance(latents, SparseCode):
        return losses.kept_threshold(latents, per_token=(act == "topk"))
    raise ValueError(f"revival 'preact' needs topk, batchtopk or jumprelu, not {act!r}")


def training_loss(
    cfg: SAETrainConfig,
    sae: SAE,
    out: ForwardOutput,
    dead_mask: Tensor,
    penalty_coefficient: Tensor | float,
    prefixes: list[int] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The total loss and its detached parts."""
    parts: dict[str, Tensor] = {}
    penalty_kind = cfg.penalty if cfg.penalty != "l0" else None
    dec_norms = sae.W_dec.norm(dim=-1)
    if prefixes is not None:
        total = losses.matryoshka_loss(
            out.x_n,
            out.latents,
            sae.W_dec,
            sae.b_dec,
            prefixes,
            penalty=penalty_kind,
            lam=penalty_coefficient,
            eps=cfg.penalty_eps,
            c=cfg.penalty_tanh_c,
        )
        parts["matryoshka"] = total.detach()
    else:
        rec = losses.reconstruction_loss(out.x_n, out.x_hat_n)
        parts["reconstruction"] = rec.detach()
        total = rec
        if penalty_kind is not None:
            pen = losses.sparsity_penalty(
                out.latents, dec_norms, penalty_kind, eps=cfg.penalty_eps, c=cfg.penalty_tanh_c
            )
            parts["penalty"] = pen.detach()
            total = total + penalty_coefficient * pen
    if cfg.penalty == "l0":
        act = sae.activation
        pen = losses.l0_penalty(out.pre, act.threshold, act.bandwidth)
        parts["penalty"] = pen.detach()
        total = total + penalty_coefficient * pen
    if cfg.revival == "auxk" and isinstance(out.latents, SparseCode):
        aux = losses.auxk_loss(
            out.pre,
            (out.x_n - out.x_hat_n).detach(),
            sae.W_dec,
            dead_mask,
            k_aux=cfg.auxk_k,
            alpha=cfg.revival_coefficient,
            normalizer=cfg.auxk_normalizer,
            preacts_at=out.preacts_at,
        )
        parts["revival"] = aux.detach()
        total = total + aux
    elif cfg.revival == "preact" and sae.cfg.activation in ("topk", "batchtopk", "jumprelu"):
        theta = revival_threshold(sae, out.latents)
        aux = cfg.revival_coefficient * losses.dead_preact_loss(
            out.pre, dead_mask, theta, dec_norms
        )
        parts["revival"] = aux.detach()
        total = total + aux
    parts["loss"] = total.detach()
    return total, parts
