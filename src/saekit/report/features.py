"""What a feature page shows beyond its contexts: logit effects, decoder neighbours, a short
label, quantile samples, on synthetic data the matched true feature and, for a crosscoder or a
cross-layer transcoder, the latent's decoder norms per source or target layer.

Every function returns plain data (lists and numbers) that the site renders and report.json
records, so a test can read the numbers back from the page and compare them to these.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from saekit.eval.decoder_norms import (
    OTHER,
    SHARED,
    ZERO,
    LayerNormSummary,
    SourceNormSummary,
    norm_classes,
    own_layer_share,
    relative_norm_difference,
)
from saekit.eval.ground_truth import cosine_matrix
from saekit.report.topk import Slots


def unembedding(model: Any, d_in: int) -> Tensor | None:
    """The model's unembedding W_U [V, d] when it has one whose input width is the SAE's (a
    residual-stream hook); else None (no logit effects)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    weight = getattr(head, "weight", None)
    if not isinstance(weight, Tensor) or weight.ndim != 2 or weight.shape[1] != d_in:
        return None
    return weight.detach()


def logit_effects(direction_Md: Tensor, W_U_Vd: Tensor, n: int = 10) -> list[dict[str, Any]]:
    """Per latent, the n tokens its decoder direction promotes and suppresses most: the entries
    of W_U · w_dec (the direct "logit weights", Bricken et al. 2023, "Towards
    Monosemanticity", transformer-circuits.pub; the final layer norm is left out, as there)."""
    effects_MV = direction_Md.double() @ W_U_Vd.double().T
    n = min(n, effects_MV.shape[1])
    up = effects_MV.topk(n, dim=1)
    down = effects_MV.topk(n, dim=1, largest=False)
    return [
        {
            "promoted": list(zip(up.indices[m].tolist(), up.values[m].tolist(), strict=True)),
            "suppressed": list(zip(down.indices[m].tolist(), down.values[m].tolist(), strict=True)),
        }
        for m in range(effects_MV.shape[0])
    ]


def decoder_neighbours(W_dec_Fd: Tensor, latent_ids: Tensor, n: int = 8) -> list[list[Any]]:
    """Per reported latent, the n other latents with the largest decoder cosine, as [id, cos]."""
    w = W_dec_Fd.detach().double()
    w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cos_MF = w[latent_ids] @ w.T
    cos_MF[torch.arange(len(latent_ids)), latent_ids] = float("-inf")  # not itself
    n = min(n, w.shape[0] - 1)
    best = cos_MF.topk(n, dim=1)
    return [
        [[int(i), float(c)] for i, c in zip(best.indices[m], best.values[m], strict=True)]
        for m in range(len(latent_ids))
    ]


def auto_label(center_ids: list[int], decode: Callable[[int], str], n: int = 3) -> str:
    """The n most frequent tokens at the top contexts' selected positions, most frequent first
    (ties: first seen first), joined by " / "."""
    counts = Counter(i for i in center_ids if i >= 0)
    return " / ".join(decode(i).strip() or repr(decode(i)) for i, _ in counts.most_common(n))


def contexts(slots: Slots, m: int, order: list[int] | None = None) -> list[dict[str, Any]]:
    """Latent m's filled slots (in ``order``, default best first) as plain records."""
    filled = slots.filled[m].nonzero().flatten().tolist()
    return [
        {
            "key": int(slots.key[m, j]),
            "value": float(slots.value[m, j]),
            "aux": float(slots.aux[m, j]),
            "tokens": slots.tokens[m, j].tolist(),
            "acts": slots.acts[m, j].tolist(),
        }
        for j in (filled if order is None else order)
    ]


def quantile_samples(slots: Slots, m: int, n_bands: int = 4, per_band: int = 4) -> list[dict]:
    """Latent m's uniform sample of firing tokens, sorted by activation and cut into
    ``n_bands`` bands of equal count (band 1 the lowest); up to ``per_band`` evenly spaced
    samples from each, highest first. Bands of a uniform sample estimate the quantile ranges of
    all its firing tokens (SAEDashboard's and Neuronpedia's interval samples)."""
    filled = slots.filled[m].nonzero().flatten()
    if filled.numel() == 0:
        return []
    values = slots.value[m, filled]
    ranked = filled[values.argsort(stable=True)].tolist()  # ascending activation
    bands = []
    for b in range(n_bands):
        lo, hi = b * len(ranked) // n_bands, (b + 1) * len(ranked) // n_bands
        band = ranked[lo:hi]
        if not band:
            continue
        step = max(1, len(band) // per_band)
        picked = band[::step][:per_band][::-1]
        bands.append(
            {
                "band": b + 1,
                "of": n_bands,
                "low": float(slots.value[m, band[0]]),
                "high": float(slots.value[m, band[-1]]),
                "contexts": contexts(slots, m, picked),
            }
        )
    return bands[::-1]


def density_histogram(density: list[float], n_bins: int = 20) -> dict[str, Any]:
    """Counts of log10(density) over [-7, 0] in equal bins (dead latents counted apart)."""
    d = torch.tensor(density, dtype=torch.float64)
    alive = d[d > 0]
    lo, hi = -7.0, 0.0
    bins = ((alive.log10() - lo) / (hi - lo) * n_bins).floor().clamp(0, n_bins - 1).long()
    counts = torch.bincount(bins, minlength=n_bins).tolist()
    return {"lo": lo, "hi": hi, "counts": counts, "dead": int((d == 0).sum())}


def truth_matches(
    true_FD: Tensor, W_dec_Fd: Tensor, latent_ids: Tensor, threshold: float = 0.9
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(per reported latent its best-matching true feature and |cos|; the true features whose
    best |cos| with any decoder row is below ``threshold``: not recovered, as in
    :func:`saekit.eval.ground_truth.recovery`)."""
    abs_cos_FM = cosine_matrix(true_FD, W_dec_Fd).abs()
    best_M = abs_cos_FM[:, latent_ids].max(dim=0)
    matched = [
        {"feature": int(f), "cos": float(c)}
        for f, c in zip(best_M.indices, best_M.values, strict=True)
    ]
    best_F = abs_cos_FM.max(dim=1)
    missed = [
        {"feature": f, "cos": float(best_F.values[f]), "latent": int(best_F.indices[f])}
        for f in (best_F.values < threshold).nonzero().flatten().tolist()
    ]
    return matched, missed


def _finite(value: float) -> float | None:
    return None if math.isnan(value) else value


def source_norms(
    norms_SM: Tensor, sources: list[str], latent_ids: Tensor
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A crosscoder's decoder norms per source: the summary of every latent (its classes by
    :mod:`saekit.eval.decoder_norms`, the histogram of Δ for two sources) and, per reported
    latent, its norm per source, its class and (two sources) its Δ."""
    classes = norm_classes(norms_SM)
    delta = relative_norm_difference(norms_SM) if len(sources) == 2 else None
    names = {SHARED: "shared", OTHER: "other", ZERO: "zero decoder"}
    summary = {"kind": "source", "labels": list(sources)}
    summary.update(SourceNormSummary.of(norms_SM, sources).to_json())
    entries = []
    for latent in latent_ids.tolist():
        c = int(classes[latent])
        entry: dict[str, Any] = {
            "norms": [[s, float(norms_SM[j, latent])] for j, s in enumerate(sources)],
            "class": names.get(c, f"only {sources[c]}" if c >= 0 else ""),
        }
        if delta is not None:
            entry["relative_norm"] = _finite(float(delta[latent]))
        entries.append(entry)
    return summary, entries


def layer_norms(
    norms_LMT: Tensor, targets: list[str], latent_ids: Tensor
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A cross-layer transcoder's decoder norms per target layer (``norms_LMT[l, i, t]``, 0 for
    t < l): the summary (own-layer share, :mod:`saekit.eval.decoder_norms`) and, per reported
    latent (id = layer · M + index), its layer and its norm per target it writes to (l..L-1)."""
    L, M = norms_LMT.shape[:2]
    share = own_layer_share(norms_LMT)
    summary = {"kind": "target", "labels": list(targets)}
    summary.update(LayerNormSummary.of(norms_LMT).to_json())
    entries = []
    for latent in latent_ids.tolist():
        layer, i = divmod(latent, M)
        norms = [[targets[t], float(norms_LMT[layer, i, t])] for t in range(layer, L)]
        entries.append(
            {
                "layer": layer,
                "index": i,
                "norms": norms,
                "own_layer_share": _finite(float(share[layer, i])),
            }
        )
    return summary, entries
