"""Specification tests of the activations (docs/design.md, section Activations σ).

Forward values against plain per-entry references; custom backwards against the design formulas
in float64, entry by entry; gradcheck where the function is smooth. An activation encodes
``x_n`` through its SAE's encoder, so the module tests use an SAE whose encoder is the identity
(d_in = M, W_enc = I, zero biases, s = 1): the pre-activations it sees are exactly the ones given.
The TopK family runs on both training paths: kernel "torch" (sparse) and "reference" (dense).
"""

from __future__ import annotations

import math

import pytest
import torch

from saekit.activations import ACTIVATIONS
from saekit.activations.abstopk import AbsTopK, AbsTopKConfig
from saekit.activations.batchtopk import BatchTopK, BatchTopKConfig, batch_min_positive
from saekit.activations.gated import Gated, GatedConfig
from saekit.activations.hierarchical_topk import HierarchicalTopK, HierarchicalTopKConfig
from saekit.activations.jumprelu import JumpReLU, JumpReLUConfig, jumprelu, step
from saekit.activations.matching_pursuit import MatchingPursuit, MatchingPursuitConfig
from saekit.activations.prolu import ProLU, ProLUConfig, prolu
from saekit.activations.relu import ReLU, ReLUConfig
from saekit.activations.topk import TopK, TopKConfig
from saekit.core.comm import LocalComm
from saekit.core.encoding import Encoding, Preacts, SparseCode, as_dense
from saekit.model.config import SAEConfig
from saekit.model.sae import SAE

F64 = torch.float64
KERNELS = ["torch", "reference"]


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


def identity_sae(activation, d_sae: int, training: bool = True) -> SAE:
    """An SAE whose pre-activations are its input: W_enc = W_dec = I, b_enc = b_dec = 0, s = 1."""
    sae = SAE(SAEConfig(d_in=d_sae, d_sae=d_sae, activation=activation, dtype="float64"))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(d_sae))
        sae.W_dec.copy_(torch.eye(d_sae))
    return sae.train(training)


def encode(sae: SAE, pre: torch.Tensor) -> Encoding:
    return sae.activation.encode(sae.encoder_view(), pre)


SHAPES = {"2d": (6, 4), "3d": (2, 3, 4)}
THETA = [0.2, 0.5, 1.3, 0.05]
EPS = 0.1


# ------------------------------------------------------------------------------ registry, flags

FLAGS = {  # kind: (unit_norm_decoder, revival_signals, needs_penalty, uses_encoder_bias)
    "relu": (False, set(), True, True),
    "topk": (True, {"auxk", "preact"}, False, True),
    "batchtopk": (True, {"auxk", "preact"}, False, True),
    "jumprelu": (False, {"preact"}, False, True),
    "prolu": (False, set(), True, False),
    "abstopk": (True, {"preact"}, False, True),
    "gated": (False, set(), True, True),
    "matching_pursuit": (True, {"auxk"}, False, False),
    "hierarchical_topk": (True, {"auxk", "preact"}, False, True),
}


def test_registry_holds_every_kind_once_with_its_config():
    assert set(ACTIVATIONS) == set(FLAGS)
    expected = {
        "relu": (ReLU, ReLUConfig),
        "topk": (TopK, TopKConfig),
        "batchtopk": (BatchTopK, BatchTopKConfig),
        "jumprelu": (JumpReLU, JumpReLUConfig),
        "prolu": (ProLU, ProLUConfig),
        "abstopk": (AbsTopK, AbsTopKConfig),
        "gated": (Gated, GatedConfig),
        "matching_pursuit": (MatchingPursuit, MatchingPursuitConfig),
        "hierarchical_topk": (HierarchicalTopK, HierarchicalTopKConfig),
    }
    for kind, cls in ACTIVATIONS.items():
        assert (cls, cls.config_class) == expected[kind]
        assert cls.config_class.kind == kind


@pytest.mark.parametrize("kind", FLAGS)
def test_flags_follow_the_design(kind):
    unit_norm, signals, needs_penalty, uses_b_enc = FLAGS[kind]
    cls = ACTIVATIONS[kind]
    assert cls.unit_norm_decoder is unit_norm
    assert set(cls.revival_signals) == signals
    assert cls.needs_penalty is needs_penalty
    assert cls.uses_encoder_bias is uses_b_enc


@pytest.mark.parametrize("kind", ["relu", "topk", "batchtopk", "prolu"])
def test_only_jumprelu_has_an_l0_step(kind):
    activation = {"kind": kind, "k": 2} if "topk" in kind else kind
    sae = identity_sae(activation, 4)
    with pytest.raises(NotImplementedError, match="no thresholds"):
        sae.activation.l0_step(Preacts(randn(3, 4, seed=0)))


@pytest.mark.parametrize("kind", ["relu", "prolu"])
def test_relu_and_prolu_have_no_firing_threshold(kind):
    sae = identity_sae(kind, 4)
    with pytest.raises(NotImplementedError, match="no firing threshold"):
        sae.activation.firing_threshold(encode(sae, randn(3, 4, seed=0)))


# ------------------------------------------------------------------------------ ReLU


def test_relu_forward_and_gradcheck():
    pre = randn(6, 4, seed=0)
    pre = torch.where(pre.abs() < 0.1, pre + 0.3, pre).requires_grad_(True)  # away from the kink
    sae = identity_sae("relu", 4)
    expected = [[max(p, 0.0) for p in row] for row in rows(pre)]
    enc = encode(sae, pre)
    close64(enc.latents, torch.tensor(expected, dtype=F64))
    close64(enc.preacts.dense(), pre)
    assert torch.autograd.gradcheck(lambda p: encode(sae, p).latents, (pre,))


# ------------------------------------------------------------------------------ TopK


def topk_reference(pre: torch.Tensor, k: int) -> list[list[float]]:
    """ReLU of each token's k largest, by a sort of each row."""
    out = []
    for row in pre.tolist():
        kept = sorted(range(len(row)), key=lambda i: row[i], reverse=True)[:k]
        out.append([max(row[i], 0.0) if i in kept else 0.0 for i in range(len(row))])
    return out


@pytest.mark.parametrize("kernel", KERNELS)
def test_topk_keeps_exactly_k_per_token_the_sort_based_set_relu_d(kernel):
    N, M, k = 7, 10, 4
    pre = randn(N, M, seed=1)
    pre[2] = -pre[2].abs() - 0.1  # a token with no positive pre-activation
    pre[3] = -pre[3].abs() - 0.1  # and one with a single positive entry, fewer than k
    pre[3, 5] = 0.7
    enc = encode(identity_sae({"kind": "topk", "k": k, "kernel": kernel}, M), pre)
    z = as_dense(enc.latents)
    close64(z, torch.tensor(topk_reference(pre, k), dtype=F64))
    assert not z[2].any()  # ReLU'd: the kept entries of token 2 are all 0
    assert int((z[3] != 0).sum()) == 1
    close64(enc.preacts.detached, pre)
    if kernel == "reference":  # dense latents, as the formula reads
        assert isinstance(enc.latents, torch.Tensor) and enc.latents.shape == (N, M)
        return
    code = enc.latents
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


def test_topk_code_is_sorted_by_token_and_carries_its_layout():
    sae = identity_sae({"kind": "topk", "k": 3}, 9)
    code = encode(sae, randn(5, 9, seed=2)).latents
    assert (code.token[1:] >= code.token[:-1]).all()
    assert torch.equal(code.layout.token, code.token)
    assert torch.equal(code.layout.latent, code.latent)


@pytest.mark.parametrize("kernel", KERNELS)
def test_topk_gradcheck_away_from_ties(kernel):
    N, M, k = 4, 8, 3
    g = torch.Generator().manual_seed(3)
    # distinct values with gaps of 0.25, the k-th largest positive: no tie, no ReLU kink nearby
    levels = torch.linspace(-0.9, 0.85, M, dtype=F64)
    pre = torch.stack([levels[torch.randperm(M, generator=g)] for _ in range(N)])
    pre.requires_grad_(True)
    sae = identity_sae({"kind": "topk", "k": k, "kernel": kernel}, M)
    assert torch.autograd.gradcheck(lambda p: as_dense(encode(sae, p).latents), (pre,))


def test_topk_firing_threshold_is_each_tokens_smallest_kept_value_relud():
    N, M, k = 5, 7, 3
    pre = randn(N, M, seed=18)
    pre[1] = -pre[1].abs() - 0.2  # no positive entry: θ = 0 for that token
    for kernel in KERNELS:
        sae = identity_sae({"kind": "topk", "k": k, "kernel": kernel}, M)
        theta = sae.activation.firing_threshold(encode(sae, pre))
        expected = [[max(sorted(row, reverse=True)[k - 1], 0.0)] for row in pre.tolist()]
        assert theta.shape == (N, 1)
        close64(theta, torch.tensor(expected, dtype=F64))
        assert float(theta[1, 0]) == 0.0


# ------------------------------------------------------------------------------ BatchTopK


def batchtopk_reference(pre: torch.Tensor, k: int) -> dict[tuple[int, int], float]:
    """(token, latent) -> ReLU(pre) of the k·N largest entries of the whole batch."""
    N, M = pre.shape
    flat = sorted(
        ((n, i) for n in range(N) for i in range(M)), key=lambda ni: pre[ni].item(), reverse=True
    )
    return {ni: max(pre[ni].item(), 0.0) for ni in flat[: k * N]}


@pytest.mark.parametrize("kernel", KERNELS)
def test_batchtopk_training_keeps_the_k_times_N_largest_over_the_batch(kernel):
    N, M, k = 6, 10, 2
    pre = randn(N, M, seed=4)
    pre[0] += 3.0  # token 0 dominates: it must take more than k, others fewer
    enc = encode(identity_sae({"kind": "batchtopk", "k": k, "kernel": kernel}, M), pre)
    expected = batchtopk_reference(pre, k)
    dense = torch.zeros(N, M, dtype=F64)
    for (n, i), v in expected.items():
        dense[n, i] = v
    close64(as_dense(enc.latents), dense)
    counts = torch.bincount(torch.tensor([n for n, _ in expected]), minlength=N)
    assert counts[0] > k and counts.min() < k  # a batch budget, not a per-token one
    if kernel == "reference":
        assert isinstance(enc.latents, torch.Tensor)
        return
    code = enc.latents
    assert isinstance(code, SparseCode)
    assert code.values.numel() == k * N  # nnz == k·N
    assert code.n_tokens == N and code.d_sae == M
    kept = zip(code.token.tolist(), code.latent.tolist(), strict=True)
    assert dict(zip(kept, code.values.tolist(), strict=True)) == expected
    assert (code.token[1:] >= code.token[:-1]).all()  # CSR order


@pytest.mark.parametrize("kernel", KERNELS)
def test_batchtopk_training_relus_kept_negative_values(kernel):
    N, M, k = 3, 5, 2
    pre = -randn(N, M, seed=5).abs()
    pre[1, 3] = 0.4  # a single positive entry; the other k·N − 1 kept entries are ReLU'd to 0
    latents = encode(identity_sae({"kind": "batchtopk", "k": k, "kernel": kernel}, M), pre).latents
    dense = as_dense(latents).detach()
    assert float(dense[1, 3]) == 0.4 and int((dense != 0).sum()) == 1
    assert (dense >= 0).all()
    if kernel == "torch":
        assert latents.values.numel() == k * N


@pytest.mark.parametrize("kernel", KERNELS)
def test_batchtopk_training_gradcheck_away_from_ties(kernel):
    N, M, k = 3, 6, 2
    g = torch.Generator().manual_seed(6)
    levels = torch.linspace(-1.0, 1.0, N * M, dtype=F64)
    pre = levels[torch.randperm(N * M, generator=g)].reshape(N, M).requires_grad_(True)
    sae = identity_sae({"kind": "batchtopk", "k": k, "kernel": kernel}, M)
    assert torch.autograd.gradcheck(lambda p: as_dense(encode(sae, p).latents), (pre,))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("theta", [0.0, 0.3, 1.1])
def test_batchtopk_eval_applies_the_threshold(theta, kernel):
    N, M = 8, 10
    sae = identity_sae({"kind": "batchtopk", "k": 2, "kernel": kernel}, M, training=False)
    sae.activation.threshold.fill_(theta)
    sae.activation.threshold_initialized.fill_(True)
    pre = randn(N, M, seed=7)
    z = as_dense(encode(sae, pre).latents)
    expected = [[p if p > theta else 0.0 for p in row] for row in pre.tolist()]
    close64(z, torch.tensor(expected, dtype=F64))


def make_batchtopk(beta: float, d_sae: int = 10) -> BatchTopK:
    return BatchTopK(BatchTopKConfig(k=2, threshold_beta=beta), d_sae)


def test_batchtopk_update_threshold_follows_the_ema_rule():
    beta = 0.9
    act = make_batchtopk(beta)
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
    act = make_batchtopk(0.999)
    act.update_threshold(torch.tensor(0.42))
    assert float(act.threshold) == pytest.approx(0.42, rel=1e-6)


class OtherRanks(LocalComm):
    """A data-parallel comm whose other rank saw batch minimum ``other``."""

    world_size = 2

    def __init__(self, other: float):
        self.other = other
        self.calls = 0

    def all_reduce(self, x: torch.Tensor, op="sum", what="tensor") -> torch.Tensor:
        assert op == "min"
        self.calls += 1
        return x.copy_(torch.minimum(x, torch.tensor(self.other, dtype=x.dtype)))


@pytest.mark.parametrize("kernel", KERNELS)
def test_batchtopk_after_step_updates_theta_in_training_only(kernel):
    N, M, k, beta = 5, 8, 3, 0.9
    pre = randn(N, M, seed=19)
    sae = identity_sae({"kind": "batchtopk", "k": k, "kernel": kernel, "threshold_beta": beta}, M)
    act = sae.activation
    m = min(v for v in sorted(pre.reshape(-1).tolist(), reverse=True)[: k * N] if v > 0)

    act.after_step(encode(sae, pre), LocalComm())  # one process: θ = m
    assert float(act.threshold) == m and bool(act.threshold_initialized)

    ranks = OtherRanks(other=m / 4)  # another rank saw a smaller minimum: θ follows it
    act.after_step(encode(sae, pre), ranks)
    assert ranks.calls == 1
    assert float(act.threshold) == pytest.approx(beta * m + (1 - beta) * m / 4, rel=1e-12)

    sae.eval()
    before = float(act.threshold)
    act.after_step(encode(sae, pre), OtherRanks(other=0.001))
    assert float(act.threshold) == before


@pytest.mark.parametrize("kind", ["relu", "topk", "jumprelu", "prolu"])
def test_after_step_changes_no_other_activations_state(kind):
    activation = {"kind": kind, "k": 2} if kind == "topk" else kind
    sae = identity_sae(activation, 6)
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    sae.activation.after_step(encode(sae, randn(4, 6, seed=20)), LocalComm())
    for name, value in sae.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_batch_min_positive_is_the_smallest_positive_kept_value():
    values = torch.tensor([0.0, 0.7, 0.25, 0.0, 1.5, 0.3], dtype=F64)
    code = SparseCode(values, torch.arange(6), torch.tensor([0, 0, 1, 1, 2, 2]), 3, 6)
    assert float(batch_min_positive(code)) == 0.25
    assert float(batch_min_positive(code.to_dense())) == 0.25  # dense latents too
    zeros = SparseCode(torch.zeros(4, dtype=F64), torch.arange(4), torch.arange(4), 4, 4)
    assert float(batch_min_positive(zeros)) == math.inf


@pytest.mark.parametrize("kernel", KERNELS)
def test_batch_min_positive_and_firing_threshold_on_a_training_batch(kernel):
    N, M, k = 5, 8, 3
    pre = randn(N, M, seed=8)
    sae = identity_sae({"kind": "batchtopk", "k": k, "kernel": kernel}, M)
    enc = encode(sae, pre)
    flat = sorted(pre.reshape(-1).tolist(), reverse=True)[: k * N]
    m = min(v for v in flat if v > 0)
    assert float(batch_min_positive(enc.latents)) == m
    assert float(sae.activation.firing_threshold(enc)) == m
    # no positive kept value: the firing threshold is 0, not inf
    enc = encode(sae, -pre.abs() - 0.1)
    assert float(sae.activation.firing_threshold(enc)) == 0.0


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


def jumprelu_sae(theta: list[float], init: float = 0.01) -> SAE:
    cfg = {"kind": "jumprelu", "init_threshold": init, "bandwidth": EPS, "threshold_param": "log"}
    sae = identity_sae(cfg, len(theta))
    with torch.no_grad():
        sae.activation.log_threshold.copy_(torch.tensor(theta, dtype=F64).log())
    return sae


def test_jumprelu_log_threshold_gradient_includes_the_chain_rule_factor():
    """∂/∂log θ = θ·∂/∂θ = −(θ²/ε)·K((pre − θ)/ε)·g, summed over tokens."""
    M = len(THETA)
    sae = jumprelu_sae(THETA)
    act = sae.activation
    theta = [math.exp(t) for t in act.log_threshold.tolist()]
    pre = near_threshold((6, M), theta, EPS, seed=11)
    g = randn(6, M, seed=12)
    (encode(sae, pre).latents * g).sum().backward()

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


def test_jumprelu_module_starts_at_init_threshold_and_forwards_with_exp_of_log_threshold():
    sae = identity_sae({"kind": "jumprelu", "init_threshold": 0.25, "bandwidth": 0.01}, 4)
    assert sae.activation.threshold.tolist() == pytest.approx([0.25] * 4)
    pre = torch.tensor([[0.1, 0.24, 0.26, -1.0], [0.3, 0.2, 5.0, 0.25001]], dtype=F64)
    expected = torch.tensor([[0.0, 0.0, 0.26, 0.0], [0.3, 0.0, 5.0, 0.25001]], dtype=F64)
    close64(encode(sae, pre).latents, expected)
    theta = sae.activation.firing_threshold(encode(sae, pre))
    assert not theta.requires_grad
    assert theta.tolist() == pytest.approx([0.25] * 4)  # θ, per latent


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


def test_jumprelu_l0_step_reaches_log_threshold_through_the_chain_rule():
    """l0_step(pre) = H(pre − θ); ∂/∂log θ = −(θ/ε)·K((pre − θ)/ε)·g, summed over tokens."""
    M = len(THETA)
    sae = jumprelu_sae(THETA)
    pre = near_threshold((2, 3, M), THETA, EPS, seed=21).requires_grad_(True)
    g = randn(2, 3, M, seed=22)
    h = sae.activation.l0_step(Preacts(pre))
    (h * g).sum().backward()
    P, G = rows(pre), rows(g)
    h_ref = [[1.0 if P[n][i] > THETA[i] else 0.0 for i in range(M)] for n in range(len(P))]
    dlog_ref = [
        sum(-(THETA[i] / EPS) * rectangle((P[n][i] - THETA[i]) / EPS) * G[n][i] for n in range(6))
        for i in range(M)
    ]
    close64(h, torch.tensor(h_ref, dtype=F64).reshape(2, 3, M))
    close64(sae.activation.log_threshold.grad, torch.tensor(dlog_ref, dtype=F64))
    assert pre.grad is None


# ------------------------------------------------------------------------------ ProLU


def prolu_reference(Ms, G, b, variant):
    M, n_tok = len(b), len(Ms)
    gate = [
        [1.0 if Ms[n][i] + b[i] > 0 and Ms[n][i] > 0 else 0.0 for i in range(M)]
        for n in range(n_tok)
    ]
    z = [[Ms[n][i] * gate[n][i] for i in range(M)] for n in range(n_tok)]
    if variant == "relu":
        dm = [[G[n][i] * gate[n][i] for i in range(M)] for n in range(n_tok)]
        db = [sum(G[n][i] * gate[n][i] for n in range(n_tok)) for i in range(M)]
    else:
        dm = [[G[n][i] * gate[n][i] * (1 + Ms[n][i]) for i in range(M)] for n in range(n_tok)]
        db = [sum(G[n][i] * gate[n][i] * Ms[n][i] for n in range(n_tok)) for i in range(M)]
    return gate, z, dm, db


PROLU_BIAS = [0.5, -0.4, 0.0, -1.5]


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("variant", ["ste", "relu"])
def test_prolu_forward_and_backward_match_design_formulas(variant, shape):
    bias = torch.tensor(PROLU_BIAS, dtype=F64, requires_grad=True)
    m = (1.2 * randn(*shape, seed=15)).requires_grad_(True)
    g = randn(*shape, seed=16)
    z = prolu(m, bias, variant)
    grad_m, grad_b = torch.autograd.grad(z, (m, bias), g)

    gate, z_ref, dm_ref, db_ref = prolu_reference(rows(m), rows(g), PROLU_BIAS, variant)
    close64(z, torch.tensor(z_ref, dtype=F64).reshape(shape))
    close64(grad_m, torch.tensor(dm_ref, dtype=F64).reshape(shape))
    close64(grad_b, torch.tensor(db_ref, dtype=F64))
    # the bias gate really bites: some positive m are cut by m + b ≤ 0
    Ms = rows(m)
    assert any(Ms[n][i] > 0 and gate[n][i] == 0 for n in range(len(Ms)) for i in range(4))


@pytest.mark.parametrize("variant", ["ste", "relu"])
def test_prolu_module_uses_its_own_bias_and_not_b_enc(variant):
    sae = identity_sae({"kind": "prolu", "variant": variant}, 4)
    with torch.no_grad():
        sae.activation.bias.copy_(torch.tensor(PROLU_BIAS, dtype=F64))
        sae.b_enc.fill_(0.7)  # must not enter m
    m = (1.2 * randn(6, 4, seed=15)).requires_grad_(True)
    g = randn(6, 4, seed=16)
    enc = encode(sae, m)
    close64(enc.preacts.detached, m)
    (enc.latents * g).sum().backward()
    _, z_ref, dm_ref, db_ref = prolu_reference(rows(m), rows(g), PROLU_BIAS, variant)
    close64(enc.latents, torch.tensor(z_ref, dtype=F64))
    close64(m.grad, torch.tensor(dm_ref, dtype=F64))  # W_enc = I: dx_n = dm
    close64(sae.activation.bias.grad, torch.tensor(db_ref, dtype=F64))
    assert sae.b_enc.grad is None


# ------------------------------------------------------------------------------ SparseCode, Preacts


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
    close64(as_dense(code), dense)
    assert as_dense(dense) is dense


def test_sparse_code_to_dense_is_differentiable_in_values():
    token, latent = torch.tensor([0, 1, 1, 2]), torch.tensor([2, 0, 3, 3])
    values = randn(4, seed=17).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda v: SparseCode(v, latent, token, 3, 4).to_dense(), (values,)
    )


def test_dense_preacts_answer_detached_dense_and_at():
    pre = randn(4, 5, seed=23).requires_grad_(True)
    preacts = Preacts(pre * 2.0)
    assert not preacts.detached.requires_grad
    close64(preacts.detached, 2.0 * pre.detach())
    token = torch.tensor([[0, 0], [2, 2], [3, 3]])
    latent = torch.tensor([[4, 1], [0, 4], [2, 2]])  # (3, 2) listed twice: gradients add
    values = preacts.at(token, latent)
    assert values.shape == (3, 2)
    P = pre.tolist()
    expected = [
        [2.0 * P[n][i] for n, i in zip(tr, lr, strict=True)]
        for tr, lr in zip(token.tolist(), latent.tolist(), strict=True)
    ]
    close64(values, torch.tensor(expected, dtype=F64))
    values.sum().backward()
    grad = torch.zeros(4, 5, dtype=F64)
    for n, i in zip(token.reshape(-1).tolist(), latent.reshape(-1).tolist(), strict=True):
        grad[n, i] += 2.0
    close64(pre.grad, grad)
