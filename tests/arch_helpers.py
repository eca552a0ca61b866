"""Shared set-up for the architecture specification tests (test_arch_*.py).

Each architecture test builds an SAE the way training does (``Member``: config → SAE →
``init_from_data`` → objective), arms the usual traps (data with a nonzero mean and scale
s ≠ 1, b_dec moved off the data mean, b_enc nonzero, decoder rows of non-unit norm, 3-D input),
runs saekit's loss and backward exactly as ``Member.train_step`` does, and compares values and
the gradient of every parameter with a float64 reference the test writes from the paper.
"""

from __future__ import annotations

import math

import torch
from test_objective import leaves, saekit_objective  # noqa: F401 (leaves: re-exported)

from saekit.core.configs import from_dict
from saekit.model.sae import SAE
from saekit.train.member import Member
from saekit.train.member_config import SAETrainConfig

F64 = torch.float64
D, M = 6, 16
B, T = 2, 5
N = B * T


def data(seed: int = 0, n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_init [n, D] for the scale and b_dec, x [B, T, D]): mean 3, spread 7, so s ≠ 1."""
    g = torch.Generator().manual_seed(seed)
    x_init = torch.randn(n, D, generator=g, dtype=F64) * 7 + 3
    x = torch.randn(B, T, D, generator=g, dtype=F64) * 7 + 3
    return x_init, x


def make_member(activation: dict, penalty: dict | None = None, revival="none", **extra) -> Member:
    cfg = from_dict(
        SAETrainConfig,
        {
            "sae": {"d_in": D, "d_sae": M, "activation": activation, "dtype": "float64"},
            "penalty": penalty,
            "revival": revival,
            "name": "arch",
            **extra,
        },
    )
    cfg.validate()  # as a run's config is
    member = Member(cfg, 10, "cpu")
    member.init_from_data(data()[0])
    perturb(member.sae)
    assert float(member.sae.scale) != 1.0 and member.sae.b_dec.abs().max() > 0.1
    return member


@torch.no_grad()
def perturb(sae: SAE, seed: int = 1) -> None:
    """Every shared parameter off its initial value; the activation's own parameters too."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=F64)

    sae.W_enc.add_(0.3 * rnd(M, D))
    sae.W_dec.mul_(0.5 + 1.5 * torch.rand(M, 1, generator=g, dtype=F64))
    sae.b_dec.add_(0.2 * rnd(D))
    if sae.activation.uses_encoder_bias:
        sae.b_enc.copy_(0.3 * rnd(M))
    for param in sae.activation.parameters():
        param.add_(0.3 * rnd(*param.shape))


def dead_mask(case: str) -> torch.Tensor:
    mask = torch.zeros(M, dtype=torch.bool)
    if case == "all":
        mask[:] = True
    elif case == "some":
        mask[[2, 11]] = True
    return mask


def reference_auxk(pre, e, W_dec, dead, alpha: float, k_aux: int) -> torch.Tensor:
    """AuxK from its docstring (revival.auxk_loss): the k_aux largest ReLU(pre) among dead
    latents fit the stop-gradient residual e through W_dec, no b_dec, over e's variance."""
    cand = torch.where(dead, torch.relu(pre.detach()), torch.full_like(pre, -math.inf))
    chosen = cand.argsort(dim=-1, descending=True)[:, :k_aux]
    sel = torch.zeros_like(pre).scatter(1, chosen, 1.0) * dead.to(F64)
    e_hat = (torch.relu(pre) * sel) @ W_dec
    mse = (e_hat - e).pow(2).sum(-1).mean()
    variance = (e - e.mean(0)).pow(2).sum(-1).mean()
    return alpha * min(float(dead.sum()) / k_aux, 1.0) * mse / variance


# The objective proof's helpers (tests/objective/test_objective.py): fresh float64 leaves holding
# the SAE's parameter values, and the loss + backward exactly as Member.train_step runs them.
saekit_loss = saekit_objective


def assert_same_gradients(sae: SAE, ref: dict[str, torch.Tensor]) -> None:
    """Every trained parameter's gradient equals the reference's, and the case exercised it."""
    ours = {n: p.grad for n, p in sae.named_parameters() if p.requires_grad}
    theirs = {n: p.grad for n, p in ref.items() if p.requires_grad}
    assert sorted(ours) == sorted(theirs)
    for name, expected in theirs.items():
        assert expected is not None and expected.abs().max() > 0, f"{name}: no gradient"
        assert ours[name] is not None, f"{name}: saekit gave no gradient"
        torch.testing.assert_close(
            ours[name], expected, rtol=1e-9, atol=1e-11, msg=f"gradient of {name}"
        )


def round_trip(sae: SAE, x: torch.Tensor, tmp_path) -> SAE:
    """save → load gives the same latents and reconstruction on raw input (s folded)."""
    sae.eval()
    loaded = SAE.load(sae.save(tmp_path / "sae"))
    assert loaded.cfg == sae.cfg
    with torch.no_grad():
        z, z_loaded = sae.encode(x), loaded.encode(x)
        torch.testing.assert_close(z_loaded, z, rtol=1e-9, atol=1e-10)
        assert (z_loaded != 0).equal(z != 0)
        torch.testing.assert_close(loaded(x).x_hat, sae(x).x_hat, rtol=1e-9, atol=1e-9)
    assert float(loaded.scale) == 1.0
    return loaded
