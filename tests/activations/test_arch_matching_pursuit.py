"""Matching Pursuit SAE (arXiv 2506.03093) against a float64 reference written from the
algorithm: one token at a time, one step at a time, a Python loop over the atoms for the
correlations; autograd of that loop gives the reference gradients.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from arch_helpers import (
    F64,
    D,
    M,
    assert_same_gradients,
    data,
    dead_mask,
    leaves,
    make_member,
    reference_auxk,
    round_trip,
    saekit_loss,
)

from saekit.core.configs import from_dict
from saekit.model.config import SAEConfig
from saekit.model.sae import SAE
from saekit.train.member_config import SAETrainConfig

K = 3
ALPHA = 0.3
K_AUX = D // 2  # AuxK's documented default


def mp(k: int = K, tau: float = 0.0) -> dict:
    return {"kind": "matching_pursuit", "k": k, "residual_threshold": tau}


def reference_code(x_n, W_dec, b_dec, k: int, tau: float) -> torch.Tensor:
    """z [N, M] by the textbook loop; differentiable in W_dec and b_dec."""
    n_tokens, d_sae = x_n.shape[0], W_dec.shape[0]
    atoms = [W_dec[i] / W_dec[i].norm() for i in range(d_sae)]
    rows = []
    for n in range(n_tokens):
        r = x_n[n] - b_dec
        r0 = float(r.detach().norm())
        coef = [torch.zeros((), dtype=F64) for _ in range(d_sae)]
        for _ in range(k):
            if tau > 0 and float(r.detach().norm()) <= tau * r0:
                break
            dots = [torch.dot(r, atoms[i]) for i in range(d_sae)]
            j = max(range(d_sae), key=lambda i: float(dots[i].detach()))
            c = torch.clamp(dots[j], min=0.0)
            coef[j] = coef[j] + c / W_dec[j].norm()
            r = r - c * atoms[j]
        rows.append(torch.stack(coef))
    return torch.stack(rows)


def reference_loss(P, scale, x, dead, tau: float, revival: str):
    x_n = x.reshape(-1, x.shape[-1]) / scale
    W_dec, b_dec = P["W_dec"], P["b_dec"]
    z = reference_code(x_n, W_dec, b_dec, K, tau)
    x_hat = z @ W_dec + b_dec
    parts = {"reconstruction": (x_n - x_hat).pow(2).sum(-1).mean()}
    if revival == "auxk":
        pre = (x_n - b_dec) @ (W_dec / W_dec.norm(dim=-1, keepdim=True)).T
        e = (x_n - x_hat).detach()
        parts["revival"] = reference_auxk(pre, e, W_dec, dead, ALPHA, K_AUX)
    return parts, z


@pytest.mark.parametrize(
    "tau,revival,dead_case",
    [(0.0, "none", "none"), (0.0, "auxk", "all"), (0.6, "auxk", "some"), (0.6, "none", "none")],
)
def test_mp_loss_and_every_gradient_match_the_float64_reference(tau, revival, dead_case):
    revival_cfg = {"kind": "auxk", "coefficient": ALPHA} if revival == "auxk" else "none"
    member = make_member(mp(tau=tau), revival=revival_cfg)
    sae = member.sae
    _, x = data()
    dead = dead_mask(dead_case)
    out, _, parts = saekit_loss(member, x, dead)
    assert out.x_hat.shape == x.shape

    P = leaves(sae)
    ref_parts, z_ref = reference_loss(P, sae.scale.double(), x, dead, tau, revival)
    sum(ref_parts.values()).backward()
    assert sorted(parts) == sorted(ref_parts)
    for name, value in ref_parts.items():
        torch.testing.assert_close(parts[name].detach(), value.detach(), rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(out.latents.detach(), z_ref.detach(), rtol=1e-10, atol=1e-12)
    l0 = (out.latents != 0).sum(-1)
    assert l0.max() <= K
    if tau > 0:  # the trap: the threshold stops some tokens before k steps, not all
        assert (l0 < K).any() and (l0 == K).any()
    # W_enc and b_enc are not part of a tied SAE: no gradient
    assert sae.W_enc.grad is None and sae.b_enc.grad is None
    assert_same_gradients(sae, P)


def test_mp_reconstruction_is_the_input_minus_the_final_residual_and_shrinks_each_step():
    """‖r‖ never grows: each step removes the residual's projection on a unit atom."""
    member = make_member(mp(k=M))
    sae = member.sae.eval()
    x_n = sae.normalise(data()[1])
    errors = []
    with torch.no_grad():
        for k in range(1, 7):
            sae.activation.cfg.k = k
            errors.append(
                float(
                    (x_n - sae.decode_n(sae.activation.encode(sae.encoder_view(), x_n).latents))
                    .pow(2)
                    .sum()
                )
            )
    assert all(b <= a + 1e-12 for a, b in itertools.pairwise(errors))
    assert errors[-1] < 0.9 * errors[0]


def test_mp_latents_are_scale_free_so_the_saved_sae_encodes_the_same(tmp_path):
    member = make_member(mp(tau=0.5))
    loaded = round_trip(member.sae, data()[1], tmp_path)
    assert loaded.cfg.activation.residual_threshold == 0.5
    assert not loaded.W_enc.requires_grad and loaded.W_dec.requires_grad


def test_mp_refuses_preact_revival_and_bad_fields():
    with pytest.raises(ValueError, match=r"revival.kind 'preact'.*'matching_pursuit'"):
        make_member(mp(), revival="preact")
    for bad, message in [
        ({"k": 0}, "k must be a positive integer"),
        ({"k": 2, "residual_threshold": 1.0}, "residual_threshold must be below 1"),
        ({"k": 2, "residual_threshold": -0.1}, "residual_threshold"),
    ]:
        with pytest.raises(ValueError, match=message):
            SAEConfig(d_in=D, d_sae=M, activation={"kind": "matching_pursuit", **bad})


def test_mp_default_revival_is_auxk_and_the_decoder_is_kept_unit_norm():
    member = make_member(mp(), revival=None)
    assert [t.name for t in member.objective.terms] == ["reconstruction", "revival"]
    sae = SAE(SAEConfig(d_in=D, d_sae=M, activation=mp()))
    assert sae.activation.unit_norm_decoder


def test_mp_refuses_whitening_whose_fold_would_untie_it():
    with pytest.raises(ValueError, match=r"sae.whitening does not apply.*'matching_pursuit'"):
        from_dict(
            SAETrainConfig,
            {
                "sae": {"d_in": D, "d_sae": M, "activation": mp(), "whitening": {"kind": "zca"}},
                "name": "mp",
            },
        ).validate()
