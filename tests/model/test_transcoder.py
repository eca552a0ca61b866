"""Transcoders: one dictionary reads x (d_in) and predicts a target y (d_out), optionally with an
affine skip path. Specification in float64 (docs/design.md, "Transcoders"):

    x_n = x / s,  y_n = y / s_y,  pre = x_n W_encᵀ + b_enc (no b_dec: it lives in y's space)
    ŷ_n = z W_dec + x_n W_skipᵀ + b_dec,  ŷ = s_y·ŷ_n
    reconstruction = mean_n ‖y_n − ŷ_n‖²;  AuxK's residual e = y_n − ŷ_n

Traps: scales s ≠ s_y ≠ 1, nonzero b_dec, b_enc and data mean, 3-D input, d_in ≠ d_out, some
and all latents dead.
"""

from __future__ import annotations

import pytest
import torch

from saekit.model.config import SAEConfig
from saekit.model.sae import SAE
from saekit.objective.config import AuxKRevival, FixedPrefixes
from saekit.objective.terms import TermInputs, build_objective

D_IN, D_OUT, M, K, B, T = 6, 5, 16, 3, 2, 9
S_X, S_Y = 1.7, 0.6


def make_transcoder(activation, skip=True, d_out=D_OUT, seed=0) -> SAE:
    cfg = SAEConfig(
        d_in=D_IN, d_sae=M, activation=activation, d_out=d_out, skip=skip, dtype="float64"
    )
    sae = SAE(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
        sae.scale.fill_(S_X)
        sae.target_scale.fill_(S_Y)
    return sae


def data(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, D_IN, generator=g, dtype=torch.float64) * 2 + 1.5
    y = torch.randn(B, T, D_OUT, generator=g, dtype=torch.float64) * 0.7 - 0.4
    return x, y


def leaves(sae: SAE) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone().requires_grad_(True) for n, p in sae.named_parameters()}


def hand_forward(P, x, act, skip=True):
    """Plain float64 transcoder: (z [N, M], ŷ_n [N, d_out], x_n, pre)."""
    x_n = x.reshape(-1, D_IN) / S_X
    pre = x_n @ P["W_enc"].T + P["b_enc"]
    relu = torch.relu(pre)
    if act == "relu":
        z = relu
    else:  # topk: per token, keep the k largest of ReLU(pre)
        rows = []
        for row in relu:
            keep = torch.zeros_like(row)
            for i in sorted(range(M), key=lambda i: -float(row[i].detach()))[:K]:
                keep = keep + row * torch.nn.functional.one_hot(torch.tensor(i), M)
            rows.append(keep)
        z = torch.stack(rows)
    y_hat_n = z @ P["W_dec"] + P["b_dec"]
    if skip:
        y_hat_n = y_hat_n + x_n @ P["W_skip"].T
    return z, y_hat_n, x_n, pre


def hand_auxk(pre, residual, W_dec, dead, alpha=1 / 32):
    """AuxK by a plain loop: dead latents' top-k_aux positive pre-activations fit e (no b_dec)."""
    k_aux = min(D_OUT // 2, M)
    e = residual.detach()
    e_hat = []
    for n in range(e.shape[0]):
        cands = [i for i in range(M) if dead[i] and pre[n, i] > 0]
        cands = sorted(cands, key=lambda i: -float(pre[n, i].detach()))[:k_aux]
        e_hat.append(sum((pre[n, i] * W_dec[i] for i in cands), torch.zeros(D_OUT).double()))
    mse = (torch.stack(e_hat) - e).pow(2).sum(-1).mean()
    variance = (e - e.mean(0)).pow(2).sum(-1).mean()
    return alpha * min(int(dead.sum()) / k_aux, 1.0) * mse / variance


ACTIVATIONS = {
    "relu": {"kind": "relu"},
    "topk-torch": {"kind": "topk", "k": K, "kernel": "torch"},
    "topk-reference": {"kind": "topk", "k": K, "kernel": "reference"},
}


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_forward_matches_float64_reference(name, skip):
    sae = make_transcoder(ACTIVATIONS[name], skip=skip)
    x, y = data()
    out = sae(x, y)
    z, y_hat_n, _, _ = hand_forward(leaves(sae), x, name.split("-")[0], skip)
    assert out.x_hat.shape == (B, T, D_OUT)
    torch.testing.assert_close(out.x_hat, (y_hat_n * S_Y).reshape(B, T, D_OUT))
    torch.testing.assert_close(out.target_n, y.reshape(-1, D_OUT) / S_Y)
    torch.testing.assert_close(sae.encode(x).reshape(-1, M), z.detach())


@pytest.mark.parametrize("dead_case", ["some", "all"])
@pytest.mark.parametrize("name", ["topk-torch", "topk-reference"])
def test_reconstruction_and_auxk_match_float64_reference(name, dead_case):
    """Loss and every gradient, W_skip's included, against the hand-built float64 loss."""
    sae = make_transcoder(ACTIVATIONS[name])
    x, y = data()
    dead = torch.zeros(M, dtype=torch.bool)
    dead[::2] = True
    if dead_case == "all":
        dead[:] = True
    objective = build_objective(type(sae.activation), None, AuxKRevival())
    total, parts = objective(TermInputs(sae, sae(x, y), dead, torch.tensor(0.0), None))
    total.backward()

    P = leaves(sae)
    _, y_hat_n, _, pre = hand_forward(P, x, "topk")
    y_n = y.reshape(-1, D_OUT) / S_Y
    recon = (y_n - y_hat_n).pow(2).sum(-1).mean()
    auxk = hand_auxk(pre, y_n - y_hat_n, P["W_dec"], dead)
    assert float(auxk.detach()) > 0
    (recon + auxk).backward()
    torch.testing.assert_close(parts["reconstruction"], recon.detach())
    torch.testing.assert_close(parts["revival"], auxk.detach())
    for n, p in sae.named_parameters():
        torch.testing.assert_close(p.grad, P[n].grad, msg=n)
    assert P["W_skip"].grad.abs().sum() > 0


def test_matryoshka_prefixes_start_from_the_skip_path():
    """Each prefix's prediction is b_dec + x_n W_skipᵀ + the latents below its end."""
    sae = make_transcoder({"kind": "relu"})
    x, y = data()
    objective = build_objective(type(sae.activation), FixedPrefixes(groups=[4, 12]), None)
    out = sae(x, y)
    prefixes = [4, 16]
    loss = objective.terms[0](
        TermInputs(sae, out, torch.zeros(M, dtype=torch.bool), None, prefixes)
    )
    P = leaves(sae)
    z, _, x_n, _ = hand_forward(P, x, "relu")
    y_n = y.reshape(-1, D_OUT) / S_Y
    per_prefix = [
        (y_n - (z[:, :p] @ P["W_dec"][:p] + P["b_dec"] + x_n @ P["W_skip"].T)).pow(2).sum(-1).mean()
        for p in prefixes
    ]
    torch.testing.assert_close(loss, sum(per_prefix) / 2)


@pytest.mark.parametrize("name", ["topk-torch", "topk-reference"])
def test_with_the_target_equal_to_the_input_it_is_the_sae(name):
    """Same weights, b_dec = 0, y = x: outputs, losses (AuxK included) and the gradients of
    W_enc, b_enc, W_dec are identical; with b_dec ≠ 0 the SAE's centering folds into b_enc
    (b_enc − W_enc b_dec)."""
    act = ACTIVATIONS[name]
    sae = SAE(SAEConfig(d_in=D_IN, d_sae=M, activation=act, dtype="float64"))
    tc = SAE(SAEConfig(d_in=D_IN, d_sae=M, activation=act, d_out=D_IN, dtype="float64"))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, T, D_IN, generator=g, dtype=torch.float64) + 2
    dead = torch.arange(M) % 3 == 0
    objective = build_objective(type(sae.activation), None, AuxKRevival())

    def run(model, target):
        model.zero_grad()
        out = model(x, target)
        total, parts = objective(TermInputs(model, out, dead, torch.tensor(0.0), None))
        total.backward()
        return out, parts, {n: p.grad.clone() for n, p in model.named_parameters()}

    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(M, D_IN, generator=g, dtype=torch.float64))
        sae.W_dec.copy_(torch.randn(M, D_IN, generator=g, dtype=torch.float64))
        sae.b_enc.copy_(torch.randn(M, generator=g, dtype=torch.float64))
        sae.scale.fill_(S_X)
        tc.load_state_dict({**sae.state_dict(), "target_scale": sae.scale.clone()})
    out_s, parts_s, grads_s = run(sae, None)
    out_t, parts_t, grads_t = run(tc, x)
    assert torch.equal(out_s.x_hat, out_t.x_hat)
    assert torch.equal(out_s.target_n, out_t.target_n)
    assert parts_s.keys() == parts_t.keys() and float(parts_s["revival"].detach()) > 0
    for key in parts_s:
        assert torch.equal(parts_s[key], parts_t[key]), key
    for n in ("W_enc", "b_enc", "W_dec"):
        assert torch.equal(grads_s[n], grads_t[n]), n
    # the SAE's b_dec also centres the encoder's input: its gradient gains −W_encᵀ ∂b_enc
    centering = grads_t["b_enc"] @ sae.W_enc.detach()
    torch.testing.assert_close(grads_s["b_dec"], grads_t["b_dec"] - centering)

    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(D_IN, generator=g, dtype=torch.float64))
        tc.b_dec.copy_(sae.b_dec)
        tc.b_enc.copy_(sae.b_enc - sae.W_enc @ sae.b_dec)
    out_s, parts_s, _ = run(sae, None)
    out_t, parts_t, _ = run(tc, x)
    torch.testing.assert_close(out_t.x_hat, out_s.x_hat, rtol=0, atol=1e-12)
    for key in parts_s:
        torch.testing.assert_close(parts_t[key], parts_s[key], rtol=1e-12, atol=0)


def test_identity_skip_with_target_equal_to_input_reconstructs_exactly():
    tc = SAE(SAEConfig(d_in=D_IN, d_sae=M, activation={"kind": "relu"}, d_out=D_IN, skip=True))
    with torch.no_grad():
        for p in (tc.W_enc, tc.W_dec, tc.b_dec):
            p.zero_()
        tc.W_skip.copy_(torch.eye(D_IN))
    x = torch.randn(B, T, D_IN) * 3 + 1
    assert torch.equal(tc(x, x).x_hat, x)


def test_save_folds_both_scales_and_loads_equal(tmp_path):
    sae = make_transcoder(ACTIVATIONS["topk-torch"])
    sae.cfg.target_hook = "model.layers.0.mlp"
    x, y = data()
    sae.save(tmp_path / "tc")
    loaded = SAE.load(tmp_path / "tc")
    assert loaded.cfg == sae.cfg
    assert float(loaded.scale) == 1.0 and float(loaded.target_scale) == 1.0
    torch.testing.assert_close(loaded(x).x_hat, sae(x).x_hat)
    torch.testing.assert_close(loaded.encode(x), sae.encode(x))
    assert float(sae.scale) == S_X  # the SAE saved is unchanged


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"skip": True}, "skip is set but d_out is not"),
        ({"target_hook": "model.layers.0.mlp"}, "target_hook is set but d_out is not"),
        ({"d_out": 0}, "d_out must be a positive integer"),
    ],
)
def test_bad_transcoder_configs_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        SAEConfig(d_in=4, d_sae=8, activation={"kind": "relu"}, **fields)


def test_a_missing_or_misplaced_target_is_refused():
    tc = make_transcoder(ACTIVATIONS["topk-torch"])
    x, y = data()
    objective = build_objective(type(tc.activation), None, None)
    no_target = TermInputs(tc, tc(x), torch.zeros(M, dtype=torch.bool), torch.tensor(0.0), None)
    with pytest.raises(ValueError, match="needs its target"):
        objective(no_target)
    with pytest.raises(ValueError, match=r"d_in \+ d_out = 11"):
        tc.split_stream(torch.zeros(4, D_IN))
    sae = SAE(SAEConfig(d_in=D_IN, d_sae=M, activation={"kind": "relu"}))
    with pytest.raises(ValueError, match="an SAE's target is its input"):
        sae(x, x)
    with pytest.raises(ValueError, match="d_out = 5"):
        tc(x, torch.zeros(3, D_IN))


def test_a_tied_activation_is_refused_as_a_transcoder():
    """Matching Pursuit encodes with its decoder, which lives in the target's space."""
    with pytest.raises(ValueError, match="matching_pursuit.*tied.*d_out"):
        make_transcoder({"kind": "matching_pursuit", "k": K})
