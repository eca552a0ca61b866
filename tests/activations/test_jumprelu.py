"""JumpReLU brought up to date (issue 14, item 4): a directly parameterised θ kept in float32,
the straight-through estimate optionally passed to the pre-activations, the quadratic target-L0
penalty of Gemma Scope 2, and old log-θ checkpoints loading exactly.

References are written from the formulas (docs/design.md, "JumpReLU") in float64 with plain
loops over tokens and latents, on an SAE with every trap armed: raw 3-D input with a nonzero
mean, dataset scale s ≠ 1, nonzero b_dec and b_enc, decoder rows off unit norm.
"""

from __future__ import annotations

import json

import pytest
import torch

from saekit.model.config import SAEConfig
from saekit.model.sae import SAE
from saekit.objective.config import QuadraticL0Penalty
from saekit.objective.terms import Penalty, TermInputs
from saekit.train.member import Member
from saekit.train.member_config import SAETrainConfig

F64 = torch.float64
D, M, B, T = 6, 5, 3, 4
EPS = 0.8  # wide, so that many pre-activations sit inside the kernel window


def rectangle(u: float) -> float:
    return 1.0 if abs(u) < 0.5 else 0.0


def trap_sae(dtype: str = "float64", **activation) -> tuple[SAE, torch.Tensor]:
    """A JumpReLU SAE fitted to x·5 + 3 (s ≠ 1, b_dec ≠ 0) and a raw batch [B, T, d]; θ set to
    each latent's median pre-activation so that about half of the entries fire."""
    g = torch.Generator().manual_seed(0)
    cfg = SAEConfig(D, M, {"kind": "jumprelu", "bandwidth": EPS, **activation}, dtype=dtype)
    sae = SAE(cfg)
    sae.reset_parameters(generator=g)
    sae.init_from_data(torch.randn(64, D, generator=g, dtype=F64) * 5 + 3)
    x = (torch.randn(B, T, D, generator=g, dtype=F64) * 5 + 3).to(getattr(torch, dtype))
    with torch.no_grad():
        sae.W_enc.add_(0.3 * torch.randn(M, D, generator=g, dtype=F64))
        sae.W_dec.mul_(0.5 + torch.rand(M, 1, generator=g, dtype=F64))
        sae.b_enc.copy_(0.2 * torch.randn(M, generator=g, dtype=F64))
        sae.b_dec.add_(0.2 * torch.randn(D, generator=g, dtype=F64))
        median = sae(x).pre.median(0).values.clamp_min(0.05).to(torch.float32)
        if sae.activation.cfg.threshold_param == "log":
            sae.activation.log_threshold.copy_(median.log())
        else:
            sae.activation.threshold.copy_(median)
    assert float(sae.scale) != 1.0 and sae.b_dec.abs().max() > 0.1
    return sae, x


def reference_pre(sae: SAE, x: torch.Tensor) -> list[list[float]]:
    """pre_ni = Σ_d (x_nd / s − b_dec,d)·W_enc,id + b_enc,i, token by token."""
    s = float(sae.scale)
    W, b_enc, b_dec = (p.detach().double() for p in (sae.W_enc, sae.b_enc, sae.b_dec))
    rows = x.double().reshape(-1, D).tolist()
    return [
        [
            sum((row[d] / s - float(b_dec[d])) * float(W[i, d]) for d in range(D)) + float(b_enc[i])
            for i in range(M)
        ]
        for row in rows
    ]


def param_grads(sae: SAE) -> dict[str, torch.Tensor]:
    return {n: p.grad.double() for n, p in sae.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("to_input", [False, True], ids=["theta-only", "ste-to-input"])
def test_jumprelu_forward_and_backward_match_the_float64_formula(to_input):
    """z = pre·H(pre − θ); ∂θ_i = Σ_n −(θ_i/ε)K_ni g_ni; ∂pre_ni = H_ni g_ni (+ (θ_i/ε)K_ni g_ni
    with ste_to_input), reaching W_enc, b_enc and b_dec through pre = (x/s − b_dec)W_encᵀ
    + b_enc."""
    sae, x = trap_sae(ste_to_input=to_input)
    theta = sae.activation.threshold.tolist()
    g = torch.randn(B * T, M, generator=torch.Generator().manual_seed(5), dtype=F64)
    out = sae(x)
    (out.latents * g).sum().backward()

    pre, G = reference_pre(sae, x), g.tolist()
    N = len(pre)
    z_ref = [[pre[n][i] if pre[n][i] > theta[i] else 0.0 for i in range(M)] for n in range(N)]
    kern = [[rectangle((pre[n][i] - theta[i]) / EPS) for i in range(M)] for n in range(N)]
    dtheta = [sum(-(theta[i] / EPS) * kern[n][i] * G[n][i] for n in range(N)) for i in range(M)]
    dpre = [
        [
            (G[n][i] if pre[n][i] > theta[i] else 0.0)
            + (theta[i] / EPS * kern[n][i] * G[n][i] if to_input else 0.0)
            for i in range(M)
        ]
        for n in range(N)
    ]
    s = float(sae.scale)
    b_dec = sae.b_dec.detach().tolist()
    xc = [[v / s - b_dec[d] for d, v in enumerate(row)] for row in x.reshape(-1, D).tolist()]
    dW = [[sum(dpre[n][i] * xc[n][d] for n in range(N)) for d in range(D)] for i in range(M)]
    db_enc = [sum(dpre[n][i] for n in range(N)) for i in range(M)]
    W = sae.W_enc.tolist()
    db_dec = [-sum(dpre[n][i] * W[i][d] for n in range(N) for i in range(M)) for d in range(D)]

    grads = param_grads(sae)
    close = dict(rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(out.latents.double(), torch.tensor(z_ref, dtype=F64), **close)
    torch.testing.assert_close(
        grads["activation.threshold"], torch.tensor(dtheta, dtype=F64), **close
    )
    torch.testing.assert_close(grads["W_enc"], torch.tensor(dW, dtype=F64), **close)
    torch.testing.assert_close(grads["b_enc"], torch.tensor(db_enc, dtype=F64), **close)
    torch.testing.assert_close(grads["b_dec"], torch.tensor(db_dec, dtype=F64), **close)
    assert sum(k > 0 for row in kern for k in row) > N  # the window is really exercised
    assert any(0 < z_ref[n][i] for n in range(N) for i in range(M))


@pytest.mark.parametrize("to_input", [False, True], ids=["theta-only", "ste-to-input"])
def test_quadratic_l0_penalty_matches_the_float64_formula(to_input):
    """λ·mean_n (2/T)(L0_n − T)², L0_n = Σ_i H(pre_ni − θ_i); ∂θ_i = λ/N Σ_n (4/T)(L0_n − T)
    ·(−1/ε)K_ni; with ste_to_input the same term, negated, reaches pre (and so W_enc)."""
    lam, target = 0.7, 1.5
    sae, x = trap_sae(ste_to_input=to_input)
    theta = sae.activation.threshold.tolist()
    cfg = QuadraticL0Penalty(coefficient=lam, target_l0=target)
    out = sae(x)
    lam_t = torch.tensor(lam, dtype=F64)
    value = Penalty(cfg)(TermInputs(sae, out, torch.zeros(M, dtype=torch.bool), lam_t, None))
    value.backward()

    pre = reference_pre(sae, x)
    N = len(pre)
    l0 = [sum(1.0 for i in range(M) if pre[n][i] > theta[i]) for n in range(N)]
    ref = lam * sum(2 / target * (l0[n] - target) ** 2 for n in range(N)) / N
    kern = [[rectangle((pre[n][i] - theta[i]) / EPS) for i in range(M)] for n in range(N)]
    slope = [lam / N * 4 / target * (l0[n] - target) for n in range(N)]
    dtheta = [sum(slope[n] * (-1 / EPS) * kern[n][i] for n in range(N)) for i in range(M)]
    dpre = [[-slope[n] * (-1 / EPS) * kern[n][i] for i in range(M)] for n in range(N)]
    s = float(sae.scale)
    b_dec = sae.b_dec.detach().tolist()
    xc = [[v / s - b_dec[d] for d, v in enumerate(row)] for row in x.reshape(-1, D).tolist()]
    dW = [[sum(dpre[n][i] * xc[n][d] for n in range(N)) for d in range(D)] for i in range(M)]

    assert len(set(l0)) > 1 and min(abs(v - target) for v in l0) > 0  # L0_n spread around T
    assert value.item() == pytest.approx(ref, rel=1e-12)
    grads = param_grads(sae)
    torch.testing.assert_close(grads["activation.threshold"], torch.tensor(dtheta, dtype=F64))
    if to_input:
        torch.testing.assert_close(grads["W_enc"], torch.tensor(dW, dtype=F64))
        assert grads["W_enc"].abs().max() > 0
    else:  # the paper's estimator: the L0 penalty reaches θ only
        assert "W_enc" not in grads or grads["W_enc"].abs().max() == 0


def test_quadratic_l0_needs_a_target_fixes_lambda_and_refuses_matryoshka():
    with pytest.raises(ValueError, match="target_l0 must be set"):
        QuadraticL0Penalty(coefficient=1.0)
    with pytest.raises(ValueError, match="controller_rate means nothing"):
        QuadraticL0Penalty(coefficient=1.0, target_l0=4.0, controller_rate=0.1)
    entry = {
        "name": "q",
        "sae": {"d_in": D, "d_sae": 8, "activation": "jumprelu"},
        "penalty": {"kind": "quadratic_l0", "coefficient": 0.5, "target_l0": 3.0},
    }
    member = Member(SAETrainConfig(**entry), 10, "cpu")
    assert member.controller is None and float(member.lambda_value()) == 0.5
    bad = SAETrainConfig(**entry, matryoshka={"kind": "fixed", "groups": [4, 4]})
    with pytest.raises(ValueError, match="'quadratic_l0' with matryoshka"):
        bad.validate()
    relu = SAETrainConfig(**{**entry, "sae": {"d_in": D, "d_sae": 8, "activation": "relu"}})
    with pytest.raises(ValueError, match="'quadratic_l0' needs thresholds"):
        relu.validate()


# ------------------------------------------------------------------------------ under Adam


def adam_theta_run(threshold_param: str, steps: int, lr: float, init: float, **kw) -> torch.Tensor:
    """θ after ``steps`` Member steps whose loss is dominated by the L0 penalty (every pre
    inside the kernel window, so ∂L/∂θ < 0 on every step and Adam raises θ)."""
    entry = {
        "sae": {
            "d_in": D,
            "d_sae": M,
            "activation": {
                "kind": "jumprelu",
                "init_threshold": init,
                "bandwidth": 100.0,
                "threshold_param": threshold_param,
            },
            "dtype": kw.pop("dtype", "float32"),
        },
        "penalty": {"kind": "l0", "coefficient": 100.0},
        "revival": "none",
        "lr": lr,
        "warmup_steps": 0,
        "decay_start": 1.0,
        **kw,
    }
    member = Member(SAETrainConfig(**entry), steps, "cpu")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, D, generator=g) * 5 + 3
    member.init_from_data(x)
    for step_index in range(steps):
        member.train_step(x, step_index)
    return member.sae.activation.theta().detach()


def test_a_direct_threshold_moves_by_about_lr_per_step_where_log_theta_barely_moves():
    """SAELens #718: Adam moves log θ by ~lr, so θ by ~θ·lr: at θ = 0.001 and lr 1e-3 over 30
    steps that is ~3e-5; the direct θ moves by ~lr·steps = 0.03, 30 times its start."""
    steps, lr, init = 30, 1e-3, 0.001
    direct = adam_theta_run("direct", steps, lr, init) - init
    log = adam_theta_run("log", steps, lr, init) - init
    assert direct.min() > 0.8 * lr * steps
    assert log.max() < 1e-4  # θ·(e^(lr·steps) − 1) ≈ 3.0e-5: a thousandth of the useful move
    assert log.min() > 0  # it does move, in the right direction, only far too little


def test_threshold_stays_float32_and_exact_in_bf16_autocast():
    """SAELens #728: bf16 has ~0.4% resolution, so at θ = 1.1 an Adam step of lr = 7e-5 rounds
    away; θ is kept in float32 for a bf16 SAE and under autocast, and moves as in float32."""
    lr, init, steps = 7e-5, 1.1, 20
    assert torch.tensor(init, dtype=torch.bfloat16) + lr == torch.tensor(init, dtype=torch.bfloat16)
    bf16_sae = SAE(SAEConfig(D, M, {"kind": "jumprelu", "init_threshold": init}, dtype="bfloat16"))
    assert bf16_sae.activation.threshold.dtype == torch.float32
    assert bf16_sae.activation.threshold[0].item() == torch.tensor(init).item()  # not 1.1016
    bf16_sae.to(torch.bfloat16)  # Module.to casts every float parameter; θ stays float32
    assert bf16_sae.activation.threshold.dtype == torch.float32

    fp32 = adam_theta_run("direct", steps, lr, init) - init
    autocast = adam_theta_run("direct", steps, lr, init, autocast_bf16=True) - init
    bf16 = adam_theta_run("direct", steps, lr, init, dtype="bfloat16", autocast_bf16=True) - init
    assert fp32.min() > 0.8 * lr * steps
    torch.testing.assert_close(autocast, fp32, rtol=1e-3, atol=0)
    torch.testing.assert_close(bf16, fp32, rtol=1e-3, atol=0)


# ------------------------------------------------------------------------------ checkpoints


@pytest.mark.parametrize("param", ["direct", "log"])
def test_save_load_round_trip_keeps_theta_and_outputs(param, tmp_path):
    sae, x = trap_sae(dtype="float32", threshold_param=param, ste_to_input=True)
    sae.save(tmp_path / "sae")
    loaded = SAE.load(tmp_path / "sae")
    assert loaded.cfg.activation == sae.cfg.activation
    assert torch.equal(loaded.activation.theta(), sae.activation.theta())
    torch.testing.assert_close(loaded.encode(x), sae.encode(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loaded(x).x_hat, sae(x).x_hat, rtol=1e-5, atol=1e-4)


def test_a_checkpoint_saved_with_log_threshold_loads_into_the_direct_theta_exactly(tmp_path):
    """What saekit wrote before threshold_param existed: log θ under activation.log_threshold
    and no threshold_param in cfg.json. It loads as θ = exp(log θ), bit for bit, and encodes
    exactly as the log-parameterised SAE did."""
    saved, x = trap_sae(dtype="float32", threshold_param="log")
    saved.save(tmp_path / "old")
    saved.save(tmp_path / "as-saved")
    old = SAE.load(tmp_path / "as-saved")  # the log-parameterised SAE, its scale folded
    meta = json.loads((tmp_path / "old" / "cfg.json").read_text())
    del meta["config"]["activation"]["threshold_param"]
    (tmp_path / "old" / "cfg.json").write_text(json.dumps(meta))

    loaded = SAE.load(tmp_path / "old")
    assert loaded.cfg.activation.threshold_param == "direct"
    assert "log_threshold" not in dict(loaded.activation.named_parameters())
    assert torch.equal(loaded.activation.threshold, old.activation.log_threshold.exp())
    assert torch.equal(loaded.encode(x), old.encode(x))
    assert (loaded.encode(x) != 0).any() and (loaded.encode(x) == 0).any()
