"""HierarchicalTopK (arXiv 2505.24473) against a float64 reference written from the paper's
loss: per token, the K largest ReLU(pre) sorted by hand, each prefix's reconstruction summed
row by row, the K prefix errors averaged. Then the SAE used at k' < K after save → load.
"""

from __future__ import annotations

import pytest
import torch
from arch_helpers import (
    D,
    assert_same_gradients,
    data,
    dead_mask,
    leaves,
    make_member,
    reference_auxk,
    round_trip,
    saekit_loss,
)

from saekit.model.config import SAEConfig
from saekit.model.sae import SAE

K = 4
ALPHA = 0.3
K_AUX = D // 2


def htopk(kernel: str = "torch", **extra) -> dict:
    return {"kind": "hierarchical_topk", "k": K, "kernel": kernel, **extra}


def reference_loss(P, scale, x, dead, revival: str):
    x_n = x.reshape(-1, x.shape[-1]) / scale
    W_dec, b_dec = P["W_dec"], P["b_dec"]
    pre = (x_n - b_dec) @ P["W_enc"].T + P["b_enc"]
    prefix_errors = [0.0] * K
    x_hat_full = []
    for n in range(x_n.shape[0]):
        ranked = sorted(range(pre.shape[1]), key=lambda i: -float(pre[n, i].detach()))[:K]
        x_hat = b_dec
        for j, i in enumerate(ranked):
            x_hat = x_hat + torch.relu(pre[n, i]) * W_dec[i]
            prefix_errors[j] = prefix_errors[j] + (x_n[n] - x_hat).pow(2).sum()
        x_hat_full.append(x_hat)
    n_tokens = x_n.shape[0]
    parts = {"reconstruction": sum(e / n_tokens for e in prefix_errors) / K}
    if revival == "auxk":
        e = (x_n - torch.stack(x_hat_full)).detach()
        parts["revival"] = reference_auxk(pre, e, W_dec, dead, ALPHA, K_AUX)
    return parts


@pytest.mark.parametrize("kernel", ["torch", "reference"])
@pytest.mark.parametrize("revival,dead_case", [("none", "none"), ("auxk", "some")])
def test_htopk_loss_and_every_gradient_match_the_float64_reference(kernel, revival, dead_case):
    revival_cfg = {"kind": "auxk", "coefficient": ALPHA} if revival == "auxk" else "none"
    member = make_member(htopk(kernel), revival=revival_cfg)
    sae = member.sae
    _, x = data()
    dead = dead_mask(dead_case)
    out, _, parts = saekit_loss(member, x, dead)

    P = leaves(sae)
    ref_parts = reference_loss(P, sae.scale.double(), x, dead, revival)
    sum(ref_parts.values()).backward()
    assert sorted(parts) == sorted(ref_parts)
    for name, value in ref_parts.items():
        torch.testing.assert_close(parts[name].detach(), value.detach(), rtol=1e-10, atol=1e-13)
    # the trap: prefixes differ, so the mean over prefixes is not the plain TopK loss
    plain = (out.x_n - out.x_hat_n).pow(2).sum(-1).mean()
    assert abs(parts["reconstruction"] - plain) > 0.05 * plain
    assert_same_gradients(sae, P)


def test_htopk_matryoshka_is_refused():
    with pytest.raises(ValueError, match="matryoshka does not apply.*'hierarchical_topk'"):
        make_member(htopk(), matryoshka={"kind": "fixed", "groups": [8, 8]})


@pytest.mark.parametrize("kernel", ["torch", "reference"])
def test_htopk_encodes_any_k_prime_after_save_and_load(kernel, tmp_path):
    member = make_member(htopk(kernel, inference_k=2))
    sae = member.sae
    _, x = data()
    loaded = round_trip(sae, x, tmp_path)
    assert loaded.cfg.activation.inference_k == 2
    with torch.no_grad():
        z_K = sae.train()(x).latents  # training: K per token
        z_K = z_K.to_dense() if kernel == "torch" else z_K
        for k_prime in (1, 2, 3, K):
            loaded.activation.set_inference_k(k_prime)
            z = loaded.encode(x).reshape(-1, z_K.shape[-1])
            assert ((z != 0).sum(-1) <= k_prime).all() and ((z != 0).sum(-1) == k_prime).any()
            # the k' largest of the K-code, i.e. the prefix the loss trained
            expected = torch.zeros_like(z_K)
            top = z_K.topk(k_prime, dim=-1)
            expected.scatter_(1, top.indices, top.values)
            torch.testing.assert_close(z, expected.to(z.dtype), rtol=1e-9, atol=1e-10)
    saved = SAE.load(loaded.save(tmp_path / "k3"))
    assert saved.cfg.activation.inference_k == K


def test_htopk_inference_k_is_checked():
    with pytest.raises(ValueError, match="inference_k = 5 exceeds k = 4"):
        SAEConfig(d_in=D, d_sae=16, activation=htopk(inference_k=5))
    sae = SAE(SAEConfig(d_in=D, d_sae=16, activation=htopk()))
    with pytest.raises(ValueError, match="inference_k must be a positive integer"):
        sae.activation.set_inference_k(0)


def test_htopk_trains_with_k_and_evaluates_with_inference_k():
    sae = SAE(SAEConfig(d_in=D, d_sae=16, activation=htopk(inference_k=1)))
    x = data()[1]
    assert ((sae.train()(x).latents.to_dense() != 0).sum(-1) <= K).all()
    assert ((sae.eval()(x).latents.to_dense() != 0).sum(-1) <= 1).all()
