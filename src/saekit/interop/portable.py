"""The form every format is translated through, and the table of what each activation exports as.

A :class:`Portable` SAE is what the other libraries can serve: an affine encoder on the raw
activations with b_dec subtracted first, pre = (x − b_dec) W_encᵀ + b_enc, one of a few
activations on ``pre``, and the decoder x̂ = z W_dec + b_dec. Tensors use saekit's layout
(``W_enc`` and ``W_dec`` both [M, d]); each format's reader and writer transposes and renames.
A transcoder (``transcoder``: saekit's ``d_out`` set) reads x uncentred, pre = x W_encᵀ + b_enc,
and predicts ŷ = z W_dec + x W_skipᵀ + b_dec (``W_dec`` [M, d_out], ``W_skip`` [d_out, d_in] or
None); the same activations apply.

Each activation says what it exports as (``Activation.export_form``, default none: no exact
equivalent in any library, refused) and loads its own state on import
(``Activation.load_export``); this module carries the affine weights, folded, and the
transcoder fields. :func:`to_sae` builds the saekit SAE of a portable one (imports).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from saekit.activations import ACTIVATIONS
from saekit.activations.base import ExportForm
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


def to_portable(sae: SAE) -> Portable:
    """The portable form of a saekit SAE (its activation's ``export_form``), or InteropError
    naming the activation."""
    if sae.cfg.encoder_steps > 1:
        raise InteropError(
            f"sae.encoder_steps = {sae.cfg.encoder_steps} (LISTA steps) has no equivalent in "
            "SAELens, sparsify, dictionary_learning or circuit-tracer: they encode in one step"
        )
    try:
        form = sae.activation.export_form()
    except ValueError as exc:  # e.g. a negative JumpReLU threshold
        raise InteropError(str(exc)) from exc
    if form is None:
        exportable = sorted(k for k, cls in ACTIVATIONS.items() if cls.overrides("export_form"))
        raise InteropError(
            f"activation {sae.cfg.activation.kind!r} has no exact equivalent in SAELens, sparsify"
            f" or dictionary_learning (exportable: {', '.join(exportable)})"
        )
    extra = dict(form.extra or {})
    p = Portable(form.architecture, **_affine(sae), k=form.k, threshold=form.threshold, extra=extra)
    if sae.cfg.transcoder:  # the same weights, folded as save() folds them (s_y/s on W_skip)
        p.transcoder = True
        p.W_skip = sae.folded_copy().W_skip.detach().cpu() if sae.cfg.skip else None
    return p


@torch.no_grad()
def to_sae(p: Portable) -> SAE:
    """The saekit SAE computing exactly what the portable one does (scale 1, eval mode): the
    activation of the same name (:data:`SERVED`) builds its config and loads its own state from
    the form (``ActivationConfig.from_export``, ``Activation.load_export``)."""
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
    form = ExportForm(p.architecture, p.k, p.threshold, p.extra)
    dtype = str(p.W_enc.dtype).removeprefix("torch.")
    info = dict(p.info)
    transcoder = _transcoder_fields(p, info)
    cfg = SAEConfig(
        d_in=d_in,
        d_sae=d_sae,
        activation=ACTIVATIONS[p.architecture].config_class.from_export(form),
        hook=info.pop("hook", None),
        model_name=info.pop("model_name", None),
        dtype=dtype,
        metadata=info,
        **transcoder,
    )
    sae = SAE(cfg)
    for name in expected:
        getattr(sae, name).copy_(getattr(p, name))
    try:
        sae.activation.load_export(form)
    except ValueError as exc:  # a threshold or extra tensor of the wrong shape or value
        raise InteropError(str(exc)) from exc
    return sae.eval()


def _transcoder_fields(p: Portable, info: dict[str, Any]) -> dict[str, Any]:
    """SAEConfig's d_out, target_hook and skip of a portable transcoder (none for an SAE)."""
    if not p.transcoder:
        if p.W_skip is not None:
            raise InteropError("a skip path W_skip on an SAE (not a transcoder)")
        return {}
    skip = p.W_skip is not None
    return {"d_out": p.d_out, "target_hook": info.pop("target_hook", None), "skip": skip}
