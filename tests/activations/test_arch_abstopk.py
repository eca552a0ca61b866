"""AbsTopK (arXiv 2510.00404) against a float64 reference written from the paper's formula:
z_ni = pre_ni where |pre_ni| is among token n's k largest |pre|, signed; no ReLU.

Also the counts that used to assume ReLU latents: L0, density and dead latents count z ≠ 0,
so a latent that fires only negative is live (training counters and evaluation alike).
"""

from __future__ import annotations

import pytest
import torch
from arch_helpers import (
    F64,
    M,
    assert_same_gradients,
    data,
    dead_mask,
    leaves,
    make_member,
    saekit_loss,
)

from saekit.eval.metrics import MetricAccumulator, latent_counts
from saekit.model.config import SAEConfig
from saekit.model.sae import SAE

K = 3
PREACT_COEF = 0.7


def abstopk(kernel: str = "torch") -> dict:
    return {"kind": "abstopk", "k": K, "kernel": kernel}


def reference_latents(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Per token, by sorting |pre| in plain Python: the k largest magnitudes keep their sign."""
    z = torch.zeros_like(pre)
    for n in range(pre.shape[0]):
        order = sorted(range(pre.shape[1]), key=lambda i: -abs(float(pre[n, i])))
        for i in order[:k]:
            z[n, i] = pre[n, i]
    return z


def reference_loss(P: dict, scale: torch.Tensor, x: torch.Tensor, dead, revival: str):
    x_n = x.reshape(-1, x.shape[-1]) / scale
    pre = (x_n - P["b_dec"]) @ P["W_enc"].T + P["b_enc"]
    z = reference_latents(pre.detach(), K)
    z = torch.where(z != 0, pre, torch.zeros_like(pre))  # the kept entries carry pre's gradient
    x_hat = z @ P["W_dec"] + P["b_dec"]
    parts = {"reconstruction": (x_n - x_hat).pow(2).sum(-1).mean()}
    if revival == "preact":  # θ: each token's k-th largest |pre|
        theta = pre.detach().abs().sort(-1, descending=True).values[:, K - 1 : K]
        dead_f = dead.to(F64)
        weight = dead_f * P["W_dec"].detach().norm(dim=-1)
        gap = torch.relu(theta - pre)
        n_dead = dead_f.sum().clamp_min(1.0)
        parts["revival"] = PREACT_COEF * (gap * weight).sum(-1).mean() / n_dead
    return parts, z


@pytest.mark.parametrize("kernel", ["torch", "reference"])
@pytest.mark.parametrize(
    "revival,dead_case", [("none", "none"), ("preact", "all"), ("preact", "some")]
)
def test_abstopk_loss_and_every_gradient_match_the_float64_reference(kernel, revival, dead_case):
    revival_cfg = {"kind": "preact", "coefficient": PREACT_COEF} if revival == "preact" else "none"
    member = make_member(abstopk(kernel), revival=revival_cfg)
    sae = member.sae
    _, x = data()
    dead = dead_mask(dead_case)
    out, total, parts = saekit_loss(member, x, dead)
    assert out.x_hat.shape == x.shape

    P = leaves(sae)
    ref_parts, z_ref = reference_loss(P, sae.scale.double(), x, dead, revival)
    sum(ref_parts.values()).backward()
    assert sorted(parts) == sorted(ref_parts)
    for name, value in ref_parts.items():
        torch.testing.assert_close(parts[name].detach(), value.detach(), rtol=1e-10, atol=1e-13)
    z = out.latents.to_dense() if kernel == "torch" else out.latents
    torch.testing.assert_close(z.detach(), z_ref.detach(), rtol=1e-12, atol=1e-12)
    assert (z < 0).any() and (z > 0).any()  # the trap: negatives are kept, signed
    assert_same_gradients(sae, P)


def test_abstopk_refuses_auxk_naming_both_fields():
    with pytest.raises(ValueError, match=r"revival.kind 'auxk'.*'abstopk'.*\['preact'\]"):
        make_member(abstopk(), revival={"kind": "auxk"})


def test_abstopk_default_revival_is_none():
    assert [t.name for t in make_member(abstopk(), revival=None).objective.terms] == [
        "reconstruction"
    ]


def negative_only_sae() -> SAE:
    """Identity encoder on 4 latents, so pre = x_n − b_dec; latent 0 always has the largest |pre|
    and it is negative."""
    sae = SAE(SAEConfig(d_in=4, d_sae=4, activation={"kind": "abstopk", "k": 2}, dtype="float64"))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(4))
        sae.W_dec.copy_(torch.eye(4))
    return sae


NEGATIVE_X = torch.tensor(
    [[[-9.0, 1.0, 0.5, 2.0], [-8.0, 3.0, 0.1, 0.2]], [[-7.0, 0.3, 4.0, 0.1], [-9.5, 0.2, 0.3, 5]]],
    dtype=F64,
)


@pytest.mark.parametrize("kernel", ["torch", "reference"])
def test_counts_are_of_nonzero_latents_so_negative_only_latents_are_live(kernel):
    sae = negative_only_sae()
    sae.activation.cfg.kernel = kernel
    out = sae.train()(NEGATIVE_X)
    per_token, per_latent = latent_counts(out.latents)
    assert per_token.tolist() == [2, 2, 2, 2]
    assert per_latent.tolist() == [4, 1, 1, 2]  # latent 0: 4 tokens, all negative

    acc = MetricAccumulator(4, 4)
    acc.add(NEGATIVE_X, out.x_hat.detach(), out.latents)
    result = acc.result()
    assert result.l0 == 2.0 and result.dead_fraction == 0.0
    assert result.latent_density == [1.0, 0.25, 0.25, 0.5]


def test_training_counters_reset_a_latent_that_fired_only_negative():
    member = make_member({"kind": "abstopk", "k": 2}, revival="none")
    sae = member.sae
    x = data()[1].reshape(-1, data()[1].shape[-1])  # train_step takes [N, d]
    with torch.no_grad():
        z = sae.train()(x).latents.to_dense()
    negative_only = ((z < 0).any(0) & ~(z > 0).any(0)).nonzero().flatten()
    assert negative_only.numel() > 0  # the trap is armed
    member.tokens_since_fired.fill_(123)
    member.train_step(x, 0)
    fired = (z != 0).any(0)
    assert (member.tokens_since_fired == 0).equal(fired)
    assert (member.tokens_since_fired[negative_only] == 0).all()
    assert (member.tokens_since_fired[~fired] == 123 + x.shape[0]).all()


def test_abstopk_firing_threshold_is_each_tokens_smallest_kept_magnitude():
    sae = negative_only_sae()
    enc = sae.activation.encode(sae.encoder_view(), NEGATIVE_X.reshape(-1, 4))
    assert sae.activation.firing_threshold(enc).flatten().tolist() == [2.0, 3.0, 4.0, 5.0]


def test_abstopk_rejects_k_above_d_sae():
    with pytest.raises(ValueError, match="activation.k = 17 exceeds d_sae = 16"):
        SAEConfig(d_in=4, d_sae=M, activation={"kind": "abstopk", "k": 17})


def test_feature_report_density_counts_negative_only_latents():
    from saekit.report.collect import LatentCollector

    z_BTM = NEGATIVE_X.clone()  # latent 0 is negative on every token
    collector = LatentCollector(torch.arange(4))
    collector.update(z_BTM, torch.ones(2, 2, dtype=torch.bool), torch.zeros(2, 2, dtype=torch.long))
    assert collector.fired.tolist() == [4, 4, 4, 4]
    z_BTM[..., 1] = 0.0
    collector.update(z_BTM, torch.ones(2, 2, dtype=torch.bool), torch.zeros(2, 2, dtype=torch.long))
    assert collector.fired.tolist() == [8, 4, 8, 8]
