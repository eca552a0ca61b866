"""Specifications of the Matryoshka objective, its prefix sampler, and latent re-sorting.

The one-pass reconstruction (block deltas + running sums, docs/design.md "Matryoshka") must
equal the naive one: one ordinary SAE decode per prefix with the latents from p on zeroed. A
penalty averaged over prefixes is the plain penalty with per-latent prefix weights; it must
equal the naive mean over prefixes of the penalty summed over the latents below p.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from scipy import stats

from saekit.core.encoding import Preacts, as_dense
from saekit.model.config import SAEConfig
from saekit.model.sae import SAE
from saekit.objective.config import PenaltyConfig
from saekit.objective.losses import l0_penalty, reconstruction_loss, sparsity_penalty
from saekit.objective.matryoshka import (
    block_deltas,
    fixed_prefixes,
    frequency_order,
    matryoshka_reconstruction_loss,
    prefix_length_probs,
    prefix_weights,
    sample_prefixes,
)

D, M, K = 10, 48, 5
B, T = 3, 6  # 18 tokens


def make_sae(activation: str, seed: int = 0, **fields) -> tuple[SAE, torch.Tensor]:
    """An SAE fitted to x·7 + 3 (scale s ≠ 1, b_dec ≠ 0), free decoder norms, raw [B, T, d].

    ``fields`` are the activation config's (``k`` defaults to K for the TopK family)."""
    g = torch.Generator().manual_seed(seed)
    if activation in ("topk", "batchtopk"):
        fields.setdefault("k", K)
    sae = SAE(SAEConfig(D, M, {"kind": activation, **fields}))
    sae.reset_parameters(generator=g)
    sae.init_from_data(torch.randn(64, D, generator=g) * 7 + 3)
    with torch.no_grad():
        sae.W_enc.add_(0.3 * torch.randn(M, D, generator=g))
        sae.b_enc.add_(0.1 * torch.randn(M, generator=g))
        sae.W_dec.mul_(torch.empty(M, 1).uniform_(0.5, 2.0, generator=g))
    assert abs(float(sae.scale) - 1) > 0.5 and sae.b_dec.abs().min() > 0.1
    return sae, torch.randn(B, T, D, generator=g) * 7 + 3


EPS = 0.1
PLAIN_F = {
    "l1": lambda a: a,
    "log": lambda a: torch.log(a + EPS),
    "tanh": lambda a: torch.tanh(a),
    "sqrt": lambda a: torch.sqrt(a + EPS),
}
"""f(a) of each penalty, written out (ε = 0.1, c = 1)."""
PENALTIES = tuple(PLAIN_F)


def penalty_of(kind: str) -> PenaltyConfig:
    return PenaltyConfig.parse({"kind": kind, "coefficient": 1.0}, "penalty")


def naive_reconstruction(sae, out, prefixes):
    """(1/P) Σ_p mean_n ‖x_n − decode(z with z_i = 0 for i ≥ p)‖²."""
    z_NM = as_dense(out.latents)
    total = 0.0
    for p in prefixes:
        keep = (torch.arange(M) < p).to(z_NM.dtype)
        x_hat_p = sae.decode_n(z_NM * keep)
        total = total + (out.x_n - x_hat_p).pow(2).sum(-1).mean()
    return total / len(prefixes)


def naive_penalty(sae, out, prefixes, kind):
    """(1/P) Σ_p mean_n Σ_{i<p} f(|z_ni|·‖W_dec,i‖), inactive latents included."""
    a_NM = as_dense(out.latents).abs() * sae.W_dec.norm(dim=-1)
    f_NM = PLAIN_F[kind](a_NM)
    total = 0.0
    for p in prefixes:
        total = total + f_NM[:, :p].sum(-1).mean()
    return total / len(prefixes)


PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")
FORMS = ["sparse_topk", "sparse_batchtopk", "dense_from_code", "relu"]


def grads_of(loss, sae):
    return torch.autograd.grad(loss, [getattr(sae, p) for p in PARAMS], allow_unused=True)


def form_case(form, prefix_mode):
    activation = {"sparse_batchtopk": "batchtopk", "relu": "relu"}.get(form, "topk")
    sae, x = make_sae(activation)
    if prefix_mode == "fixed":
        prefixes = fixed_prefixes([4, 8, 12, 24])
    else:
        prefixes = sample_prefixes(M, 5, min_prefix=2, generator=torch.Generator().manual_seed(3))
    return sae, x, prefixes


def latents_of(form, out):
    return as_dense(out.latents) if form == "dense_from_code" else out.latents


def assert_same_grads(got, want):
    for name, g, w in zip(PARAMS, got, want, strict=True):
        if w is None:
            assert g is None or g.abs().max() == 0, name
            continue
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("prefix_mode", ["fixed", "sampled"])
@pytest.mark.parametrize("form", FORMS)
def test_one_pass_reconstruction_equals_naive_per_prefix_decodes_in_value_and_gradient(
    form, prefix_mode
):
    sae, x, prefixes = form_case(form, prefix_mode)
    out = sae(x)
    loss = matryoshka_reconstruction_loss(
        out.x_n, latents_of(form, out), sae.W_dec, sae.b_dec, prefixes
    )
    got = grads_of(loss, sae)
    out = sae(x)
    ref = naive_reconstruction(sae, out, prefixes)
    want = grads_of(ref, sae)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-5)
    assert_same_grads(got, want)


@pytest.mark.parametrize("kind", PENALTIES)
@pytest.mark.parametrize("prefix_mode", ["fixed", "sampled"])
@pytest.mark.parametrize("form", FORMS)
def test_prefix_weighted_penalty_equals_the_naive_prefix_average_in_value_and_gradient(
    form, prefix_mode, kind
):
    sae, x, prefixes = form_case(form, prefix_mode)
    out = sae(x)
    weights = prefix_weights(prefixes, M, like=sae.W_dec)
    value = sparsity_penalty(
        latents_of(form, out), sae.W_dec.norm(dim=-1), penalty_of(kind), latent_weights_M=weights
    )
    got = grads_of(value, sae)
    out = sae(x)
    ref = naive_penalty(sae, out, prefixes, kind)
    want = grads_of(ref, sae)
    assert value.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-5)
    assert_same_grads(got, want)


def test_prefix_weighted_l0_penalty_equals_the_naive_prefix_average_with_its_theta_gradient():
    sae, x = make_sae("jumprelu", init_threshold=0.3, bandwidth=0.5, threshold_param="log")
    prefixes = fixed_prefixes([4, 8, 12, 24])
    pre = Preacts(sae(x).pre.detach())
    weighted = l0_penalty(
        sae.activation.l0_step(pre), prefix_weights(prefixes, M, like=pre.detached)
    )
    (got,) = torch.autograd.grad(weighted, [sae.activation.log_threshold])
    steps_NM = sae.activation.l0_step(pre)
    naive = sum(steps_NM[:, :p].sum(-1).mean() for p in prefixes) / len(prefixes)
    (want,) = torch.autograd.grad(naive, [sae.activation.log_threshold])
    assert weighted.item() == pytest.approx(naive.item(), rel=1e-6)
    assert want.abs().max() > 0
    torch.testing.assert_close(got, want)


def test_prefix_weights_count_the_prefixes_each_latent_belongs_to():
    like = torch.zeros((), dtype=torch.float64)
    weights = prefix_weights([2, 5, 8], 8, like=like)
    expected = torch.tensor([3, 3, 2, 2, 2, 1, 1, 1], dtype=torch.float64) / 3
    assert weights.dtype == torch.float64
    torch.testing.assert_close(weights, expected)
    assert torch.equal(prefix_weights([8], 8, like=like), torch.ones(8, dtype=torch.float64))


@pytest.mark.parametrize("dense", [False, True])
def test_cumulated_block_deltas_are_the_per_prefix_reconstructions(dense):
    sae, x = make_sae("topk")
    out = sae(x)
    prefixes = fixed_prefixes([6, 10, 32])
    latents = as_dense(out.latents) if dense else out.latents
    x_hat_PND = block_deltas(latents, sae.W_dec, prefixes).cumsum(0) + sae.b_dec
    assert x_hat_PND.shape == (3, B * T, D)
    z_NM = as_dense(out.latents)
    for j, p in enumerate(prefixes):
        naive = sae.decode_n(z_NM * (torch.arange(M) < p).to(z_NM.dtype))
        torch.testing.assert_close(x_hat_PND[j], naive, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_hat_PND[-1], out.x_hat_n, rtol=1e-5, atol=1e-5)


def test_single_prefix_matryoshka_is_the_plain_objective():
    sae, x = make_sae("topk")
    out = sae(x)
    loss = matryoshka_reconstruction_loss(out.x_n, out.latents, sae.W_dec, sae.b_dec, [M])
    ref = reconstruction_loss(out.x_n, out.x_hat_n)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    norms = sae.W_dec.norm(dim=-1)
    weighted = sparsity_penalty(
        out.latents, norms, penalty_of("log"), latent_weights_M=prefix_weights([M], M, norms)
    )
    assert weighted.item() == pytest.approx(
        sparsity_penalty(out.latents, norms, penalty_of("log")).item()
    )


def test_prefixes_must_increase_and_end_at_d_sae():
    sae, x = make_sae("topk")
    out = sae(x)
    for bad in ([10, 10, M], [10, 20], [30, 20, M], []):
        with pytest.raises(ValueError, match="prefixes"):
            matryoshka_reconstruction_loss(out.x_n, out.latents, sae.W_dec, sae.b_dec, bad)
        with pytest.raises(ValueError, match="prefixes"):
            prefix_weights(bad, M, like=sae.W_dec)


# ------------------------------------------------------------------------- prefix sampling


def test_single_sampled_prefix_follows_the_truncated_pareto_formula():
    """P − 1 = 1: each call draws one length, whose law is exactly the formula (chi-square)."""
    d_sae, m, a = 40, 4, 0.5
    g = torch.Generator().manual_seed(1234)
    n_draws = 100_000
    counts = torch.zeros(d_sae + 1, dtype=torch.long)
    for _ in range(n_draws):
        first, last = sample_prefixes(d_sae, 2, min_prefix=m, alpha=a, generator=g)
        assert last == d_sae
        counts[first] += 1
    assert counts[:m].sum() == 0 and counts[d_sae] == 0
    span = d_sae - m + 1
    weights = [((l - m + 1) / span) ** a - ((l - m) / span) ** a for l in range(m, d_sae)]
    expected = [n_draws * w / sum(weights) for w in weights]
    assert min(expected) > 5
    observed = counts[m:d_sae].tolist()
    p_value = stats.chisquare(observed, expected).pvalue
    assert p_value > 1e-3
    torch.testing.assert_close(
        prefix_length_probs(d_sae, m, a), torch.tensor(weights, dtype=torch.float64) / sum(weights)
    )


def test_sampled_prefixes_are_distinct_sorted_at_least_min_and_end_with_d_sae():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        prefixes = sample_prefixes(64, 10, min_prefix=3, generator=g)
        assert len(prefixes) == 10 and prefixes[-1] == 64
        assert all(a < b for a, b in itertools.pairwise(prefixes))
        assert prefixes[0] >= 3
    # as many lengths as there are: every length from m to M − 1, then M
    assert sample_prefixes(8, 6, min_prefix=3, generator=g) == [3, 4, 5, 6, 7, 8]
    assert sample_prefixes(8, 1) == [8]


def test_fixed_prefixes_are_cumulative_group_sizes():
    assert fixed_prefixes([4, 8, 16]) == [4, 12, 28]
    with pytest.raises(ValueError):
        fixed_prefixes([4, 0])


@pytest.mark.parametrize(
    "counts",
    [
        [3, 0, 7, 7, 1, 0, 3, 9, 0, 7],  # ties at the top, the middle and zero
        [0] * 6,  # none fired: the order stays
        [5] * 6,  # all equal: the order stays
        [0, 0, 0, 0, 0, 1],  # one fired: it comes first
        list(range(12)),  # ascending: reversed
    ],
)
def test_frequency_order_is_a_stable_sort_by_descending_counts(counts):
    expected = sorted(range(len(counts)), key=lambda i: -counts[i])  # Python's sort is stable
    perm = frequency_order(torch.tensor(counts, dtype=torch.int64))
    assert perm.dtype == torch.int64 and perm.tolist() == expected
