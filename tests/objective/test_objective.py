"""The objective, proven (issue 10): every supported combination of activation × reconstruction ×
penalty × revival × dead latents against a total composed by hand in float64, values and
gradients of every parameter, plus one optimizer step by hand and short runs that must learn.

The reference below is written from the formulas in the module docstrings and docs/design.md
and calls nothing from saekit.objective (losses, revival, matryoshka) or saekit.kernels: only
the parameter tensors are read off the SAE. saekit's side runs exactly as train/member.py does
(``Member``, its ``objective`` and ``TermInputs``), on the fast sparse path (kernel "torch") for
the TopK family. The usual traps are all set at once: data with a nonzero mean and a scale
s ≠ 1, b_dec and b_enc moved off their initial values, decoder rows of non-unit norm, 3-D input,
and every dead-latent case (all, none, some).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from saekit.core.configs import from_dict
from saekit.model.sae import SAE
from saekit.objective.terms import TermInputs
from saekit.train.member import Member
from saekit.train.member_config import SAETrainConfig

D, M, K = 6, 16, 3
B, T = 2, 5
N = B * T
K_AUX = min(D // 2, M)  # AuxK's documented default
LAM = 0.375  # exact in float32 too (Member holds λ in float32)
PEN_EPS, TANH_C = 0.05, 2.0  # not the defaults: the config must reach the formula
AUX_ALPHA, PREACT_COEF = 0.3, 0.7
GROUPS = [3, 5, 8]  # Matryoshka prefixes 3, 8, 16
JUMP_BANDWIDTH = 0.5  # wide, so many pre-activations sit inside the STE window
DEAD_SOME = [2, 11]  # fewer than K_AUX: the min(n_dead / k_aux, 1) factor is < 1

ACTIVATION_KINDS = ("relu", "topk", "batchtopk", "jumprelu", "prolu")
RECONSTRUCTIONS = ("plain", "matryoshka")
PENALTY_KINDS = ("none", "l1", "log", "sqrt", "tanh", "l0")
REVIVAL_KINDS = ("none", "auxk", "preact", "input")
DEAD_CASES = ("all", "none", "some")

SPARSITY = ("l1", "log", "sqrt", "tanh")
SUPPORTED = {
    # activation: (penalties it takes, revivals it takes). Reconstruction and the dead latents
    # never decide support. ReLU and ProLU are sparse only through a penalty; the L0 penalty
    # needs thresholds (JumpReLU); AuxK needs a TopK-style selection; the pre-activation revival
    # needs a firing threshold.
    "relu": ({*SPARSITY}, {"none"}),
    "topk": ({"none", *SPARSITY}, {"none", "auxk", "preact", "input"}),
    "batchtopk": ({"none", *SPARSITY}, {"none", "auxk", "preact", "input"}),
    "jumprelu": ({"none", *SPARSITY, "l0"}, {"none", "preact"}),
    "prolu": ({*SPARSITY}, {"none"}),
}

ALL_COMBOS = list(
    itertools.product(ACTIVATION_KINDS, RECONSTRUCTIONS, PENALTY_KINDS, REVIVAL_KINDS, DEAD_CASES)
)


def is_supported(act: str, penalty: str, revival: str) -> bool:
    penalties, revivals = SUPPORTED[act]
    return penalty in penalties and revival in revivals


SUPPORTED_COMBOS = [c for c in ALL_COMBOS if is_supported(c[0], c[2], c[3])]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread is fastest, and immune to a busy machine's oversubscription."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- configs


def activation_cfg(act: str, **extra) -> dict:
    cfg = {
        "relu": {"kind": "relu"},
        "topk": {"kind": "topk", "k": K, "kernel": "torch"},
        "batchtopk": {"kind": "batchtopk", "k": K, "kernel": "torch", "threshold_beta": 0.9},
        "jumprelu": {"kind": "jumprelu", "init_threshold": 0.3, "bandwidth": JUMP_BANDWIDTH},
        "prolu": {"kind": "prolu", "variant": "ste"},
    }[act]
    return {**cfg, **extra}


def penalty_cfg(kind: str, lam: float = LAM) -> dict | None:
    if kind == "none":
        return None
    cfg = {"kind": kind, "coefficient": lam}
    if kind in ("log", "sqrt"):
        cfg["eps"] = PEN_EPS
    if kind == "tanh":
        cfg["c"] = TANH_C
    return cfg


def revival_cfg(kind: str) -> dict:
    if kind in ("auxk", "input"):
        return {"kind": kind, "coefficient": AUX_ALPHA}
    if kind == "preact":
        return {"kind": "preact", "coefficient": PREACT_COEF}
    return {"kind": "none"}


def train_cfg(
    act, recon="plain", penalty="none", revival="none", dtype="float64", act_extra=None, **extra
):
    data = {
        "sae": {
            "d_in": extra.pop("d_in", D),
            "d_sae": extra.pop("d_sae", M),
            "activation": activation_cfg(act, **(act_extra or {})),
            "dtype": dtype,
        },
        "penalty": penalty_cfg(penalty, extra.pop("lam", LAM)),
        "revival": revival_cfg(revival),
        **extra,
    }
    if recon == "matryoshka":
        data["matryoshka"] = {"kind": "fixed", "groups": list(GROUPS)}
    return from_dict(SAETrainConfig, data)


# ----------------------------------------------------------------------------- which combos


def refusal_reasons(act: str, penalty: str, revival: str) -> list[tuple[str, str]]:
    """(field, kind) pairs the refusal must name besides sae.activation.kind."""
    penalties, revivals = SUPPORTED[act]
    reasons = []
    if penalty not in penalties:
        reasons.append(("penalty", penalty))
    if revival not in revivals:
        reasons.append(("revival.kind", revival))
    return reasons


def test_supported_set_is_the_table():
    """SAETrainConfig(...).objective() builds exactly the combinations of SUPPORTED; every other
    one is refused with a ValueError naming sae.activation.kind and the offending field."""
    built, refused = set(), set()
    for act, recon, penalty, revival, _dead in ALL_COMBOS:
        cfg = train_cfg(act, recon, penalty, revival)
        key = (act, penalty, revival)
        try:
            objective = cfg.objective()
        except ValueError as exc:
            refused.add(key)
            msg = str(exc)
            reasons = refusal_reasons(act, penalty, revival)
            assert reasons, f"{key} refused but the table supports it: {msg}"
            assert "sae.activation.kind" in msg and repr(act) in msg, msg
            named = [
                field
                for field, kind in reasons
                if field in msg and (kind == "none" or repr(kind) in msg)
            ]
            assert named, f"{key}: the message names none of {reasons}: {msg}"
            continue
        built.add(key)
        names = [t.name for t in objective.terms]
        expected = ["reconstruction"]
        expected += [] if penalty == "none" else ["penalty"]
        expected += [] if revival == "none" else ["revival"]
        assert names == expected, (key, names)
    table = {(a, p, r) for a, _, p, r, _ in SUPPORTED_COMBOS}
    assert built == table
    assert len(built) == 60 and len(refused) == 5 * 6 * 4 - 60


def test_default_revival_is_auxk_where_it_applies():
    for act in ACTIVATION_KINDS:
        data = {"sae": {"d_in": D, "d_sae": M, "activation": activation_cfg(act)}}
        if act in ("relu", "prolu"):
            data["penalty"] = {"kind": "l1", "coefficient": 1.0}
        names = [type(t).__name__ for t in from_dict(SAETrainConfig, data).objective().terms]
        assert ("AuxK" in names) == (act in ("topk", "batchtopk")), (act, names)


# ----------------------------------------------------------------------------- the reference


def _rect(u):
    """K(u) = 1[|u| < 1/2]."""
    return (u.abs() < 0.5).to(u.dtype)


class HandJumpReLU(torch.autograd.Function):
    """z = pre·H(pre − θ); ∂z/∂pre = H·g, ∂z/∂θ = −(θ/ε)·K((pre − θ)/ε)·g."""

    @staticmethod
    def forward(ctx, pre, theta, eps):
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return torch.where(pre > theta, pre, torch.zeros_like(pre))

    @staticmethod
    def backward(ctx, g):
        pre, theta = ctx.saved_tensors
        eps = ctx.eps
        grad_pre = torch.where(pre > theta, g, torch.zeros_like(g))
        grad_theta = (-(theta / eps) * _rect((pre - theta) / eps) * g).sum(0)
        return grad_pre, grad_theta, None


class HandStep(torch.autograd.Function):
    """H(pre − θ); no gradient to pre, ∂H/∂θ = −(1/ε)·K((pre − θ)/ε)·g."""

    @staticmethod
    def forward(ctx, pre, theta, eps):
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, g):
        pre, theta = ctx.saved_tensors
        return None, (-(1.0 / ctx.eps) * _rect((pre - theta) / ctx.eps) * g).sum(0), None


class HandProLU(torch.autograd.Function):
    """z = m·H(m + b)·H(m); gate = H(m + b)·H(m); ste: ∂m = g·gate·(1 + m), ∂b = g·gate·m;
    relu: ∂m = ∂b = g·gate."""

    @staticmethod
    def forward(ctx, m, b, variant):
        gate = ((m + b > 0) & (m > 0)).to(m.dtype)
        ctx.save_for_backward(m, gate)
        ctx.variant = variant
        return m * gate

    @staticmethod
    def backward(ctx, g):
        m, gate = ctx.saved_tensors
        if ctx.variant == "ste":
            return g * gate * (1 + m), (g * gate * m).sum(0), None
        return g * gate, (g * gate).sum(0), None


def hand_f(a, kind):
    if kind == "l1":
        return a
    if kind == "log":
        return torch.log(a + PEN_EPS)
    if kind == "sqrt":
        return torch.sqrt(a + PEN_EPS)
    if kind == "tanh":
        return torch.tanh(TANH_C * a)
    raise AssertionError(kind)


def hand_forward(act, P, scale, x, k=K, bandwidth=JUMP_BANDWIDTH, variant="ste"):
    """(x_n, pre [N, M] differentiable, z [N, M]) by the formulas, in float64."""
    x_n = x.reshape(-1, x.shape[-1]).double() / scale
    x_c = x_n - P["b_dec"]
    if act == "prolu":
        pre = x_c @ P["W_enc"].T  # m: no encoder bias
        return x_n, pre, HandProLU.apply(pre, P["activation.bias"], variant)
    pre = x_c @ P["W_enc"].T + P["b_enc"]
    if act == "relu":
        z = torch.relu(pre)
    elif act == "topk":
        order = pre.detach().argsort(dim=-1, descending=True)[:, :k]  # per-token sort
        keep = torch.zeros_like(pre).scatter(1, order, 1.0)
        z = torch.relu(pre) * keep
    elif act == "batchtopk":
        flat = pre.detach().reshape(-1).argsort(descending=True)[: k * pre.shape[0]]
        keep = torch.zeros(pre.numel(), dtype=pre.dtype).index_fill(0, flat, 1.0)
        z = torch.relu(pre) * keep.view_as(pre)  # global sort of the flattened batch
    elif act == "jumprelu":
        z = HandJumpReLU.apply(pre, P["activation.threshold"], bandwidth)
    else:
        raise AssertionError(act)
    return x_n, pre, z


def hand_objective(act, recon, penalty, revival, P, scale, x, dead, lam=LAM, k=K, variant="ste"):
    """Every term by hand: returns ({name: contribution}, z)."""
    x_n, pre, z = hand_forward(act, P, scale, x, k=k, variant=variant)
    W_dec, b_dec = P["W_dec"], P["b_dec"]
    norms = W_dec.norm(dim=-1)
    x_hat = z @ W_dec + b_dec
    prefixes = list(itertools.accumulate(GROUPS)) if recon == "matryoshka" else [M]
    parts = {}
    # reconstruction: mean_n ‖x_n − x̂_n‖², or (1/P) Σ_j mean_n ‖x_n − x̂_{p_j}‖²
    recs = []
    for p in prefixes:
        x_hat_p = z[:, :p] @ W_dec[:p] + b_dec  # an explicit decode of every prefix
        recs.append((x_n - x_hat_p).pow(2).sum(-1).mean())
    parts["reconstruction"] = sum(recs) / len(recs)
    # penalty: f(|z|·‖W_dec,i‖) over ALL latents (f(0) included), prefix-averaged
    if penalty != "none":
        if penalty == "l0":
            theta = P["activation.threshold"]
            per_latent = HandStep.apply(pre.detach(), theta, JUMP_BANDWIDTH)
        else:
            per_latent = hand_f(z.abs() * norms, penalty)
        S = sum(per_latent[:, :p].sum(-1).mean() for p in prefixes) / len(prefixes)
        parts["penalty"] = lam * S
    dead_f = dead.to(torch.float64)
    n_dead = dead_f.sum()
    if revival in ("auxk", "input"):
        # auxk: the full reconstruction's residual; input: the centred input (stop-gradient)
        e = (x_n - x_hat).detach() if revival == "auxk" else (x_n - b_dec).detach()
        cand = torch.where(dead, torch.relu(pre.detach()), torch.full_like(pre, -math.inf))
        chosen = cand.argsort(dim=-1, descending=True)[:, :K_AUX]
        sel = torch.zeros_like(pre).scatter(1, chosen, 1.0) * dead_f
        e_hat = (torch.relu(pre) * sel) @ W_dec  # NO b_dec
        mse = (e_hat - e).pow(2).sum(-1).mean()
        V = (e - e.mean(0)).pow(2).sum(-1).mean()
        parts["revival"] = AUX_ALPHA * torch.clamp(n_dead / K_AUX, max=1.0) * mse / V
    elif revival == "preact":
        if act == "topk":  # per token: the k-th largest pre, ReLU'd
            theta = torch.relu(pre.detach().sort(dim=-1, descending=True).values[:, k - 1 : k])
        elif act == "batchtopk":  # the batch's smallest positive kept value
            kept = z.detach()[z.detach() > 0]
            theta = kept.min() if kept.numel() else torch.zeros((), dtype=torch.float64)
        else:  # per latent
            theta = P["activation.threshold"].detach()
        gap = torch.relu(theta - pre)
        per_dead = 1 / torch.clamp(n_dead, min=1.0)  # normalised per dead latent
        parts["revival"] = PREACT_COEF * (gap * dead_f * norms.detach()).sum(-1).mean() * per_dead
    return parts, z


# ----------------------------------------------------------------------------- fixtures


def data(seed=0, n=64):
    g = torch.Generator().manual_seed(seed)
    x_init = torch.randn(n, D, generator=g, dtype=torch.float64) * 7 + 3
    x = torch.randn(B, T, D, generator=g, dtype=torch.float64) * 7 + 3
    return x_init, x


@torch.no_grad()
def perturb(sae: SAE, seed=1):
    """Move every parameter off its initial value: b_dec off the data mean, b_enc nonzero where
    the activation has one, decoder rows of norm in [0.5, 2], thresholds around the pre."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    sae.W_enc.add_(0.3 * rnd(M, D))
    sae.W_dec.mul_(0.5 + 1.5 * torch.rand(M, 1, generator=g, dtype=torch.float64))
    sae.b_dec.add_(0.2 * rnd(D))
    if sae.activation.uses_encoder_bias:
        sae.b_enc.copy_(0.3 * rnd(M))
    act = sae.activation
    if hasattr(act, "theta"):
        act.threshold.copy_(0.05 + 0.9 * torch.rand(M, generator=g, dtype=torch.float64))
    if hasattr(act, "bias") and isinstance(act.bias, torch.nn.Parameter):
        act.bias.copy_(0.5 * rnd(M))


def dead_mask(case: str) -> torch.Tensor:
    mask = torch.zeros(M, dtype=torch.bool)
    if case == "all":
        mask[:] = True
    elif case == "some":
        mask[DEAD_SOME] = True
    return mask


def make_member(act, recon, penalty, revival, **cfg_extra) -> Member:
    x_init, _ = data()
    member = Member(train_cfg(act, recon, penalty, revival, **cfg_extra), 10, "cpu")
    member.init_from_data(x_init)
    perturb(member.sae)
    return member


def leaves(sae: SAE) -> dict[str, torch.Tensor]:
    return {
        name: p.detach().clone().requires_grad_(p.requires_grad)
        for name, p in sae.named_parameters()
    }


def saekit_objective(member: Member, x, dead):
    """As Member.train_step computes the loss (no optimizer step)."""
    sae = member.sae
    sae.train()
    sae.zero_grad(set_to_none=True)
    out = sae(x)
    inputs = TermInputs(sae, out, dead, member.lambda_value(), member.prefixes())
    total, parts = member.objective(inputs)
    total.backward()
    return out, total, parts


def grads(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {
        n: (p.grad if p.grad is not None else torch.zeros_like(p))
        for n, p in params.items()
        if p.requires_grad
    }


# ----------------------------------------------------------------------------- the proof


def _id(combo):
    return "-".join(combo)


@pytest.mark.parametrize("combo", SUPPORTED_COMBOS, ids=[_id(c) for c in SUPPORTED_COMBOS])
def test_objective_matches_hand_total(combo):
    act, recon, penalty, revival, dead_case = combo
    member = make_member(act, recon, penalty, revival)
    sae = member.sae
    assert float(sae.scale) != 1.0 and sae.b_dec.abs().max() > 0.1
    _, x = data()
    dead = dead_mask(dead_case)

    out, total, parts = saekit_objective(member, x, dead)
    assert out.x_hat.shape == x.shape and total.dtype == torch.float64

    P = leaves(sae)
    ref_parts, _ = hand_objective(act, recon, penalty, revival, P, sae.scale.double(), x, dead)
    ref_total = sum(ref_parts.values())
    ref_total.backward()

    assert sorted(parts) == sorted(ref_parts)
    for name, value in ref_parts.items():
        torch.testing.assert_close(
            parts[name].detach(), value.detach(), rtol=1e-10, atol=1e-13, msg=f"term {name}"
        )
    torch.testing.assert_close(total.detach(), ref_total.detach(), rtol=1e-10, atol=0)

    ours, theirs = grads(dict(sae.named_parameters())), grads(P)
    assert sorted(ours) == sorted(theirs)
    for name in theirs:
        torch.testing.assert_close(
            ours[name], theirs[name], rtol=1e-9, atol=1e-11, msg=f"gradient of {name}"
        )
    if not sae.activation.uses_encoder_bias:
        assert sae.b_enc.grad is None and not sae.b_enc.any()

    # the case really exercises what it names
    for name in ("W_enc", "W_dec", "b_dec"):
        assert theirs[name].abs().max() > 0, name
    if act == "jumprelu":
        assert theirs["activation.threshold"].abs().max() > 0
    if revival != "none":
        assert (ref_parts["revival"] > 0) == (dead_case != "none")


@pytest.mark.parametrize("act", ["topk", "batchtopk"])
def test_reference_kernel_matches_hand_total(act):
    """kernel "reference" (dense autograd) proves the same total as the sparse fast path."""
    member = make_member(act, "matryoshka", "log", "auxk", act_extra={"kernel": "reference"})
    _, x = data()
    dead = dead_mask("all")
    _, total, _ = saekit_objective(member, x, dead)
    P = leaves(member.sae)
    ref_parts, _ = hand_objective(
        act, "matryoshka", "log", "auxk", P, member.sae.scale.double(), x, dead
    )
    ref = sum(ref_parts.values())
    ref.backward()
    torch.testing.assert_close(total.detach(), ref.detach(), rtol=1e-10, atol=0)
    for name, p in member.sae.named_parameters():
        torch.testing.assert_close(p.grad, P[name].grad, rtol=1e-9, atol=1e-11, msg=name)


def test_prolu_relu_variant_matches_hand_total():
    member = make_member("prolu", "plain", "l1", "none", act_extra={"variant": "relu"})
    _, x = data()
    dead = dead_mask("none")
    _, total, _ = saekit_objective(member, x, dead)
    P = leaves(member.sae)
    ref_parts, _ = hand_objective(
        "prolu", "plain", "l1", "none", P, member.sae.scale.double(), x, dead, variant="relu"
    )
    ref = sum(ref_parts.values())
    ref.backward()
    torch.testing.assert_close(total.detach(), ref.detach(), rtol=1e-10, atol=0)
    g = P["activation.bias"].grad
    torch.testing.assert_close(member.sae.activation.bias.grad, g, rtol=1e-9, atol=1e-11)


# ----------------------------------------------------------------------------- one step by hand

STEP_CASES = [
    ("topk", "none", "auxk"),
    ("batchtopk", "l1", "preact"),
    ("jumprelu", "l0", "preact"),
]


@pytest.mark.parametrize("case", STEP_CASES, ids=["-".join(c) for c in STEP_CASES])
def test_train_step_matches_hand_step(case):
    """Member.train_step = the hand loss with the dead mask taken BEFORE the batch is counted,
    the decoder-parallel gradient removed (unit-norm activations), clipping, Adam's first step
    p − lr·g/(|g| + eps), decoder rows renormalised, counters reset where a latent fired."""
    act, penalty, revival = case
    lr, clip, dead_tokens = 1e-2, 0.5, 25
    member = make_member(
        act,
        "plain",
        penalty,
        revival,
        lr=lr,
        grad_clip=clip,
        warmup_steps=0,
        decay_start=1.0,
        dead_tokens=dead_tokens,
    )
    sae = member.sae
    _, x = data()
    # latents 0-5 dead before the batch; 6-11 one token short of dead (dead after counting
    # this batch unless they fire); 12-15 alive.
    counters = torch.zeros(M, dtype=torch.int64)
    counters[:6] = dead_tokens
    counters[6:12] = dead_tokens - 1
    member.tokens_since_fired = counters.clone()
    dead = counters >= dead_tokens

    P = leaves(sae)
    ref_parts, z = hand_objective(act, "plain", penalty, revival, P, sae.scale.double(), x, dead)
    ref_total = sum(ref_parts.values())
    ref_total.backward()
    G = grads(P)
    unit = act in ("topk", "batchtopk")
    if unit:
        W = P["W_dec"].detach()
        u = W / W.norm(dim=-1, keepdim=True)
        G_par = G["W_dec"]
        G["W_dec"] = G_par - (G_par * u).sum(-1, keepdim=True) * u
        assert (G["W_dec"].sign() != G_par.sign()).any()  # the projection changes the step
    norm = torch.sqrt(sum(g.pow(2).sum() for g in G.values()))
    G = {n: g * min(1.0, clip / (float(norm) + 1e-6)) for n, g in G.items()}
    expected = {n: P[n].detach() - lr * g / (g.abs() + 1e-8) for n, g in G.items()}
    if unit:
        expected["W_dec"] = expected["W_dec"] / expected["W_dec"].norm(dim=-1, keepdim=True)
    z_fired = z.detach()
    fired = (z_fired != 0).any(0)

    metrics = member.train_step(x.reshape(N, D), step=0)

    torch.testing.assert_close(metrics.loss, ref_total.detach(), rtol=1e-10, atol=0)
    assert float(metrics.dead_fraction) == pytest.approx(float(dead.double().mean()))
    assert float(metrics.l0) == pytest.approx(float((z_fired != 0).sum(-1).double().mean()))
    for name, value in expected.items():
        torch.testing.assert_close(
            dict(sae.named_parameters())[name].detach(), value, rtol=1e-9, atol=1e-12, msg=name
        )
    assert fired.any() and not fired.all()
    assert torch.equal(member.tokens_since_fired, torch.where(fired, 0, counters + N))
    if act == "batchtopk":
        m1 = z_fired[z_fired > 0].min()
        assert float(sae.activation.threshold) == pytest.approx(float(m1), rel=1e-12)
        # second step: θ ← βθ + (1 − β)m
        with torch.no_grad():
            _, _, z2 = hand_forward(act, leaves(sae), sae.scale.double(), x)
        m2 = z2[z2 > 0].min()
        member.train_step(x.reshape(N, D), step=1)
        beta = sae.activation.cfg.threshold_beta
        expected_theta = beta * float(m1) + (1 - beta) * float(m2)
        assert float(m2) != pytest.approx(float(m1))
        assert float(sae.activation.threshold) == pytest.approx(expected_theta, rel=1e-12)


def test_save_folds_the_scale(tmp_path):
    """A saved SAE takes raw activations: s folded into the weights (s = 1 in the file), the
    same latents and reconstruction as the unsaved one."""
    member = make_member("topk", "plain", "none", "auxk")
    sae = member.sae.eval()
    s = float(sae.scale)
    _, x = data()
    loaded = SAE.load(sae.save(tmp_path / "sae"))
    assert float(loaded.scale) == 1.0 and float(sae.scale) == s != 1.0
    torch.testing.assert_close(loaded.W_enc, sae.W_enc / s)
    torch.testing.assert_close(loaded.W_dec, sae.W_dec * s)
    torch.testing.assert_close(loaded.b_dec, sae.b_dec * s)
    torch.testing.assert_close(loaded(x).x_hat, sae(x).x_hat)
    torch.testing.assert_close(loaded.encode(x), sae.encode(x))


# ----------------------------------------------------------------------------- training learns


def sparse_data(n_batches, batch, d=8, n_features=16, active=2, seed=0):
    """x = Σ c_i f_i over `active` random features per token, + a mean; deterministic."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n_features, d, generator=g)
    feats /= feats.norm(dim=-1, keepdim=True)
    mean = torch.randn(d, generator=g)
    out = []
    for _ in range(n_batches):
        idx = torch.rand(batch, n_features, generator=g).argsort(-1)[:, :active]
        c = torch.zeros(batch, n_features).scatter(
            1, idx, 0.5 + torch.rand(batch, active, generator=g)
        )
        out.append(c @ feats + mean)
    return out


def run_member(cfg: SAETrainConfig, batches, prepare=None):
    member = Member(cfg, len(batches), "cpu")
    member.init_from_data(torch.cat(batches[:4]))
    if prepare is not None:
        prepare(member)
    return member, [member.train_step(x, i) for i, x in enumerate(batches)]


def small_cfg(act, penalty="none", revival="none", lam=0.1, act_extra=None, **extra):
    return train_cfg(
        act,
        "plain",
        penalty,
        revival,
        dtype="float32",
        act_extra=act_extra,
        lam=lam,
        d_in=8,
        d_sae=32,
        lr=1e-2,
        warmup_steps=5,
        **extra,
    )


LEARN_CASES = [
    ("relu", "l1"),
    ("topk", "none"),
    ("batchtopk", "none"),
    ("jumprelu", "l0"),
    ("prolu", "sqrt"),
]


@pytest.mark.parametrize("act,penalty", LEARN_CASES)
def test_training_lowers_the_loss(act, penalty):
    extra = {"jumprelu": {"init_threshold": 0.1, "bandwidth": 0.05}}.get(act, {})
    if act in ("topk", "batchtopk"):
        extra = {"k": 2}
    cfg = small_cfg(act, penalty, "none", lam=0.01, act_extra=extra)
    _, metrics = run_member(cfg, sparse_data(80, 128))
    first = sum(float(m.reconstruction) for m in metrics[:5]) / 5
    last = sum(float(m.reconstruction) for m in metrics[-5:]) / 5
    assert last < 0.5 * first, (first, last)


@pytest.mark.parametrize("act,penalty", [("relu", "l1"), ("relu", "log"), ("jumprelu", "l0")])
def test_a_larger_lambda_gives_a_lower_l0(act, penalty):
    extra = {"init_threshold": 0.1, "bandwidth": 0.05} if act == "jumprelu" else None
    batches = sparse_data(80, 128)
    l0 = {}
    for lam in (1e-3, 0.3):
        _, metrics = run_member(small_cfg(act, penalty, lam=lam, act_extra=extra), batches)
        l0[lam] = sum(float(m.l0) for m in metrics[-5:]) / 5
    assert l0[0.3] < 0.7 * l0[1e-3], l0


def _all_dead_with_hogs(member: Member):
    """Every latent dead at the start, and latents 0-3 given a large encoder bias so that they
    take every token's top-k: the others never fire unless something revives them."""
    member.tokens_since_fired.fill_(member.cfg.dead_tokens)
    with torch.no_grad():
        member.sae.b_enc[:4] = 4.0


@pytest.mark.parametrize("revival", ["auxk", "none"])
def test_auxk_revives_dead_latents(revival):
    cfg = small_cfg("topk", "none", revival, act_extra={"k": 4}, dead_tokens=512)
    if revival == "auxk":
        cfg.revival.coefficient = 1.0
    _, metrics = run_member(cfg, sparse_data(120, 128), prepare=_all_dead_with_hogs)
    start, end = float(metrics[0].dead_fraction), float(metrics[-1].dead_fraction)
    assert start == 1.0
    if revival == "auxk":
        assert end < 0.6, end
    else:
        assert end >= 28 / 32, end  # only the four that took the top-k are alive
