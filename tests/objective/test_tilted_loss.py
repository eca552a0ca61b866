"""Specifications of the tilted reconstruction loss (``reconstruction_tilt``; TERM, Li et al.,
ICLR 2021, arXiv 2007.01162), saekit's unit-free form:

    R(t) = m·(1/t)·log mean_n exp(t·ℓ_n/m),  ℓ_n = ‖y_n − ŷ_n‖²,  m = stop_grad(mean_n ℓ_n).

The references below are float64 plain loops over tokens and coordinates (no logsumexp, no
saekit loss code), on trap inputs: data ×7 + 3 (scale ≠ 1, mean ≠ 0), b_dec moved off the data
mean, 3-D input [B, T, d], a transcoder with a skip path. Values and the gradients of every
parameter are compared, and the gradient with respect to ŷ against its closed form
−2·softmax(t·ℓ/m)_n·(y_n − ŷ_n) (the paper's tilted weights).
"""

from __future__ import annotations

import math

import pytest
import torch

from saekit.core.configs import from_dict
from saekit.core.encoding import as_dense
from saekit.objective.losses import (
    reconstruction_loss,
    tilted_mean,
    tilted_reconstruction_loss,
)
from saekit.objective.matryoshka import matryoshka_reconstruction_loss
from saekit.objective.terms import TermInputs
from saekit.train.member import Member
from saekit.train.member_config import SAETrainConfig
from saekit.train.presets import recipe_batchtopk, recipe_matryoshka

D, D_OUT, M, K = 6, 5, 24, 4
B, T = 3, 7  # 21 tokens
GROUPS = (4, 8, 12)
TILTS = (-2.0, 0.5, 3.0)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ----------------------------------------------------------------------------- references


def loop_errors(y_ND: torch.Tensor, y_hat_ND: torch.Tensor) -> list[torch.Tensor]:
    """ℓ_n = Σ_i (y_ni − ŷ_ni)², one token and one coordinate at a time."""
    errors = []
    for n in range(y_ND.shape[0]):
        total = torch.zeros((), dtype=torch.float64)
        for i in range(y_ND.shape[1]):
            total = total + (y_ND[n, i] - y_hat_ND[n, i]) ** 2
        errors.append(total)
    return errors


def loop_tilted(errors: list[torch.Tensor], t: float) -> torch.Tensor:
    """m/t · log((1/N) Σ_n exp(t·ℓ_n/m)), m the plain mean as a Python float (detached)."""
    n = len(errors)
    if t == 0:
        return sum(errors) / n
    m = sum(float(e.detach()) for e in errors) / n
    return m / t * torch.log(sum(torch.exp(t * e / m) for e in errors) / n)


def tilted_weights(errors: list[float], t: float) -> list[float]:
    """softmax(t·ℓ/m)_n, by hand."""
    m = sum(errors) / len(errors)
    w = [math.exp(t * e / m) for e in errors]
    return [v / sum(w) for v in w]


# ----------------------------------------------------------------------------- models


def train_cfg(tilt: float, *, matryoshka=False, transcoder=False, act="topk") -> SAETrainConfig:
    activation = {"kind": act, "k": K} if act != "relu" else {"kind": "relu"}
    sae = {"d_in": D, "d_sae": M, "activation": activation, "dtype": "float64"}
    if transcoder:
        sae.update(d_out=D_OUT, skip=True)
    data = {"sae": sae, "name": "x", "revival": {"kind": "none"}, "reconstruction_tilt": tilt}
    if act == "relu":
        data["penalty"] = {"kind": "l1", "coefficient": 0.1}
    if matryoshka:
        data["matryoshka"] = {"kind": "fixed", "groups": list(GROUPS)}
    return from_dict(SAETrainConfig, data)


def batch(seed: int, n: int, transcoder: bool) -> torch.Tensor:
    """x·7 + 3 (and a transcoder's target y = tanh(x A)·5 − 2 beside it), float64."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g, dtype=torch.float64) * 7 + 3
    if not transcoder:
        return x
    A = torch.randn(D, D_OUT, generator=torch.Generator().manual_seed(99), dtype=torch.float64)
    return torch.cat([x, torch.tanh(x @ A / 7) * 5 - 2], -1)


def make_member(tilt: float, **kw) -> Member:
    transcoder = kw.get("transcoder", False)
    member = Member(train_cfg(tilt, **kw), 10, "cpu")
    member.init_from_data(batch(0, 64, transcoder))
    g = torch.Generator().manual_seed(1)
    sae = member.sae
    with torch.no_grad():
        sae.W_enc.add_(0.3 * torch.randn(sae.W_enc.shape, generator=g, dtype=torch.float64))
        sae.W_dec.mul_(0.5 + 1.5 * torch.rand(M, 1, generator=g, dtype=torch.float64))
        sae.b_dec.add_(0.5 * torch.randn(sae.b_dec.shape, generator=g, dtype=torch.float64))
        sae.b_enc.copy_(0.3 * torch.randn(M, generator=g, dtype=torch.float64))
    assert abs(float(sae.scale) - 1) > 0.5 and sae.b_dec.abs().min() > 0.01
    return member


def objective_and_grads(member: Member, stream: torch.Tensor):
    """saekit's reconstruction term on a 3-D batch, and the gradients of every parameter."""
    sae = member.sae
    sae.zero_grad(set_to_none=True)
    x, target = sae.split_stream(stream.reshape(B, T, -1))
    out = sae(x) if target is None else sae(x, target)
    dead = torch.zeros(M, dtype=torch.bool)
    _, parts = member.objective(
        TermInputs(sae, out, dead, member.lambda_value(), member.prefixes())
    )
    parts["reconstruction"].backward()
    grads = {n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None}
    return out, parts["reconstruction"].detach(), grads


def hand_code(sae, x_ND: torch.Tensor, P: dict[str, torch.Tensor]):
    """(y_n target, z [N, M], offset [N, d_out]) of a TopK SAE or skip transcoder from the
    parameters P, in float64: x_n = x/s, pre = (x_n − b_dec)W_encᵀ + b_enc for an SAE (a
    transcoder does not centre its input), z = ReLU(pre) on each token's top k."""
    x_n = x_ND / sae.scale.double()
    centre = 0 if sae.cfg.transcoder else P["b_dec"]
    pre = (x_n - centre) @ P["W_enc"].T + P["b_enc"]
    order = pre.detach().argsort(dim=-1, descending=True)[:, :K]
    z = torch.relu(pre) * torch.zeros_like(pre).scatter(1, order, 1.0)
    offset = P["b_dec"] + (x_n @ P["W_skip"].T if sae.cfg.transcoder else 0)
    return x_n, z, offset


def hand_reference(member: Member, stream: torch.Tensor, tilt: float, matryoshka: bool):
    """The loss and its parameter gradients from a hand forward and the plain loops."""
    sae = member.sae
    P = {n: p.detach().clone().requires_grad_(True) for n, p in sae.named_parameters()}
    transcoder = sae.cfg.transcoder
    x_ND = stream[:, :D]
    x_n, z, offset = hand_code(sae, x_ND, P)
    y_n = stream[:, D:] / sae.target_scale.double() if transcoder else x_n
    ends = list(member.prefixes()) if matryoshka else [M]
    levels = []
    for p in ends:  # each prefix decodes with the latents from p on left out
        y_hat = z[:, :p] @ P["W_dec"][:p] + offset
        levels.append(loop_tilted(loop_errors(y_n, y_hat), tilt))
    value = sum(levels) / len(levels)
    value.backward()
    return value.detach(), {n: p.grad for n, p in P.items() if p.grad is not None}


# ----------------------------------------------------------------------------- formula


@pytest.mark.parametrize("t", [*TILTS, 0.0])
def test_tilted_loss_matches_the_loop_and_the_tilted_weights(t):
    g = torch.Generator().manual_seed(3)
    y = torch.randn(B, T, D, generator=g, dtype=torch.float64) * 7 + 3  # 3-D, mean ≠ 0
    y_hat = (y + torch.randn(B, T, D, generator=g, dtype=torch.float64) * 2).requires_grad_()
    value = tilted_reconstruction_loss(y, y_hat, t)
    value.backward()
    y_ND, y_hat_ND = y.reshape(-1, D), y_hat.detach().reshape(-1, D)
    errors = loop_errors(y_ND, y_hat_ND)
    torch.testing.assert_close(value.detach(), loop_tilted(errors, t), rtol=1e-12, atol=0)
    w = tilted_weights([float(e) for e in errors], t) if t else [1 / len(errors)] * len(errors)
    for n in range(len(errors)):  # ∂R/∂ŷ_n = −2·w_n·(y_n − ŷ_n)
        expected = -2 * w[n] * (y_ND[n] - y_hat_ND[n])
        torch.testing.assert_close(y_hat.grad.reshape(-1, D)[n], expected, rtol=1e-10, atol=1e-14)
    if t:  # the tilt visibly moves both the value and the weights
        assert abs(float(value.detach()) - float(sum(errors)) / len(errors)) > 1e-3
        assert max(w) / min(w) > 1.5


def test_zero_tilt_is_the_plain_loss_bit_for_bit():
    g = torch.Generator().manual_seed(4)
    y = torch.randn(B, T, D, generator=g, dtype=torch.float64) * 7 + 3
    y_hat = y + torch.randn(B, T, D, generator=g, dtype=torch.float64)
    assert torch.equal(tilted_reconstruction_loss(y, y_hat, 0.0), reconstruction_loss(y, y_hat))
    ell = torch.rand(50, generator=g, dtype=torch.float64)
    assert torch.equal(tilted_mean(ell, 0.0), ell.mean())


def test_small_tilt_tends_to_the_mean_and_large_to_the_max():
    g = torch.Generator().manual_seed(5)
    ell = torch.rand(40, generator=g, dtype=torch.float64) * 9 + 0.1
    mean = float(ell.mean())
    for t in (1e-3, -1e-3):  # R(t) = mean + t·Var/(2m) + O(t²)
        gap = float(tilted_mean(ell, t)) - mean
        expected = t * float(ell.var(unbiased=False)) / (2 * mean)
        assert abs(gap - expected) <= 2e-3 * abs(expected), (t, gap, expected)
    for t in (1e-9, -1e-9):  # the limit (rounding: m·ε/|t| at most)
        assert float(tilted_mean(ell, t)) == pytest.approx(mean, rel=1e-6)
    for t in (-2.0, 3.0):  # unit-free: R(t) of c·ℓ is c·R(t) of ℓ (t needs no rescaling)
        torch.testing.assert_close(tilted_mean(ell * 49, t), 49 * tilted_mean(ell, t))
    # R is increasing in t, bounded by the min and the max; logsumexp keeps t = 1e4 finite
    values = [float(tilted_mean(ell, t)) for t in (-1e4, -5.0, -0.5, 0.5, 5.0, 1e4)]
    assert values == sorted(values)
    assert values[0] == pytest.approx(float(ell.min()), rel=1e-2)
    assert values[-1] == pytest.approx(float(ell.max()), rel=1e-2)
    # an exact reconstruction (every ℓ_n = 0) is 0 with a zero gradient, not nan
    zero = torch.zeros(8, dtype=torch.float64, requires_grad=True)
    value = tilted_mean(zero, 2.0)
    value.backward()
    assert float(value.detach()) == 0.0 and torch.equal(zero.grad, torch.full_like(zero, 1 / 8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("t", [5.0, 100.0, -10.0])
def test_an_exact_or_near_exact_reconstruction_is_finite_at_any_tilt(dtype, t):
    # m clamps to the dtype's smallest normal; t/m overflowed there for |t| > 4, and
    # 0·inf gave nan (value and gradient) where the reconstruction was exact
    zero = torch.zeros(8, dtype=dtype, requires_grad=True)
    value = tilted_mean(zero, t)
    value.backward()
    assert float(value.detach()) == 0.0
    torch.testing.assert_close(zero.grad, torch.full_like(zero, 1 / 8), rtol=1e-3, atol=0)
    # one token's error just above the smallest normal, the rest exact: between min and max
    tiny = torch.finfo(dtype).tiny
    ell = torch.zeros(8, dtype=dtype)
    ell[0] = 4 * tiny
    got = float(tilted_mean(ell, t))
    assert math.isfinite(got) and 0.0 <= got <= 4 * tiny


# ----------------------------------------------------------------------------- through saekit


CASES = [(False, False), (True, False), (False, True), (True, True)]


@pytest.mark.parametrize("t", TILTS)
@pytest.mark.parametrize("matryoshka,transcoder", CASES)
def test_objective_matches_the_hand_reference(t, matryoshka, transcoder):
    """SAE and skip transcoder, plain and Matryoshka (every level tilted on its own, then
    averaged): the term and every parameter's gradient equal the hand forward + loops."""
    member = make_member(t, matryoshka=matryoshka, transcoder=transcoder)
    stream = batch(7, B * T, transcoder)
    out, value, grads = objective_and_grads(member, stream)
    assert as_dense(out.latents).count_nonzero() == K * B * T  # every token's k fire
    ref, ref_grads = hand_reference(member, stream, t, matryoshka)
    torch.testing.assert_close(value, ref, rtol=1e-10, atol=0)
    assert sorted(grads) == sorted(ref_grads)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-9, atol=1e-12, msg=name)
    # the tilt is visible: the untilted reference differs
    plain, _ = hand_reference(member, stream, 0.0, matryoshka)
    assert abs(float(plain) - float(ref)) > 1e-3 * float(plain)


@pytest.mark.parametrize("matryoshka,transcoder", CASES)
def test_zero_tilt_objective_is_today_s(matryoshka, transcoder):
    """reconstruction_tilt 0 (and unset) computes today's term: the same numbers, bit for bit,
    as the activation's reconstruction_loss or the one-pass Matryoshka loss."""
    unset = train_cfg(0.0, matryoshka=matryoshka, transcoder=transcoder)
    assert unset.reconstruction_tilt == 0.0
    member = make_member(0.0, matryoshka=matryoshka, transcoder=transcoder)
    stream = batch(7, B * T, transcoder)
    out, value, grads = objective_and_grads(member, stream)
    sae, view = member.sae, member.sae.encoder_view()
    if matryoshka:
        today = matryoshka_reconstruction_loss(
            out.target(), out.latents, view.W_dec, view.decoder_offset_n(out.x_n),
            member.prefixes(),
        )  # fmt: skip
    else:
        today = sae.activation.reconstruction_loss(view, out)
    assert torch.equal(value, today.detach())


def test_matryoshka_levels_are_tilted_apart_not_pooled():
    """Each level has its own m_j and softmax: tilting the levels' pooled tokens differs."""
    member = make_member(3.0, matryoshka=True)
    stream = batch(7, B * T, False)
    _, value, _ = objective_and_grads(member, stream)
    sae = member.sae
    P = {n: p.detach() for n, p in sae.named_parameters()}
    x_n, z, offset = hand_code(sae, stream, P)
    pooled = []
    for p in member.prefixes():
        pooled += loop_errors(x_n, z[:, :p] @ P["W_dec"][:p] + offset)
    assert abs(float(loop_tilted(pooled, 3.0)) - float(value)) > 1e-3 * float(value)


# ----------------------------------------------------------------------------- config


L1 = {"kind": "l1", "coefficient": 0.1}
HIER = {"d_in": D, "d_sae": M, "activation": {"kind": "hierarchical_topk", "k": K}}
CROSS = {"kind": "crosscoder", "n_sources": 2, "d_in": D, "d_sae": M, "activation": "relu"}
CLT = {"kind": "clt", "n_layers": 2, "d_in": D, "d_sae": M, "activation": "relu"}


@pytest.mark.parametrize(
    "data,match",
    [
        ({"sae": HIER}, "tilt does not apply to sae.activation.kind 'hierarchical_topk'"),
        ({"sae": CROSS, "penalty": L1}, "tilt does not apply to sae.kind 'crosscoder'"),
        ({"sae": CLT, "penalty": L1}, "tilt does not apply to sae.kind 'clt'"),
    ],
)
def test_refused_where_it_does_not_apply(data, match):
    data = {**data, "name": "x"}
    cfg = from_dict(SAETrainConfig, {**data, "reconstruction_tilt": 1.0})
    with pytest.raises(ValueError, match=match):
        cfg.validate()
    from_dict(SAETrainConfig, data).validate()  # the same entry untilted is fine


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_tilt_is_refused(bad):
    cfg = train_cfg(0.0)
    cfg.reconstruction_tilt = bad
    with pytest.raises(ValueError, match="reconstruction_tilt must be a finite number"):
        cfg.validate()


def test_latent_parallel_refuses_the_tilt():
    from saekit.train.mesh import check_latent_saes

    check_latent_saes([train_cfg(0.0)], 2)
    with pytest.raises(ValueError, match="saes.0: reconstruction_tilt has no latent-sharded"):
        check_latent_saes([train_cfg(1.0)], 2)


def test_recipes_take_the_tilt():
    for recipe in (recipe_batchtopk, recipe_matryoshka):
        plain = recipe(64, 4, 100, 32, 1e-3)
        assert "reconstruction_tilt" not in plain and recipe(64, 4, 100, 32, 1e-3, tilt=0) == plain
        tilted = recipe(64, 4, 100, 32, 1e-3, tilt=2.0)
        assert tilted == {**plain, "reconstruction_tilt": 2.0}
        cfg = from_dict(SAETrainConfig, {**tilted, "sae": {**tilted["sae"], "d_in": 8}})
        cfg.validate()
        assert cfg.reconstruction_tilt == 2.0


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("matryoshka", [False, True])
def test_a_tiny_run_trains_with_the_tilt(matryoshka):
    """Finite losses that fall, and a run visibly apart from the untilted one."""
    g = torch.Generator().manual_seed(11)
    feats = torch.randn(32, D, generator=g)
    batches = []
    for _ in range(40):
        c = torch.rand(64, 32, generator=g) * (torch.rand(64, 32, generator=g) < 0.1)
        batches.append(c @ feats * 7 + 3)
    runs = {}
    for t in (0.0, 2.0):
        cfg = train_cfg(t, matryoshka=matryoshka)
        cfg.sae.dtype, cfg.lr, cfg.warmup_steps = "float32", 1e-2, 2
        member = Member(cfg, len(batches), "cpu")
        member.init_from_data(torch.cat(batches[:4]))
        metrics = [member.train_step(x, i) for i, x in enumerate(batches)]
        recon = [float(m.reconstruction) for m in metrics]
        assert all(math.isfinite(r) for r in recon)
        assert sum(recon[-5:]) < 0.7 * sum(recon[:5]), recon
        runs[t] = (recon, member.sae.W_dec.detach().clone())
    assert runs[0.0][0][0] != runs[2.0][0][0]  # the logged term is the tilted one
    assert not torch.allclose(runs[0.0][1], runs[2.0][1])
