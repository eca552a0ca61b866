"""The form cross-layer transcoders are translated through, as :mod:`saekit.interop.portable`
is for SAEs and per-layer transcoders.

A :class:`PortableCLT` over L layers with M latents each: layer l's latents read that layer's
input, pre_l = x_l W_enc[l]ᵀ + b_enc[l] (nothing subtracted), z_l = σ(pre_l), and the
prediction at target layer t sums every earlier-or-same layer's decoders,
ŷ_t = Σ_{l ≤ t} z_l W_dec[l][:, t − l] + b_dec[t] (Ameisen et al. 2025, "Circuit Tracing",
transformer-circuits.pub; circuit-tracer's ``CrossLayerTranscoder``). Tensors in saekit's CLT
layout: ``W_enc`` [L, M, d_in], ``b_enc`` [L, M], ``W_dec[l]`` [M, L − l, d_out], ``b_dec``
[L, d_out]; σ one of the portable activations over the L·M latents (latent i of layer l is
l·M + i), its threshold [L, M]. Scales are folded: the form computes on raw activations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from saekit.activations import ACTIVATIONS
from saekit.activations.base import ExportForm
from saekit.interop.portable import SERVED, InteropError
from saekit.model.clt import CLTConfig, CrossLayerTranscoder


@dataclass
class PortableCLT:
    architecture: str
    """One of saekit.interop.portable.SERVED."""
    W_enc: Tensor
    """[L, M, d_in]"""
    b_enc: Tensor
    """[L, M]"""
    W_dec: list[Tensor]
    """W_dec[l]: [M, L − l, d_out], layer l's latents into targets l..L−1."""
    b_dec: Tensor
    """[L, d_out]"""
    k: int | None = None
    threshold: Tensor | None = None
    """jumprelu: [L, M] θ ≥ 0."""
    info: dict[str, Any] = field(default_factory=dict)
    """model_name, hooks and target_hooks (one per layer, or None), where it came from."""

    @property
    def n_layers(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_latent(self) -> int:
        """M, the latents per layer."""
        return self.W_enc.shape[1]

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[2]

    @property
    def d_out(self) -> int:
        return self.b_dec.shape[1]

    def check(self, where: str) -> None:
        """Every tensor of the shape the first layer's encoder implies, or InteropError."""
        if self.W_enc.ndim != 3:
            raise InteropError(f"{where}: W_enc has shape {tuple(self.W_enc.shape)}, not [L, M, d]")
        n, m = self.n_layers, self.d_latent
        d_out = self.b_dec.shape[-1] if self.b_dec.ndim == 2 else None
        expected = {"b_enc": (n, m), "b_dec": (n, d_out)}
        expected |= {f"W_dec[{layer}]": (m, n - layer, d_out) for layer in range(n)}
        if self.threshold is not None:
            expected["threshold"] = (n, m)
        if len(self.W_dec) != n:
            raise InteropError(f"{where}: {len(self.W_dec)} decoders for {n} layers")
        for name, shape in expected.items():
            found = self.W_dec[int(name[6:-1])] if name.startswith("W_dec") else getattr(self, name)
            if tuple(found.shape) != shape:
                raise InteropError(
                    f"{where}: {name} has shape {tuple(found.shape)}, expected {shape} (L = {n}, "
                    f"M = {m} from W_enc)"
                )


def stack_layers(tensors: list[Tensor], where: str, name: str) -> Tensor:
    """Per-layer tensors of one shape stacked [L, ...], or InteropError naming the shapes."""
    try:
        return torch.stack(tensors)
    except RuntimeError:
        shapes = sorted({tuple(t.shape) for t in tensors})
        raise InteropError(f"{where}: {name} differs in shape between layers ({shapes})") from None


def to_portable_clt(clt: CrossLayerTranscoder) -> PortableCLT:
    """The portable form of a saekit CLT: its activation's ``export_form`` over the L·M latents
    (θ reshaped [L, M]), the weights with both scales folded (``folded_copy``: W_enc[l]/s_l,
    W_dec[l][:, j]·t_{l+j}, b_dec[l]·t_l; the pre-activations, so θ, unchanged); or
    InteropError naming the activation."""
    try:
        form = clt.activation.export_form()
    except ValueError as exc:  # e.g. a negative JumpReLU threshold
        raise InteropError(str(exc)) from exc
    if form is None:
        raise InteropError(f"activation {clt.cfg.activation.kind!r} has no exact equivalent")
    L, M = clt.cfg.n_layers, clt.cfg.d_sae
    folded = clt.folded_copy()
    return PortableCLT(
        form.architecture,
        folded.W_enc.detach().cpu(),
        folded.b_enc.detach().cpu(),
        [W.detach().cpu() for W in folded.W_dec],
        folded.b_dec.detach().cpu(),
        k=form.k,
        threshold=None if form.threshold is None else form.threshold.reshape(L, M),
    )


@torch.no_grad()
def to_clt(pc: PortableCLT) -> CrossLayerTranscoder:
    """The saekit CLT computing exactly what the portable one does (scales 1, eval mode): the
    activation of the same name builds its config and loads its state from the form, its θ
    flattened to the L·M latents."""
    if pc.architecture not in SERVED:
        raise InteropError(f"no saekit activation for portable architecture {pc.architecture!r}")
    threshold = None if pc.threshold is None else pc.threshold.reshape(-1)
    form = ExportForm(pc.architecture, pc.k, threshold, {})
    info = dict(pc.info)
    cfg = CLTConfig(
        d_in=pc.d_in,
        d_sae=pc.d_latent,
        n_layers=pc.n_layers,
        activation=ACTIVATIONS[pc.architecture].config_class.from_export(form),
        d_out=pc.d_out,
        hooks=info.pop("hooks", None),
        target_hooks=info.pop("target_hooks", None),
        model_name=info.pop("model_name", None),
        dtype=str(pc.W_enc.dtype).removeprefix("torch."),
        metadata=info,
    )
    clt = CrossLayerTranscoder(cfg)
    clt.W_enc.copy_(pc.W_enc)
    clt.b_enc.copy_(pc.b_enc)
    for W, value in zip(clt.W_dec, pc.W_dec, strict=True):
        W.copy_(value)
    clt.b_dec.copy_(pc.b_dec)
    try:
        clt.activation.load_export(form)
    except ValueError as exc:  # a threshold of the wrong shape or value
        raise InteropError(str(exc)) from exc
    return clt.eval()
