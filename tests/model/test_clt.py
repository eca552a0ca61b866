"""Cross-layer transcoders against plain float64 loops written from the paper (Ameisen et al.
2025, "Circuit Tracing"), per token, per layer and per target:

    x_n^l = x^l / s_l,  y_n^l = y^l / t_l,  pre^l = x_n^l W_enc[l]ᵀ + b_enc[l]
    ŷ_n^{l'} = Σ_{l ≤ l'} z^l W_dec[l][:, l' − l] + b_dec[l']
    loss = Σ_{l'} mean_n ‖y_n^{l'} − ŷ_n^{l'}‖² + λ·mean_n Σ_{l,i} f(|z_{n,l,i}|·‖W_dec[l][i]‖)

‖W_dec[l][i]‖ is the norm of latent (l, i)'s decoders into all its targets, concatenated. AuxK:
the dead latents' top-k_aux positive pre-activations per token, decoded into every target they
reach, fit the concatenated residual. Traps: 3-D input, per-layer scales ≠ 1 (and s ≠ t),
nonzero b_enc, b_dec and data mean, d_in ≠ d_out, no, some and all latents dead. With L = 1 the
CLT is a transcoder exactly: same initialisation, forward, losses and gradients.
"""

from __future__ import annotations

import json

import pytest
import torch

from saekit.activations.jumprelu import jumprelu, step
from saekit.model.clt import CLTConfig, CrossLayerTranscoder
from saekit.model.config import DictionaryConfig, SAEConfig
from saekit.model.crosscoder import Crosscoder
from saekit.model.dictionary import build_dictionary, load_dictionary
from saekit.model.format import CheckpointError
from saekit.model.sae import SAE
from saekit.objective.config import AuxKRevival, L0Penalty, L1Penalty, TanhPenalty
from saekit.objective.terms import TermInputs, build_objective

L, M, D_IN, D_OUT, B, T = 3, 5, 4, 3, 2, 5
N = B * T
K, K_BATCH = 2, 3
S_X = torch.tensor([1.7, 0.4, 2.5], dtype=torch.float64)
S_Y = torch.tensor([0.6, 1.9, 0.8], dtype=torch.float64)
BANDWIDTH = 0.5  # wide enough that some pre-activations lie within ε/2 of θ

ACTIVATIONS = {
    "relu-l1": ({"kind": "relu"}, L1Penalty(coefficient=0.3)),
    "relu-tanh": ({"kind": "relu"}, TanhPenalty(coefficient=0.2, c=1.5)),
    "topk-torch": ({"kind": "topk", "k": K, "kernel": "torch"}, None),
    "topk-reference": ({"kind": "topk", "k": K, "kernel": "reference"}, None),
    "batchtopk-torch": ({"kind": "batchtopk", "k": K_BATCH, "kernel": "torch"}, None),
    "jumprelu-l0": ({"kind": "jumprelu", "bandwidth": BANDWIDTH, "ste_to_input": True},
                    L0Penalty(coefficient=0.4)),
}  # fmt: skip


def make_clt(activation, n_layers=L, d_out=D_OUT, seed=0) -> CrossLayerTranscoder:
    cfg = CLTConfig(
        d_in=D_IN, d_sae=M, n_layers=n_layers, activation=activation, d_out=d_out,
        dtype="float64",
    )  # fmt: skip
    clt = CrossLayerTranscoder(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in clt.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
            if name == "activation.threshold":
                p.abs_()
        clt.scale.copy_(S_X[:n_layers])
        clt.target_scale.copy_(S_Y[:n_layers])
    return clt


def data(n_layers=L, d_out=D_OUT, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, n_layers * D_IN, generator=g, dtype=torch.float64) * 2 + 1.5
    y = torch.randn(B, T, n_layers * d_out, generator=g, dtype=torch.float64) * 0.7 - 0.4
    return x, y


def leaves(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}


def hand_forward(P, x, act):
    """Plain loops: (z [N, L, M], ŷ_n [N, L, d_out], pre [N, L, M])."""
    X = x.reshape(N, L, D_IN)
    pre = torch.stack([
        torch.stack([P["W_enc"][l] @ (X[n, l] / S_X[l]) + P["b_enc"][l] for l in range(L)])
        for n in range(N)
    ])  # fmt: skip
    kind = act["kind"]
    values = pre.detach()
    if kind == "relu":
        z = torch.relu(pre)
    elif kind == "jumprelu":
        theta = P["activation.threshold"]
        z = jumprelu(pre.reshape(N, L * M), theta, BANDWIDTH, True).reshape(N, L, M)
    else:
        keep = torch.zeros(N, L, M, dtype=torch.bool)
        if kind == "topk":  # k per token and layer
            for n in range(N):
                for l in range(L):
                    order = sorted(range(M), key=lambda i: -float(values[n, l, i]))
                    for i in order[:K]:
                        keep[n, l, i] = True
        else:  # batchtopk: the k·N largest of the whole batch, all layers together
            flat = sorted(range(N * L * M), key=lambda j: -float(values.reshape(-1)[j]))
            keep.view(-1)[flat[: K_BATCH * N]] = True
        z = torch.relu(pre) * keep
    y_hat = []
    for n in range(N):
        targets = []
        for lp in range(L):
            acc = P["b_dec"][lp]
            for l in range(lp + 1):
                acc = acc + z[n, l] @ P[f"W_dec.{l}"][:, lp - l, :]
            targets.append(acc)
        y_hat.append(torch.stack(targets))
    return z, torch.stack(y_hat), pre


def concat_norms(P):
    """‖latent (l, i)'s decoders into all its targets‖ [L, M], by a loop over targets."""
    rows = []
    for l in range(L):
        sq = sum(P[f"W_dec.{l}"][:, lp - l, :].pow(2).sum(-1) for lp in range(l, L))
        rows.append(sq.sqrt())
    return torch.stack(rows)


def hand_auxk(pre, residual, P, dead, alpha=1 / 32):
    """AuxK by loops: per token, the dead latents' top-k_aux positive pre-activations decoded
    into every target they reach (no b_dec) against the concatenated residual."""
    k_aux = min(L * D_OUT // 2, L * M)
    e = residual.detach()  # [N, L·d_out]
    e_hat = []
    for n in range(N):
        cands = [(l, i) for l in range(L) for i in range(M) if dead[l * M + i] and pre[n, l, i] > 0]
        cands = sorted(cands, key=lambda c: -float(pre[n, c[0], c[1]].detach()))[:k_aux]
        targets = [torch.zeros(D_OUT, dtype=torch.float64) for _ in range(L)]
        for l, i in cands:
            for lp in range(l, L):
                targets[lp] = targets[lp] + pre[n, l, i] * P[f"W_dec.{l}"][i, lp - l]
        e_hat.append(torch.cat(targets))
    mse = (torch.stack(e_hat) - e).pow(2).sum(-1).mean()
    variance = (e - e.mean(0)).pow(2).sum(-1).mean()
    return alpha * min(int(dead.sum()) / k_aux, 1.0) * mse / variance


def dead_mask(case):
    dead = torch.zeros(L * M, dtype=torch.bool)
    if case == "some":
        dead[1::3] = True
    elif case == "all":
        dead[:] = True
    return dead


@pytest.mark.parametrize("dead_case", ["none", "some", "all"])
@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_forward_loss_and_every_gradient_match_float64_loops(name, dead_case, one_thread):
    act, penalty = ACTIVATIONS[name]
    clt = make_clt(act)
    clt.train()
    x, y = data()
    dead = dead_mask(dead_case)
    revival = AuxKRevival() if "auxk" in type(clt.activation).revival_signals else None
    objective = build_objective(type(clt.activation), penalty, revival)
    lam = torch.tensor(0.7, dtype=torch.float64)
    out = clt(x, y)
    total, parts = objective(TermInputs(clt, out, dead, lam, None))
    total.backward()

    P = leaves(clt)
    z, y_hat_n, pre = hand_forward(P, x, act)
    y_n = (y.reshape(N, L, D_OUT) / S_Y.view(L, 1)).reshape(N, L * D_OUT)
    y_hat_flat = y_hat_n.reshape(N, L * D_OUT)
    recon = sum((y_n.view(N, L, D_OUT)[:, lp] - y_hat_n[:, lp]).pow(2).sum(-1).mean()
                for lp in range(L))  # fmt: skip
    expected = {"reconstruction": recon}
    if isinstance(penalty, L0Penalty):
        steps = step(pre.reshape(N, L * M), P["activation.threshold"], BANDWIDTH, True)
        expected["penalty"] = lam * steps.sum(-1).mean()
    elif penalty is not None:
        a = z.abs() * concat_norms(P)
        f = a if isinstance(penalty, L1Penalty) else torch.tanh(penalty.c * a)
        expected["penalty"] = lam * f.sum((1, 2)).mean()
    if revival is not None:
        expected["revival"] = hand_auxk(pre, y_n - y_hat_flat, P, dead)
    sum(expected.values()).backward()

    torch.testing.assert_close(
        out.x_hat, (y_hat_n * S_Y.view(L, 1)).reshape(B, T, L * D_OUT).detach()
    )
    torch.testing.assert_close(out.target_n, y_n)
    dense = out.latents.to_dense() if hasattr(out.latents, "to_dense") else out.latents
    torch.testing.assert_close(dense.detach(), z.reshape(N, L * M).detach())
    assert parts.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(parts[key].detach(), value.detach(), msg=key)
    if revival is not None and dead_case != "none":
        assert float(parts["revival"].detach()) > 0
    for n, p in clt.named_parameters():
        torch.testing.assert_close(p.grad, P[n].grad, msg=n)
        assert P[n].grad.abs().sum() > 0 or n == "activation.threshold", n


def test_the_sparse_decode_costs_the_active_pairs_and_skips_empty_layers(monkeypatch):
    """Layer l's decode reads only its own entries into its L − l targets (one sparse decode per
    layer that has entries), never the other layers' entries."""
    import saekit.kernels.layered as layered

    calls = []
    real = layered.sparse_decode

    def counting(values, latent, token, W, n_tokens, layout=None):
        calls.append((values.numel(), W.shape[1]))
        return real(values, latent, token, W, n_tokens, layout)

    monkeypatch.setattr(layered, "sparse_decode", counting)
    clt = make_clt({"kind": "batchtopk", "k": 2})
    x, y = data()
    with torch.no_grad():
        clt.b_enc[1] = -100.0  # layer 1 never fires
    code = clt(x, y).latents
    layer_E = code.latent // M
    assert (layer_E == 1).sum() == 0
    expected = [(int((layer_E == l).sum()), (L - l) * D_OUT) for l in (0, 2)]
    assert calls == expected and sum(c[0] for c in calls) == code.values.numel()


def test_decoder_norms_by_target_and_unit_norm_rows():
    clt = make_clt({"kind": "topk", "k": K})
    P = leaves(clt)
    by_target = clt.decoder_norms_by_target()
    assert by_target.shape == (L * M, L)
    for l in range(L):
        for i in range(M):
            for lp in range(L):
                want = P[f"W_dec.{l}"][i, lp - l].norm() if lp >= l else 0.0
                torch.testing.assert_close(by_target[l * M + i, lp], torch.as_tensor(want).double())
    torch.testing.assert_close(by_target.pow(2).sum(-1).sqrt(), clt.decoder_norms().detach())
    # the TopK family's constraint: each latent's concatenated decoders at unit norm, and its
    # gradient orthogonal to them
    x, y = data()
    clt(x, y).x_hat_n.pow(3).sum().backward()
    before = [W.grad.clone() for W in clt.W_dec]
    clt.remove_parallel_grad_()
    for W, G in zip(clt.W_dec, before, strict=True):  # G − (G·w / ‖w‖²) w, w concatenated
        w = W.detach()
        coef = (G * w).sum((1, 2)) / w.pow(2).sum((1, 2))
        torch.testing.assert_close(W.grad, G - coef.view(M, 1, 1) * w)
    clt.normalize_decoder_()
    torch.testing.assert_close(clt.decoder_norms().detach(), torch.ones(L * M).double())


def test_init_from_data_sets_per_layer_scales_and_target_means():
    clt = make_clt({"kind": "topk", "k": K})
    x, y = data()
    clt.init_from_data(x, target=y)
    X, Y = x.reshape(N, L, D_IN), y.reshape(N, L, D_OUT)
    for l in range(L):
        s = (X[:, l].pow(2).sum(-1).mean() / D_IN).sqrt()
        t = (Y[:, l].pow(2).sum(-1).mean() / D_OUT).sqrt()
        torch.testing.assert_close(clt.scale[l], s)
        torch.testing.assert_close(clt.target_scale[l], t)
        torch.testing.assert_close(clt.b_dec[l].detach(), (Y[:, l] / t).mean(0))
    with pytest.raises(ValueError, match="needs the targets"):
        clt.init_from_data(x)


# ------------------------------------------------------------------------ L = 1: a transcoder


def transcoder_and_clt(activation, d_out, seed=0):
    """A transcoder (SAE with d_out, no skip) and a 1-layer CLT, both initialised from the same
    seed as training initialises them (reset_parameters with a seeded generator)."""
    tc = SAE(SAEConfig(d_in=D_IN, d_sae=M, activation=activation, d_out=d_out, dtype="float64"))
    clt = CrossLayerTranscoder(
        CLTConfig(d_in=D_IN, d_sae=M, n_layers=1, activation=activation, d_out=d_out,
                  dtype="float64")
    )  # fmt: skip
    tc.reset_parameters(torch.Generator().manual_seed(seed))
    clt.reset_parameters(torch.Generator().manual_seed(seed))
    return tc, clt


@pytest.mark.parametrize("d_out", [D_IN, D_OUT], ids=["tied-width", "other-width"])
def test_one_layer_initialises_as_a_transcoder(d_out):
    tc, clt = transcoder_and_clt({"kind": "topk", "k": K}, d_out)
    assert torch.equal(clt.W_enc[0], tc.W_enc) and torch.equal(clt.W_dec[0][:, 0], tc.W_dec)
    names = {n: p.shape for n, p in clt.named_parameters()}
    assert names == {"W_enc": (1, M, D_IN), "b_enc": (1, M), "W_dec.0": (M, 1, d_out),
                     "b_dec": (1, d_out)}  # fmt: skip


@pytest.mark.parametrize("dead_case", ["none", "some", "all"])
@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_one_layer_is_a_transcoder_exactly(name, dead_case):
    """Same data, same parameters: identical outputs, loss terms and gradients (bit for bit)."""
    act, penalty = ACTIVATIONS[name]
    tc, clt = transcoder_and_clt(act, D_OUT)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        clt_params = dict(clt.named_parameters())
        for n, p_tc in tc.named_parameters():
            value = torch.randn(p_tc.shape, generator=g, dtype=torch.float64) * 0.5
            p_tc.copy_(value.abs() if n == "activation.threshold" else value)
            p_clt = clt_params["W_dec.0" if n == "W_dec" else n]
            p_clt.copy_(p_tc.view(p_clt.shape))
        tc.scale.fill_(1.3)
        tc.target_scale.fill_(0.7)
        clt.scale.fill_(1.3)
        clt.target_scale.fill_(0.7)
    x, y = data(n_layers=1)
    dead = torch.zeros(M, dtype=torch.bool) if dead_case == "none" else torch.ones(M).bool()
    if dead_case == "some":
        dead[::2] = False
    revival = AuxKRevival() if "auxk" in type(tc.activation).revival_signals else None
    results = []
    for model in (tc, clt):
        model.train()
        objective = build_objective(type(model.activation), penalty, revival)
        out = model(x, y)
        lam = torch.tensor(0.7, dtype=torch.float64)
        total, parts = objective(TermInputs(model, out, dead, lam, None))
        total.backward()
        grads = {n.removesuffix(".0"): p.grad.reshape(-1) for n, p in model.named_parameters()}
        results.append((out, parts, grads))
    (out_t, parts_t, grads_t), (out_c, parts_c, grads_c) = results
    assert torch.equal(out_t.x_hat, out_c.x_hat) and torch.equal(out_t.target_n, out_c.target_n)
    assert parts_t.keys() == parts_c.keys()
    for key in parts_t:
        assert torch.equal(parts_t[key], parts_c[key]), key
    assert grads_t.keys() == grads_c.keys()
    for n in grads_t:
        assert torch.equal(grads_t[n], grads_c[n]), n


# ------------------------------------------------------------------------ configs, save, load


@pytest.mark.parametrize(
    ("activation", "message"),
    [
        ({"kind": "gated"}, "'gated' does not apply to a cross-layer transcoder.*own loss"),
        ({"kind": "matching_pursuit", "k": 2}, "'matching_pursuit' does not apply"),
        ({"kind": "prolu"}, "'prolu' does not apply.*owns its encoder bias"),
        ({"kind": "hierarchical_topk", "k": 2}, "'hierarchical_topk' does not apply"),
        ({"kind": "topk", "k": M + 1}, f"activation.k = {M + 1} exceeds d_sae = {M}"),
    ],
)
def test_activations_that_do_not_fit_are_refused_in_one_line(activation, message):
    with pytest.raises(ValueError, match=message) as info:
        CLTConfig(d_in=D_IN, d_sae=M, n_layers=L, activation=activation)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"n_layers": 0}, "n_layers must be a positive integer"),
        ({"hooks": ["a", "b"]}, r"hooks must name 3 distinct hooks \(one input per layer\)"),
        ({"target_hooks": ["a", "a", "b"]}, "target_hooks must name 3 distinct hooks"),
        ({"kind": "sae"}, "kind must be 'clt'"),
    ],
)
def test_bad_clt_configs_are_refused(fields, message):
    base = {"d_in": D_IN, "d_sae": M, "n_layers": L, "activation": {"kind": "relu"}}
    with pytest.raises(ValueError, match=message):
        CLTConfig(**{**base, **fields})


def test_a_run_config_names_the_dictionary_by_kind():
    plain = {"d_in": 4, "d_sae": 8, "activation": {"kind": "topk", "k": 2}}
    assert type(DictionaryConfig.from_plain(plain, "sae")) is SAEConfig
    assert type(DictionaryConfig.from_plain({**plain, "kind": "sae"}, "sae")) is SAEConfig
    clt = DictionaryConfig.from_plain({**plain, "kind": "clt", "n_layers": 2}, "sae")
    assert type(clt) is CLTConfig and clt.d_out == 4 and clt.n_latents == 16
    assert DictionaryConfig.from_plain(clt.to_dict(), "sae") == clt
    with pytest.raises(ValueError, match=r"sae.kind: unknown dictionary 'clx'; choose one of"):
        DictionaryConfig.from_plain({**plain, "kind": "clx"}, "sae")
    with pytest.raises(ValueError, match="sae: missing required field.*n_layers"):
        DictionaryConfig.from_plain({**plain, "kind": "clt"}, "sae")


def test_save_folds_the_scales_and_loads_equal(tmp_path):
    clt = make_clt({"kind": "jumprelu"})
    clt.cfg.hooks = ["l0.in", "l1.in", "l2.in"]
    x, y = data()
    clt.eval()
    clt.save(tmp_path / "clt")
    loaded = load_dictionary(tmp_path / "clt")
    assert type(loaded) is CrossLayerTranscoder and loaded.cfg == clt.cfg
    assert torch.equal(loaded.scale, torch.ones(L).double())
    assert torch.equal(loaded.target_scale, torch.ones(L).double())
    torch.testing.assert_close(loaded(x).x_hat, clt(x).x_hat)
    torch.testing.assert_close(loaded.encode(x), clt.encode(x))
    assert torch.equal(clt.scale, S_X)  # the CLT saved is unchanged
    meta = json.loads((tmp_path / "clt" / "cfg.json").read_text())
    assert meta["config"]["kind"] == "clt" and meta["tensors"]["W_dec.2"]["shape"] == [M, 1, D_OUT]


def test_a_corrupt_or_mismatched_checkpoint_is_refused_in_one_line(tmp_path):
    clt = make_clt({"kind": "topk", "k": K})
    clt.save(tmp_path / "clt")
    weights = tmp_path / "clt" / "sae.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-3] ^= 0xFF
    weights.write_bytes(bytes(raw))
    for load in (CrossLayerTranscoder.load, load_dictionary):
        with pytest.raises(CheckpointError, match="does not match the sha256") as info:
            load(tmp_path / "clt")
        assert "\n" not in str(info.value)

    clt.save(tmp_path / "other")
    meta_path = tmp_path / "other" / "cfg.json"
    meta = json.loads(meta_path.read_text())
    meta["config"]["n_layers"] = 2
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'W_dec.2'.*'W_enc' has shape"):
        load_dictionary(tmp_path / "other")
    with pytest.raises(CheckpointError, match="holds a 'clt', not a 'crosscoder'"):
        Crosscoder.load(tmp_path / "clt", verify=False)
    # SAE.load (convert, finetune, the suite before load_dictionary) names what the file holds
    with pytest.raises(CheckpointError, match="holds a 'clt', not an SAE .load any with"):
        SAE.load(tmp_path / "clt", verify=False)


def test_build_dictionary_builds_each_kind():
    cfg = CLTConfig(d_in=D_IN, d_sae=M, n_layers=2, activation={"kind": "relu"})
    assert type(build_dictionary(cfg)) is CrossLayerTranscoder
    sae_cfg = SAEConfig(d_in=D_IN, d_sae=M, activation={"kind": "relu"})
    assert type(build_dictionary(sae_cfg)) is SAE


def test_preact_revival_pushes_dead_latents_toward_their_layers_kept_value():
    """revival.dead_preact_loss with TopK per layer: θ of token n and layer l is the smallest
    kept ReLU value of that (token, layer); mean_n Σ_{dead} ReLU(θ − pre)·‖W_dec[l][i]‖ over
    n_dead, by loops, with its gradients."""
    from saekit.objective.config import PreactRevival

    clt = make_clt({"kind": "topk", "k": K})
    x, y = data()
    dead = dead_mask("some")
    objective = build_objective(type(clt.activation), None, PreactRevival())
    _, parts = objective(TermInputs(clt, clt(x, y), dead, torch.tensor(0.0), None))
    parts["revival"].backward()
    P = leaves(clt)
    _, _, pre = hand_forward(P, x, {"kind": "topk"})
    norms = concat_norms(P).detach()
    total = 0.0
    for n in range(N):
        for l in range(L):
            theta = max(0.0, sorted(pre[n, l].tolist(), reverse=True)[K - 1])
            for i in range(M):
                if dead[l * M + i]:
                    total = total + torch.relu(theta - pre[n, l, i]) * norms[l, i]
    expected = total / N / int(dead.sum())
    expected.backward()
    torch.testing.assert_close(parts["revival"].detach(), expected.detach())
    for name in ("W_enc", "b_enc"):
        torch.testing.assert_close(dict(clt.named_parameters())[name].grad, P[name].grad)
