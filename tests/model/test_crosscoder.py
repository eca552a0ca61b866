"""Crosscoders against plain float64 loops written from Lindsey et al. 2024 ("Sparse Crosscoders
for Cross-Layer Features and Model Diffing"), per token and per source:

    x_n^s = x^s / s_s,  pre = Σ_s (x_n^s − b_dec^s) W_enc^sᵀ + b_enc,  x̂_n^s = z W_dec^s + b_dec^s
    loss = Σ_s mean_n ‖x_n^s − x̂_n^s‖² + λ·mean_n Σ_i f(|z_ni|·Σ_s ‖W_dec^s_i‖)

AuxK: the dead latents' top-k_aux positive pre-activations per token decoded into every source
against the concatenated residual. Traps: 3-D input, per-source scales ≠ 1, nonzero b_enc,
b_dec and data mean, no, some and all latents dead. With S = 1 a crosscoder is an SAE exactly.
"""

from __future__ import annotations

import pytest
import torch

from saekit.activations.jumprelu import jumprelu, step
from saekit.model.clt import CrossLayerTranscoder
from saekit.model.config import SAEConfig
from saekit.model.crosscoder import Crosscoder, CrosscoderConfig
from saekit.model.dictionary import load_dictionary
from saekit.model.format import CheckpointError
from saekit.model.sae import SAE
from saekit.objective.config import AuxKRevival, FixedPrefixes, L0Penalty, L1Penalty
from saekit.objective.terms import TermInputs, build_objective

S, M, D, B, T = 3, 6, 4, 2, 5
N = B * T
K, K_BATCH = 2, 3
SCALES = torch.tensor([1.7, 0.4, 2.5], dtype=torch.float64)
BANDWIDTH = 0.5

ACTIVATIONS = {
    "relu-l1": ({"kind": "relu"}, L1Penalty(coefficient=0.3)),
    "topk-torch": ({"kind": "topk", "k": K, "kernel": "torch"}, None),
    "topk-reference": ({"kind": "topk", "k": K, "kernel": "reference"}, None),
    "batchtopk-torch": ({"kind": "batchtopk", "k": K_BATCH, "kernel": "torch"}, None),
    "jumprelu-l0": ({"kind": "jumprelu", "bandwidth": BANDWIDTH, "ste_to_input": True},
                    L0Penalty(coefficient=0.4)),
}  # fmt: skip


def make_crosscoder(activation, n_sources=S, seed=0) -> Crosscoder:
    cfg = CrosscoderConfig(
        d_in=D, d_sae=M, n_sources=n_sources, activation=activation, dtype="float64"
    )
    cc = Crosscoder(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in cc.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
            if name == "activation.threshold":
                p.abs_()
        cc.scale.copy_(SCALES[:n_sources])
    return cc


def data(n_sources=S, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, n_sources * D, generator=g, dtype=torch.float64) * 2 + 1.5


def leaves(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}


def hand_forward(P, x, act):
    """Plain loops: (z [N, M], x̂_n [N, S, d], x_n [N, S, d], pre [N, M])."""
    X = x.reshape(N, S, D)
    x_n = torch.stack([torch.stack([X[n, s] / SCALES[s] for s in range(S)]) for n in range(N)])
    pre = torch.stack([
        sum(P["W_enc"][s] @ (x_n[n, s] - P["b_dec"][s]) for s in range(S)) + P["b_enc"]
        for n in range(N)
    ])  # fmt: skip
    values, kind = pre.detach(), act["kind"]
    if kind == "relu":
        z = torch.relu(pre)
    elif kind == "jumprelu":
        z = jumprelu(pre, P["activation.threshold"], BANDWIDTH, True)
    else:
        keep = torch.zeros(N, M, dtype=torch.bool)
        if kind == "topk":
            for n in range(N):
                for i in sorted(range(M), key=lambda i: -float(values[n, i]))[:K]:
                    keep[n, i] = True
        else:
            flat = sorted(range(N * M), key=lambda j: -float(values.reshape(-1)[j]))
            keep.view(-1)[flat[: K_BATCH * N]] = True
        z = torch.relu(pre) * keep
    x_hat = torch.stack([
        torch.stack([z[n] @ P["W_dec"][s] + P["b_dec"][s] for s in range(S)]) for n in range(N)
    ])  # fmt: skip
    return z, x_hat, x_n, pre


def hand_auxk(pre, residual, W_dec, dead, alpha=1 / 32):
    k_aux = min(S * D // 2, M)
    e = residual.detach()  # [N, S·d]
    e_hat = []
    for n in range(N):
        cands = [i for i in range(M) if dead[i] and pre[n, i] > 0]
        cands = sorted(cands, key=lambda i: -float(pre[n, i].detach()))[:k_aux]
        per_source = [
            sum((pre[n, i] * W_dec[s, i] for i in cands), torch.zeros(D).double()) for s in range(S)
        ]
        e_hat.append(torch.cat(per_source))
    mse = (torch.stack(e_hat) - e).pow(2).sum(-1).mean()
    variance = (e - e.mean(0)).pow(2).sum(-1).mean()
    return alpha * min(int(dead.sum()) / k_aux, 1.0) * mse / variance


@pytest.mark.parametrize("dead_case", ["none", "some", "all"])
@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_forward_loss_and_every_gradient_match_float64_loops(name, dead_case, one_thread):
    act, penalty = ACTIVATIONS[name]
    cc = make_crosscoder(act)
    cc.train()
    x = data()
    dead = torch.zeros(M, dtype=torch.bool)
    dead[{"none": [], "some": [1, 4], "all": list(range(M))}[dead_case]] = True
    revival = AuxKRevival() if "auxk" in type(cc.activation).revival_signals else None
    objective = build_objective(type(cc.activation), penalty, revival)
    lam = torch.tensor(0.7, dtype=torch.float64)
    out = cc(x)
    total, parts = objective(TermInputs(cc, out, dead, lam, None))
    total.backward()

    P = leaves(cc)
    z, x_hat_n, x_n, pre = hand_forward(P, x, act)
    recon = sum((x_n[:, s] - x_hat_n[:, s]).pow(2).sum(-1).mean() for s in range(S))
    expected = {"reconstruction": recon}
    if isinstance(penalty, L0Penalty):
        steps = step(pre, P["activation.threshold"], BANDWIDTH, True)
        expected["penalty"] = lam * steps.sum(-1).mean()
    elif penalty is not None:  # Lindsey et al.: the SUM of the per-source decoder norms
        weight = sum(P["W_dec"][s].pow(2).sum(-1).sqrt() for s in range(S))
        expected["penalty"] = lam * (z.abs() * weight).sum(-1).mean()
    if revival is not None:
        residual = (x_n - x_hat_n).reshape(N, S * D)
        expected["revival"] = hand_auxk(pre, residual, P["W_dec"], dead)
    sum(expected.values()).backward()

    torch.testing.assert_close(
        out.x_hat, (x_hat_n * SCALES.view(S, 1)).reshape(B, T, S * D).detach()
    )
    torch.testing.assert_close(out.target_n, x_n.reshape(N, S * D))
    dense = out.latents.to_dense() if hasattr(out.latents, "to_dense") else out.latents
    torch.testing.assert_close(dense.detach(), z.detach())
    assert parts.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(parts[key].detach(), value.detach(), msg=key)
    if revival is not None and dead_case != "none":
        assert float(parts["revival"].detach()) > 0
    for n, p in cc.named_parameters():
        torch.testing.assert_close(p.grad, P[n].grad, msg=n)


def test_matryoshka_prefixes_reconstruct_every_source():
    cc = make_crosscoder({"kind": "relu"})
    x = data()
    objective = build_objective(type(cc.activation), FixedPrefixes(groups=[2, 4]), None)
    loss = objective.terms[0](TermInputs(cc, cc(x), torch.zeros(M).bool(), None, [2, M]))
    P = leaves(cc)
    z, _, x_n, _ = hand_forward(P, x, {"kind": "relu"})
    per_prefix = [
        sum((x_n[:, s] - (z[:, :p] @ P["W_dec"][s][:p] + P["b_dec"][s])).pow(2).sum(-1).mean()
            for s in range(S))
        for p in (2, M)
    ]  # fmt: skip
    torch.testing.assert_close(loss, sum(per_prefix) / 2)


def test_decoder_norm_ratios_and_unit_norm_rows():
    cc = make_crosscoder({"kind": "topk", "k": K})
    with torch.no_grad():
        cc.W_dec[1:, 0] = 0.0  # latent 0 decodes into source 0 only
    by_source = cc.decoder_norms_by_target()
    assert by_source.shape == (M, S)
    for i in range(M):
        for s in range(S):
            torch.testing.assert_close(by_source[i, s], cc.W_dec[s, i].norm().detach())
    assert by_source[0, 0] > 0 and torch.equal(by_source[0, 1:], torch.zeros(S - 1).double())
    torch.testing.assert_close(cc.decoder_norms().detach(), by_source.sum(-1))
    x = data()
    cc(x).x_hat_n.pow(3).sum().backward()
    G, w = cc.W_dec.grad.clone(), cc.W_dec.detach()
    cc.remove_parallel_grad_()  # G − (G·w / ‖w‖²) w per latent, w its concatenated decoder
    coef = (G * w).sum((0, 2)) / w.pow(2).sum((0, 2))
    torch.testing.assert_close(cc.W_dec.grad, G - coef.view(1, M, 1) * w)
    cc.normalize_decoder_()
    torch.testing.assert_close(cc.W_dec.detach().pow(2).sum((0, 2)), torch.ones(M).double())


def test_init_from_data_sets_per_source_scales_and_means():
    cc = make_crosscoder({"kind": "topk", "k": K})
    x = data()
    cc.init_from_data(x)
    X = x.reshape(N, S, D)
    for s in range(S):
        scale = (X[:, s].pow(2).sum(-1).mean() / D).sqrt()
        torch.testing.assert_close(cc.scale[s], scale)
        torch.testing.assert_close(cc.b_dec[s].detach(), (X[:, s] / scale).mean(0))


# ------------------------------------------------------------------------ S = 1: an SAE


def sae_and_crosscoder(activation, seed=0):
    sae = SAE(SAEConfig(d_in=D, d_sae=M, activation=activation, dtype="float64"))
    cc = Crosscoder(
        CrosscoderConfig(d_in=D, d_sae=M, n_sources=1, activation=activation, dtype="float64")
    )
    sae.reset_parameters(torch.Generator().manual_seed(seed))
    cc.reset_parameters(torch.Generator().manual_seed(seed))
    return sae, cc


@pytest.mark.parametrize("dead_case", ["none", "some", "all"])
@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_one_source_is_an_sae_exactly(name, dead_case):
    act, penalty = ACTIVATIONS[name]
    sae, cc = sae_and_crosscoder(act)
    assert torch.equal(cc.W_enc[0], sae.W_enc) and torch.equal(cc.W_dec[0], sae.W_dec)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for (n, p_s), p_c in zip(sae.named_parameters(), cc.parameters(), strict=True):
            value = torch.randn(p_s.shape, generator=g, dtype=torch.float64) * 0.5
            p_s.copy_(value.abs() if n == "activation.threshold" else value)
            p_c.copy_(p_s.view(p_c.shape))
        sae.scale.fill_(1.3)
        cc.scale.fill_(1.3)
    x = data(n_sources=1)
    dead = torch.ones(M, dtype=torch.bool) if dead_case == "all" else torch.zeros(M).bool()
    if dead_case == "some":
        dead[::2] = True
    revival = AuxKRevival() if "auxk" in type(sae.activation).revival_signals else None
    results = []
    for model in (sae, cc):
        model.train()
        objective = build_objective(type(model.activation), penalty, revival)
        out = model(x)
        lam = torch.tensor(0.7, dtype=torch.float64)
        total, parts = objective(TermInputs(model, out, dead, lam, None))
        total.backward()
        results.append((out, parts, [p.grad.reshape(-1) for p in model.parameters()]))
    (out_s, parts_s, grads_s), (out_c, parts_c, grads_c) = results
    assert torch.equal(out_s.x_hat, out_c.x_hat) and torch.equal(out_s.target_n, out_c.target_n)
    assert parts_s.keys() == parts_c.keys()
    for key in parts_s:
        assert torch.equal(parts_s[key], parts_c[key]), key
    for a, b in zip(grads_s, grads_c, strict=True):
        assert torch.equal(a, b)
    for model in (sae, cc):
        model.remove_parallel_grad_()
        model.normalize_decoder_()
    assert torch.equal(sae.W_dec.grad, cc.W_dec.grad[0]) and torch.equal(sae.W_dec, cc.W_dec[0])


# ------------------------------------------------------------------------ configs, save, load


def test_save_folds_the_scales_and_loads_equal(tmp_path):
    cc = make_crosscoder({"kind": "batchtopk", "k": K_BATCH})
    cc.activation.threshold.fill_(0.2)
    cc.eval()
    x = data()
    cc.save(tmp_path / "cc")
    loaded = load_dictionary(tmp_path / "cc")
    assert type(loaded) is Crosscoder and loaded.cfg == cc.cfg
    assert torch.equal(loaded.scale, torch.ones(S).double())
    torch.testing.assert_close(loaded(x).x_hat, cc(x).x_hat)
    torch.testing.assert_close(loaded.encode(x), cc.encode(x))
    assert torch.equal(cc.scale, SCALES)


def test_a_corrupt_or_mismatched_checkpoint_is_refused_in_one_line(tmp_path):
    cc = make_crosscoder({"kind": "topk", "k": K})
    cc.save(tmp_path / "cc")
    (tmp_path / "cc" / "sae.safetensors").write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match="does not match the sha256") as info:
        Crosscoder.load(tmp_path / "cc")
    assert "\n" not in str(info.value)
    with pytest.raises(CheckpointError, match="cannot read sae.safetensors"):
        Crosscoder.load(tmp_path / "cc", verify=False)
    cc.save(tmp_path / "ok")
    with pytest.raises(CheckpointError, match="holds a 'crosscoder', not a 'clt'"):
        CrossLayerTranscoder.load(tmp_path / "ok")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"n_sources": 0}, "n_sources must be a positive integer"),
        ({"hooks": ["a", "b"]}, r"hooks must name 3 distinct hooks \(one per source\)"),
        ({"activation": {"kind": "topk", "k": M + 1}}, "activation.k = 7 exceeds d_sae = 6"),
    ],
)
def test_bad_crosscoder_configs_are_refused(fields, message):
    base = {"d_in": D, "d_sae": M, "n_sources": S, "activation": {"kind": "relu"}}
    with pytest.raises(ValueError, match=message):
        CrosscoderConfig(**{**base, **fields})
