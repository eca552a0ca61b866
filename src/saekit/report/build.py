"""A finished pass (:class:`saekit.report.collect.Collected`) as the plain data of a report:
what the site renders and ``report.json`` records."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from saekit.eval.dictionaries import (
    concatenated_decoders,
    decoder_norms,
    is_multi_hook,
    part_names,
)
from saekit.model.clt import CrossLayerTranscoder
from saekit.model.sae import SAE
from saekit.report.collect import Collected
from saekit.report.features import (
    auto_label,
    contexts,
    decoder_neighbours,
    density_histogram,
    layer_norms,
    logit_effects,
    quantile_samples,
    source_norms,
    truth_matches,
)

DENSE_THRESHOLD = 0.1
"""A latent firing on more than this share of tokens is dense (as MetricAccumulator counts)."""


@torch.no_grad()
def decoder_directions(sae: SAE, ids: Tensor) -> Tensor:
    """[len(ids), d]: each latent's decoder row in the input's space, the linear part of
    :meth:`SAE.denormalise` (s·row, or s·row·M⁻¹ when the SAE whitens its input)."""
    rows = sae.W_dec.detach()[ids.to(sae.W_dec.device)]
    return (sae.denormalise(rows) - sae.denormalise(torch.zeros_like(rows[:1]))).float().cpu()


def report_data(
    collected: Collected,
    sae: SAE,
    decode: Callable[[int], str] | None,
    meta: dict[str, Any],
    W_U: Tensor | None = None,
    truth: Tensor | None = None,
) -> dict[str, Any]:
    """The report: ``summary`` (every latent), ``latents`` (the reported ones), ``vocab`` (the
    text of each token id shown), ``unrecovered`` (synthetic: true features no latent matches).
    ``decode``: token id -> text (None for synthetic data, whose "tokens" are vectors)."""
    c, metrics = collected.collector, collected.metrics
    ids = c.latent_ids
    multi = is_multi_hook(sae)
    # a CLT's or crosscoder's latent: its decoders side by side (scale folded), no logit effects
    W_dec = concatenated_decoders(sae).float() if multi else sae.W_dec.detach().float()
    logits = None if W_U is None or multi else logit_effects(decoder_directions(sae, ids), W_U)
    norm_summary, norm_entries = decoder_norm_data(sae, ids) if multi else (None, [])
    neighbours = decoder_neighbours(W_dec, ids)
    matched, missed = (None, []) if truth is None else truth_matches(truth, W_dec, ids)
    shown: set[int] = set()
    latents = []
    top_slots, sample_slots = c.top.sorted(), c.sample.sorted()
    for m, latent in enumerate(ids.tolist()):
        top = contexts(top_slots, m)
        centers = [ctx["tokens"][top_slots.left] for ctx in top]
        entry: dict[str, Any] = {
            "id": latent,
            "fired": int(c.fired[m]),
            "density": int(c.fired[m]) / max(c.n_tokens, 1),
            "max_act": top[0]["value"] if top else 0.0,
            "label": auto_label(centers, decode) if decode is not None else "",
            "top": top,
            "quantiles": quantile_samples(sample_slots, m),
            "histogram": {"hi": float(c.histogram.hi[m]), "counts": c.histogram.counts[m].tolist()},
            "neighbours": neighbours[m],
        }
        if logits is not None:
            entry["logits"] = logits[m]
            shown.update(i for i, _ in logits[m]["promoted"] + logits[m]["suppressed"])
        if matched is not None:
            entry["truth"] = matched[m]
        if norm_entries:
            entry["decoder_norms"] = norm_entries[m]
        for ctx in top + [s for band in entry["quantiles"] for s in band["contexts"]]:
            shown.update(ctx["tokens"])
        latents.append(entry)
    density = torch.tensor(metrics.latent_density, dtype=torch.float64)
    summary = {
        **meta,
        **metrics.summary(),
        "d_sae": sae.cfg.n_latents,
        "d_in": sae.cfg.d_in,
        "dead": int((density == 0).sum()),
        "dense": int((density > DENSE_THRESHOLD).sum()),
        "l0_histogram": metrics.l0_histogram,
        "density_histogram": density_histogram(metrics.latent_density),
        "window_left": c.top.left,
        "reported": len(latents),
        "synthetic": truth is not None,
    }
    if norm_summary is not None:
        summary["decoder_norms"] = norm_summary
    vocab = {} if decode is None else {str(i): decode(i) for i in sorted(shown) if i >= 0}
    return {"summary": summary, "latents": latents, "vocab": vocab, "unrecovered": missed}


def decoder_norm_data(sae: Any, ids: Tensor) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A CLT's or crosscoder's decoder norms per target layer or source: the summary of every
    latent and the reported latents' entries (:mod:`saekit.report.features`)."""
    norms = decoder_norms(sae)
    if isinstance(sae, CrossLayerTranscoder):
        return layer_norms(norms, part_names(sae), ids)
    return source_norms(norms, part_names(sae), ids)
