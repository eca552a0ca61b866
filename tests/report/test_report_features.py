"""The feature page's extras against plain loops in float64: logit effects (decoder row times
the unembedding, in the input's scale), decoder-cosine neighbours, quantile bands, the density
histogram and the auto-label."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from saekit.model.config import SAEConfig
from saekit.model.sae import SAE
from saekit.report.build import report_data
from saekit.report.collect import CollectConfig, collect_batches
from saekit.report.features import (
    auto_label,
    decoder_neighbours,
    density_histogram,
    quantile_samples,
    unembedding,
)
from saekit.report.topk import Slots


class Head(nn.Module):
    def __init__(self, W_U: torch.Tensor):
        super().__init__()
        self.out = nn.Linear(W_U.shape[1], W_U.shape[0], bias=False)
        self.out.weight.data.copy_(W_U)

    def get_output_embeddings(self) -> nn.Module:
        return self.out


@pytest.mark.parametrize("whitening", [None, {"kind": "zca", "eps": 0.01}])
def test_logit_effects_are_the_decoder_row_in_input_space_times_the_unembedding(whitening):
    """Input-space direction of latent m: s·W_dec[m], or s·W_dec[m]·M⁻¹ when whitened."""
    torch.manual_seed(0)
    d, V = 6, 11
    cfg = SAEConfig(d_in=d, d_sae=5, activation={"kind": "topk", "k": 2}, whitening=whitening)
    sae = SAE(cfg)
    x = torch.randn(64, 1, d) * 7 + 3  # dataset scale != 1, nonzero mean
    x[..., 0] *= 5  # anisotropic: whitening is not a multiple of the identity
    sae.init_from_data(x.view(-1, d))
    assert float(sae.scale) != 1.0
    unwhiten = (
        torch.eye(d, dtype=torch.float64) if whitening is None else sae.unwhiten_matrix.double()
    )
    W_U = torch.randn(V, d)
    keep, ids = torch.ones(64, 1, dtype=torch.bool), torch.zeros(64, 1, dtype=torch.long)
    collected = collect_batches(sae, [(x, keep, ids)], torch.tensor([1, 3]))
    data = report_data(collected, sae, str, {}, W_U=unembedding(Head(W_U), d))
    for entry in data["latents"]:
        w_dec = sae.W_dec[entry["id"]].double().tolist()
        row = [
            float(sae.scale) * sum(w_dec[i] * float(unwhiten[i, j]) for i in range(d))
            for j in range(d)
        ]
        effect = [sum(row[j] * float(W_U[v, j]) for j in range(d)) for v in range(V)]
        ranked = sorted(range(V), key=lambda v: -effect[v])
        promoted, suppressed = entry["logits"]["promoted"], entry["logits"]["suppressed"]
        assert [t for t, _ in promoted] == ranked[:10]
        assert [t for t, _ in suppressed] == ranked[::-1][:10]
        for t, value in promoted + suppressed:
            assert math.isclose(value, effect[t], rel_tol=1e-5, abs_tol=1e-9)
    assert unembedding(Head(torch.randn(V, d + 1)), d) is None  # another width: no effects


def test_neighbours_are_the_largest_decoder_cosines_other_than_itself():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(9, 4, dtype=torch.float64, generator=g)
    W[5] = -3 * W[2]  # cos -1: the least similar, never a neighbour
    W[7] = 2 * W[2] + 1e-3 * W[0]  # cos ~1 with latent 2
    got = decoder_neighbours(W, torch.tensor([2, 0]), n=3)
    for row, m in zip(got, [2, 0], strict=True):
        cos = {j: float(W[m] @ W[j] / (W[m].norm() * W[j].norm())) for j in range(9) if j != m}
        best = sorted(cos, key=lambda j: -cos[j])[:3]
        assert [i for i, _ in row] == best
        assert [c for _, c in row] == [pytest.approx(cos[j], rel=1e-12) for j in best]
    assert got[0][0][0] == 7 and math.isclose(got[0][0][1], 1.0, abs_tol=1e-5)


def test_quantile_bands_split_the_sorted_sample_into_equal_counts():
    slots = Slots.empty(1, 10, 0, 0)
    values = [0.5, 3.0, 1.0, 2.5, 0.25, 4.0, 2.0, 1.5]  # exact in float32
    slots.score[0, :8] = torch.tensor(values, dtype=torch.float64)
    slots.value[0, :8] = torch.tensor(values)
    slots.key[0, :8] = torch.arange(8)
    bands = quantile_samples(slots, 0, n_bands=4, per_band=2)
    assert [(b["band"], b["low"], b["high"]) for b in bands] == [
        (4, 3.0, 4.0),
        (3, 2.0, 2.5),
        (2, 1.0, 1.5),
        (1, 0.25, 0.5),
    ]
    assert [c["value"] for c in bands[0]["contexts"]] == [4.0, 3.0]


def test_density_histogram_and_label():
    density = [0.0, 1e-8, 1e-3, 0.5, 1.0, 0.0]
    hist = density_histogram(density, n_bins=7)  # one bin per decade over [1e-7, 1]
    assert hist["dead"] == 2 and sum(hist["counts"]) == 4
    assert hist["counts"] == [1, 0, 0, 0, 1, 0, 2]
    assert auto_label([5, 3, 5, -1, 3, 5, 9], lambda i: f" t{i}") == "t5 / t3 / t9"


def test_collect_config_refuses_a_negative_window():
    try:
        CollectConfig(left=-1)
    except ValueError as exc:
        assert "left must be >= 0" in str(exc)
    else:
        raise AssertionError("accepted left = -1")
