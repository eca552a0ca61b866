"""Transcoder export: SAELens' transcoder cfg.json and tensors, circuit-tracer's per-layer file
read the way its loader reads it (load_relu_transcoder, circuit_tracer 0.5), and what cannot be
exported is refused with a one-line error. The load in sae-lens itself:
tests/interop/test_transcoders_real.py (``make test-interop``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from harness import D_IN, make_input  # noqa: E402
from transcoders import IN_HOOK, OUT_HOOK, random_transcoder  # noqa: E402

from saekit.interop import export_sae, import_sae
from saekit.interop.portable import InteropError


def circuit_tracer_forward(path: Path, x: torch.Tensor):
    """circuit-tracer's SingleLayerTranscoder on the file: F.linear(x, W_enc, b_enc); ReLU, or
    JumpReLU x·1[x > θ] when ``activation_function.threshold`` is present; acts @ W_dec + b_dec
    + x @ W_skipᵀ."""
    with safe_open(str(path), framework="pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    pre = F.linear(x, t["W_enc"], t["b_enc"])
    theta = t.get("activation_function.threshold")
    acts = F.relu(pre) if theta is None else pre * (pre > theta)
    y_hat = acts @ t["W_dec"] + t["b_dec"]
    if "W_skip" in t:
        y_hat = y_hat + x @ t["W_skip"].T
    return acts, y_hat


@pytest.mark.parametrize(
    ("activation", "skip"),
    [({"kind": "relu"}, True), ({"kind": "jumprelu"}, True), ({"kind": "relu"}, False)]
    + [({"kind": "batchtopk", "k": 5}, True)],
)
def test_circuit_tracer_file_computes_the_transcoder(tmp_path, activation, skip):
    tc = random_transcoder(activation, skip, d_out=D_IN)
    out = export_sae(tc, "circuit-tracer", tmp_path / "ct")
    assert (out / "layer_3.safetensors").is_file()  # the block of model.layers.3.mlp
    x = make_input()
    acts, y_hat = circuit_tracer_forward(out / "layer_3.safetensors", x)
    with torch.no_grad():
        torch.testing.assert_close(acts, tc.encode(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(y_hat, tc(x).x_hat, rtol=1e-5, atol=1e-5)
    info = json.loads((out / "saekit.json").read_text())
    assert (info["hook"], info["target_hook"], info["layer"]) == (IN_HOOK, OUT_HOOK, 3)


def test_saelens_transcoder_config_names_the_architecture_and_both_hooks(tmp_path):
    tc = random_transcoder({"kind": "jumprelu"}, skip=True)
    out = export_sae(tc, "saelens", tmp_path / "sl")
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu_skip_transcoder"
    assert (cfg["d_in"], cfg["d_out"], cfg["apply_b_dec_to_input"]) == (D_IN, 12, False)
    assert cfg["metadata"]["hook_name"] == "blocks.3.ln2.hook_normalized"
    assert cfg["metadata"]["hook_name_out"] == "blocks.3.hook_mlp_out"
    with safe_open(str(out / "sae_weights.safetensors"), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    assert shapes["W_skip"] == (12, D_IN) and shapes["W_dec"][1] == 12
    plain = export_sae(random_transcoder({"kind": "relu"}, False), "saelens", tmp_path / "p")
    assert json.loads((plain / "cfg.json").read_text())["architecture"] == "transcoder"


@pytest.mark.parametrize(
    ("fmt", "activation", "d_out", "message"),
    [
        ("saelens", {"kind": "topk", "k": 5}, 12, "SAELens has no topk transcoder"),
        ("circuit-tracer", {"kind": "topk", "k": 5}, D_IN, "ReLU or JumpReLU"),
        ("circuit-tracer", {"kind": "relu"}, 12, "map d_model to d_model"),
        ("sparsify", {"kind": "topk", "k": 5}, 12, "sparsify transcoders"),
    ],
)
def test_what_a_format_cannot_hold_is_refused(tmp_path, fmt, activation, d_out, message):
    tc = random_transcoder(activation, skip=True, d_out=d_out)
    with pytest.raises(InteropError, match=message):
        export_sae(tc, fmt, tmp_path / "out")


def _random(*shape, g, scale=1.0):
    return scale * torch.randn(*shape, generator=g, dtype=torch.float64)


def test_saelens_skip_transcoders_import_as_sae_lens_computes_them(tmp_path):
    """SAELens' (Jump)ReLU skip transcoder written out in float64: pre = x W_enc + b_enc
    (nothing subtracted), z = ReLU(pre)·1[pre > θ], ŷ = z W_dec + b_dec + x W_skipᵀ."""
    g = torch.Generator().manual_seed(3)
    d_out = D_IN + 4
    t = {"W_enc": _random(D_IN, 20, g=g, scale=0.3), "b_enc": _random(20, g=g, scale=0.3)}
    t |= {"W_dec": _random(20, d_out, g=g), "b_dec": _random(d_out, g=g)}
    t |= {"W_skip": _random(d_out, D_IN, g=g, scale=0.3), "threshold": _random(20, g=g).abs()}
    meta = {"model_name": "gpt2", "hook_name": "blocks.2.ln2.hook_normalized"}
    cfg = {"architecture": "jumprelu_skip_transcoder", "d_in": D_IN, "d_sae": 20, "d_out": d_out}
    cfg |= {
        "apply_b_dec_to_input": False,
        "metadata": {**meta, "hook_name_out": "blocks.2.hook_mlp_out"},
    }
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    save_file(t, str(tmp_path / "sae_weights.safetensors"))
    tc = import_sae(tmp_path, "saelens")
    assert (tc.cfg.d_out, tc.cfg.skip, tc.cfg.target_hook) == (d_out, True, "transformer.h.2.mlp")
    x = make_input().double()
    pre = x @ t["W_enc"] + t["b_enc"]
    z = F.relu(pre) * (pre > t["threshold"])
    with torch.no_grad():
        torch.testing.assert_close(tc.encode(x), z)
        torch.testing.assert_close(tc(x).x_hat, z @ t["W_dec"] + t["b_dec"] + x @ t["W_skip"].T)
    cfg["apply_b_dec_to_input"] = True
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(InteropError, match="apply_b_dec_to_input"):
        import_sae(tmp_path, "saelens")


def test_gemma_scope_2_skip_is_transposed_on_import(tmp_path):
    """Gemma Scope 2 stores affine_skip_connection [d_in, d_out] and SAELens' loader transposes
    it (gemma_3_sae_huggingface_loader): ŷ = z w_dec + b_dec + x A. d_in = d_out, as in Gemma
    Scope 2's transcoders, so a missing transpose still has the right shape."""
    g = torch.Generator().manual_seed(4)
    t = {"w_enc": _random(D_IN, 20, g=g, scale=0.3), "b_enc": _random(20, g=g, scale=0.3)}
    t |= {"w_dec": _random(20, D_IN, g=g), "b_dec": _random(D_IN, g=g)}
    t |= {"affine_skip_connection": _random(D_IN, D_IN, g=g), "threshold": _random(20, g=g).abs()}
    save_file(t, str(tmp_path / "params.safetensors"))
    hooks = {"hf_hook_point_in": "model.layers.3.pre_feedforward_layernorm.output"}
    hooks["hf_hook_point_out"] = "model.layers.3.post_feedforward_layernorm.output"
    (tmp_path / "config.json").write_text(json.dumps({"model_name": "gemma-3-1b-pt", **hooks}))
    tc = import_sae(tmp_path, "gemma_scope_2")
    assert tc.cfg.hook == "model.layers.3.pre_feedforward_layernorm"
    assert tc.cfg.target_hook == "model.layers.3.post_feedforward_layernorm"
    x = make_input().double()
    pre = x @ t["w_enc"] + t["b_enc"]
    z = F.relu(pre) * (pre > t["threshold"])
    y_hat = z @ t["w_dec"] + t["b_dec"] + x @ t["affine_skip_connection"]
    with torch.no_grad():
        torch.testing.assert_close(tc(x).x_hat, y_hat)


@pytest.mark.parametrize(
    ("activation", "skip"),
    [
        ({"kind": "relu"}, False),
        ({"kind": "jumprelu"}, True),
        ({"kind": "batchtopk", "k": 5}, True),
    ],
)
def test_saelens_transcoder_round_trip(tmp_path, activation, skip):
    """Export then import: both scales and the skip path folded once, both hooks kept."""
    tc = random_transcoder(activation, skip)
    back = import_sae(export_sae(tc, "saelens", tmp_path / "sl"), "saelens")
    assert (back.cfg.hook, back.cfg.target_hook, back.cfg.skip) == (IN_HOOK, OUT_HOOK, skip)
    x = make_input()
    with torch.no_grad():
        torch.testing.assert_close(back.encode(x), tc.encode(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(back(x).x_hat, tc(x).x_hat, rtol=1e-5, atol=1e-5)
