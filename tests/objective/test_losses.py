"""Specifications of the loss formulas in saekit.objective.losses and saekit.objective.revival
(Matryoshka: test_matryoshka.py; how the terms combine: test_objective.py).

Every loss is checked against a float64 reference written plainly here, on a real SAE whose
dataset scale s ≠ 1 and b_dec ≠ 0 (fitted to data x·7 + 3) and on 3-D input [B, T, d].
Losses that read pre-activations are checked through every kind of
:class:`~saekit.core.encoding.Preacts`: the fast path's sparse backward
(:class:`~saekit.kernels.SparsePreacts`), its dense backward, and plain autograd.
"""

from __future__ import annotations

import contextlib
import copy
import math

import pytest
import torch

from saekit.core.encoding import Preacts, as_dense
from saekit.kernels.sparse import SparsePreacts
from saekit.model.config import SAEConfig
from saekit.model.sae import SAE
from saekit.objective.config import PenaltyConfig
from saekit.objective.losses import (
    LambdaController,
    l0_penalty,
    reconstruction_loss,
    sparsity_penalty,
)
from saekit.objective.revival import auxk_loss, dead_preact_loss

D, M, K = 12, 40, 4
B, T = 3, 5  # 15 tokens


def make_sae(activation: str = "topk", seed: int = 0, **fields) -> tuple[SAE, torch.Tensor]:
    """An SAE fitted to x·7 + 3 (s ≠ 1, b_dec ≠ 0) and a raw 3-D batch [B, T, d] from it.

    ``fields`` are the activation config's (``k`` defaults to K for the TopK family)."""
    g = torch.Generator().manual_seed(seed)
    if activation in ("topk", "batchtopk"):
        fields.setdefault("k", K)
    sae = SAE(SAEConfig(D, M, {"kind": activation, **fields}))
    sae.reset_parameters(generator=g)
    x = torch.randn(B, T, D, generator=g) * 7 + 3
    sae.init_from_data(torch.randn(64, D, generator=g) * 7 + 3)
    with torch.no_grad():  # break the tied init so that encoder and decoder differ
        sae.W_enc.add_(0.3 * torch.randn(M, D, generator=g))
        sae.b_enc.add_(0.2 * torch.randn(M, generator=g))
    assert abs(float(sae.scale) - 1) > 0.5 and sae.b_dec.abs().min() > 0.1
    return sae, x


def float64_twin(sae: SAE) -> SAE:
    twin = SAE(SAEConfig(**{**sae.cfg.to_dict(), "dtype": "float64"}))
    twin.load_state_dict(sae.state_dict())
    return twin


def plain_pre(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    """pre = (x/s − b_dec) W_encᵀ + b_enc [N, M], written out (differentiable)."""
    x_n = x.reshape(-1, D).to(sae.W_enc.dtype) / sae.scale
    return (x_n - sae.b_dec) @ sae.W_enc.T + sae.b_enc


def all_grads(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.grad.clone() if t.grad is not None else torch.zeros_like(t) for t in tensors]


@contextlib.contextmanager
def no_host_sync():
    """Inside the block, any tensor-to-Python conversion raises."""

    def refuse(*args, **kwargs):
        raise AssertionError("host sync: tensor converted to a Python value")

    patch = pytest.MonkeyPatch()
    try:
        for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero"):
            patch.setattr(torch.Tensor, name, refuse)
        yield
    finally:
        patch.undo()


# ------------------------------------------------------------------------- reconstruction


def test_reconstruction_loss_is_mean_over_tokens_of_squared_error_summed_over_d():
    sae, x = make_sae("topk")
    out = sae(x)
    x_n, x_hat_n = out.x_n.double(), out.x_hat_n.double()
    ref = sum(sum((x_n[n, j] - x_hat_n[n, j]) ** 2 for j in range(D)) for n in range(B * T)) / (
        B * T
    )
    assert out.x_n.shape == (B * T, D)
    torch.testing.assert_close(reconstruction_loss(out.x_n, out.x_hat_n).double(), ref)
    # also accepts the input's shape
    got = reconstruction_loss(out.x_n.reshape(B, T, D), out.x_hat_n.reshape(B, T, D))
    torch.testing.assert_close(got.double(), ref)


# ------------------------------------------------------------------------- sparsity penalties


PENALTIES = ("l1", "log", "tanh", "sqrt")
"""The penalty kinds with a formula f(a), each written out in :func:`penalty_reference`."""
EPS, C = 0.3, 2.5
"""Shapes off the defaults (0.1, 1), so a formula that ignores its field fails."""


def penalty_of(kind: str) -> PenaltyConfig:
    """The penalty kind with ε = EPS (log, sqrt) or c = C (tanh)."""
    shape = {"log": {"eps": EPS}, "sqrt": {"eps": EPS}, "tanh": {"c": C}}.get(kind, {})
    return PenaltyConfig.parse({"kind": kind, "coefficient": 1.0, **shape}, "penalty")


def test_every_penalty_kind_with_a_formula_has_a_reference_here():
    shaped = {k for k, cls in PenaltyConfig._kinds.items() if cls.terms is not PenaltyConfig.terms}
    assert shaped == set(PENALTIES)


def penalty_reference(z_NM: torch.Tensor, norms_M: torch.Tensor, kind: str) -> float:
    """mean_n Σ_i f(|z_ni|·‖W_dec,i‖) over ALL latents, active or not (ε = EPS, c = C)."""
    f = {
        "l1": lambda a: a,
        "log": lambda a: math.log(a + EPS),
        "tanh": lambda a: math.tanh(C * a),
        "sqrt": lambda a: math.sqrt(a + EPS),
    }[kind]
    z_NM, norms_M = z_NM.detach(), norms_M.detach()
    total = 0.0
    for n in range(z_NM.shape[0]):
        for i in range(z_NM.shape[1]):
            total += f(abs(z_NM[n, i].item()) * norms_M[i].item())
    return total / z_NM.shape[0]


@pytest.mark.parametrize("kind", PENALTIES)
def test_sparsity_penalty_dense_matches_reference_including_inactive_constants(kind):
    sae, x = make_sae("relu")
    with torch.no_grad():
        sae.W_dec.mul_(torch.linspace(0.5, 2.0, M).unsqueeze(1))  # unequal decoder norms
    out = sae(x)
    norms = sae.W_dec.norm(dim=-1)
    assert (out.latents == 0).any() and (out.latents > 0).any()
    got = sparsity_penalty(out.latents, norms, penalty_of(kind))
    assert got.item() == pytest.approx(penalty_reference(out.latents, norms, kind), rel=1e-5)


@pytest.mark.parametrize("kind", PENALTIES)
def test_sparsity_penalty_sparse_code_equals_dense_form_value_and_gradient(kind):
    sae, x = make_sae("topk")
    out = sae(x)
    norms = sae.W_dec.norm(dim=-1)
    sparse = sparsity_penalty(out.latents, norms, penalty_of(kind))
    grads_sparse = torch.autograd.grad(sparse, [sae.W_enc, sae.W_dec], retain_graph=True)
    dense = sparsity_penalty(out.latents.to_dense(), norms, penalty_of(kind))
    grads_dense = torch.autograd.grad(dense, [sae.W_enc, sae.W_dec])
    ref = penalty_reference(out.latents.to_dense().detach(), norms.detach(), kind)
    assert sparse.item() == pytest.approx(ref, rel=1e-5)
    assert dense.item() == pytest.approx(ref, rel=1e-5)
    for gs, gd in zip(grads_sparse, grads_dense, strict=True):
        torch.testing.assert_close(gs, gd)


def test_l0_penalty_counts_active_latents_and_its_log_threshold_gradient_is_straight_through():
    eps = 0.5  # wide kernel so that many pre-activations fall inside it
    sae, x = make_sae("jumprelu", init_threshold=0.3, bandwidth=eps, threshold_param="log")
    out = sae(x)
    theta = sae.activation.theta()
    l0 = l0_penalty(sae.activation.l0_step(out.encoding.preacts))  # differentiable: the trap
    l0.backward()

    pre, th = out.pre.detach().double(), theta.detach().double()
    n_tok = pre.shape[0]
    ref_value = sum(int(pre[n, i] > th[i]) for n in range(n_tok) for i in range(M)) / n_tok
    # ∂H/∂θ_i = −(1/ε)·K((pre − θ)/ε); the log parameterisation multiplies by θ_i.
    ref_grad = torch.zeros(M, dtype=torch.float64)
    for i in range(M):
        for n in range(n_tok):
            if abs((pre[n, i] - th[i]) / eps) < 0.5:
                ref_grad[i] += -(1 / eps) * th[i] / n_tok
    assert l0.item() == pytest.approx(ref_value)
    assert ref_grad.abs().sum() > 0
    torch.testing.assert_close(sae.activation.log_threshold.grad.double(), ref_grad)
    assert sae.W_enc.grad is None or sae.W_enc.grad.abs().max() == 0  # no gradient to pre


def test_l0_penalty_weights_each_latent_and_flattens_leading_dimensions():
    sae, x = make_sae("jumprelu", init_threshold=0.3, bandwidth=0.5)
    pre = sae(x).pre.detach()
    steps = sae.activation.l0_step(Preacts(pre))
    w = torch.linspace(0.0, 1.0, M)
    on = (pre.double() > sae.activation.theta().detach().double()).double()
    ref = sum(w[i].item() * on[n, i].item() for n in range(B * T) for i in range(M)) / (B * T)
    assert l0_penalty(steps, w).item() == pytest.approx(ref)
    assert l0_penalty(steps.reshape(B, T, M)).item() == pytest.approx(on.sum(-1).mean().item())


def test_lambda_controller_raises_lambda_above_target_lowers_it_below_and_round_trips():
    ctl = LambdaController(lam=1.0, target_l0=20.0, rate=0.1)
    with no_host_sync():
        lam_up = ctl.step(torch.tensor(40.0)).clone()
        lam_down = ctl.step(torch.tensor(5.0)).clone()
        lam_same = ctl.step(torch.tensor(20.0)).clone()
        lam_zero = ctl.step(torch.tensor(0.0)).clone()  # L0 = 0 is bounded, not −inf
    restored = LambdaController(lam=3.0, target_l0=1.0)
    restored.load_state_dict(ctl.state_dict())
    lam_up, lam_down, lam_same, lam_zero = (
        t.item() for t in (lam_up, lam_down, lam_same, lam_zero)
    )
    lam_restored, lam_now = restored.lam.item(), ctl.lam.item()
    assert lam_up == pytest.approx(math.exp(0.1 * math.log(2)))
    assert lam_down == pytest.approx(lam_up * math.exp(-0.1))  # log(5/20) clamped to −1
    assert lam_same == pytest.approx(lam_down)
    assert lam_zero == pytest.approx(lam_same * math.exp(-0.1))
    assert lam_restored == lam_now and restored.target_l0 == 20.0 and restored.rate == 0.1


# ------------------------------------------------------------------------- AuxK


def auxk_reference(
    pre_NM, e_ND, W_dec_MD, dead, k_aux, alpha=1 / 32, normalizer="residual", add_b_dec=None
):
    """Float64 AuxK written out: per token, the k_aux largest positive dead pre-activations."""
    n_tok, d = e_ND.shape
    sq_err = 0.0
    for n in range(n_tok):
        cands = [(pre_NM[n, i], i) for i in range(len(dead)) if dead[i] and pre_NM[n, i] > 0]
        cands.sort(key=lambda c: -c[0].item())
        e_hat = torch.zeros(d, dtype=torch.float64)
        for value, i in cands[:k_aux]:
            e_hat = e_hat + value * W_dec_MD[i]
        if add_b_dec is not None:
            e_hat = e_hat + add_b_dec
        sq_err = sq_err + ((e_hat - e_ND[n]) ** 2).sum()
    mse = sq_err / n_tok
    if normalizer == "residual":
        mse = mse / ((e_ND - e_ND.mean(0)) ** 2).sum(-1).mean()
    n_dead = dead.sum().item()
    return alpha * min(n_dead / k_aux, 1.0) * mse


PREACTS = ("sparse", "dense_backward", "autograd")
"""The Preacts AuxK reads: the TopK fast path's own (sparse backward through ``at``), the same
wrapped as a plain Preacts of its ``dense()`` (the dense custom backward), and the reference
kernel's (dense autograd through the encoder)."""


def topk_preacts(preacts: str) -> tuple[SAE, torch.Tensor, object, Preacts]:
    """(sae, x, out, preacts) for one of :data:`PREACTS`."""
    sae, x = make_sae("topk", kernel="reference" if preacts == "autograd" else "torch")
    out = sae(x)
    p = out.encoding.preacts
    if preacts == "sparse":
        assert isinstance(p, SparsePreacts)
    elif preacts == "dense_backward":
        p = Preacts(out.pre)
    else:
        assert type(p) is Preacts
    return sae, x, out, p


def auxk_case(dead, preacts="sparse", normalizer="residual", **kwargs):
    """(loss, grads) in float32 via auxk_loss and (loss, grads) via the float64 reference."""
    sae, x, out, p = topk_preacts(preacts)
    loss = auxk_loss(p, out.x_n - out.x_hat_n, sae.W_dec, dead, normalizer=normalizer, **kwargs)
    loss.backward()
    twin = float64_twin(sae)
    o64 = twin(x.double())
    k_aux = kwargs.get("k_aux") or min(D // 2, M)
    ref = auxk_reference(
        plain_pre(twin, x),
        (o64.x_n - o64.x_hat_n).detach(),
        twin.W_dec,
        dead,
        k_aux,
        normalizer=normalizer,
    )
    if ref.requires_grad:
        ref.backward()
    params = ("W_enc", "b_enc", "W_dec", "b_dec")
    return (
        loss,
        all_grads(*(getattr(sae, p) for p in params)),
        ref,
        all_grads(*(getattr(twin, p) for p in params)),
    )


@pytest.mark.parametrize("preacts", PREACTS)
def test_auxk_all_dead_matches_float64_reference_value_and_gradients(preacts):
    dead = torch.ones(M, dtype=torch.bool)
    loss, grads, ref, ref_grads = auxk_case(dead, preacts)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert loss.item() > 0
    for name, g, g_ref in zip(("W_enc", "b_enc", "W_dec"), grads[:3], ref_grads[:3], strict=True):
        assert g.abs().max() > 0, f"no AuxK gradient reaches {name}"
        torch.testing.assert_close(g.double(), g_ref, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("preacts", PREACTS)
def test_auxk_with_no_dead_latent_is_exactly_zero(preacts):
    sae, _, out, p = topk_preacts(preacts)
    dead = torch.zeros(M, dtype=torch.bool)
    with no_host_sync():
        loss = auxk_loss(p, out.x_n - out.x_hat_n, sae.W_dec, dead)
        loss.backward()
    assert loss.shape == ()
    assert loss.item() == 0.0
    g_enc, g_dec = all_grads(sae.W_enc, sae.W_dec)
    assert g_enc.abs().max() == 0 and g_dec.abs().max() == 0


@pytest.mark.parametrize("preacts", PREACTS)
def test_auxk_with_fewer_dead_than_k_aux_scales_by_n_dead_over_k_aux_and_pads_with_zeros(preacts):
    # k_aux = d // 2 = 6; 3 dead latents: scale 1/2, at most 3 (positive) entries per token.
    dead = torch.zeros(M, dtype=torch.bool)
    dead[[1, 7, 30]] = True
    loss, grads, ref, ref_grads = auxk_case(dead, preacts)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    for g, g_ref in zip(grads[:3], ref_grads[:3], strict=True):
        torch.testing.assert_close(g.double(), g_ref, rtol=1e-4, atol=1e-7)
    # Latents that are alive get no gradient from AuxK, encoder or decoder side.
    alive = ~dead
    assert grads[0][alive].abs().max() == 0 and grads[2][alive].abs().max() == 0
    assert grads[0][dead].abs().max() > 0


@pytest.mark.parametrize("preacts", PREACTS)
def test_auxk_with_explicit_k_aux_and_unnormalised_mse(preacts):
    dead = torch.zeros(M, dtype=torch.bool)
    dead[::3] = True  # 14 dead, k_aux = 4: scale 1
    loss, grads, ref, ref_grads = auxk_case(dead, preacts, normalizer="none", k_aux=4)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    for g, g_ref in zip(grads[:3], ref_grads[:3], strict=True):
        torch.testing.assert_close(g.double(), g_ref, rtol=1e-4, atol=1e-7)


def test_auxk_does_not_add_b_dec_to_the_aux_reconstruction():
    """Regression (sparsify PR #134): ê = z_aux W_dec; e = x_n − x̂_n already holds b_dec."""
    dead = torch.ones(M, dtype=torch.bool)
    sae, x = make_sae("topk")
    out = sae(x)
    loss = auxk_loss(out.encoding.preacts, out.x_n - out.x_hat_n, sae.W_dec, dead)
    twin = float64_twin(sae)
    o64 = twin(x.double())
    args = (plain_pre(twin, x), (o64.x_n - o64.x_hat_n).detach(), twin.W_dec, dead, D // 2)
    right = auxk_reference(*args)
    wrong = auxk_reference(*args, add_b_dec=twin.b_dec)
    assert loss.item() == pytest.approx(right.item(), rel=1e-5)
    # b_dec ≈ 3/s per coordinate: adding it moves the loss by ≈ 5%, 1000× the float error.
    assert abs(loss.item() - wrong.item()) > 0.03 * loss.item()


@pytest.mark.parametrize("preacts", PREACTS)
def test_auxk_gradient_does_not_reach_b_dec_except_through_the_encoder_input(preacts):
    dead = torch.ones(M, dtype=torch.bool)
    _, grads, _, ref_grads = auxk_case(dead, preacts)
    assert ref_grads[3].abs().max() > 0  # the encoder input x_n − b_dec does carry one
    torch.testing.assert_close(grads[3].double(), ref_grads[3], rtol=1e-4, atol=1e-7)


def test_auxk_is_scale_invariant_with_residual_normaliser_and_scales_by_s2_without():
    dead = torch.zeros(M, dtype=torch.bool)
    dead[: M // 2] = True
    sae, x = make_sae("topk")
    folded = copy.deepcopy(sae)
    folded.fold_scale_()  # takes raw x: x_n = x, x̂_n = s·x̂_n, W_dec = s·W_dec, pre unchanged
    s = float(sae.scale)
    out, out_f = sae(x), folded(x)
    torch.testing.assert_close(out_f.pre, out.pre, rtol=1e-4, atol=1e-4)
    for normalizer, factor in (("residual", 1.0), ("none", s**2)):
        loss = auxk_loss(
            out.encoding.preacts, out.x_n - out.x_hat_n, sae.W_dec, dead, normalizer=normalizer
        )
        loss_f = auxk_loss(
            out_f.encoding.preacts,
            out_f.x_n - out_f.x_hat_n,
            folded.W_dec,
            dead,
            normalizer=normalizer,
        )
        assert loss_f.item() == pytest.approx(factor * loss.item(), rel=1e-4)


def test_auxk_on_the_fast_path_uses_the_sparse_backward_and_equals_the_dense_one(monkeypatch):
    """Same SAE, same step: SparsePreacts.at (sparse encoder backward, never the dense [N, M]
    gradient) and a plain Preacts of the differentiable dense pre give the same value and
    gradients."""
    dead = torch.zeros(M, dtype=torch.bool)
    dead[::2] = True
    sae, x = make_sae("topk")
    out = sae(x)
    residual = (out.x_n - out.x_hat_n).detach()
    params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]
    dense = auxk_loss(Preacts(out.pre), residual, sae.W_dec, dead)
    g_dense = torch.autograd.grad(dense, params)

    def refuse(self):
        raise AssertionError("AuxK on the fast path differentiated the dense pre-activations")

    with monkeypatch.context() as patch:
        patch.setattr(SparsePreacts, "dense", refuse)
        fast = auxk_loss(out.encoding.preacts, residual, sae.W_dec, dead)
        g_fast = torch.autograd.grad(fast, params)
    assert fast.item() == pytest.approx(dense.item(), rel=1e-5)
    for a, b in zip(g_fast, g_dense, strict=True):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("preacts", PREACTS)
def test_auxk_runs_without_host_sync(preacts):
    sae, _, out, p = topk_preacts(preacts)
    dead = torch.zeros(M, dtype=torch.bool)
    dead[5:9] = True
    with no_host_sync():
        loss = auxk_loss(p, out.x_n - out.x_hat_n, sae.W_dec, dead)
        loss.backward()
    assert loss.shape == ()


# ------------------------------------------------------------------------- pre-activation revival


@pytest.mark.parametrize("kernel", ["torch", "reference"])
def test_firing_threshold_is_per_token_for_topk_batch_min_for_batchtopk_per_latent_for_jumprelu(
    kernel,
):
    sae, x = make_sae("topk", kernel=kernel)
    out = sae(x)
    with no_host_sync():
        theta = sae.activation.firing_threshold(out.encoding)
    dense = as_dense(out.latents).detach()
    ref = torch.stack([dense[n][dense[n] > 0].min() for n in range(B * T)]).unsqueeze(1)
    assert theta.shape == (B * T, 1) and not theta.requires_grad
    # Every TopK token keeps K positive values here, so the smallest kept is the smallest positive.
    assert ((dense > 0).sum(-1) == K).all()
    torch.testing.assert_close(theta, ref)

    sae_b, _ = make_sae("batchtopk", kernel=kernel)
    out_b = sae_b(x)
    with no_host_sync():
        theta_b = sae_b.activation.firing_threshold(out_b.encoding)
    values = as_dense(out_b.latents).detach()
    assert theta_b.shape == () and not theta_b.requires_grad
    assert theta_b == values[values > 0].min()

    sae_j, _ = make_sae("jumprelu", init_threshold=0.2)
    with torch.no_grad():
        sae_j.activation.threshold.add_(torch.linspace(0, 1, M))
    with no_host_sync():
        theta_j = sae_j.activation.firing_threshold(sae_j(x).encoding)
    assert theta_j.shape == (M,) and not theta_j.requires_grad
    assert torch.equal(theta_j, sae_j.activation.threshold.detach())


@pytest.mark.parametrize("kernel", ["torch", "reference"])
def test_firing_threshold_is_zero_where_nothing_kept_is_positive(kernel):
    for activation, shape in (("topk", (B * T, 1)), ("batchtopk", ())):
        sae, x = make_sae(activation, kernel=kernel)
        with torch.no_grad():
            sae.b_enc.sub_(1e3)  # every pre-activation negative: nothing fires
        enc = sae(x).encoding
        assert (as_dense(enc.latents) == 0).all()
        theta = sae.activation.firing_threshold(enc)
        assert theta.shape == shape and (theta == 0).all()


def dead_preact_reference(pre, dead, theta_of, norms):
    total = 0.0
    for n in range(pre.shape[0]):
        for i in range(pre.shape[1]):
            if dead[i]:
                total += max(theta_of(n, i).item() - pre[n, i].item(), 0.0) * norms[i].item()
    return total / pre.shape[0] / max(sum(bool(v) for v in dead), 1)  # per dead latent


@pytest.mark.parametrize("case", ["topk", "topk-reference", "batchtopk", "jumprelu"])
def test_dead_preact_loss_pushes_dead_preacts_toward_the_threshold_through_the_encoder_only(case):
    activation, _, kernel = case.partition("-")
    sae, x = make_sae(activation, **({"kernel": kernel} if kernel else {}))
    with torch.no_grad():
        sae.W_dec.mul_(torch.linspace(0.5, 2.0, M).unsqueeze(1))
    out = sae(x)
    dead = torch.zeros(M, dtype=torch.bool)
    dead[::2] = True
    firing = sae.activation.firing_threshold(out.encoding)
    if activation == "topk":
        theta = firing
        theta_of = lambda n, i: theta[n, 0]  # noqa: E731
    elif activation == "batchtopk":
        theta = firing
        theta_of = lambda n, i: theta  # noqa: E731
    else:
        theta = sae.activation.threshold  # not detached: the loss must detach θ itself
        assert torch.equal(firing, theta.detach())
        theta_of = lambda n, i: theta.detach()[i]  # noqa: E731
    norms = sae.W_dec.norm(dim=-1)  # not detached either
    loss = dead_preact_loss(out.encoding.preacts, dead, theta, norms)
    loss.backward()
    pre = out.pre.detach().double()
    ref = dead_preact_reference(pre, dead, theta_of, norms.detach())
    assert ref > 0
    assert loss.item() == pytest.approx(ref, rel=1e-5)
    assert sae.W_dec.grad is None or sae.W_dec.grad.abs().max() == 0
    if activation == "jumprelu":
        assert sae.activation.threshold.grad is None
    # ∂L/∂b_enc,i = −(1/(N·n_dead))·Σ_n 1[pre_ni < θ]·‖W_dec,i‖ on dead latents, 0 on the
    # others: the step lowers the loss by raising dead pre-activations.
    ref_grad = torch.zeros(M, dtype=torch.float64)
    for i in range(M):
        if dead[i]:
            below = sum(float(pre[n, i] < theta_of(n, i).item()) for n in range(B * T))
            ref_grad[i] = -below * norms[i].item() / (B * T) / int(dead.sum())
    assert ref_grad.min() < 0
    torch.testing.assert_close(sae.b_enc.grad.double(), ref_grad, rtol=1e-5, atol=1e-7)


def test_reconstruction_loss_broadcasts_as_the_difference_would():
    """x_n [1, d] against x̂ [9, d]: the mean over the 9 broadcast tokens, as ‖x_n − x̂_n‖² reads."""
    g = torch.Generator().manual_seed(2)
    x, x_hat = torch.randn(1, 5, generator=g), torch.randn(9, 5, generator=g)
    x0 = x[0].tolist()
    expected = sum(
        sum((a - b) ** 2 for a, b in zip(x0, row, strict=True)) for row in x_hat.tolist()
    )
    torch.testing.assert_close(reconstruction_loss(x, x_hat).item(), expected / 9)
