"""Specification of the SynthSAEBench generator (saekit.data.synthetic: synthbench_world,
synthbench_sampler).

References are built here independently: closed forms in float64, subset enumeration for the
hierarchy's marginal rates, bivariate-normal orthant probabilities for the copula, and
torch.optim.Adam with autograd for the orthogonalisation.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from scipy.stats import multivariate_normal, norm

from saekit.data.synthetic.synthbench_sampler import SynthBenchData, sparse_bernoulli
from saekit.data.synthetic.synthbench_world import (
    SynthBenchConfig,
    SynthBenchWorld,
    compensated_probabilities,
    orthogonalise,
    orthogonality_loss,
    synthsaebench_16k,
    zipf_linear_probabilities,
)

SIGMAS = 5.0


def tree_cfg(**overrides) -> SynthBenchConfig:
    fields = dict(
        n_features=300, d=24, n_roots=4, branching=3, depth=2, correlation_scale=0.0,
        p_min=0.01, ortho_steps=0, seed=3,
    )  # fmt: skip
    fields.update(overrides)
    return SynthBenchConfig(**fields)


def draw(data: SynthBenchData, n_batches: int, n: int):
    batches = [data.batch(i, n) for i in range(n_batches)]
    tokens = sum(n for _ in batches)
    counts = sum(torch.bincount(b.firings.feature, minlength=data.cfg.n_features) for b in batches)
    return batches, tokens, counts


def assert_rates(counts_F, n, rates_F, which) -> None:
    for i in which:
        p = float(rates_F[i])
        tol = SIGMAS * math.sqrt(n * p * (1 - p)) + 2
        assert abs(int(counts_F[i]) - n * p) <= tol, (i, int(counts_F[i]), n * p)


def test_the_16k_preset_has_the_published_settings():
    """Settings only. The published world is a file SAELens saved (its SyntheticModel, built on
    a GPU): the same settings and seed here give another random draw, not that world, and
    SAELens ships no preset that rebuilds it. saekit reads such a file instead
    (data.synthbench.world_path; tests/interop/test_saelens_world_real.py checks it bit for bit)."""
    cfg = synthsaebench_16k()
    assert (cfg.n_features, cfg.d, cfg.n_roots, cfg.branching, cfg.depth) == (
        16_384, 768, 128, 4, 3,
    )  # fmt: skip
    assert (cfg.correlation_rank, cfg.correlation_scale) == (25, 0.1)
    assert (cfg.ortho_steps, cfg.ortho_lr, cfg.seed, cfg.scale_children) == (100, 3e-4, 42, True)
    assert cfg.n_tree == 128 + 512 + 2048 + 8192


def test_zipf_probabilities_run_from_p_max_to_p_min_as_a_power_law():
    p = zipf_linear_probabilities(1000, 0.5, 0.4, 5e-4)
    assert p[0] == pytest.approx(0.4) and p[-1] == pytest.approx(5e-4)
    r = [(i + 1) ** -0.5 for i in (0, 9, 999)]
    expected_9 = 5e-4 + (0.4 - 5e-4) * (r[1] - r[2]) / (r[0] - r[2])
    assert float(p[9]) == pytest.approx(expected_9, rel=1e-12)


def test_compensation_matches_a_plain_loop():
    cfg = tree_cfg()
    world = SynthBenchWorld(cfg)
    base = world.base_probabilities
    got = compensated_probabilities(base, world.parent)
    for i in range(cfg.n_features):
        par = int(world.parent[i])
        if par < 0:
            assert float(got[i]) == float(base[i])
            continue
        siblings = [j for j in range(cfg.n_features) if int(world.parent[j]) == par and j != i]
        want = (
            float(base[i])
            / float(base[par])
            * (1 + sum(float(base[j]) for j in siblings) / float(base[par]))
        )
        assert float(got[i]) == pytest.approx(min(want, 1.0), rel=1e-12)


def exact_hierarchy_rates(world: SynthBenchWorld) -> torch.Tensor:
    """Marginal rate of every feature without correlation, by enumerating sibling subsets:
    rate(child) = rate(parent) · q_i · E[1 / (1 + #other firing siblings)], q = p·P(mag > 0)."""
    F = world.cfg.n_features
    mu, sd = world.magnitude_mean.double(), world.magnitude_std.double()
    q = [float(world.probabilities[i]) * float(norm.cdf(mu[i] / sd[i])) for i in range(F)]
    rate = [0.0] * F
    for i in range(F):  # breadth-first numbering: a parent comes before its children
        par = int(world.parent[i])
        if par < 0:
            rate[i] = q[i]
            continue
        others = [j for j in range(F) if int(world.parent[j]) == par and j != i]
        share = 0.0
        for fired in itertools.product((0, 1), repeat=len(others)):
            prob = math.prod(q[j] if f else 1 - q[j] for j, f in zip(others, fired, strict=True))
            share += prob / (1 + sum(fired))
        rate[i] = rate[par] * q[i] * share
    return torch.tensor(rate, dtype=torch.float64)


def test_firing_rates_of_every_feature_match_the_hierarchy_closed_form():
    data = SynthBenchData(tree_cfg())
    _, n, counts = draw(data, 10, 2000)
    assert_rates(counts, n, exact_hierarchy_rates(data.world), range(data.cfg.n_features))


def test_children_fire_only_with_their_parent_and_exclusively_among_siblings():
    data = SynthBenchData(tree_cfg(correlation_scale=0.2, correlation_rank=4))
    world = data.world
    batches, _, counts = draw(data, 3, 2000)
    assert counts[world.parent >= 0].sum() > 1000  # the checks below see many children
    for b in batches:
        dense = b.firings.dense(data.cfg.n_features)
        child = torch.nonzero(world.parent >= 0).flatten()
        assert (dense[:, world.parent[child]][dense[:, child] > 0] > 0).all()
        for par in torch.unique(world.parent[child]).tolist():
            siblings = torch.nonzero(world.parent == par).flatten()
            assert ((dense[:, siblings] > 0).sum(1) <= 1).all()


def test_children_are_scaled_by_parent_value_over_parent_mean():
    """Roots' magnitudes vary, every other magnitude is its mean: v2 children then equal
    μ_child · parent value / μ_parent exactly (and vary with the root); v1 children equal μ."""
    for scale in (True, False):
        data = SynthBenchData(tree_cfg(scale_children=scale))
        world = data.world
        root = world.depth == 0
        world.magnitude_std.copy_(torch.where(root, 1.0, 1e-7))
        dense = data.batch(0, 4000).firings.dense(data.cfg.n_features).double()
        tok, feat = torch.nonzero((dense > 0) & (world.parent >= 0), as_tuple=True)
        par = world.parent[feat]
        mu = world.magnitude_mean.double()
        expected = mu[feat] * (dense[tok, par] / mu[par] if scale else 1.0)
        assert torch.allclose(dense[tok, feat], expected, rtol=1e-4)
        assert (dense[tok, feat] / mu[feat]).std() > (0.1 if scale else -1.0)


def test_copula_rates_and_pair_coactivation_match_the_bivariate_normal():
    cfg = tree_cfg(n_roots=0, n_features=40, correlation_rank=2, correlation_scale=0.5)
    data = SynthBenchData(cfg)
    world = data.world
    batches, n, counts = draw(data, 10, 2000)
    q = world.probabilities * torch.tensor(
        norm.cdf((world.magnitude_mean / world.magnitude_std).double())
    )
    assert_rates(counts, n, q, range(cfg.n_features))
    dense = torch.cat([b.firings.dense(cfg.n_features) for b in batches]) > 0
    corr = world.correlation_matrix()
    for i, j in [(0, 1), (0, 2), (1, 3), (2, 5)]:
        t = norm.isf(world.probabilities[[i, j]].numpy())
        rho = float(corr[i, j])
        both = multivariate_normal(mean=[0, 0], cov=[[1, rho], [rho, 1]]).cdf(-t)
        both *= float(norm.cdf(world.magnitude_mean[i] / world.magnitude_std[i]))
        both *= float(norm.cdf(world.magnitude_mean[j] / world.magnitude_std[j]))
        got = int((dense[:, i] & dense[:, j]).sum())
        assert abs(got - n * both) <= SIGMAS * math.sqrt(n * both) + 2, (i, j, got, n * both)
    independent = float(q[0] * q[1]) * n
    assert abs(int((dense[:, 0] & dense[:, 1]).sum()) - independent) > 0  # the pair is coupled


def test_correlation_spectrum_is_low_rank_plus_own_noise_with_unit_diagonal():
    world = SynthBenchWorld(
        tree_cfg(n_roots=0, n_features=200, correlation_rank=5, correlation_scale=0.3)
    )
    corr = world.correlation_matrix()
    assert torch.allclose(corr.diagonal(), torch.ones(200, dtype=torch.float64))
    shifted = torch.linalg.eigvalsh(corr - torch.diag(world.own_std.double().pow(2)))
    assert (shifted[:-5].abs() < 1e-9).all() and (shifted[-5:] > 0.1).all()


def test_sparse_bernoulli_counts_are_binomial_without_duplicates():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.001, 0.02, 0.049, 0.2, 0.6], dtype=torch.float64)
    n_tok, counts = 0, torch.zeros(5)
    for _ in range(20):
        tok, feat = sparse_bernoulli(p, 3000, g)
        assert torch.unique(tok * 5 + feat).numel() == tok.numel()
        counts += torch.bincount(feat, minlength=5)
        n_tok += 3000
    assert_rates(counts, n_tok, p, range(5))


def test_orthogonalise_is_adam_on_the_orthogonality_loss():
    raw = torch.randn(50, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = (raw / raw.norm(dim=-1, keepdim=True)).clone().requires_grad_(True)
    opt = torch.optim.Adam([ref], lr=1e-2)
    for _ in range(7):
        opt.zero_grad()
        orthogonality_loss(ref).backward()
        opt.step()
    want = ref.detach() / ref.detach().norm(dim=-1, keepdim=True)
    assert torch.allclose(orthogonalise(raw, 7, 1e-2), want, atol=1e-10)


def test_dictionary_is_unit_norm_and_orthogonalising_lowers_coherence():
    before = SynthBenchWorld(tree_cfg(n_features=256, d=16, ortho_steps=0)).directions.double()
    after = SynthBenchWorld(tree_cfg(n_features=256, d=16, ortho_steps=100, ortho_lr=3e-3))
    f = after.directions.double()
    assert torch.allclose(f.norm(dim=-1), torch.ones(256, dtype=torch.float64), atol=1e-6)

    def mean_sq_cos(x):
        gram = x @ x.T
        return float((gram.pow(2).sum() - 256) / (256 * 255))

    # random unit vectors in R^16 have E[cos²] = 1/16; the Welch bound is (F − d)/(d(F − 1))
    assert mean_sq_cos(before) == pytest.approx(1 / 16, rel=0.1)
    assert (256 - 16) / (16 * 255) <= mean_sq_cos(f) < mean_sq_cos(before)


def test_batches_are_a_pure_function_of_seed_and_index_and_bos_tokens_are_empty():
    cfg = tree_cfg(correlation_scale=0.2, correlation_rank=3, bos_share=0.3)
    a, b = SynthBenchData(cfg), SynthBenchData(cfg)
    assert torch.equal(a.batch(5, 500).x, b.batch(5, 500).x)
    assert not torch.equal(a.batch(5, 500).x, a.batch(6, 500).x)
    assert not torch.equal(a.batch(5, 500).x, SynthBenchData(cfg, stream_seed=1).batch(5, 500).x)
    batch = a.batch(0, 5000)
    share = float(batch.bos.double().mean())
    assert abs(share - 0.3) < SIGMAS * math.sqrt(0.3 * 0.7 / 5000)
    assert torch.allclose(batch.x[batch.bos], a.world.bias.expand(int(batch.bos.sum()), -1))
    assert not batch.bos[batch.firings.token].any()


def test_bad_settings_are_refused_with_the_field_named():
    with pytest.raises(ValueError, match="bos_share"):
        SynthBenchConfig(bos_share=1.0)
    with pytest.raises(ValueError, match="hierarchy needs"):
        SynthBenchConfig(n_features=1000)
