"""Gated SAE (arXiv 2404.16014) against a float64 reference written from the paper's eqs. 6–9:
W_mag = exp(r_mag) ⊙ W_gate built as a matrix, the gate and magnitude paths computed apart,
L = L_rec + λ·Σ ReLU(π_gate)·‖W_dec‖ + L_aux with a frozen copy of the decoder in L_aux.
"""

from __future__ import annotations

import math

import pytest
import torch
from arch_helpers import (
    assert_same_gradients,
    data,
    dead_mask,
    leaves,
    make_member,
    saekit_loss,
)

from saekit.activations import ACTIVATIONS

LAM = 0.375
AUX = 0.6
TANH_C = 2.0


def gated(aux: float = AUX) -> dict:
    return {"kind": "gated", "aux_coefficient": aux}


def reference_loss(P: dict, scale, x, penalty: str):
    x_n = x.reshape(-1, x.shape[-1]) / scale
    W_gate, b_gate = P["W_enc"], P["b_enc"]
    W_mag = P["activation.r_mag"].exp()[:, None] * W_gate  # [M, d]
    x_c = x_n - P["b_dec"]
    pi_gate = x_c @ W_gate.T + b_gate
    pi_mag = x_c @ W_mag.T + P["activation.b_mag"]
    f = torch.where(pi_gate > 0, torch.relu(pi_mag), torch.zeros_like(pi_mag))
    x_hat = f @ P["W_dec"] + P["b_dec"]
    a = torch.relu(pi_gate) * P["W_dec"].norm(dim=-1)
    per_latent = a if penalty == "l1" else torch.tanh(TANH_C * a)
    W_frozen, b_frozen = P["W_dec"].detach(), P["b_dec"].detach()
    x_hat_gate = torch.relu(pi_gate) @ W_frozen + b_frozen
    parts = {
        "reconstruction": (x_n - x_hat).pow(2).sum(-1).mean(),
        "penalty": LAM * per_latent.sum(-1).mean(),
        "aux": AUX * (x_n - x_hat_gate).pow(2).sum(-1).mean(),
    }
    return parts, f


@pytest.mark.parametrize("penalty", ["l1", "tanh"])
def test_gated_loss_and_every_gradient_match_the_float64_reference(penalty):
    pen = {"kind": penalty, "coefficient": LAM, **({"c": TANH_C} if penalty == "tanh" else {})}
    member = make_member(gated(), penalty=pen)
    sae = member.sae
    _, x = data()
    out, total, parts = saekit_loss(member, x, dead_mask("some"))
    assert out.x_hat.shape == x.shape

    P = leaves(sae)
    ref_parts, f = reference_loss(P, sae.scale.double(), x, penalty)
    sum(ref_parts.values()).backward()
    assert sorted(parts) == sorted(ref_parts)
    for name, value in ref_parts.items():
        torch.testing.assert_close(parts[name].detach(), value.detach(), rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(out.latents.detach(), f.detach(), rtol=1e-12, atol=1e-12)
    # the trap: a gate open with π_mag < 0 (z = 0), a gate shut with π_mag > 0 (z = 0)
    pre_gate = out.encoding.preacts.detached
    assert ((pre_gate > 0) & (out.latents == 0)).any() and (out.latents > 0).any()
    assert_same_gradients(sae, P)


def test_gated_gate_learns_only_from_penalty_and_aux():
    """Without the penalty and aux terms, b_enc (b_gate) gets no gradient: H has none."""
    member = make_member(gated(aux=0.0), penalty={"kind": "l1", "coefficient": 1e-30})
    sae = member.sae
    saekit_loss(member, data()[1], dead_mask("none"))
    assert sae.b_enc.grad.abs().max() < 1e-25
    assert sae.activation.b_mag.grad.abs().max() > 0


def test_gated_needs_a_penalty_and_takes_no_revival_or_l0():
    with pytest.raises(ValueError, match="'gated' is sparse only through a penalty"):
        make_member(gated())
    with pytest.raises(ValueError, match="penalty.kind 'l0' needs thresholds"):
        make_member(gated(), penalty={"kind": "l0", "coefficient": 1.0})
    with pytest.raises(ValueError, match=r"revival.kind 'preact'.*'gated'"):
        make_member(gated(), penalty={"kind": "l1", "coefficient": 1.0}, revival="preact")
    cls = ACTIVATIONS["gated"]
    assert not cls.unit_norm_decoder and cls.needs_penalty and not cls.revival_signals


def test_gated_rejects_a_bad_aux_coefficient():
    for bad in (-1.0, math.nan):
        with pytest.raises(ValueError, match=r"aux_coefficient.*(>= 0|finite number)"):
            make_member(gated(aux=bad), penalty={"kind": "l1", "coefficient": 1.0})
