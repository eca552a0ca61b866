"""Issue 28: a TopK transcoder's AuxK through the dense column path (few near-dead latents)
for every (d_in, d_out) shape, against AuxK written out by hand in float64.

The column path allocated the decoder gradient [M, d_in] instead of [M, d_out]: a transcoder
with d_out ≠ d_in crashed as soon as a few latents were near death.
"""

from __future__ import annotations

import math

import pytest
import torch

from saekit.model.config import SAEConfig
from saekit.model.sae import SAE
from saekit.objective import revival
from saekit.objective.revival import auxk_loss

F64 = torch.float64
M, K, K_AUX, N_DEAD = 29, 3, 4, 3
PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")


def make_transcoder(d_in, d_out):
    cfg = SAEConfig(
        d_in=d_in, d_out=d_out, d_sae=M, activation={"kind": "topk", "k": K}, dtype="float64"
    )
    sae = SAE(cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.copy_(0.1 * torch.randn_like(sae.b_enc))
        sae.W_enc.add_(0.3 * torch.randn_like(sae.W_enc))
    return sae.train()


def hand_auxk(sae, x_n, y_n, dead):
    """The transcoder's encoder reads x_n uncentred; ê = ReLU(pre)·sel W_dec, no b_dec."""
    pre = x_n @ sae.W_enc.T + sae.b_enc
    top = pre.detach().topk(K, dim=-1).indices
    z = torch.zeros_like(pre).scatter(1, top, torch.relu(pre).gather(1, top))
    e = (y_n - (z @ sae.W_dec + sae.b_dec)).detach()
    cand = torch.where(dead, torch.relu(pre.detach()), torch.full_like(pre, -math.inf))
    chosen = cand.argsort(dim=-1, descending=True)[:, :K_AUX]
    sel = torch.zeros_like(pre).scatter(1, chosen, 1.0) * dead.to(F64)
    e_hat = (torch.relu(pre) * sel) @ sae.W_dec
    V = (e - e.mean(0)).pow(2).sum(-1).mean()
    return (
        (1 / 32) * torch.clamp(dead.sum() / K_AUX, max=1.0) * (e_hat - e).pow(2).sum(-1).mean() / V
    )


@pytest.mark.parametrize("d_in,d_out", [(16, 12), (16, 16), (12, 16)])
def test_transcoder_auxk_column_path_matches_the_hand_formula(d_in, d_out, monkeypatch):
    calls = []
    real = revival.columns_decode
    monkeypatch.setattr(revival, "columns_decode", lambda *a: calls.append(1) or real(*a))
    sae = make_transcoder(d_in, d_out)
    g = torch.Generator().manual_seed(1)
    x = 2.0 * torch.randn(20, d_in, generator=g, dtype=F64) + 1.0
    y = torch.randn(20, d_out, generator=g, dtype=F64)
    dead = torch.zeros(M, dtype=torch.bool)
    dead[[2, 11, 25]] = True
    out = sae(x, y)
    loss = auxk_loss(
        out.encoding.preacts, out.target_n - out.x_hat_n, sae.W_dec, dead,
        k_aux=K_AUX, dead_cols=torch.nonzero(dead).reshape(-1),
    )  # fmt: skip
    assert calls == [1], "the few near-dead columns must take the dense column path"
    expected = hand_auxk(sae, sae.normalise(x), sae.normalise_target(y), dead)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    params = [getattr(sae, p) for p in PARAMS]
    got = torch.autograd.grad(loss, params, allow_unused=True)
    want = torch.autograd.grad(expected, params, allow_unused=True)
    for name, a, b in zip(PARAMS, got, want, strict=True):
        if b is None or name == "b_dec":  # ê has no b_dec; the encoder reads x_n uncentred
            assert a is None or a.abs().sum() == 0, name
            continue
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)
        assert b.abs().sum() > 0, name
