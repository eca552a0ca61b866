"""Metrics of a dictionary whose output has several parts: a cross-layer transcoder's target layers
(each with its own latents) or a crosscoder's sources (one latent space for all).

Each part keeps a :class:`~saekit.eval.metrics.MetricAccumulator` (its FVU, ratio of sums over the
whole set, and, for a CLT, its layer's L0 and dead share); one more counts every latent of every
layer together (the total L0 per token, its histogram, dead and dense shares). The pooled FVU of
all parts is Σ_p Σ‖y_p − ŷ_p‖² / Σ_p Σ‖y_p − ȳ_p‖²: the FVU of the concatenated target [y_1 … y_P]
with each part's own mean (the loss sums the parts' squared errors the same way).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import Tensor

from saekit.core.encoding import SparseCode
from saekit.eval.decoder_norms import LayerNormSummary, SourceNormSummary
from saekit.eval.metrics import EvalResult, MetricAccumulator, latent_counts


def layer_counts(latents: Tensor | SparseCode, n_layers: int) -> tuple[Tensor, Tensor]:
    """A code over L equal layers of latents ([N, L·M], layer-major): the active latents of each
    layer per token [L, N] and the tokens each latent fired on [L·M]
    (:func:`saekit.eval.metrics.latent_counts`, per layer)."""
    per_token, per_latent = latent_counts(latents)  # per_token: all layers together
    M = per_latent.numel() // n_layers
    if isinstance(latents, SparseCode):
        fired = (latents.values != 0).to(torch.int64)
        per_layer = per_token.new_zeros(n_layers * latents.n_tokens)
        per_layer.index_add_(0, latents.latent // M * latents.n_tokens + latents.token, fired)
        return per_layer.view(n_layers, latents.n_tokens), per_latent
    N = latents.shape[0]
    return (latents != 0).view(N, n_layers, M).sum(-1).T, per_latent


@dataclass(frozen=True)
class PartScores:
    """One part's metrics: a CLT's target layer or a crosscoder's source."""

    name: str
    """The part's hook (a CLT: its target hook; a crosscoder: its source)."""
    fvu: float
    """Σ‖y − ŷ‖² / Σ‖y − ȳ‖² over the evaluated tokens."""
    mse: float
    """Mean over tokens of ‖y − ŷ‖²."""
    l0: float | None = None
    """A CLT: mean active latents of this layer per token; None for a crosscoder's source."""
    dead_fraction: float | None = None
    """A CLT: share of this layer's latents that never fired; None for a crosscoder's source."""
    input_hook: str | None = None
    """A CLT: the hook this layer's latents read."""
    spliced_fvu: float | None = None
    """A CLT spliced into the model: the FVU of this layer's prediction against what the MLP
    computes in the spliced forward (errors of earlier layers included); None otherwise."""

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PartScores:
        return cls(**{k: d.get(k) for k in cls.__dataclass_fields__})


class PartAccumulator:
    """Streams batches part by part; ``layer_latents``: a CLT's latents per layer (each part a
    layer with its own latents), or ``d_sae``: a crosscoder's latents, shared by every part."""

    def __init__(
        self,
        names: Sequence[str],
        widths: Sequence[int],
        *,
        layer_latents: int | None = None,
        d_sae: int | None = None,
        device: torch.device | str = "cpu",
        input_hooks: Sequence[str] | None = None,
    ) -> None:
        if len(names) != len(widths):
            raise ValueError(f"{len(names)} part names for {len(widths)} widths")
        if (layer_latents is None) == (d_sae is None):
            raise ValueError("give layer_latents (a CLT's per layer) or d_sae (a crosscoder's)")
        self.names = list(names)
        self.widths = list(widths)
        self.input_hooks = None if input_hooks is None else list(input_hooks)
        self.layered = layer_latents is not None
        per_part = layer_latents or 1
        total = len(widths) * per_part if self.layered else int(d_sae or 0)
        self.parts = [MetricAccumulator(w, per_part, device=device) for w in widths]
        self.whole = MetricAccumulator(1, total, device=device)
        self.spliced: list[MetricAccumulator] | None = None

    def add(self, part: int, y: Tensor, y_hat: Tensor) -> None:
        """Part ``part``'s target and its prediction, [..., width]."""
        self.parts[part].add_reconstruction(y, y_hat)

    def add_spliced(self, part: int, y: Tensor, y_hat: Tensor) -> None:
        """A CLT spliced into the model: the MLP's output in the spliced forward and the
        prediction that replaced it."""
        if self.spliced is None:
            device = self.whole.fired.device
            self.spliced = [MetricAccumulator(w, 1, device=device) for w in self.widths]
        self.spliced[part].add_reconstruction(y, y_hat)

    def add_latents(self, latents: Tensor | SparseCode) -> None:
        """The code of a batch: a crosscoder's [N, M]; a CLT's [N, L·M], latent l·M + i being
        latent i of layer l (its layers' counts go to their parts)."""
        if not self.layered:
            self.whole.add_latents(latents)
            return
        per_token_LN, per_latent = layer_counts(latents, len(self.parts))
        per_latent_LM = per_latent.view(len(self.parts), -1)
        for layer, acc in enumerate(self.parts):
            acc.add_counts(per_token_LN[layer], per_latent_LM[layer])
        self.whole.add_counts(per_token_LN.sum(0), per_latent)

    def pooled_fvu(self) -> float:
        """Σ over parts of the squared errors / Σ of their variances (module docstring)."""
        err = sum(a.sum_sq_err for a in self.parts)
        var = sum(a.total_variance() for a in self.parts)
        return float(err / var)

    def result(self) -> tuple[EvalResult, list[PartScores]]:
        """The whole (pooled FVU and MSE over parts; L0, dead and dense over every latent) and
        each part's scores."""
        if int(self.whole.l0_tokens) == 0:
            raise ValueError("no tokens were evaluated")
        n = int(self.parts[0].n)
        if any(int(a.n) != n for a in self.parts):
            raise ValueError(
                f"the parts saw different token counts: {[int(a.n) for a in self.parts]}"
            )
        fvu = self.pooled_fvu()
        mse = float(sum(a.sum_sq_err for a in self.parts) / n)
        whole = replace(
            self.whole.result(), n_tokens=n, fvu=fvu, explained_variance=1.0 - fvu, mse=mse
        )
        scores = []
        for p, acc in enumerate(self.parts):
            layer = acc.result() if self.layered else None
            scores.append(
                PartScores(
                    name=self.names[p],
                    fvu=float(acc.fvu()),
                    mse=float(acc.sum_sq_err / acc.n),
                    l0=None if layer is None else layer.l0,
                    dead_fraction=None if layer is None else layer.dead_fraction,
                    input_hook=None if self.input_hooks is None else self.input_hooks[p],
                    spliced_fvu=None if self.spliced is None else float(self.spliced[p].fvu()),
                )
            )
        return whole, scores


@dataclass(frozen=True)
class PartsReport:
    """The part of a report (``saekit eval``'s and a run's ``eval.json``) that a multi-hook
    dictionary adds: its scores per target layer (a CLT: key ``per_layer``) or per source (a
    crosscoder: ``per_source``) and the summary of its decoder norms (``decoder_norms``)."""

    kind: str
    """``layer`` (a cross-layer transcoder) or ``source`` (a crosscoder)."""
    parts: list[PartScores]
    """Per target layer or source, in order."""
    decoder_norms: SourceNormSummary | LayerNormSummary | None = None
    """Where the latents write (:mod:`saekit.eval.decoder_norms`)."""

    def __post_init__(self) -> None:
        if self.kind not in ("layer", "source"):
            raise ValueError(f"PartsReport kind must be 'layer' or 'source', got {self.kind!r}")

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {f"per_{self.kind}": [p.to_json() for p in self.parts]}
        if self.decoder_norms is not None:
            d["decoder_norms"] = self.decoder_norms.to_json()
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PartsReport | None:
        """The part in a report's JSON; None in a report without one (an SAE's, any version)."""
        kind = next((k for k in ("layer", "source") if f"per_{k}" in d), None)
        if kind is None:
            return None
        norms = d.get("decoder_norms")
        summary: SourceNormSummary | LayerNormSummary | None = None
        if norms is not None:
            is_layer = "own_layer_share_histogram" in norms
            summary = (LayerNormSummary if is_layer else SourceNormSummary).from_json(norms)
        return cls(kind, [PartScores.from_json(p) for p in d[f"per_{kind}"]], summary)
