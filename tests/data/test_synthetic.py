"""Specification of the synthetic ground-truth generator (saekit.data.synthetic.generator).

Every reference is computed here, independently of the generator: float64 closed forms,
binomial tolerances, plain loops and least squares.
"""

from __future__ import annotations

import math

import pytest
import torch

from saekit.data.synthetic.generator import SyntheticConfig, SyntheticData, zipf_probabilities

N_TOKENS = 20_000
SIGMAS = 5.0


def small_cfg(**overrides) -> SyntheticConfig:
    fields = dict(d=32, n_features=128, mean_l0=6.0, seed=7)
    fields.update(overrides)
    return SyntheticConfig(**fields)


def assert_binomial_frequencies(active_NF: torch.Tensor, probs_F: torch.Tensor) -> None:
    """Each feature's count of active tokens lies within SIGMAS binomial standard deviations."""
    n = active_NF.shape[0]
    counts = active_NF.sum(0).tolist()
    for i, p in enumerate(probs_F.double().tolist()):
        tolerance = SIGMAS * math.sqrt(n * p * (1 - p)) + 1
        assert abs(counts[i] - n * p) <= tolerance, (i, counts[i], n * p)


def off_diagonal_correlations(active_NF: torch.Tensor) -> torch.Tensor:
    """[F, F] Pearson correlation of activity indicators (float64, features never constant)."""
    a = active_NF.double()
    centred = a - a.mean(0)
    cov = centred.T @ centred / a.shape[0]
    std = cov.diagonal().sqrt()
    return cov / (std[:, None] * std[None, :])


# --- geometry ------------------------------------------------------------------------------


def test_directions_are_unit_vectors_in_superposition():
    data = SyntheticData(small_cfg())
    F, d = data.directions.shape
    assert (F, d) == (128, 32)
    assert F > d
    for row in data.directions.double().tolist():
        assert math.sqrt(sum(v * v for v in row)) == pytest.approx(1.0, abs=1e-6)


def test_mean_offset_has_the_configured_nonzero_norm():
    data = SyntheticData(small_cfg(mean_norm=3.5))
    norm = math.sqrt(sum(v * v for v in data.mean.double().tolist()))
    assert norm == pytest.approx(3.5, rel=1e-6)


# --- frequencies ---------------------------------------------------------------------------


def test_zipf_probabilities_match_the_capped_power_law():
    n, exponent, total = 10, 1.0, 5.0
    probs = zipf_probabilities(n, exponent, total).tolist()
    # Reference: p_i = min(1, c (i+1)^-exponent) with c found by bisection so that Σ p_i = total.
    weights = [(i + 1) ** -exponent for i in range(n)]
    lo, hi = 0.0, 1e6
    for _ in range(200):
        c = (lo + hi) / 2
        if sum(min(1.0, c * w) for w in weights) < total:
            lo = c
        else:
            hi = c
    expected = [min(1.0, c * w) for w in weights]
    assert expected[0] == 1.0 and expected[1] == 1.0  # the cap is active in this case
    assert probs == pytest.approx(expected, abs=1e-9)
    assert sum(probs) == pytest.approx(total, abs=1e-9)
    assert max(probs) <= 1.0
    assert all(a >= b for a, b in zip(probs, probs[1:], strict=False))


def test_zipf_probabilities_without_the_cap_are_proportional_to_the_power_law():
    probs = zipf_probabilities(50, 0.6, 3.0).tolist()
    weights = [(i + 1) ** -0.6 for i in range(50)]
    expected = [3.0 * w / sum(weights) for w in weights]
    assert probs == pytest.approx(expected, rel=1e-12)


def test_zipf_probabilities_with_total_equal_to_n_are_all_one():
    assert zipf_probabilities(8, 0.6, 8.0).tolist() == pytest.approx([1.0] * 8, abs=1e-9)


def test_empirical_firing_frequencies_match_the_probabilities():
    data = SyntheticData(small_cfg())
    active = data.batch(0, N_TOKENS).coefficients > 0
    assert_binomial_frequencies(active, data.probabilities)


def test_empirical_l0_matches_true_l0_and_the_configured_mean_l0():
    cfg = small_cfg()
    data = SyntheticData(cfg)
    assert data.true_l0 == pytest.approx(cfg.mean_l0, rel=1e-6)
    l0_per_token = (data.batch(0, N_TOKENS).coefficients > 0).sum(1).double()
    standard_error = float(l0_per_token.std()) / math.sqrt(N_TOKENS)
    assert float(l0_per_token.mean()) == pytest.approx(cfg.mean_l0, abs=SIGMAS * standard_error)


# --- magnitudes ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["independent", "hierarchical", "correlated"])
def test_active_magnitudes_are_uniform_with_the_configured_mean_and_std(kind):
    cfg = small_cfg(kind=kind, magnitude_mean=2.0, magnitude_std=0.5, n_parents=8)
    coefficients = SyntheticData(cfg).batch(0, N_TOKENS).coefficients
    magnitudes = coefficients[coefficients > 0].double()
    n = magnitudes.numel()
    half_width = 0.5 * math.sqrt(3.0)
    assert float(magnitudes.min()) >= 2.0 - half_width - 1e-5
    assert float(magnitudes.max()) <= 2.0 + half_width + 1e-5
    assert float(magnitudes.mean()) == pytest.approx(2.0, abs=SIGMAS * 0.5 / math.sqrt(n))
    assert float(magnitudes.std()) == pytest.approx(0.5, rel=0.02)
    # Uniform: each quarter of the support holds a quarter of the magnitudes.
    edges = [2.0 - half_width + k * half_width / 2 for k in range(5)]
    for lo, hi in zip(edges, edges[1:], strict=False):
        share = float(((magnitudes >= lo) & (magnitudes < hi)).double().mean())
        assert share == pytest.approx(0.25, abs=SIGMAS * math.sqrt(0.25 * 0.75 / n))


def test_magnitudes_are_clipped_at_five_percent_of_the_mean():
    cfg = small_cfg(magnitude_mean=1.0, magnitude_std=1.0)
    coefficients = SyntheticData(cfg).batch(0, N_TOKENS).coefficients
    magnitudes = coefficients[coefficients > 0].double()
    n = magnitudes.numel()
    a, b, floor = 1.0 - math.sqrt(3.0), 1.0 + math.sqrt(3.0), 0.05
    assert float(magnitudes.min()) == pytest.approx(floor, abs=1e-6)
    clipped_share = (floor - a) / (b - a)
    share = float((magnitudes <= floor + 1e-6).double().mean())
    assert share == pytest.approx(clipped_share, abs=SIGMAS * math.sqrt(0.25 / n))
    # E[max(U, floor)] for U uniform on [a, b].
    expected_mean = (floor * (floor - a) + (b * b - floor * floor) / 2) / (b - a)
    assert float(magnitudes.mean()) == pytest.approx(expected_mean, abs=SIGMAS * 1.0 / math.sqrt(n))


# --- the activations -----------------------------------------------------------------------


def test_x_is_coefficients_times_directions_plus_mean_plus_isotropic_noise():
    cfg = small_cfg(noise_std=0.1)
    data = SyntheticData(cfg)
    batch = data.batch(3, N_TOKENS)
    x = batch.x.double()
    c = batch.coefficients.double()
    # Regress x on [coefficients, 1]: the slopes are the directions, the intercept is the mean.
    design = torch.cat([c, torch.ones(N_TOKENS, 1, dtype=torch.float64)], dim=1)
    solution = torch.linalg.lstsq(design, x).solution  # [F + 1, d]
    assert torch.allclose(solution[:-1], data.directions.double(), atol=0.02)
    assert torch.allclose(solution[-1], data.mean.double(), atol=0.02)
    # The residual against the true structure is the noise: zero mean, std noise_std, isotropic.
    residual = x - c @ data.directions.double() - data.mean.double()
    assert residual.mean(0).abs().max() < SIGMAS * 0.1 / math.sqrt(N_TOKENS)
    per_dim_std = residual.std(0)
    assert torch.allclose(per_dim_std, torch.full_like(per_dim_std, 0.1), rtol=0.05)
    # Isotropic: dimensions uncorrelated (each sample correlation is ≈ 1/√N ≈ 0.007 of noise).
    cov = residual.T @ residual / N_TOKENS
    corr = cov / (per_dim_std[:, None] * per_dim_std[None, :])
    assert (corr - torch.diag(corr.diagonal())).abs().max() < 0.05
    # Independent of the features: regressing the residual on them gives ≈ 0 slopes.
    residual_slopes = torch.linalg.lstsq(design, residual).solution[:-1]
    assert residual_slopes.abs().max() < 0.02


def test_without_noise_x_is_exactly_the_feature_sum_plus_mean():
    data = SyntheticData(small_cfg(noise_std=0.0))
    batch = data.batch(0, 256)
    x = batch.x.double().tolist()
    c = batch.coefficients.double().tolist()
    directions = data.directions.double().tolist()
    mean = data.mean.double().tolist()
    for n in range(0, 256, 37):
        for j in range(0, 32, 5):
            expected = mean[j] + sum(c[n][i] * directions[i][j] for i in range(128))
            assert x[n][j] == pytest.approx(expected, abs=1e-5)


# --- determinism ---------------------------------------------------------------------------


def test_batches_are_a_pure_function_of_seed_and_index():
    a, b = SyntheticData(small_cfg(seed=11)), SyntheticData(small_cfg(seed=11))
    assert torch.equal(a.directions, b.directions)
    assert torch.equal(a.mean, b.mean)
    first, again = a.batch(5, 64), b.batch(5, 64)
    assert torch.equal(first.x, again.x)
    assert torch.equal(first.coefficients, again.coefficients)
    assert torch.equal(a.batch(5, 64).x, first.x)  # no hidden state between calls
    assert not torch.equal(a.batch(6, 64).x, first.x)
    other_seed = SyntheticData(small_cfg(seed=12))
    assert not torch.equal(other_seed.batch(5, 64).x, first.x)
    assert not torch.equal(other_seed.batch(5, 64).coefficients, first.coefficients)
    assert not torch.equal(other_seed.directions, a.directions)


def test_stream_from_start_k_yields_batch_k_first():
    data = SyntheticData(small_cfg())
    stream = data.stream(32, start=4)
    assert torch.equal(next(stream), data.batch(4, 32).x)
    assert torch.equal(next(stream), data.batch(5, 32).x)
    assert torch.equal(next(data.stream(32)), data.batch(0, 32).x)


# --- hierarchical --------------------------------------------------------------------------

P, C, PARENT_P = 8, 4, 0.2


def hierarchical_data() -> SyntheticData:
    return SyntheticData(
        small_cfg(
            kind="hierarchical", n_parents=P, children_per_parent=C, parent_probability=PARENT_P
        )
    )


def test_hierarchical_parent_of_maps_each_child_to_its_parent():
    parent_of = hierarchical_data().parent_of.tolist()
    expected = [-1] * 128
    for parent in range(P):
        for k in range(C):
            expected[P + parent * C + k] = parent
    assert parent_of == expected


def test_hierarchical_exactly_one_child_fires_with_each_active_parent_and_none_without():
    data = hierarchical_data()
    active = (data.batch(0, 4000).coefficients > 0).tolist()
    for row in active:
        for parent in range(P):
            children = row[P + parent * C : P + (parent + 1) * C]
            assert sum(children) == (1 if row[parent] else 0)
    # Every child fires only together with its parent (checked via parent_of as well).
    parent_of = data.parent_of.tolist()
    for row in active:
        for child, parent in enumerate(parent_of):
            if parent >= 0 and row[child]:
                assert row[parent]


def test_hierarchical_marginal_frequencies_match_probabilities():
    data = hierarchical_data()
    probs = data.probabilities.double()
    assert probs[:P].tolist() == pytest.approx([PARENT_P] * P)
    assert probs[P : P + P * C].tolist() == pytest.approx([PARENT_P / C] * (P * C))
    active = data.batch(0, N_TOKENS).coefficients > 0
    assert_binomial_frequencies(active, probs)
    assert data.true_l0 == pytest.approx(6.0, rel=1e-6)
    l0 = active.sum(1).double()
    assert float(l0.mean()) == pytest.approx(
        6.0, abs=SIGMAS * float(l0.std()) / math.sqrt(N_TOKENS)
    )


@pytest.mark.parametrize(
    "overrides",
    [
        # The tree alone has L0 = 2 · 16 · 0.1 = 3.2 > mean_l0.
        dict(mean_l0=2.0, n_parents=16, children_per_parent=4, parent_probability=0.1),
        # No free features: the L0 is the tree's 3.2 whatever mean_l0 says.
        dict(
            n_features=80, mean_l0=6.0, n_parents=16, children_per_parent=4, parent_probability=0.1
        ),
    ],
)
def test_hierarchical_mean_l0_is_honoured_or_rejected(overrides):
    """mean_l0 is documented as the true L0: a tree that cannot meet it must be refused."""
    fields = dict(d=32, n_features=128, kind="hierarchical", seed=0)
    fields.update(overrides)
    try:
        cfg = SyntheticConfig(**fields)
    except ValueError as error:
        assert "mean_l0" in str(error)
        return
    assert SyntheticData(cfg).true_l0 == pytest.approx(cfg.mean_l0, rel=1e-3)


# --- correlated ----------------------------------------------------------------------------


def correlated_pair() -> tuple[SyntheticData, SyntheticData]:
    fields = dict(d=16, n_features=64, mean_l0=8.0, seed=3)
    return (
        SyntheticData(SyntheticConfig(kind="correlated", correlation_strength=0.5, **fields)),
        SyntheticData(SyntheticConfig(kind="independent", **fields)),
    )


def test_correlated_marginal_frequencies_still_match_probabilities():
    correlated, independent = correlated_pair()
    assert torch.equal(correlated.probabilities, independent.probabilities)
    active = correlated.batch(0, N_TOKENS).coefficients > 0
    assert_binomial_frequencies(active, correlated.probabilities)
    l0 = active.sum(1).double()
    assert float(l0.mean()) == pytest.approx(
        8.0, abs=SIGMAS * float(l0.std()) / math.sqrt(N_TOKENS)
    )


def test_correlated_features_sharing_factors_fire_together():
    correlated, independent = correlated_pair()
    F = 64
    off = ~torch.eye(F, dtype=torch.bool)
    corr_c = off_diagonal_correlations(correlated.batch(0, N_TOKENS).coefficients > 0)[off]
    corr_i = off_diagonal_correlations(independent.batch(0, N_TOKENS).coefficients > 0)[off]
    # Independent features: correlations are sampling noise (≈ 1/√N each), mean ≈ 0.
    assert abs(float(corr_i.mean())) < 0.001
    assert float(corr_i.abs().mean()) < 2 / math.sqrt(N_TOKENS)
    # Correlated features: on average positively correlated, clearly above the baseline.
    assert float(corr_c.mean()) > float(corr_i.mean()) + 0.003
    assert float(corr_c.abs().mean()) > 5 * float(corr_i.abs().mean())
    # Pairs whose shared loadings point the same way fire together; opposite ones avoid each other.
    loadings = correlated.factors.double()
    shared = (loadings @ loadings.T)[off]  # latent Gaussian correlation of each pair
    assert float(corr_c[shared > 0.2].mean()) > 0.05
    assert float(corr_c[shared < -0.2].mean()) < -0.03


# --- configuration -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(kind="tree"), "kind"),
        (dict(mean_l0=0.0), "mean_l0"),
        (dict(mean_l0=-1.0), "mean_l0"),
        (dict(n_features=10, mean_l0=11.0), "mean_l0"),
        (
            dict(kind="hierarchical", n_features=64, n_parents=16, children_per_parent=4),
            "n_features",
        ),
        (dict(correlation_strength=1.0), "correlation_strength"),
        (dict(correlation_strength=-0.1), "correlation_strength"),
    ],
)
def test_bad_config_raises_value_error_naming_the_field(overrides, field):
    fields = dict(d=32, n_features=128)
    fields.update(overrides)
    with pytest.raises(ValueError, match=field):
        SyntheticConfig(**fields)
