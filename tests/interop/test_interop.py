"""Interop formats against the libraries' formulas, written out here in float64 from their source
(sae_lens/saes/*.py, sparsify/sparse_coder.py, dictionary_learning/dictionary.py,
trainers/top_k.py, batch_top_k.py): files written by saekit are read back raw and run through
the library's formula; files laid out as the library saves them are imported. The same checks
against the real libraries: tests/interop (make test-interop). Every trap of issue 11 is here:
transposed W_enc, rescale_acts_by_decoder_norm, BatchTopK's θ under a scale fold,
dictionary_learning's JumpReLU without b_dec on the input and its TopK's unused threshold,
ProLU as JumpReLU. Transcoders (W_skip): tests/interop/test_interop_transcoders.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent))
from harness import D_IN, D_SAE, K, assert_close, make_input, random_sae  # noqa: E402

from saekit.interop import export_sae, import_sae  # noqa: E402


def top_k(pre, k, by_magnitude=False):
    """Keep each token's k largest entries, or of largest |pre| (plain loop over tokens)."""
    flat = pre.reshape(-1, pre.shape[-1])
    out = torch.zeros_like(flat)
    rank = flat.abs() if by_magnitude else flat
    for n in range(flat.shape[0]):
        idx = sorted(range(flat.shape[1]), key=lambda i: -float(rank[n, i]))[:k]
        out[n, idx] = flat[n, idx]
    return out.reshape(pre.shape)


def saelens_reference(cfg, t, x):
    """sae_lens 6.x encode/decode: (x − b_dec·apply) W_enc + b_enc; standard ReLU, topk (ranked
    by pre·‖W_dec‖ when rescaling, latents divided by it before decoding), jumprelu ReLU·H."""
    x, t = x.double(), {k: v.double() for k, v in t.items()}
    x_c = x - t["b_dec"] * cfg.get("apply_b_dec_to_input", True)
    pre = x_c @ t["W_enc"] + t.get("b_enc", t.get("b_gate"))
    norms = t["W_dec"].norm(dim=-1)
    rescale = cfg.get("rescale_acts_by_decoder_norm", False)
    if cfg["architecture"] == "standard":
        z = pre.relu()
    elif cfg["architecture"] == "topk":
        z = top_k(pre * norms if rescale else pre, cfg["k"]).relu()
    elif cfg["architecture"] == "abstopk":
        z = top_k(pre * norms if rescale else pre, cfg["k"], by_magnitude=True)
    elif cfg["architecture"] == "gated":
        z = (pre > 0) * (x_c @ (t["W_enc"] * t["r_mag"].exp()) + t["b_mag"]).relu()
    else:
        z = pre.relu() * (pre > t["threshold"])
    return z, (z / norms if rescale else z) @ t["W_dec"] + t["b_dec"]


def sparsify_reference(cfg, t, x):
    x, t = x.double(), {k: v.double() for k, v in t.items()}
    z = top_k(((x - t["b_dec"]) @ t["encoder.weight"].T + t["encoder.bias"]).relu(), cfg["k"])
    return z, z @ t["W_dec"] + t["b_dec"]


def ours(sae, x):
    with torch.no_grad():
        return sae.encode(x).double(), sae(x).x_hat.double()


@pytest.mark.parametrize(
    "activation",
    [
        {"kind": "relu"},
        {"kind": "topk", "k": K},
        {"kind": "jumprelu"},
        {"kind": "batchtopk", "k": K},  # θ must stay as it is under the scale fold (SAELens #763)
        {"kind": "prolu"},  # JumpReLU with b_enc = 0, θ_i = max(−b_i, 0)
        {"kind": "jumprelu", "threshold_param": "log"},
        {"kind": "topk", "k": K, "whitening": {"kind": "zca", "eps": 0.001}},
        {"kind": "abstopk", "k": K},
        {"kind": "gated"},
        {"kind": "hierarchical_topk", "k": K + 3, "inference_k": K},  # SAELens topk, k = K
    ],
    ids=lambda a: (
        "-".join(str(v) for k, v in a.items() if k != "whitening")
        + ("-whitened" if "whitening" in a else "")
    ),
)
def test_export_to_saelens_computes_what_saekit_does(tmp_path, activation):
    activation = dict(activation)
    sae = random_sae(activation, whitening=activation.pop("whitening", None))
    out = export_sae(sae, "saelens", tmp_path / "sl")
    cfg = json.loads((out / "cfg.json").read_text())
    t = load_file(str(out / "sae_weights.safetensors"))
    assert t["W_enc"].shape == (D_IN, D_SAE)  # SAELens stores W_enc transposed
    x = make_input()
    z_ref, x_hat_ref = saelens_reference(cfg, t, x)
    z, x_hat = ours(sae, x)
    assert (z != 0).any() and (z == 0).any()
    assert_close(z, z_ref, "latents")
    assert_close(x_hat, x_hat_ref, "reconstruction")


def test_export_to_sparsify_computes_what_saekit_does(tmp_path):
    sae = random_sae({"kind": "topk", "k": K})
    out = export_sae(sae, "sparsify", tmp_path / "sp")
    assert out == tmp_path / "sp" / "h.2"  # transformer.h.3:input is what h.2 returns
    cfg = json.loads((out / "cfg.json").read_text())
    t = load_file(str(out / "sae.safetensors"))
    assert sorted(t) == ["W_dec", "b_dec", "encoder.bias", "encoder.weight"]
    z_ref, x_hat_ref = sparsify_reference(cfg, t, make_input())
    z, x_hat = ours(sae, make_input())
    assert_close(z, z_ref, "latents")
    assert_close(x_hat, x_hat_ref, "reconstruction")


def random_tensors(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        k: (0.5 + torch.rand(1, generator=g)) * torch.randn(s, generator=g)
        for k, s in shapes.items()
    }


def write_saelens(path, cfg, tensors):
    path.mkdir(parents=True)
    (path / "cfg.json").write_text(json.dumps({"d_in": D_IN, "d_sae": D_SAE, **cfg}))
    save_file(tensors, str(path / "sae_weights.safetensors"))


SAELENS_SHAPES = {
    "W_enc": (D_IN, D_SAE),
    "b_enc": (D_SAE,),
    "W_dec": (D_SAE, D_IN),
    "b_dec": (D_IN,),
}


@pytest.mark.parametrize(
    "cfg",
    [
        {"architecture": "standard"},
        {"architecture": "standard", "apply_b_dec_to_input": False},
        {"architecture": "topk", "k": K},
        {"architecture": "topk", "k": K, "rescale_acts_by_decoder_norm": True},
        {"architecture": "jumprelu"},
        {"architecture": "abstopk", "k": K, "rescale_acts_by_decoder_norm": True},
        {"architecture": "gated", "apply_b_dec_to_input": False},
    ],
    ids=[
        "standard",
        "standard-no-bdec-input",
        "topk",
        "topk-rescaled",
        "jumprelu",
        "abstopk-rescaled",
        "gated-no-bdec-input",
    ],
)
def test_saelens_files_import_with_the_same_outputs(tmp_path, cfg):
    shapes = dict(SAELENS_SHAPES)
    if cfg["architecture"] == "jumprelu":
        shapes["threshold"] = (D_SAE,)
    if cfg["architecture"] == "gated":  # b_gate instead of b_enc
        shapes.update(b_gate=shapes.pop("b_enc"), b_mag=(D_SAE,), r_mag=(D_SAE,))
    t = random_tensors(shapes)
    for name in ("threshold", "r_mag"):
        if name in t:  # some θ < 0: ReLU·H keeps only pre > max(θ, 0)
            t[name] = t[name] * 0.3
    write_saelens(tmp_path / "sl", cfg, t)
    sae = import_sae(tmp_path / "sl", "saelens")
    x = make_input()
    z_ref, x_hat_ref = saelens_reference(cfg, t, x)
    z = sae.encode(x).detach()
    assert (z != 0).any() and (z == 0).any()
    assert_close(z, z_ref, "latents")
    assert_close(sae.decode(z).detach(), x_hat_ref, "reconstruction")


def write_dictionary_learning(path, dict_class, state, **trainer):
    path.mkdir(parents=True)
    torch.save(state, path / "ae.pt")
    trainer.update(dict_class=dict_class, activation_dim=D_IN, dict_size=D_SAE, lm_name="gpt2")
    (path / "config.json").write_text(json.dumps({"trainer": trainer}))


def linear_state(seed=0):
    s = random_tensors(
        {
            "encoder.weight": (D_SAE, D_IN),
            "encoder.bias": (D_SAE,),
            "decoder.weight": (D_IN, D_SAE),
        },
        seed,
    )
    s["b_dec"] = torch.randn(D_IN)
    return s


def test_dictionary_learning_jumprelu_does_not_subtract_b_dec(tmp_path):
    s = random_tensors(
        {"W_enc": (D_IN, D_SAE), "b_enc": (D_SAE,), "W_dec": (D_SAE, D_IN), "b_dec": (D_IN,)}
    )
    s["threshold"] = 0.3 * torch.randn(D_SAE)
    write_dictionary_learning(tmp_path / "dl", "JumpReluAutoEncoder", s)
    sae = import_sae(tmp_path / "dl", "dictionary_learning")
    x = make_input().double()
    d = {k: v.double() for k, v in s.items()}
    pre = x @ d["W_enc"] + d["b_enc"]  # no b_dec: JumpReluAutoEncoder.apply_b_dec_to_input False
    z_ref = (pre * (pre > d["threshold"])).relu()
    z = sae.encode(make_input()).detach()
    assert_close(z, z_ref, "latents")
    assert_close(sae.decode(z).detach(), z_ref @ d["W_dec"] + d["b_dec"], "reconstruction")


@pytest.mark.parametrize("dict_class", ["AutoEncoderTopK", "BatchTopKSAE"])
def test_dictionary_learning_topk_encodes_per_token_and_batchtopk_by_threshold(
    tmp_path, dict_class
):
    s = linear_state()
    s.update(k=torch.tensor(K, dtype=torch.int), threshold=torch.tensor(0.9))
    write_dictionary_learning(tmp_path / "dl", dict_class, s, k=K)
    sae = import_sae(tmp_path / "dl", "dictionary_learning")
    x = make_input().double()
    d = {k: v.double() for k, v in s.items()}
    f = ((x - d["b_dec"]) @ d["encoder.weight"].T + d["encoder.bias"]).relu()
    # AutoEncoderTopK saves a threshold it does not encode by; BatchTopKSAE encodes by it.
    z_ref = top_k(f, K) if dict_class == "AutoEncoderTopK" else f * (f > d["threshold"])
    assert (
        sae.cfg.activation.kind
        == {"AutoEncoderTopK": "topk", "BatchTopKSAE": "batchtopk"}[dict_class]
    )
    z = sae.encode(make_input()).detach()
    assert_close(z, z_ref, "latents")
    assert_close(
        sae.decode(z).detach(), z_ref @ d["decoder.weight"].T + d["b_dec"], "reconstruction"
    )


def test_dictionary_learning_gated(tmp_path):
    s = random_tensors(
        {
            "encoder.weight": (D_SAE, D_IN),
            "decoder.weight": (D_IN, D_SAE),
            "decoder_bias": (D_IN,),
            "r_mag": (D_SAE,),
            "gate_bias": (D_SAE,),
            "mag_bias": (D_SAE,),
        }
    )
    write_dictionary_learning(tmp_path / "dl", "GatedAutoEncoder", s)
    sae = import_sae(tmp_path / "dl", "dictionary_learning")
    d = {k: v.double() for k, v in s.items()}
    x_enc = (make_input().double() - d["decoder_bias"]) @ d["encoder.weight"].T
    gate = x_enc + d["gate_bias"] > 0
    z_ref = gate * (d["r_mag"].exp() * x_enc + d["mag_bias"]).relu()
    z = sae.encode(make_input()).detach()
    assert (z != 0).any() and (z == 0).any()
    assert_close(z, z_ref, "latents")
    x_hat_ref = z_ref @ d["decoder.weight"].T + d["decoder_bias"]
    assert_close(sae.decode(z).detach(), x_hat_ref, "reconstruction")


def test_dictionary_learning_autoencoder(tmp_path):
    s = linear_state()
    s["bias"] = s.pop("b_dec")
    write_dictionary_learning(tmp_path / "dl", "AutoEncoder", s)
    sae = import_sae(tmp_path / "dl", "dictionary_learning")
    d = {k: v.double() for k, v in s.items()}
    x = make_input().double()
    z_ref = ((x - d["bias"]) @ d["encoder.weight"].T + d["encoder.bias"]).relu()
    assert_close(sae.encode(make_input()).detach(), z_ref, "latents")


def test_saekit_to_saelens_and_back_is_the_same_sae(tmp_path):
    sae = random_sae({"kind": "jumprelu"})
    export_sae(sae, "saelens", tmp_path / "sl")
    back = import_sae(tmp_path / "sl", "saelens")
    x = make_input()
    assert_close(back(x).x_hat.detach(), sae(x).x_hat.detach(), "reconstruction")
    assert back.cfg.hook == "transformer.h.3:input" and back.cfg.model_name == "gpt2"
    cfg = json.loads((tmp_path / "sl" / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == "blocks.3.hook_resid_pre"
