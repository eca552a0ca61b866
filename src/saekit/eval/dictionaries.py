"""Multi-hook dictionaries (a cross-layer transcoder, a crosscoder) as evaluation sees them: their
parts (a CLT's target layers, a crosscoder's sources), their decoder norms per part, and the
:class:`~saekit.eval.parts.PartsReport` that ``saekit eval`` and a run's ``eval.json`` write.

Decoder norms are those of the decoders as saved, scales folded: a CLT's ‖W_dec^{l→t}_i‖·t_t and a
crosscoder's ‖W_dec^s_i‖·s_s, each in its own target's or source's units. A dictionary being
trained (scales not yet folded) and the one it saves give the same norms, and so the same ratios.
For a crosscoder over two models whose activations differ in scale, a shared feature's norms
differ by that scale too (Δ moves off ½): the ratios read the decoders as the models' units
weigh them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from saekit.core.encoding import SparseCode
from saekit.eval.decoder_norms import LayerNormSummary, SourceNormSummary
from saekit.eval.parts import PartAccumulator, PartsReport
from saekit.model.clt import CrossLayerTranscoder
from saekit.model.crosscoder import Crosscoder


def is_multi_hook(dictionary: Any) -> bool:
    """A cross-layer transcoder or a crosscoder (an SAE or a transcoder is not)."""
    return isinstance(dictionary, (CrossLayerTranscoder, Crosscoder))


def stream_hooks(dictionary: CrossLayerTranscoder | Crosscoder) -> list[str] | None:
    """Every hook the dictionary reads, in its stream's order (its ``split_stream``): a CLT's
    inputs then targets, a crosscoder's sources; None when its cfg.json names none."""
    cfg = dictionary.cfg
    if cfg.hooks is None:
        return None
    if isinstance(dictionary, CrossLayerTranscoder):
        return None if cfg.target_hooks is None else [*cfg.hooks, *cfg.target_hooks]
    return list(cfg.hooks)


def part_names(dictionary: CrossLayerTranscoder | Crosscoder) -> list[str]:
    """A CLT's target hooks, a crosscoder's source hooks (``target t`` / ``source s`` when its
    cfg.json names none, e.g. trained on synthetic data)."""
    cfg = dictionary.cfg
    if isinstance(dictionary, CrossLayerTranscoder):
        return list(cfg.target_hooks or [f"target {t}" for t in range(cfg.n_layers)])
    return list(cfg.hooks or [f"source {s}" for s in range(cfg.n_sources)])


def part_accumulator(
    dictionary: CrossLayerTranscoder | Crosscoder, device: torch.device | str = "cpu"
) -> PartAccumulator:
    """The per-part accumulator of ``dictionary``: per target layer with each layer's latents
    (a CLT), or per source sharing one latent space (a crosscoder)."""
    cfg = dictionary.cfg
    names = part_names(dictionary)
    if isinstance(dictionary, CrossLayerTranscoder):
        inputs = list(cfg.hooks or [f"input {t}" for t in range(cfg.n_layers)])
        widths = [cfg.d_out] * cfg.n_layers
        return PartAccumulator(
            names, widths, layer_latents=cfg.d_sae, device=device, input_hooks=inputs
        )
    return PartAccumulator(names, [cfg.d_in] * cfg.n_sources, d_sae=cfg.d_sae, device=device)


def add_forward(
    acc: PartAccumulator, target: Tensor, x_hat: Tensor, latents: Tensor | SparseCode
) -> None:
    """One batch of a forward: the target (a crosscoder: its input) and the prediction, the
    parts side by side [..., Σ widths], and the code."""
    start = 0
    for p, width in enumerate(acc.widths):
        acc.add(p, target[..., start : start + width], x_hat[..., start : start + width])
        start += width
    acc.add_latents(latents)


@torch.no_grad()
def decoder_norms(dictionary: CrossLayerTranscoder | Crosscoder) -> Tensor:
    """Scale-folded decoder norms (module docstring): a CLT's [L, M, L], ``[l, i, t]`` the norm
    of latent i of layer l into target t (0 for t < l); a crosscoder's [S, M]."""
    by_target = dictionary.decoder_norms_by_target().double()  # CLT [L·M, L], crosscoder [M, S]
    if isinstance(dictionary, CrossLayerTranscoder):
        L, M = dictionary.cfg.n_layers, dictionary.cfg.d_sae
        scaled = by_target * dictionary.target_scale.double().view(1, L)
        return scaled.view(L, M, L).cpu()
    return (by_target * dictionary.scale.double().view(1, -1)).T.contiguous().cpu()


def norm_summary(
    dictionary: CrossLayerTranscoder | Crosscoder,
) -> LayerNormSummary | SourceNormSummary:
    norms = decoder_norms(dictionary)
    if isinstance(dictionary, CrossLayerTranscoder):
        return LayerNormSummary.of(norms)
    return SourceNormSummary.of(norms, part_names(dictionary))


def parts_report(
    dictionary: CrossLayerTranscoder | Crosscoder, acc: PartAccumulator
) -> PartsReport:
    """The per-part scores of ``acc`` and the decoder norms' summary."""
    _, parts = acc.result()
    kind = "layer" if isinstance(dictionary, CrossLayerTranscoder) else "source"
    return PartsReport(kind, parts, norm_summary(dictionary))


@torch.no_grad()
def concatenated_decoders(dictionary: CrossLayerTranscoder | Crosscoder) -> Tensor:
    """[n_latents, Σ widths]: each latent's decoders into every part side by side, scales folded
    (a CLT's latent of layer l: zeros for the targets before l), for decoder cosines."""
    cfg = dictionary.cfg
    if isinstance(dictionary, CrossLayerTranscoder):
        L, M, d = cfg.n_layers, cfg.d_sae, cfg.d_out
        t = dictionary.target_scale.double()
        rows = torch.zeros(L, M, L, d, dtype=torch.float64, device=t.device)
        for layer, W in enumerate(dictionary.W_dec):
            rows[layer, :, layer:] = W.double() * t[layer:].view(1, -1, 1)
        return rows.view(L * M, L * d).cpu()
    W = dictionary.W_dec.double() * dictionary.scale.double().view(-1, 1, 1)  # [S, M, d]
    return W.permute(1, 0, 2).reshape(cfg.d_sae, -1).cpu()
