"""Transcoder export: SAELens' transcoder cfg.json and tensors, circuit-tracer's per-layer files
and set (the tensors its load_relu_transcoder reads, config.yaml), and what cannot be exported
is refused with a one-line error. The loads in sae-lens and circuit-tracer themselves:
tests/interop/test_transcoders_real.py, test_circuit_tracer_real.py (``make test-interop``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent))
from harness import D_IN, make_input  # noqa: E402
from transcoders import IN_HOOK, OUT_HOOK, random_transcoder  # noqa: E402

from saekit.interop import export_sae, export_transcoder_set, import_sae
from saekit.interop.circuit_tracer import THRESHOLD
from saekit.interop.portable import InteropError


def folded(tc) -> dict[str, torch.Tensor]:
    """What circuit-tracer's file must hold, from the unfolded weights in float64 (docs/design.md,
    Transcoders): W_enc/s, b_enc, s_y·W_dec, s_y·b_dec, (s_y/s)·W_skip; θ unchanged (the
    pre-activations do not change)."""
    s, s_y = tc.scale.double(), tc.target_scale.double()
    t = {"W_enc": tc.W_enc.double() / s, "b_enc": tc.b_enc.double()}
    t |= {"W_dec": s_y * tc.W_dec.double(), "b_dec": s_y * tc.b_dec.double()}
    if tc.cfg.skip:
        t["W_skip"] = (s_y / s) * tc.W_skip.double()
    if tc.cfg.activation.kind == "jumprelu":
        t[THRESHOLD] = tc.activation.threshold.double()
    if tc.cfg.activation.kind == "batchtopk":  # its inference: JumpReLU with every θ_i = θ
        t[THRESHOLD] = tc.activation.threshold.double().expand(tc.cfg.d_sae)
    return t


@pytest.mark.parametrize(
    ("activation", "skip"),
    [({"kind": "relu"}, True), ({"kind": "jumprelu"}, True), ({"kind": "relu"}, False)]
    + [({"kind": "batchtopk", "k": 5}, True)],
)
def test_circuit_tracer_file_holds_the_folded_transcoder(tmp_path, activation, skip):
    """The layout circuit-tracer's load_relu_transcoder reads; that circuit-tracer computes the
    transcoder from it: tests/interop/test_circuit_tracer_real.py (``make test-interop``)."""
    tc = random_transcoder(activation, skip, d_out=D_IN)
    out = export_sae(tc, "circuit-tracer", tmp_path / "ct")
    found = load_file(out / "layer_3.safetensors")  # the block of model.layers.3.mlp
    expected = folded(tc)
    assert set(found) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(found[name].double(), value, rtol=1e-6, atol=1e-7)
    (info,) = json.loads((out / "saekit.json").read_text())["transcoders"]
    assert (info["hook"], info["target_hook"], info["layer"]) == (IN_HOOK, OUT_HOOK, 3)
    assert not (out / "config.yaml").exists()  # layers 0-2 missing: no set circuit-tracer loads


def test_circuit_tracer_set_from_transcoders_of_layers_0_to_2(tmp_path):
    tcs = [random_transcoder({"kind": "jumprelu"}, True, D_IN, seed=s, layer=s) for s in (2, 0, 1)]
    out, missing = export_transcoder_set([(tc, None) for tc in tcs], tmp_path / "set")
    assert missing == []
    assert sorted(p.name for p in out.glob("layer_*")) == [
        f"layer_{n}.safetensors" for n in range(3)
    ]
    for tc in tcs:
        found = load_file(out / f"layer_{tc.cfg.hook.split('.')[2]}.safetensors")
        torch.testing.assert_close(found["W_dec"].double(), folded(tc)["W_dec"])
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config == {
        "model_name": "meta-llama/Llama-3.2-1B",
        "model_kind": "transcoder_set",
        "feature_input_hook": "ln2.hook_normalized",
        "feature_output_hook": "hook_mlp_out",
    }
    _, missing = export_transcoder_set([(tc, None) for tc in tcs[:1]], tmp_path / "gap")
    assert missing == [0, 1] and not (tmp_path / "gap" / "config.yaml").exists()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"layer": 0}, r"one transcoder per layer; layer \[0\]"),
        ({"skip": False}, "skip path"),
        ({"activation": {"kind": "topk", "k": 5}}, "ReLU or JumpReLU"),
    ],
)
def test_what_a_circuit_tracer_set_cannot_hold_is_refused(tmp_path, changes, message):
    base = {"activation": {"kind": "relu"}, "skip": True, "d_out": D_IN}
    tcs = [random_transcoder(**base, layer=0), random_transcoder(**{**base, "layer": 2, **changes})]
    with pytest.raises(InteropError, match=message):
        export_transcoder_set([(tc, None) for tc in tcs], tmp_path / "set")


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


@pytest.mark.parametrize(
    ("activation", "skip"), [({"kind": "relu"}, False), ({"kind": "jumprelu"}, True)]
)
def test_circuit_tracer_transcoder_round_trip(tmp_path, activation, skip):
    """Export then import (one layer's file, or a directory holding one): both scales and the
    skip path folded once, both hooks kept from saekit.json."""
    tc = random_transcoder(activation, skip, d_out=D_IN)
    out = export_sae(tc, "circuit-tracer", tmp_path / "ct")
    for source in (out, out / "layer_3.safetensors"):
        back = import_sae(source, "circuit-tracer")
        assert (back.cfg.hook, back.cfg.target_hook, back.cfg.skip) == (IN_HOOK, OUT_HOOK, skip)
        x = make_input()
        with torch.no_grad():
            torch.testing.assert_close(back.encode(x), tc.encode(x), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(back(x).x_hat, tc(x).x_hat, rtol=1e-5, atol=1e-5)
