"""Cross-layer transcoder exchange: circuit-tracer's CLT directory holds the folded CLT (checked
tensor by tensor against float64 folds of the unfolded weights) and imports back exactly;
Gemma Scope 2 CLT folders import as their JumpReLU multi-layer SAE computes, written out in
float64 per token, layer and target; what a format cannot hold is refused in one line. That
circuit-tracer itself computes the export: tests/interop/test_circuit_tracer_real.py
(``make test-interop``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent))
from clts import L, M, clt_input, gemma_scope_2_clt, hooks, random_clt  # noqa: E402
from harness import D_IN, assert_close  # noqa: E402

from saekit.cli import main  # noqa: E402
from saekit.interop import export_clt, import_dictionary  # noqa: E402
from saekit.interop.portable import InteropError  # noqa: E402
from saekit.model.clt import CrossLayerTranscoder  # noqa: E402

CASES = {
    "relu": {"kind": "relu"},
    "jumprelu": {"kind": "jumprelu"},
    "batchtopk": {"kind": "batchtopk", "k": 4},
}


def folded(clt) -> dict[str, torch.Tensor]:
    """circuit-tracer's tensors from the unfolded weights in float64: W_enc_l = W_enc[l]/s_l,
    W_dec_l[:, j] = t_{l+j}·W_dec[l][:, j], b_dec_l = t_l·b_dec[l], θ_l unchanged (the
    pre-activations do not change; BatchTopK: its inference JumpReLU, every θ = its θ)."""
    s, t = clt.scale.double(), clt.target_scale.double()
    out = {}
    for layer in range(L):
        out[f"W_enc_{layer}"] = clt.W_enc[layer].double() / s[layer]
        out[f"b_enc_{layer}"] = clt.b_enc[layer].double()
        out[f"b_dec_{layer}"] = t[layer] * clt.b_dec[layer].double()
        out[f"W_dec_{layer}"] = clt.W_dec[layer].double() * t[layer:].view(1, -1, 1)
        if clt.cfg.activation.kind == "jumprelu":
            out[f"threshold_{layer}"] = clt.activation.threshold.double().view(L, M)[layer]
        if clt.cfg.activation.kind == "batchtopk":
            out[f"threshold_{layer}"] = clt.activation.threshold.double().expand(M)
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_circuit_tracer_clt_files_hold_the_folded_clt(tmp_path, case):
    clt = random_clt(CASES[case])
    out = export_clt(clt, "circuit-tracer", tmp_path / "ct")
    expected = folded(clt)
    found = {}
    for layer in range(L):
        for prefix in ("W_enc", "W_dec"):
            found |= load_file(out / f"{prefix}_{layer}.safetensors")
    assert set(found) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(found[name].double(), value, rtol=1e-6, atol=1e-7)
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config == {
        "model_name": "meta-llama/Llama-3.2-1B",
        "model_kind": "cross_layer_transcoder",
        "feature_input_hook": "ln2.hook_normalized",
        "feature_output_hook": "hook_mlp_out",
    }


@pytest.mark.parametrize("case", sorted(CASES))
def test_circuit_tracer_clt_round_trip(tmp_path, case):
    """Export then import: the same latents and predictions on 3-D input, both hook lists kept;
    the imported CLT has scales 1 (folded once)."""
    clt = random_clt(CASES[case])
    back = import_dictionary(export_clt(clt, "circuit-tracer", tmp_path / "ct"), "circuit-tracer")
    assert isinstance(back, CrossLayerTranscoder)
    assert (back.cfg.hooks, back.cfg.target_hooks) == hooks()
    assert bool((back.scale == 1).all()) and bool((back.target_scale == 1).all())
    x = clt_input()
    with torch.no_grad():
        z = clt.encode(x)
        assert 0 < float((z != 0).float().mean()) < 1, "no latent fires, or all do"
        assert_close(back.encode(x), z, "latents")
        assert_close(back(x).x_hat, clt(x).x_hat, "predictions")


def gemma_scope_2_forward(t, x):
    """Per token, layer and target: pre_l = x_l w_enc_l + b_enc_l, z_l = ReLU(pre_l)·H(pre_l − θ_l)
    (Gemma Scope's JumpReLU), ŷ_t = Σ_{l ≤ t} z_l w_dec_l[:, t] + b_dec_t."""
    X = x.reshape(-1, L, D_IN)
    z = torch.zeros(X.shape[0], L, M, dtype=torch.float64)
    y = torch.zeros(X.shape[0], L, D_IN, dtype=torch.float64)
    for n in range(X.shape[0]):
        for layer in range(L):
            pre = X[n, layer] @ t["w_enc"][layer] + t["b_enc"][layer]
            z[n, layer] = torch.relu(pre) * (pre > t["threshold"][layer])
        for target in range(L):
            y[n, target] = t["b_dec"][target]
            for layer in range(target + 1):
                y[n, target] += z[n, layer] @ t["w_dec"][layer][:, target]
    lead = x.shape[:-1]
    return z.reshape(*lead, L * M), y.reshape(*lead, L * D_IN)


def test_gemma_scope_2_clt_imports_as_it_computes(tmp_path, capsys):
    t = gemma_scope_2_clt(tmp_path / "clt")
    clt = import_dictionary(tmp_path / "clt", "gemma_scope_2")
    assert "decoders into earlier layers" in capsys.readouterr().err  # dropped, and said
    assert clt.cfg.hooks[2] == "model.layers.2.pre_feedforward_layernorm"
    assert clt.cfg.target_hooks[1] == "model.layers.1.post_feedforward_layernorm"
    x = clt_input().double()
    z, y = gemma_scope_2_forward(t, x)
    assert 0 < float((z != 0).float().mean()) < 1
    with torch.no_grad():
        torch.testing.assert_close(clt.encode(x), z)
        torch.testing.assert_close(clt(x).x_hat, y)


def test_clt_command_line_both_ways(tmp_path, capsys):
    clt = random_clt(CASES["jumprelu"])
    clt.save(tmp_path / "run" / "clt")
    ct = tmp_path / "ct"
    assert main(["export", str(tmp_path / "run"), "--to", "circuit-tracer", "--out", str(ct)]) == 0
    assert (ct / "W_dec_2.safetensors").is_file()
    assert main(["import", str(ct), "--from", "circuit-tracer", "--out", str(tmp_path / "b")]) == 0
    assert "CLT, jumprelu, 3 layers of 24 latents" in capsys.readouterr().out
    back = CrossLayerTranscoder.load(tmp_path / "b")
    x = clt_input()
    with torch.no_grad():
        assert_close(back(x).x_hat, clt(x).x_hat, "predictions")
    gemma_scope_2_clt(tmp_path / "gs")
    assert (
        main(
            [
                "import",
                str(tmp_path / "gs"),
                "--from",
                "gemma_scope_2",
                "--out",
                str(tmp_path / "g"),
            ]
        )
        == 0
    )
    assert CrossLayerTranscoder.load(tmp_path / "g").cfg.n_layers == L


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    return err


@pytest.mark.parametrize(
    ("activation", "changes", "to", "message"),
    [
        ({"kind": "topk", "k": 3}, {}, "circuit-tracer", "ReLU or JumpReLU; this one is 'topk'"),
        ({"kind": "relu"}, {"d_out": D_IN + 2}, "circuit-tracer", "map d_model to d_model"),
        ({"kind": "relu"}, {"first_layer": 2}, "circuit-tracer", "in blocks [2, 3, 4]"),
        ({"kind": "relu"}, {}, "saelens", "saelens has no cross-layer transcoder format"),
    ],
)
def test_what_a_format_cannot_hold_is_refused(tmp_path, capsys, activation, changes, to, message):
    random_clt(activation, **changes).save(tmp_path / "clt")
    assert main(["export", str(tmp_path / "clt"), "--to", to, "--out", str(tmp_path / "o")]) == 2
    assert message in error_line(capsys)


def test_bad_clt_folders_are_refused(tmp_path):
    gemma_scope_2_clt(tmp_path / "affine", skip=True)
    with pytest.raises(InteropError, match="an _affine CLT"):
        import_dictionary(tmp_path / "affine", "gemma_scope_2")
    gemma_scope_2_clt(tmp_path / "gap")
    (tmp_path / "gap" / "params_layer_1.safetensors").unlink()
    with pytest.raises(InteropError, match=r"layer files \[0, 2\]"):
        import_dictionary(tmp_path / "gap", "gemma_scope_2")
    ct = export_clt(random_clt({"kind": "jumprelu"}), "circuit-tracer", tmp_path / "ct")
    save_file({"W_enc_1": torch.zeros(M, D_IN)}, str(ct / "W_enc_1.safetensors"))
    with pytest.raises(InteropError, match="threshold_i in some layers' files only"):
        import_dictionary(ct, "circuit-tracer")


@pytest.mark.parametrize("to", ["circuit-tracer", "saelens"])
def test_a_crosscoder_is_refused(tmp_path, capsys, to):
    from saekit.model.crosscoder import Crosscoder, CrosscoderConfig

    cfg = CrosscoderConfig(d_in=D_IN, d_sae=M, n_sources=2, activation={"kind": "relu"})
    Crosscoder(cfg).save(tmp_path / "cc")
    assert main(["export", str(tmp_path / "cc"), "--to", to, "--out", str(tmp_path / "o")]) == 2
    assert f"{to} has no format for a crosscoder" in error_line(capsys)
