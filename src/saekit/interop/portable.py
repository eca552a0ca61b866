"""The form every format is translated through, and the table of what each activation exports as.

A :class:`Portable` SAE is what the other libraries can serve: an affine encoder on the raw
activations with b_dec subtracted first, pre = (x − b_dec) W_encᵀ + b_enc, one of a few
activations on ``pre``, and the decoder x̂ = z W_dec + b_dec. Tensors use saekit's layout
(``W_enc`` and ``W_dec`` both [M, d]); each format's reader and writer transposes and renames.
A transcoder (``transcoder``: saekit's ``d_out`` set) reads x uncentred, pre = x W_encᵀ + b_enc,
and predicts ŷ = z W_dec + x W_skipᵀ + b_dec (``W_dec`` [M, d_out], ``W_skip`` [d_out, d_in] or
None); the same activations apply.

:data:`EXPORTS` maps each saekit activation kind to its portable form; a kind not in it has no
exact equivalent in any library and is refused. Adding an activation's export = one entry.
:func:`to_sae` builds the saekit SAE of a portable one (imports).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from saekit.eval.calibrate import to_jumprelu
from saekit.model.config import SAEConfig
from saekit.model.sae import SAE

SERVED = ("relu", "topk", "jumprelu", "batchtopk", "abstopk", "gated")
"""The portable activations: ReLU(pre); per-token top-k of ReLU(pre); pre·H(pre − θ_i) with
θ_i ≥ 0; BatchTopK's inference pre·H(pre − θ) with one θ (imported from dictionary_learning);
per-token top-k of |pre|, signed; gated H(pre)·ReLU(m·exp(r_mag) + b_mag) with m = pre − b_enc
(arXiv 2404.16014)."""


class InteropError(ValueError):
    """A file that cannot be read, or an SAE that has no equivalent in the other format."""


@dataclass
class Portable:
    architecture: str
    """One of :data:`SERVED`."""
    W_enc: Tensor
    """[M, d]"""
    b_enc: Tensor
    """[M]"""
    W_dec: Tensor
    """[M, d]"""
    b_dec: Tensor
    """[d]"""
    k: int | None = None
    """topk, batchtopk: active latents per token."""
    threshold: Tensor | None = None
    """jumprelu: [M] θ_i ≥ 0; batchtopk: 0-d θ ≥ 0."""
    extra: dict[str, Tensor] = field(default_factory=dict)
    """gated: r_mag [M], b_mag [M]."""
    info: dict[str, Any] = field(default_factory=dict)
    """Where the SAE came from: model_name, hook, dataset, … (metadata)."""
    transcoder: bool = False
    """A transcoder: nothing subtracted from x before the encoder; ``info`` names target_hook."""
    W_skip: Tensor | None = None
    """Skip transcoders: [d_out, d_in]."""

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[1]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_out(self) -> int:
        return self.W_dec.shape[1]


def _affine(sae: SAE) -> dict[str, Tensor]:
    """W_enc, b_enc, W_dec, b_dec with the whitening and the dataset scale folded
    (``SAE.folded_copy``): the pre-activations do not change, so every threshold stays as it is
    (the fold SAELens once got wrong for BatchTopK, its #763)."""
    folded = sae.folded_copy()
    return {n: getattr(folded, n).detach().cpu() for n in ("W_enc", "b_enc", "W_dec", "b_dec")}


def _export_relu(sae: SAE) -> Portable:
    return Portable("relu", **_affine(sae))


def _export_topk(sae: SAE) -> Portable:
    return Portable("topk", **_affine(sae), k=sae.cfg.activation.k)


def _export_abstopk(sae: SAE) -> Portable:
    return Portable("abstopk", **_affine(sae), k=sae.cfg.activation.k)


def _export_hierarchical_topk(sae: SAE) -> Portable:
    """Its inference is TopK's with k = inference_k (default K)."""
    cfg = sae.cfg.activation
    return Portable("topk", **_affine(sae), k=cfg.inference_k or cfg.k)


def _export_gated(sae: SAE) -> Portable:
    """b_gate = b_enc; the magnitude path's r_mag and b_mag act on pre-activations the scale fold
    leaves unchanged."""
    extra = {n: getattr(sae.activation, n).detach().cpu() for n in ("r_mag", "b_mag")}
    return Portable("gated", **_affine(sae), extra=extra)


def _export_jumprelu(sae: SAE) -> Portable:
    theta = sae.activation.theta().detach().cpu()
    if (theta < 0).any():  # pre in (θ, 0] would give a negative latent; SAELens' would be 0
        raise InteropError(
            f"{int((theta < 0).sum())} JumpReLU thresholds are negative; SAELens' JumpReLU "
            "applies a ReLU first, so it cannot compute this SAE"
        )
    return Portable("jumprelu", **_affine(sae), threshold=theta)


def _export_batchtopk(sae: SAE) -> Portable:
    """BatchTopK's inference z = pre·H(pre − θ) is JumpReLU with every θ_i = θ
    (:func:`saekit.eval.calibrate.to_jumprelu`, also ``saekit convert``)."""
    return _export_jumprelu(to_jumprelu(sae))


def _export_prolu(sae: SAE) -> Portable:
    """ProLU z = m·H(m + b)·H(m) with m = (x − b_dec) W_encᵀ is m·H(m − max(−b, 0)): JumpReLU
    with b_enc = 0 and θ_i = max(−b_i, 0)."""
    theta = (-sae.activation.bias.detach().cpu()).clamp_min(0.0)
    return Portable("jumprelu", **_affine(sae), threshold=theta)


EXPORTS: dict[str, Callable[[SAE], Portable]] = {
    "relu": _export_relu,
    "topk": _export_topk,
    "jumprelu": _export_jumprelu,
    "batchtopk": _export_batchtopk,
    "prolu": _export_prolu,
    "abstopk": _export_abstopk,
    "hierarchical_topk": _export_hierarchical_topk,
    "gated": _export_gated,
}
"""saekit activation kind → its portable form."""


def to_portable(sae: SAE) -> Portable:
    """The portable form of a saekit SAE, or InteropError naming the activation."""
    kind = sae.cfg.activation.kind
    if kind not in EXPORTS:
        raise InteropError(
            f"activation {kind!r} has no exact equivalent in SAELens, sparsify or "
            f"dictionary_learning (exportable: {', '.join(sorted(EXPORTS))})"
        )
    p = EXPORTS[kind](sae)
    if sae.cfg.transcoder:  # the same weights, folded as save() folds them (s_y/s on W_skip)
        p.transcoder = True
        p.W_skip = sae.folded_copy().W_skip.detach().cpu() if sae.cfg.skip else None
    return p


def _activation_config(p: Portable) -> dict[str, Any]:
    if p.architecture in ("topk", "batchtopk", "abstopk"):
        return {"kind": p.architecture, "k": p.k}
    return {"kind": p.architecture}


@torch.no_grad()
def to_sae(p: Portable) -> SAE:
    """The saekit SAE computing exactly what the portable one does (scale 1, eval mode)."""
    if p.architecture not in SERVED:
        raise InteropError(f"no saekit activation for portable architecture {p.architecture!r}")
    d_sae, d_in = p.d_sae, p.d_in
    d_out = p.d_out if p.transcoder else d_in
    expected = {"W_enc": (d_sae, d_in), "b_enc": (d_sae,), "W_dec": (d_sae, d_out)}
    expected["b_dec"] = (d_out,)
    if p.W_skip is not None:  # [d_out, d_in]: Gemma Scope 2 stores it transposed (its reader)
        expected["W_skip"] = (d_out, d_in)
    for name, shape in expected.items():
        if tuple(getattr(p, name).shape) != shape:
            raise InteropError(
                f"tensor {name} has shape {tuple(getattr(p, name).shape)}, expected {shape} "
                f"(d_sae = {d_sae}, d_in = {d_in} from W_enc, d_out = {d_out} from W_dec)"
            )
    dtype = str(p.W_enc.dtype).removeprefix("torch.")
    info = dict(p.info)
    transcoder = _transcoder_fields(p, info)
    cfg = SAEConfig(
        d_in=d_in,
        d_sae=d_sae,
        activation=_activation_config(p),
        hook=info.pop("hook", None),
        model_name=info.pop("model_name", None),
        dtype=dtype,
        metadata=info,
        **transcoder,
    )
    sae = SAE(cfg)
    for name in expected:
        getattr(sae, name).copy_(getattr(p, name))
    if p.architecture == "gated":
        for name in ("r_mag", "b_mag"):
            value = p.extra.get(name)
            if value is None or tuple(value.shape) != (d_sae,):
                found = None if value is None else tuple(value.shape)
                raise InteropError(f"gated {name} has shape {found}, expected {(d_sae,)}")
            getattr(sae.activation, name).copy_(value)
    if p.architecture in ("jumprelu", "batchtopk"):
        theta = _checked_threshold(p)
        if p.architecture == "jumprelu":
            sae.activation.threshold.copy_(theta)  # threshold_param: direct (the default)
        else:
            sae.activation.threshold.copy_(theta)
            sae.activation.threshold_initialized.fill_(True)
    return sae.eval()


def _transcoder_fields(p: Portable, info: dict[str, Any]) -> dict[str, Any]:
    """SAEConfig's d_out, target_hook and skip of a portable transcoder (none for an SAE)."""
    if not p.transcoder:
        if p.W_skip is not None:
            raise InteropError("a skip path W_skip on an SAE (not a transcoder)")
        return {}
    skip = p.W_skip is not None
    return {"d_out": p.d_out, "target_hook": info.pop("target_hook", None), "skip": skip}


def _checked_threshold(p: Portable) -> Tensor:
    shape = (p.d_sae,) if p.architecture == "jumprelu" else ()
    theta = p.threshold
    if theta is None or tuple(theta.shape) != shape:
        found = None if theta is None else tuple(theta.shape)
        raise InteropError(f"{p.architecture} threshold has shape {found}, expected {shape}")
    if not torch.isfinite(theta).all() or (theta < 0).any():
        raise InteropError(f"{p.architecture} threshold must be finite and ≥ 0")
    return theta.float()
