"""Decoder-norm ratios (saekit.eval.decoder_norms) against the papers' formulas by plain loops."""

from __future__ import annotations

import math

import pytest
import torch

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


def paper_delta(a, b):
    """Minder et al. 2025 (arXiv 2504.02922) §2: ½((‖d_B‖ − ‖d_A‖)/max + 1)."""
    return 0.5 * ((b - a) / max(a, b) + 1)


def paper_class(a, b):
    """Their bands: only-B Δ ∈ [0.9, 1], only-A [0, 0.1], shared [0.4, 0.6], else other."""
    if a == 0 and b == 0:
        return "zero"
    delta = paper_delta(a, b)
    if delta >= 0.9:
        return "B"
    if delta <= 0.1:
        return "A"
    if 0.4 <= delta <= 0.6:
        return "shared"
    return "other"


# pairs (‖d_A‖, ‖d_B‖) chosen off the band edges, scaled so no pair has norm 1
PAIRS = [
    (0.0, 3.0), (3.0, 0.0), (0.1, 2.0), (2.0, 0.3), (1.5, 1.7), (2.2, 1.9), (1.0, 0.5),
    (0.5, 1.2), (0.0, 0.0), (4.0, 4.0), (0.05, 0.2), (1.3, 2.0),
]  # fmt: skip


def test_two_sources_match_the_paper_bands():
    norms = torch.tensor(PAIRS, dtype=torch.float64).T.contiguous()  # [2, M]
    delta = relative_norm_difference(norms)
    classes = norm_classes(norms)
    code = {"A": 0, "B": 1, "shared": SHARED, "other": OTHER, "zero": ZERO}
    for i, (a, b) in enumerate(PAIRS):
        want = paper_class(a, b)
        assert int(classes[i]) == code[want], (a, b, want)
        if want == "zero":
            assert math.isnan(delta[i])
        else:
            assert float(delta[i]) == pytest.approx(paper_delta(a, b), abs=1e-12)
    summary = SourceNormSummary.of(norms.float(), ["base", "chat"])
    wanted = [paper_class(a, b) for a, b in PAIRS]
    assert summary.only == [wanted.count("A"), wanted.count("B")] and summary.only[0] > 0
    assert (summary.shared, summary.other, summary.zero_decoder) == (
        wanted.count("shared"),
        wanted.count("other"),
        1,
    )
    # 20 bins over [0, 1]: Δ = 1 lands in the last bin
    deltas = [paper_delta(a, b) for a, b in PAIRS if (a, b) != (0.0, 0.0)]
    hist = [0] * 20
    for v in deltas:
        hist[min(int(v * 20), 19)] += 1
    assert summary.relative_norm_histogram == hist
    assert SourceNormSummary.from_json(summary.to_json()) == summary


def test_more_sources_use_the_same_bands_on_the_norm_ratios():
    # r_s = n_s / max: only-s when every other r <= 0.2, shared when every r >= 0.8
    norms = torch.tensor(
        [
            [1.0, 0.1, 0.1, 2.0, 1.0, 0.0],
            [0.1, 0.9, 3.0, 1.8, 0.5, 0.0],
            [0.15, 0.85, 0.2, 1.7, 1.0, 0.0],
        ]
    )
    classes = norm_classes(norms).tolist()
    for i in range(norms.shape[1]):
        col = norms[:, i].tolist()
        top = max(col)
        if top == 0:
            assert classes[i] == ZERO
            continue
        r = [v / top for v in col]
        small = [s for s in range(3) if r[s] <= 0.2]
        if len(small) == 2:
            assert classes[i] == r.index(1.0)
        elif all(v >= 0.8 for v in r):
            assert classes[i] == SHARED
        else:
            assert classes[i] == OTHER
    assert classes == [0, OTHER, 1, SHARED, OTHER, ZERO]  # every class is exercised
    assert SourceNormSummary.of(norms, ["a", "b", "c"]).relative_norm_histogram is None
    with pytest.raises(ValueError, match="compares 2 sources"):
        relative_norm_difference(norms)


def test_own_layer_share_by_loops():
    L, M = 3, 4
    g = torch.Generator().manual_seed(0)
    norms = torch.rand(L, M, L, generator=g)  # [l, i, t]: ‖d_i^{l→t}‖
    for layer in range(L):
        norms[layer, :, :layer] = 0  # no target before the latent's layer
    norms[0, 1] = 0  # a latent with no decoder
    share = own_layer_share(norms)
    for layer in range(L):
        for i in range(M):
            total = sum(float(norms[layer, i, t]) for t in range(layer, L))
            if layer == L - 1 or total == 0:
                assert math.isnan(share[layer, i])
            else:
                want = float(norms[layer, i, layer]) / total
                assert float(share[layer, i]) == pytest.approx(want)
    summary = LayerNormSummary.of(norms)
    assert summary.zero_decoder == 1
    assert sum(summary.own_layer_share_histogram) == (L - 1) * M - 1
    assert summary.mean_own_layer_share[1] == pytest.approx(float(share[1].mean()))
    assert LayerNormSummary.from_json(summary.to_json()) == summary
