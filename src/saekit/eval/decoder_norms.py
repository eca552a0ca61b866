"""Where each latent of a multi-hook dictionary writes: its decoder norms per source (a crosscoder)
or per target layer (a cross-layer transcoder), and what they say about the latent.

Crosscoder (Lindsey et al. 2024, "Sparse Crosscoders for Cross-Layer Features and Model Diffing",
transformer-circuits.pub: a latent whose decoder is ~0 in one model is specific to the other; the
relative norms cluster at the ends and in the middle). With two sources A and B, the relative norm
difference of Minder et al. 2025 ("Overcoming Sparsity Artifacts in Crosscoders to Interpret
Chat-Tuning", arXiv 2504.02922, §2)

    Δ_i = ½ ((‖d_i^B‖ − ‖d_i^A‖) / max(‖d_i^A‖, ‖d_i^B‖) + 1)  ∈ [0, 1]

classifies latent i as only-B for Δ ∈ [0.9, 1], only-A for Δ ∈ [0, 0.1], shared for Δ ∈ [0.4, 0.6]
and other elsewhere. With r_s = ‖d_i^s‖ / max_t ‖d_i^t‖, Δ = ½(r_B − r_A + 1), so the same bands
read: only-s when every other source has r ≤ 0.2, shared when every source has r ≥ 0.8; that form
holds for any number of sources and is the one computed. A latent whose decoders are all zero has
no ratio (NaN) and is counted apart.

Cross-layer transcoder (Ameisen et al. 2025, "Circuit Tracing", transformer-circuits.pub): latent
i of layer l writes to every layer t ≥ l; its own-layer share ‖d_i^{l→l}‖ / Σ_{t≥l} ‖d_i^{l→t}‖ is
1 for a latent that acts as a per-layer transcoder and small for one that writes mostly to later
layers (the last layer's latents have one target and no share).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

ONLY_MAX = 0.2
"""only-s: every other source's r = ‖d^t‖ / max ‖d‖ at most this (Δ ≥ 0.9 for two sources)."""
SHARED_MIN = 0.8
"""shared: every source's r at least this (Δ ∈ [0.4, 0.6] for two sources)."""
HISTOGRAM_BINS = 20


def norm_ratios(norms_SM: Tensor) -> Tensor:
    """r [S, M]: each latent's decoder norms over its largest; NaN where all are zero."""
    norms = norms_SM.double()
    top = norms.max(dim=0).values
    return norms / torch.where(top > 0, top, torch.nan)


def relative_norm_difference(norms_SM: Tensor) -> Tensor:
    """Δ [M] of two sources (module docstring): 0 = only the first, 1 = only the second."""
    if norms_SM.shape[0] != 2:
        raise ValueError(
            f"the relative norm difference compares 2 sources, got {norms_SM.shape[0]}"
        )
    r = norm_ratios(norms_SM)
    return 0.5 * (r[1] - r[0] + 1)


SHARED, OTHER, ZERO = -1, -2, -3
"""Class codes of :func:`norm_classes` beside a source index s (only-s)."""


def norm_classes(norms_SM: Tensor) -> Tensor:
    """Per latent [M]: s (only source s), SHARED, OTHER or ZERO (all decoders zero)."""
    r = norm_ratios(norms_SM)
    S = r.shape[0]
    cls = torch.full((r.shape[1],), OTHER, dtype=torch.long)
    zero = r.isnan().all(0)
    cls[(r >= SHARED_MIN).all(0)] = SHARED
    if S > 1:
        top = r.argmax(0)
        others_small = (r <= ONLY_MAX).sum(0) == S - 1  # every source but the largest
        only = others_small & ~zero
        cls[only] = top[only]
    cls[zero] = ZERO
    return cls


def histogram(values: Tensor, n_bins: int = HISTOGRAM_BINS) -> list[int]:
    """Counts of ``values`` in [0, 1] in equal bins (1 in the last); NaNs are not counted."""
    v = values[~values.isnan()].double()
    bins = (v * n_bins).floor().clamp(0, n_bins - 1).long()
    return torch.bincount(bins, minlength=n_bins).tolist()


@dataclass(frozen=True)
class SourceNormSummary:
    """A crosscoder's latents classified by their decoder norms per source."""

    sources: list[str]
    """The sources, in the decoder's order (A, B, ...)."""
    shared: int
    """Latents with every source's norm ratio ≥ 0.8 (Δ ∈ [0.4, 0.6] for two sources)."""
    only: list[int]
    """Per source s, latents whose other sources' ratios are all ≤ 0.2 (only-A, only-B, ...)."""
    other: int
    """Latents in none of those classes."""
    zero_decoder: int
    """Latents whose decoders are zero in every source (no ratio)."""
    relative_norm_histogram: list[int] | None = None
    """Two sources: counts of Δ over [0, 1] in 20 equal bins."""

    @classmethod
    def of(cls, norms_SM: Tensor, sources: list[str]) -> SourceNormSummary:
        c = norm_classes(norms_SM)
        S = norms_SM.shape[0]
        hist = histogram(relative_norm_difference(norms_SM)) if S == 2 else None
        return cls(
            sources=list(sources),
            shared=int((c == SHARED).sum()),
            only=[int((c == s).sum()) for s in range(S)],
            other=int((c == OTHER).sum()),
            zero_decoder=int((c == ZERO).sum()),
            relative_norm_histogram=hist,
        )

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        if self.relative_norm_histogram is None:
            del d["relative_norm_histogram"]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SourceNormSummary:
        return cls(**{k: d.get(k) for k in cls.__dataclass_fields__})


def own_layer_share(norms_LMT: Tensor) -> Tensor:
    """[L, M] own-layer share of each latent (module docstring) from ``norms_LMT[l, i, t]`` =
    ‖d_i^{l→t}‖ (0 for t < l: a latent never writes into an earlier layer); NaN for the last
    layer's latents and latents whose decoders are all zero."""
    norms = norms_LMT.double()
    L = norms.shape[0]
    total = norms.sum(-1)
    own = norms[torch.arange(L), :, torch.arange(L)]  # [L, M]: ‖d_i^{l→l}‖
    share = own / torch.where(total > 0, total, torch.nan)
    share[-1] = torch.nan
    return share


@dataclass(frozen=True)
class LayerNormSummary:
    """A cross-layer transcoder's latents by where they write."""

    own_layer_share_histogram: list[int]
    """Counts of the own-layer share over [0, 1] in 20 equal bins (latents of every layer but
    the last)."""
    mean_own_layer_share: list[float]
    """Per layer but the last, the mean own-layer share of its latents (NaN when none count)."""
    zero_decoder: int
    """Latents whose decoders are zero in every target."""

    @classmethod
    def of(cls, norms_LMT: Tensor) -> LayerNormSummary:
        share = own_layer_share(norms_LMT)
        means = [float(row[~row.isnan()].mean()) for row in share[:-1]]
        return cls(
            own_layer_share_histogram=histogram(share[:-1].flatten()),
            mean_own_layer_share=means,
            zero_decoder=int((norms_LMT.sum(-1) == 0).sum()),
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LayerNormSummary:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})
