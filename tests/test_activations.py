"""Specification tests of the activations (DESIGN.md, section Activations σ).

Forward values against plain per-entry references; custom backwards against the DESIGN.md
formulas in float64, entry by entry; gradcheck where the function is smooth.
"""

from __future__ import annotations

import math

import pytest
import torch

from saekit.activations import (
    BatchTopK,
    JumpReLU,
    ProLU,
    ReLU,
    SparseCode,
    TopK,
    jumprelu,
    step,
    topk_code,
)

F64 = torch.float64


def rectangle(u: float) -> float:
    """K(u) = 1[|u| < ½]."""
    return 1.0 if abs(u) < 0.5 else 0.0


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def near_threshold(
    shape: tuple[int, ...], theta: list[float], eps: float, seed: int
) -> torch.Tensor:
    """pre = θ + ε·u with u drawn from offsets inside, outside and on both sides of the kernel
    window (never on its edge |u| = ½), so every branch of the straight-through estimate is hit."""
    offsets = torch.tensor([-3.0, -0.8, -0.45, -0.2, -0.05, 0.1, 0.3, 0.49, 0.7, 4.0], dtype=F64)
    g = torch.Generator().manual_seed(seed)
    u = offsets[torch.randint(len(offsets), shape, generator=g)]
    return torch.tensor(theta, dtype=F64) + eps * u


def rows(t: torch.Tensor) -> list[list[float]]:
    return t.reshape(-1, t.shape[-1]).tolist()


def close64(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=1e-12, atol=1e-12)


SHAPES = {"2d": (6, 4), "3d": (2, 3, 4)}
THETA = [0.2, 0.5, 1.3, 0.05]
EPS = 0.1


# ------------------------------------------------------------------------------ ReLU


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_relu_forward_and_gradcheck(shape):
    pre = randn(*shape, seed=0)
    pre = torch.where(pre.abs() < 0.1, pre + 0.3, pre).requires_grad_(True)  # away from the kink
    expected = [[max(p, 0.0) for p in row] for row in rows(pre)]
    close64(ReLU(4)(pre), torch.tensor(expected, dtype=F64).reshape(shape))
    assert torch.autograd.gradcheck(ReLU(4), (pre,))


# ------------------------------------------------------------------------------ TopK


def test_topk_keeps_exactly_k_per_token_the_sort_based_set_relu_d():
    N, M, k = 7, 10, 4
    pre = randn(N, M, seed=1)
    pre[2] = -pre[2].abs() - 0.1  # a token with no positive pre-activation
    pre[3] = -pre[3].abs() - 0.1  # and one with a single positive entry, fewer than k
    pre[3, 5] = 0.7
    code = TopK(M, k)(pre)
    assert isinstance(code, SparseCode)
    assert code.n_tokens == N and code.d_sae == M
    assert code.values.numel() == code.latent.numel() == code.token.numel() == N * k
    for n, row in enumerate(pre.tolist()):
        kept = sorted(range(M), key=lambda i: row[i], reverse=True)[:k]
        mask = code.token == n
        assert int(mask.sum()) == k
        assert sorted(code.latent[mask].tolist()) == sorted(kept)
        by_latent = dict(zip(code.latent[mask].tolist(), code.values[mask].tolist(), strict=True))
        for i in kept:
            assert by_latent[i] == max(row[i], 0.0)
    assert (code.values >= 0).all()
    assert not code.to_dense()[2].any()  # ReLU'd: the kept entries of token 2 are all 0
    assert int((code.to_dense()[3] != 0).sum()) == 1


def test_topk_code_is_sorted_by_token():
    code = topk_code(randn(5, 9, seed=2), 3)
    assert (code.token[1:] >= code.token[:-1]).all()


def test_topk_gradcheck_away_from_ties():
    N, M, k = 4, 8, 3
    g = torch.Generator().manual_seed(3)
    # distinct values with gaps of 0.25, the k-th largest positive: no tie, no ReLU kink nearby
    levels = torch.linspace(-0.9, 0.85, M, dtype=F64)
    pre = torch.stack([levels[torch.randperm(M, generator=g)] for _ in range(N)])
    pre.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda p: TopK(M, k)(p).to_dense(), (pre,))


# ------------------------------------------------------------------------------ BatchTopK


def test_batchtopk_training_keeps_the_k_times_N_largest_over_the_batch():
    N, M, k = 6, 10, 2
    pre = randn(N, M, seed=4)
    pre[0] += 3.0  # token 0 dominates: it must take more than k, others fewer
    act = BatchTopK(M, k).train()
    code = act(pre)
    assert isinstance(code, SparseCode)
    assert code.values.numel() == k * N  # nnz == k·N
    assert code.n_tokens == N and code.d_sae == M
    flat = sorted(
        ((n, i) for n in range(N) for i in range(M)), key=lambda ni: pre[ni].item(), reverse=True
    )
    expected = {ni: max(pre[ni].item(), 0.0) for ni in flat[: k * N]}
    kept = zip(code.token.tolist(), code.latent.tolist(), strict=True)
    got = dict(zip(kept, code.values.tolist(), strict=True))
    assert got == expected
    assert (code.token[1:] >= code.token[:-1]).all()  # CSR order
    counts = torch.bincount(code.token, minlength=N)
    assert counts[0] > k and counts.min() < k  # a batch budget, not a per-token one


def test_batchtopk_training_relus_kept_negative_values():
    N, M, k = 3, 5, 2
    pre = -randn(N, M, seed=5).abs()
    pre[1, 3] = 0.4  # a single positive entry; the other k·N − 1 kept entries are ReLU'd to 0
    code = BatchTopK(M, k).train()(pre)
    assert code.values.numel() == k * N
    dense = code.to_dense()
    assert float(dense[1, 3]) == 0.4 and int((dense != 0).sum()) == 1
    assert (code.values >= 0).all()


def test_batchtopk_training_gradcheck_away_from_ties():
    N, M, k = 3, 6, 2
    g = torch.Generator().manual_seed(6)
    levels = torch.linspace(-1.0, 1.0, N * M, dtype=F64)
    pre = levels[torch.randperm(N * M, generator=g)].reshape(N, M).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda p: BatchTopK(M, k).train()(p).to_dense(), (pre,))


@pytest.mark.parametrize("theta", [0.0, 0.3, 1.1])
def test_batchtopk_eval_applies_the_threshold(theta):
    N, M = 8, 10
    act = BatchTopK(M, 2)
    act.threshold.fill_(theta)
    act.threshold_initialized.fill_(True)
    act.eval()
    pre = randn(N, M, seed=7)
    z = act(pre)
    expected = [[p if p > theta else 0.0 for p in row] for row in pre.tolist()]
    close64(z, torch.tensor(expected, dtype=F64))


def test_batchtopk_update_threshold_follows_the_ema_rule():
    beta = 0.9
    act = BatchTopK(10, 2, threshold_beta=beta)
    theta, initialized = float(act.threshold), False
    assert theta == 0.0
    for m in [math.inf, 0.5, 0.2, math.inf, 0.8, 0.1]:
        act.update_threshold(torch.tensor(m))
        if math.isfinite(m):  # an inf batch-min leaves θ unchanged
            theta = beta * theta + (1 - beta) * m if initialized else m
            initialized = True
        assert float(act.threshold) == pytest.approx(theta, rel=1e-6, abs=1e-12), m
        assert bool(act.threshold_initialized) == initialized
    assert theta != pytest.approx(0.1)  # the sequence really was averaged


def test_batchtopk_first_update_sets_theta_to_m_not_an_average_with_zero():
    act = BatchTopK(10, 2, threshold_beta=0.999)
    act.update_threshold(torch.tensor(0.42))
    assert float(act.threshold) == pytest.approx(0.42, rel=1e-6)


def test_batch_min_positive_is_the_smallest_positive_kept_value():
    values = torch.tensor([0.0, 0.7, 0.25, 0.0, 1.5, 0.3], dtype=F64)
    code = SparseCode(values, torch.arange(6), torch.tensor([0, 0, 1, 1, 2, 2]), 3, 6)
    assert float(BatchTopK.batch_min_positive(code)) == 0.25
    zeros = SparseCode(torch.zeros(4, dtype=F64), torch.arange(4), torch.arange(4), 4, 4)
    assert float(BatchTopK.batch_min_positive(zeros)) == math.inf


def test_batch_min_positive_on_a_training_batch():
    N, M, k = 5, 8, 3
    pre = randn(N, M, seed=8)
    code = BatchTopK(M, k).train()(pre)
    flat = sorted(pre.reshape(-1).tolist(), reverse=True)[: k * N]
    assert float(BatchTopK.batch_min_positive(code)) == min(v for v in flat if v > 0)


# ------------------------------------------------------------------------------ JumpReLU


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_jumprelu_forward_and_backward_match_design_formulas(shape):
    pre = near_threshold(shape, THETA, EPS, seed=9).requires_grad_(True)
    theta = torch.tensor(THETA, dtype=F64, requires_grad=True)
    g = randn(*shape, seed=10)
    z = jumprelu(pre, theta, EPS)
    grad_pre, grad_theta = torch.autograd.grad(z, (pre, theta), g)

    P, G = rows(pre), rows(g)
    M = len(THETA)
    z_ref = [[P[n][i] if P[n][i] > THETA[i] else 0.0 for i in range(M)] for n in range(len(P))]
    dpre_ref = [[G[n][i] if P[n][i] > THETA[i] else 0.0 for i in range(M)] for n in range(len(P))]
    dtheta_ref = [
        sum(
            -(THETA[i] / EPS) * rectangle((P[n][i] - THETA[i]) / EPS) * G[n][i]
            for n in range(len(P))
        )
        for i in range(M)
    ]
    close64(z, torch.tensor(z_ref, dtype=F64).reshape(shape))
    close64(grad_pre, torch.tensor(dpre_ref, dtype=F64).reshape(shape))
    close64(grad_theta, torch.tensor(dtheta_ref, dtype=F64))
    assert all(v != 0 for v in dtheta_ref)  # every latent has entries inside the window


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_jumprelu_log_threshold_gradient_includes_the_chain_rule_factor(shape):
    """∂/∂log θ = θ·∂/∂θ = −(θ²/ε)·K((pre − θ)/ε)·g, summed over tokens."""
    M = len(THETA)
    act = JumpReLU(M, init_threshold=0.01, bandwidth=EPS).double()
    with torch.no_grad():
        act.log_threshold.copy_(torch.tensor(THETA, dtype=F64).log())
    theta = [math.exp(t) for t in act.log_threshold.tolist()]
    pre = near_threshold(shape, theta, EPS, seed=11)
    g = randn(*shape, seed=12)
    (act(pre) * g).sum().backward()

    P, G = rows(pre), rows(g)
    expected = [
        sum(
            -(theta[i] ** 2 / EPS) * rectangle((P[n][i] - theta[i]) / EPS) * G[n][i]
            for n in range(len(P))
        )
        for i in range(M)
    ]
    close64(act.log_threshold.grad, torch.tensor(expected, dtype=F64))
    forgot_chain_rule = [e / t for e, t in zip(expected, theta, strict=True)]
    assert not torch.allclose(act.log_threshold.grad, torch.tensor(forgot_chain_rule, dtype=F64))


def test_jumprelu_module_forward_uses_exp_of_log_threshold():
    act = JumpReLU(4, init_threshold=0.25, bandwidth=0.01).double()
    assert act.threshold.tolist() == pytest.approx([0.25] * 4)
    pre = torch.tensor([[0.1, 0.24, 0.26, -1.0], [0.3, 0.2, 5.0, 0.25001]], dtype=F64)
    expected = torch.tensor([[0.0, 0.0, 0.26, 0.0], [0.3, 0.0, 5.0, 0.25001]], dtype=F64)
    close64(act(pre), expected)


# ------------------------------------------------------------------------------ step (L0)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_step_forward_and_backward_match_design_formulas(shape):
    pre = near_threshold(shape, THETA, EPS, seed=13).requires_grad_(True)
    theta = torch.tensor(THETA, dtype=F64, requires_grad=True)
    g = randn(*shape, seed=14)
    h = step(pre, theta, EPS)
    (h * g).sum().backward()

    P, G = rows(pre), rows(g)
    M = len(THETA)
    h_ref = [[1.0 if P[n][i] > THETA[i] else 0.0 for i in range(M)] for n in range(len(P))]
    dtheta_ref = [
        sum(-(1.0 / EPS) * rectangle((P[n][i] - THETA[i]) / EPS) * G[n][i] for n in range(len(P)))
        for i in range(M)
    ]
    close64(h, torch.tensor(h_ref, dtype=F64).reshape(shape))
    close64(theta.grad, torch.tensor(dtheta_ref, dtype=F64))
    assert pre.grad is None  # no gradient to pre


# ------------------------------------------------------------------------------ ProLU


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("variant", ["ste", "relu"])
def test_prolu_forward_and_backward_match_design_formulas(variant, shape):
    M = shape[-1]
    act = ProLU(M, variant).double()
    b = [0.5, -0.4, 0.0, -1.5]
    with torch.no_grad():
        act.bias.copy_(torch.tensor(b, dtype=F64))
    m = (1.2 * randn(*shape, seed=15)).requires_grad_(True)
    g = randn(*shape, seed=16)
    z = act(m)
    grad_m, grad_b = torch.autograd.grad(z, (m, act.bias), g)

    Ms, G = rows(m), rows(g)
    n_tok = len(Ms)
    gate = [
        [1.0 if Ms[n][i] + b[i] > 0 and Ms[n][i] > 0 else 0.0 for i in range(M)]
        for n in range(n_tok)
    ]
    z_ref = [[Ms[n][i] * gate[n][i] for i in range(M)] for n in range(n_tok)]
    if variant == "relu":
        dm_ref = [[G[n][i] * gate[n][i] for i in range(M)] for n in range(n_tok)]
        db_ref = [sum(G[n][i] * gate[n][i] for n in range(n_tok)) for i in range(M)]
    else:
        dm_ref = [[G[n][i] * gate[n][i] * (1 + Ms[n][i]) for i in range(M)] for n in range(n_tok)]
        db_ref = [sum(G[n][i] * gate[n][i] * Ms[n][i] for n in range(n_tok)) for i in range(M)]
    close64(z, torch.tensor(z_ref, dtype=F64).reshape(shape))
    close64(grad_m, torch.tensor(dm_ref, dtype=F64).reshape(shape))
    close64(grad_b, torch.tensor(db_ref, dtype=F64))
    # the bias gate really bites: some positive m are cut by m + b ≤ 0
    assert any(Ms[n][i] > 0 and gate[n][i] == 0 for n in range(n_tok) for i in range(M))


# ------------------------------------------------------------------------------ SparseCode


def test_sparse_code_to_dense_equals_the_dense_reference():
    N, M = 4, 6
    token = torch.tensor([0, 0, 1, 3, 3, 3])
    latent = torch.tensor([5, 1, 1, 0, 2, 4])
    values = torch.tensor([0.5, -1.25, 2.0, 0.0, 3.5, 0.75], dtype=F64)
    expected = [[0.0] * M for _ in range(N)]
    for v, i, n in zip(values.tolist(), latent.tolist(), token.tolist(), strict=True):
        expected[n][i] += v
    code = SparseCode(values, latent, token, N, M)
    dense = code.to_dense()
    assert dense.shape == (N, M) and dense.dtype == F64
    close64(dense, torch.tensor(expected, dtype=F64))


def test_sparse_code_to_dense_is_differentiable_in_values():
    token, latent = torch.tensor([0, 1, 1, 2]), torch.tensor([2, 0, 3, 3])
    values = randn(4, seed=17).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda v: SparseCode(v, latent, token, 3, 4).to_dense(), (values,)
    )
