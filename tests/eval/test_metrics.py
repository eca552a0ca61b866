"""Specification of the evaluation metrics (saekit.eval.metrics, saekit.eval.ground_truth).

References are plain float64 Python: loops over rows, closed forms and brute force over
assignments; nothing here calls the code under test to build an expected value.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from saekit.core.encoding import SparseCode
from saekit.eval.ground_truth import absorption_counts, cosine_matrix, recovery
from saekit.eval.metrics import MetricAccumulator, batch_fvu, latent_counts

# --- plain references ----------------------------------------------------------------------


def rows_of(t: torch.Tensor) -> list[list[float]]:
    return t.reshape(-1, t.shape[-1]).double().tolist()


def reference_fvu(x_rows: list[list[float]], x_hat_rows: list[list[float]]) -> float:
    n, d = len(x_rows), len(x_rows[0])
    mean = [sum(row[j] for row in x_rows) / n for j in range(d)]
    err = sum(
        (a - b) ** 2
        for xr, hr in zip(x_rows, x_hat_rows, strict=True)
        for a, b in zip(xr, hr, strict=True)
    )
    var = sum((xr[j] - mean[j]) ** 2 for xr in x_rows for j in range(d))
    return err / var


def reference_sq_err(x_rows, x_hat_rows) -> float:
    return sum(
        (a - b) ** 2
        for xr, hr in zip(x_rows, x_hat_rows, strict=True)
        for a, b in zip(xr, hr, strict=True)
    )


def dense_counts(z_rows: list[list[float]], d_sae: int) -> tuple[list[int], list[int]]:
    per_token = [sum(1 for v in row if v != 0) for row in z_rows]
    per_latent = [sum(1 for row in z_rows if row[m] != 0) for m in range(d_sae)]
    return per_token, per_latent


def sparse_counts(entries, n_tokens: int, d_sae: int) -> tuple[list[int], list[int]]:
    """entries: (token, latent, value) triples."""
    per_token, per_latent = [0] * n_tokens, [0] * d_sae
    for token, latent, value in entries:
        if value != 0:
            per_token[token] += 1
            per_latent[latent] += 1
    return per_token, per_latent


def make_sparse_code(entries, n_tokens: int, d_sae: int) -> SparseCode:
    entries = sorted(entries, key=lambda e: e[0])
    return SparseCode(
        values=torch.tensor([e[2] for e in entries], dtype=torch.float32),
        latent=torch.tensor([e[1] for e in entries], dtype=torch.int64),
        token=torch.tensor([e[0] for e in entries], dtype=torch.int64),
        n_tokens=n_tokens,
        d_sae=d_sae,
    )


def cos(u: list[float], v: list[float]) -> float:
    dot = sum(a * b for a, b in zip(u, v, strict=True))
    return dot / (math.sqrt(sum(a * a for a in u)) * math.sqrt(sum(b * b for b in v)))


def brute_force_mcc(abs_cos: list[list[float]]) -> float:
    """Best one-to-one matching by enumeration; unmatched features count 0; mean over F."""
    F, M = len(abs_cos), len(abs_cos[0])
    if M >= F:
        best = max(
            sum(abs_cos[f][m] for f, m in enumerate(latents))
            for latents in itertools.permutations(range(M), F)
        )
    else:
        best = max(
            sum(abs_cos[f][m] for m, f in enumerate(features))
            for features in itertools.permutations(range(F), M)
        )
    return best / F


def greedy_matching(abs_cos: list[list[float]]) -> float:
    """Repeatedly take the largest remaining |cos| (what a naive matcher would do)."""
    F, M = len(abs_cos), len(abs_cos[0])
    pairs = sorted(((abs_cos[f][m], f, m) for f in range(F) for m in range(M)), reverse=True)
    used_f, used_m, total = set(), set(), 0.0
    for value, f, m in pairs:
        if f not in used_f and m not in used_m:
            used_f.add(f)
            used_m.add(m)
            total += value
    return total / F


def decoder_with_cosines(
    cos_FM: list[list[float]], pad: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Truth = the first F standard basis vectors; decoder row m has exactly cos_FM[:, m] with them
    (the rest of its unit norm goes into a padding dimension); rows then get arbitrary scales."""
    F, M = len(cos_FM), len(cos_FM[0])
    d = F + pad
    truth = torch.zeros(F, d, dtype=torch.float64)
    for f in range(F):
        truth[f, f] = 3.0  # non-unit truth rows as well
    W = torch.zeros(M, d, dtype=torch.float64)
    for m in range(M):
        column = [cos_FM[f][m] for f in range(F)]
        rest = 1.0 - sum(c * c for c in column)
        assert rest >= 0
        W[m, :F] = torch.tensor(column, dtype=torch.float64)
        W[m, F + m % pad] = math.sqrt(rest)
        W[m] *= 0.5 + m  # scale must not matter
    return truth, W


# --- FVU -----------------------------------------------------------------------------------


def uneven_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of different sizes, means, spreads and error levels: the per-batch FVUs differ."""
    g = torch.Generator().manual_seed(0)
    d = 6
    specs = [  # (size, mean, spread, error std)
        (3, 10.0, 0.1, 0.5),
        (40, -4.0, 3.0, 0.2),
        (101, 0.5, 1.0, 0.05),
        (7, 0.0, 0.3, 1.0),
    ]
    batches = []
    for size, mean, spread, error in specs:
        x = mean + spread * torch.randn(size, d, generator=g)
        x_hat = x + error * torch.randn(size, d, generator=g)
        batches.append((x, x_hat))
    return batches


def test_fvu_is_a_ratio_of_sums_over_the_whole_set_not_a_mean_of_batch_ratios():
    batches = uneven_batches()
    acc = MetricAccumulator(6, 4)
    for x, x_hat in batches:
        acc.add_reconstruction(x, x_hat)
    x_all = [row for x, _ in batches for row in rows_of(x)]
    x_hat_all = [row for _, x_hat in batches for row in rows_of(x_hat)]
    expected = reference_fvu(x_all, x_hat_all)
    assert float(acc.fvu()) == pytest.approx(expected, rel=1e-9)
    mean_of_batch_fvus = sum(reference_fvu(rows_of(x), rows_of(h)) for x, h in batches) / len(
        batches
    )
    assert abs(mean_of_batch_fvus - expected) > 0.5 * expected  # the trap is real
    assert float(acc.fvu()) != pytest.approx(mean_of_batch_fvus, rel=0.1)


def test_fvu_accepts_3d_input_as_tokens():
    g = torch.Generator().manual_seed(1)
    x = 2.0 + torch.randn(3, 5, 4, generator=g)  # [batch, seq, d]
    x_hat = x + 0.3 * torch.randn(3, 5, 4, generator=g)
    expected = reference_fvu(rows_of(x), rows_of(x_hat))
    assert float(batch_fvu(x.double(), x_hat.double())) == pytest.approx(expected, rel=1e-12)
    assert float(batch_fvu(x, x_hat)) == pytest.approx(expected, rel=1e-6)
    acc = MetricAccumulator(4, 2)
    acc.add_reconstruction(x[:2], x_hat[:2])  # 3-D batch
    acc.add_reconstruction(x[2], x_hat[2])  # 2-D batch
    assert float(acc.fvu()) == pytest.approx(expected, rel=1e-9)
    assert acc.result().n_tokens == 15


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batch_fvu_is_computed_in_the_inputs_dtype(dtype):
    """The training log's FVU: no float64 copies of [N, d] per step."""
    x = torch.randn(10, 3, dtype=dtype)
    assert batch_fvu(x, 0.5 * x).dtype == dtype


def test_fvu_of_one_set_with_a_large_mean():
    """Two passes (x − x̄ first) even in float32: the one-pass Σx² − N·x̄² cancels badly here."""
    g = torch.Generator().manual_seed(2)
    x = 100.0 + torch.randn(64, 8, generator=g)
    x_hat = x + 0.1 * torch.randn(64, 8, generator=g)
    expected = reference_fvu(rows_of(x), rows_of(x_hat))
    assert float(batch_fvu(x.double(), x_hat.double())) == pytest.approx(expected, rel=1e-12)
    assert float(batch_fvu(x, x_hat)) == pytest.approx(expected, rel=1e-5)
    one_pass_variance = x.pow(2).sum() - x.shape[0] * x.mean(0).pow(2).sum()
    one_pass = float((x - x_hat).pow(2).sum() / one_pass_variance)
    assert one_pass != pytest.approx(expected, rel=1e-4)  # the trap is real in float32
    assert float(batch_fvu(x, x)) == 0.0


def test_fvu_of_predicting_the_mean_is_one():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(50, 5, generator=g, dtype=torch.float64) + 7.0
    x_hat = x.mean(0, keepdim=True).expand_as(x)
    assert float(batch_fvu(x, x_hat)) == pytest.approx(1.0, rel=1e-12)


def test_eval_result_explained_variance_and_mse():
    batches = uneven_batches()
    acc = MetricAccumulator(6, 4)
    for x, x_hat in batches:
        acc.add(x, x_hat, torch.ones(x.shape[0], 4))
    result = acc.result()
    x_all = [row for x, _ in batches for row in rows_of(x)]
    x_hat_all = [row for _, x_hat in batches for row in rows_of(x_hat)]
    expected_fvu = reference_fvu(x_all, x_hat_all)
    assert result.n_tokens == len(x_all) == 151
    assert result.fvu == pytest.approx(expected_fvu, rel=1e-9)
    assert result.explained_variance == pytest.approx(1.0 - expected_fvu, rel=1e-9)
    assert result.mse == pytest.approx(reference_sq_err(x_all, x_hat_all) / len(x_all), rel=1e-9)
    assert set(result.summary()) >= {"fvu", "explained_variance", "mse", "l0", "dead_fraction"}
    assert "l0_histogram" not in result.summary()


# --- latent counts -------------------------------------------------------------------------


def dense_latents(seed: int, n: int, m: int, density: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, m, generator=g)  # negative values are nonzero too
    z[torch.rand(n, m, generator=g) > density] = 0.0
    z[0, 0] = -0.0  # a negative zero is zero
    return z


def random_sparse_entries(seed: int, n_tokens: int, d_sae: int) -> list[tuple[int, int, float]]:
    g = torch.Generator().manual_seed(seed)
    entries = []
    for token in range(n_tokens):
        if token % 5 == 3:
            continue  # tokens with no entries at all
        k = int(torch.randint(1, 5, (1,), generator=g))
        latents = torch.randperm(d_sae, generator=g)[:k].tolist()
        for j, latent in enumerate(latents):
            value = 0.0 if (token + j) % 3 == 0 else float(torch.rand(1, generator=g)) + 0.1
            entries.append((token, latent, value))  # exact zeros are kept entries that never fire
    return entries


def test_latent_counts_of_dense_latents_match_loops():
    z = dense_latents(0, 30, 12, density=0.3)
    per_token, per_latent = latent_counts(z)
    expected_tokens, expected_latents = dense_counts(z.tolist(), 12)
    assert per_token.tolist() == expected_tokens
    assert per_latent.tolist() == expected_latents


def test_latent_counts_of_a_sparse_code_ignore_exact_zeros():
    n_tokens, d_sae = 23, 9  # the last tokens (and every 5th) hold no entries
    entries = random_sparse_entries(1, 20, d_sae)
    assert any(v == 0 for _, _, v in entries)
    per_token, per_latent = latent_counts(make_sparse_code(entries, n_tokens, d_sae))
    expected_tokens, expected_latents = sparse_counts(entries, n_tokens, d_sae)
    assert per_token.tolist() == expected_tokens
    assert per_latent.tolist() == expected_latents


def reference_latent_stats(per_token_batches, per_latent_total, n_tokens, dense_threshold=0.1):
    tokens = [c for batch in per_token_batches for c in batch]
    l0 = sum(tokens) / n_tokens
    histogram = [0] * (max(tokens) + 1)
    for c in tokens:
        histogram[c] += 1
    density = [c / n_tokens for c in per_latent_total]
    dead = sum(1 for c in per_latent_total if c == 0) / len(per_latent_total)
    dense = sum(1 for p in density if p > dense_threshold) / len(density)
    return l0, histogram, density, dead, dense


@pytest.mark.parametrize("form", ["dense", "sparse"])
def test_add_latents_l0_histogram_density_dead_and_dense_fractions(form):
    d_sae = 16
    acc = MetricAccumulator(4, d_sae)
    per_token_batches, per_latent_total, n_tokens = [], [0] * d_sae, 0
    for seed, n in [(10, 13), (11, 40), (12, 5)]:
        if form == "dense":
            z = dense_latents(seed, n, d_sae, density=0.2)
            z[:, 13:] = 0.0  # three latents never fire: dead
            latents = z
            per_token, per_latent = dense_counts(z.tolist(), d_sae)
        else:
            entries = [e for e in random_sparse_entries(seed, n, d_sae) if e[1] < 13]
            latents = make_sparse_code(entries, n, d_sae)
            per_token, per_latent = sparse_counts(entries, n, d_sae)
        acc.add(torch.randn(n, 4), torch.randn(n, 4), latents)
        per_token_batches.append(per_token)
        per_latent_total = [a + b for a, b in zip(per_latent_total, per_latent, strict=True)]
        n_tokens += n
    l0, histogram, density, dead, dense = reference_latent_stats(
        per_token_batches, per_latent_total, n_tokens
    )
    result = acc.result()
    assert result.l0 == pytest.approx(l0, rel=1e-12)
    assert result.l0_histogram == histogram
    assert result.latent_density == pytest.approx(density, rel=1e-12)
    assert acc.fired.tolist() == per_latent_total
    assert dead >= 3 / 16  # the trap: some latents never fire over the whole set
    assert result.dead_fraction == pytest.approx(dead, rel=1e-12)
    assert 0 < dense < 1
    assert result.dense_fraction == pytest.approx(dense, rel=1e-12)


def test_dead_fraction_all_dead_and_none_dead():
    all_dead = MetricAccumulator(2, 5)
    all_dead.add(torch.randn(4, 2), torch.randn(4, 2), torch.zeros(4, 5))
    zeros_code = make_sparse_code([(t, t % 5, 0.0) for t in range(4)], 4, 5)
    all_dead.add(torch.randn(4, 2), torch.randn(4, 2), zeros_code)  # exact zeros never fire
    result = all_dead.result()
    assert result.dead_fraction == 1.0
    assert result.dense_fraction == 0.0
    assert result.l0 == 0.0
    assert result.l0_histogram == [8]

    none_dead = MetricAccumulator(2, 5)
    z = torch.zeros(10, 5)
    for m in range(5):
        z[m, m] = 1.0  # each latent fires exactly once over the set, in different batches below
    none_dead.add(torch.randn(5, 2), torch.randn(5, 2), z[:5])
    none_dead.add(torch.randn(5, 2), torch.randn(5, 2), z[5:])
    result = none_dead.result()
    assert result.dead_fraction == 0.0
    assert result.latent_density == pytest.approx([0.1] * 5)
    assert result.dense_fraction == 0.0  # density exactly 0.1 is not above the threshold
    assert result.l0 == pytest.approx(0.5)
    assert result.l0_histogram == [5, 5]


def test_a_latent_firing_in_one_batch_only_is_not_dead():
    acc = MetricAccumulator(2, 3)
    first = torch.tensor([[1.0, 0.0, 0.0]])
    second = torch.tensor([[0.0, 0.0, 2.0], [0.0, 0.0, 1.0]])
    acc.add(torch.randn(1, 2), torch.randn(1, 2), first)
    acc.add(torch.randn(2, 2), torch.randn(2, 2), second)
    result = acc.result()
    assert result.dead_fraction == pytest.approx(1 / 3)  # only latent 1 never fired
    assert result.dense_fraction == pytest.approx(2 / 3)  # densities 1/3, 0, 2/3


def test_l0_is_exact_when_tokens_exceed_the_last_histogram_bin():
    """L0 = mean_n #{z_i ≠ 0}: the histogram's last bin lumps large counts, the mean must not."""
    acc = MetricAccumulator(2, 20, max_l0_bin=4)
    z = torch.zeros(4, 20)
    z[0, :2] = 1.0  # 2
    z[1, :10] = 1.0  # 10
    z[2, :20] = 1.0  # 20
    acc.add(torch.randn(4, 2), torch.randn(4, 2), z)  # token 3: 0
    result = acc.result()
    assert result.l0_histogram == [1, 0, 1, 0, 2]  # 10 and 20 land in the last bin
    assert result.l0 == pytest.approx((2 + 10 + 20 + 0) / 4)


# --- ground truth --------------------------------------------------------------------------


def test_cosine_matrix_matches_a_loop():
    g = torch.Generator().manual_seed(4)
    truth = torch.randn(5, 7, generator=g) * 3.0
    W = torch.randn(8, 7, generator=g) * torch.linspace(0.1, 5.0, 8)[:, None]
    got = cosine_matrix(truth, W)
    assert got.shape == (5, 8)
    assert got.dtype == torch.float64
    t_rows, w_rows = rows_of(truth), rows_of(W)
    for f in range(5):
        for m in range(8):
            assert float(got[f, m]) == pytest.approx(cos(t_rows[f], w_rows[m]), abs=1e-12)


def test_recovery_mean_max_cos_share_and_mcc_match_loops():
    g = torch.Generator().manual_seed(5)
    F, M, d = 4, 5, 6
    truth = torch.randn(F, d, generator=g, dtype=torch.float64)
    W = torch.randn(M, d, generator=g, dtype=torch.float64)
    W[0] = -2.0 * truth[2] + 0.05 * torch.randn(d, generator=g, dtype=torch.float64)  # |cos| > 0.9
    W[3] = 0.7 * truth[0] + 0.1 * torch.randn(d, generator=g, dtype=torch.float64)
    abs_cos = [[abs(cos(t, w)) for w in rows_of(W)] for t in rows_of(truth)]
    max_cos = [max(row) for row in abs_cos]
    assert 0 < sum(1 for c in max_cos if c > 0.9) < F  # the share is strictly between 0 and 1
    result = recovery(truth, W)
    assert result.mean_max_cos == pytest.approx(sum(max_cos) / F, abs=1e-12)
    assert result.recovered_share == pytest.approx(sum(1 for c in max_cos if c > 0.9) / F)
    assert result.mcc == pytest.approx(brute_force_mcc(abs_cos), abs=1e-12)
    assert result.threshold == 0.9


def test_mcc_is_the_optimal_assignment_where_greedy_matching_is_worse():
    # Greedy takes f0-l0 (0.6) first, leaving f1 with 0.05; the optimum pairs f0-l1, f1-l0.
    cos_FM = [
        [0.60, -0.50, 0.10, 0.00, 0.05],
        [-0.55, 0.05, 0.00, 0.10, 0.00],
        [0.10, 0.20, -0.70, 0.65, 0.00],
        [0.00, 0.10, 0.60, 0.00, 0.40],
    ]
    truth, W = decoder_with_cosines(cos_FM)
    abs_cos = [[abs(c) for c in row] for row in cos_FM]
    optimum = brute_force_mcc(abs_cos)
    greedy = greedy_matching(abs_cos)
    assert greedy < optimum - 0.05
    result = recovery(truth, W)
    assert result.mcc == pytest.approx(optimum, abs=1e-12)
    assert result.mean_max_cos == pytest.approx(sum(max(row) for row in abs_cos) / 4, abs=1e-12)
    assert result.recovered_share == 0.0


def test_exact_copies_of_the_truth_recover_everything():
    g = torch.Generator().manual_seed(6)
    F, d = 5, 8
    truth = torch.randn(F, d, generator=g)
    order = [3, 0, 4, 1, 2]
    signs_scales = [-1.0, 2.5, -0.3, 7.0, 1.0]
    W = torch.randn(F + 3, d, generator=g)  # three extra unrelated latents
    for m, (f, s) in enumerate(zip(order, signs_scales, strict=True)):
        W[m + 2] = s * truth[f]
    result = recovery(truth, W)
    assert result.mean_max_cos == pytest.approx(1.0, abs=1e-6)
    assert result.recovered_share == 1.0
    assert result.mcc == pytest.approx(1.0, abs=1e-6)


def test_mcc_with_fewer_latents_than_features_counts_unmatched_features_as_zero():
    cos_FM = [
        [0.85, 0.10],
        [0.20, -0.80],
        [0.25, 0.30],
        [-0.40, 0.00],
    ]
    truth, W = decoder_with_cosines(cos_FM)
    abs_cos = [[abs(c) for c in row] for row in cos_FM]
    expected = brute_force_mcc(abs_cos)
    assert expected == pytest.approx((0.85 + 0.8) / 4)
    result = recovery(truth, W)
    assert result.mcc == pytest.approx(expected, abs=1e-12)
    assert result.mean_max_cos == pytest.approx((0.85 + 0.8 + 0.3 + 0.4) / 4, abs=1e-12)
    assert result.recovered_share == 0.0


# --- absorption ----------------------------------------------------------------------------


def test_absorption_counts_on_a_hand_built_case():
    d = 6
    e = torch.eye(d)
    parent_dir, child1_dir, child2_dir = e[0], e[1], e[2]
    truth = torch.stack([parent_dir, child1_dir, child2_dir])  # F = 3
    parent_of = torch.tensor([-1, 0, 0])
    absorbing = (parent_dir + child1_dir) / math.sqrt(2.0)  # cos 0.71 with the parent: carrier
    weak = 0.2 * parent_dir + e[3]  # cos 0.196 with the parent: below 0.3, not a carrier
    W = torch.stack(
        [
            3.0 * child2_dir,  # latent 0: child 2
            2.0 * absorbing,  # latent 1: absorbs the parent into child 1
            0.5 * weak,  # latent 2: weak parent component
            0.9 * parent_dir + 0.1 * e[4],  # latent 3: the parent latent (largest cos)
            -4.0 * parent_dir,  # latent 4: writes minus the parent, cos -1: neither
        ]
    )
    PARENT_LATENT, ABSORBING, CHILD2, WEAK, ANTI = 3, 1, 0, 2, 4

    def token(features, firing):
        c = [0.0, 0.0, 0.0]
        for f in features:
            c[f] = 1.0
        z = [0.0] * 5
        for m, value in firing.items():
            z[m] = value
        return c, z

    tokens = [
        token([0, 1], {ABSORBING: 1.0}),  # absorbed
        token([0, 1], {ABSORBING: 0.7, WEAK: 0.2}),  # absorbed
        token([0, 1], {ABSORBING: 1.0, PARENT_LATENT: 0.5}),  # parent fires: not absorbed
        token([0, 1], {PARENT_LATENT: 1.0}),  # not absorbed
        token([0, 1], {PARENT_LATENT: 1.0, ANTI: 1.0}),  # not absorbed
        token([0, 1], {}),  # nothing fires: not absorbed
        token([0, 2], {CHILD2: 1.0}),  # parent silent, no carrier: not absorbed
        token([0, 2], {CHILD2: 1.0, ANTI: 1.0}),  # a row against the parent carries nothing
        token([0, 2], {CHILD2: 1.0, WEAK: 1.0}),  # weak row is no carrier: not absorbed
        token([0, 2], {CHILD2: 1.0, PARENT_LATENT: 1.0}),  # not absorbed
        token([0, 2], {ABSORBING: 1.0}),  # a carrier fires, parent silent: absorbed
        token([0], {ABSORBING: 1.0}),  # no child active: not a pair
        token([], {ABSORBING: 1.0}),  # nothing active: not a pair
    ]
    coefficients = torch.tensor([c for c, _ in tokens])
    z = torch.tensor([z for _, z in tokens])
    absorbed, total = absorption_counts(truth, parent_of, coefficients, z, W)
    assert (absorbed, total) == (3, 11)
    # A stricter carrier threshold (above 0.71) leaves no carrier.
    assert absorption_counts(truth, parent_of, coefficients, z, W, carry_threshold=0.8) == (0, 11)


def test_absorption_needs_hierarchical_data():
    truth = torch.eye(3)
    with pytest.raises(ValueError, match="hierarch"):
        absorption_counts(
            truth, torch.full((3,), -1), torch.ones(2, 3), torch.ones(2, 3), torch.eye(3)
        )
