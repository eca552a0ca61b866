"""Specification tests of SAE checkpoints (DESIGN.md, sections Forward and Checkpoints).

A save folds the scale s into the weights (W_enc/s, s·W_dec, s·b_dec) and a load gives the same
latents and reconstructions from raw activations; a checkpoint whose files disagree is refused
with a `CheckpointError` that names the problem; a failed save leaves the previous one loadable.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import pathlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from safetensors.torch import save_file as write_safetensors

import saekit.model.format
from saekit.activations.batchtopk import BatchTopKConfig
from saekit.activations.jumprelu import JumpReLUConfig
from saekit.activations.prolu import ProLUConfig
from saekit.activations.relu import ReLUConfig
from saekit.activations.topk import TopKConfig
from saekit.core.encoding import SparseCode
from saekit.model.config import SAEConfig
from saekit.model.format import CheckpointError
from saekit.model.sae import SAE

D_IN, D_SAE, K = 8, 16, 3
VARIANTS = {
    "relu": "relu",
    "topk": {"kind": "topk", "k": K},
    "topk-reference": {"kind": "topk", "k": K, "kernel": "reference"},
    "batchtopk": {"kind": "batchtopk", "k": K, "threshold_beta": 0.9},
    "jumprelu": {"kind": "jumprelu", "init_threshold": 0.02, "bandwidth": 0.005},
    "prolu-ste": {"kind": "prolu", "variant": "ste"},
    "prolu-relu": {"kind": "prolu", "variant": "relu"},
}


def make_data(*lead: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (5 * torch.randn(*lead, D_IN, generator=g, dtype=torch.float64) + 3).to(dtype)


def make_sae(variant: str = "topk", dtype: str = "float32", seed: int = 0, activation=None) -> SAE:
    """Traps: s ≠ 1, b_dec ≠ 0, b_enc ≠ 0, W_enc untied from W_dec, live thresholds and bias."""
    activation = VARIANTS[variant] if activation is None else activation
    torch.manual_seed(seed)
    cfg = SAEConfig(d_in=D_IN, d_sae=D_SAE, activation=activation, dtype=dtype, hook="blocks.3")
    sae = SAE(cfg)
    kind = cfg.activation.kind
    sae.init_from_data(make_data(64, seed=seed + 100))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(D_SAE, D_IN) / math.sqrt(D_IN))
        sae.W_dec.copy_(torch.randn(D_SAE, D_IN) / math.sqrt(D_IN))
        sae.b_enc.copy_(0.3 * torch.randn(D_SAE))
        sae.b_dec.add_(0.5 * torch.randn(D_IN))
        act = sae.activation
        if kind == "jumprelu":
            theta = torch.empty(D_SAE).uniform_(0.05, 0.6)
            if act.cfg.threshold_param == "log":
                act.log_threshold.copy_(theta.log())
            else:
                act.threshold.copy_(theta)
        if kind == "prolu":
            act.bias.copy_(torch.empty(D_SAE).uniform_(-0.5, 0.5))
        if kind == "batchtopk":
            act.update_threshold(torch.tensor(0.37))  # a nonzero threshold that must survive
    assert abs(float(sae.scale) - 1.0) > 1.0
    return sae


def dense(latents: torch.Tensor | SparseCode) -> torch.Tensor:
    return latents.to_dense() if isinstance(latents, SparseCode) else latents


def assert_rel(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5) -> None:
    err = (actual.double() - expected.double()).norm()
    assert err <= tol * expected.double().norm(), f"relative error {err / expected.norm():.2e}"


def state(sae: SAE) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in sae.state_dict().items()}


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


# ------------------------------------------------------------------------------ round trip


@pytest.mark.parametrize("variant", VARIANTS)
def test_save_load_round_trip_gives_the_same_outputs(variant, tmp_path):
    sae = make_sae(variant)
    x = make_data(2, 3, seed=1)
    before_save = state(sae)
    sae.save(tmp_path)
    assert_same_state(state(sae), before_save)  # saving leaves this SAE as it was (s unfolded)

    loaded = SAE.load(tmp_path)
    assert not loaded.training and not loaded.activation.training  # load returns eval mode
    assert loaded.cfg.to_dict() == sae.cfg.to_dict()
    assert float(loaded.scale) == 1.0  # s folded into the weights

    sae.eval()
    out, out_loaded = sae(x), loaded(x)
    assert_rel(out_loaded.pre, out.pre)
    assert_rel(dense(out_loaded.latents), dense(out.latents))
    assert_rel(out_loaded.x_hat, out.x_hat)
    assert_rel(loaded.encode(x), sae.encode(x))
    assert (sae.encode(x) != 0).any() and (sae.encode(x) == 0).any()

    # exactly the folded weights: W_enc/s, s·W_dec, s·b_dec; b_enc and σ's state unchanged
    folded = copy.deepcopy(sae)
    folded.fold_scale_()
    assert_same_state(state(loaded), state(folded))
    for name, value in sae.activation.state_dict().items():
        assert torch.equal(loaded.activation.state_dict()[name], value), name


def test_batchtopk_threshold_survives_and_is_applied_after_load(tmp_path):
    sae = make_sae("batchtopk")
    assert float(sae.activation.threshold) == pytest.approx(0.37)
    sae.save(tmp_path)
    loaded = SAE.load(tmp_path)
    assert float(loaded.activation.threshold) == float(sae.activation.threshold)
    assert bool(loaded.activation.threshold_initialized)
    x = make_data(5, seed=2)
    out = loaded(x)
    theta = float(loaded.activation.threshold)
    expected = [[p if p > theta else 0.0 for p in row] for row in out.pre.double().tolist()]
    torch.testing.assert_close(
        dense(out.latents).double(), torch.tensor(expected, dtype=torch.float64)
    )


@pytest.mark.parametrize("variant", VARIANTS)
def test_second_round_trip_is_bit_identical(variant, tmp_path):
    make_sae(variant).save(tmp_path / "a")
    first = SAE.load(tmp_path / "a")
    first.save(tmp_path / "b")
    second = SAE.load(tmp_path / "b")
    assert_same_state(state(second), state(first))
    x = make_data(2, 3, seed=3)
    assert torch.equal(second(x).x_hat, first(x).x_hat)
    assert torch.equal(second.encode(x), first.encode(x))


def test_float64_sae_round_trips_in_float64(tmp_path):
    sae = make_sae("relu", dtype="float64")
    sae.save(tmp_path)
    loaded = SAE.load(tmp_path)
    assert loaded.W_enc.dtype == torch.float64
    x = make_data(2, 3, seed=4, dtype=torch.float64)
    torch.testing.assert_close(loaded(x).x_hat, sae.eval()(x).x_hat, rtol=1e-12, atol=1e-12)


def test_cfg_json_records_format_config_and_sha256(tmp_path):
    sae = make_sae("topk")
    sae.save(tmp_path)
    meta = json.loads((tmp_path / "cfg.json").read_text())
    assert meta["format"] == saekit.model.format.CHECKPOINT_FORMAT
    assert meta["config"] == sae.cfg.to_dict()
    assert meta["config"]["hook"] == "blocks.3"
    assert meta["scale_folded"] is True
    assert meta["sha256"] == hashlib.sha256((tmp_path / "sae.safetensors").read_bytes()).hexdigest()


def test_cfg_json_nests_the_activation_config_with_every_field(tmp_path):
    make_sae("batchtopk").save(tmp_path)
    config = read_meta(tmp_path)["config"]
    assert config["activation"] == {
        "kind": "batchtopk",
        "k": K,
        "threshold_beta": 0.9,
        "kernel": "torch",
    }
    for old_field in ("k", "threshold_beta", "kernel", "prolu_variant", "jumprelu_bandwidth"):
        assert old_field not in config


# ------------------------------------------------------------------------------ format saekit.sae/1

# The flat config a saekit.sae/1 checkpoint holds: every activation field at the top level,
# whatever the activation (as SAEConfig.to_dict wrote it before the activation configs).
V1_DEFAULTS = {
    "d_in": D_IN,
    "d_sae": D_SAE,
    "activation": "topk",
    "k": None,
    "threshold_beta": 0.999,
    "jumprelu_init_threshold": 0.001,
    "jumprelu_bandwidth": 0.001,
    "prolu_variant": "ste",
    "hook": "blocks.3",
    "model_name": None,
    "dtype": "float32",
    "kernel": "torch",
    "metadata": {},
}

# name -> (flat fields of the old config, the activation config it means)
V1_CASES = {
    "relu": ({"activation": "relu", "k": K}, ReLUConfig()),  # old files carried unused fields
    "topk": ({"activation": "topk", "k": K, "kernel": "reference"}, TopKConfig(K, "reference")),
    "batchtopk": (
        {"activation": "batchtopk", "k": K, "threshold_beta": 0.95},
        BatchTopKConfig(k=K, threshold_beta=0.95, kernel="torch"),
    ),
    "jumprelu": (
        {"activation": "jumprelu", "jumprelu_init_threshold": 0.02, "jumprelu_bandwidth": 0.005},
        JumpReLUConfig(init_threshold=0.02, bandwidth=0.005),
    ),
    "prolu": ({"activation": "prolu", "prolu_variant": "relu"}, ProLUConfig(variant="relu")),
    "prolu-float64": (
        {"activation": "prolu", "prolu_variant": "ste", "dtype": "float64"},
        ProLUConfig(variant="ste"),
    ),
}


def write_v1_checkpoint(path: Path, sae: SAE, flat_config: dict) -> None:
    """cfg.json and sae.safetensors as saekit.sae/1 wrote them, built here by hand: the scale
    folded (W_enc/s, s·W_dec, s·b_dec, scale = 1), the same tensor names."""
    s = sae.scale.detach().clone()
    tensors = {
        "W_enc": sae.W_enc.detach() / s.to(sae.W_enc.dtype),
        "b_enc": sae.b_enc.detach().clone(),
        "W_dec": sae.W_dec.detach() * s.to(sae.W_dec.dtype),
        "b_dec": sae.b_dec.detach() * s.to(sae.b_dec.dtype),
        "scale": torch.ones_like(s),
    }
    for name, value in sae.activation.state_dict().items():
        tensors[f"activation.{name}"] = value.detach().clone()
    path.mkdir(parents=True)
    write_safetensors(tensors, str(path / "sae.safetensors"), metadata={"format": "saekit.sae/1"})
    meta = {
        "format": "saekit.sae/1",
        "saekit_version": "0.1.0",
        "config": flat_config,
        "scale_folded": True,
        "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in tensors.items()},
        "sha256": hashlib.sha256((path / "sae.safetensors").read_bytes()).hexdigest(),
    }
    write_meta(path, meta)


@pytest.mark.parametrize("case", V1_CASES)
def test_a_checkpoint_in_format_1_loads_with_equal_outputs(case, tmp_path):
    fields, activation = V1_CASES[case]
    flat = {**V1_DEFAULTS, **fields}
    source = activation  # what saekit.sae/1 trained: a JumpReLU's log θ
    if isinstance(activation, JumpReLUConfig):
        source = dataclasses.replace(activation, threshold_param="log")
    sae = make_sae(dtype=flat["dtype"], activation=source).eval()
    write_v1_checkpoint(tmp_path / "v1", sae, flat)

    loaded = SAE.load(tmp_path / "v1")
    assert loaded.cfg.activation == activation
    assert loaded.cfg.hook == "blocks.3" and loaded.cfg.dtype == flat["dtype"]
    assert float(loaded.scale) == 1.0
    x = make_data(2, 3, seed=7, dtype=getattr(torch, flat["dtype"]))
    out, out_loaded = sae(x), loaded(x)
    assert_rel(out_loaded.pre, out.pre)
    assert_rel(dense(out_loaded.latents), dense(out.latents))
    assert_rel(out_loaded.x_hat, out.x_hat)
    assert_rel(loaded.encode(x), sae.encode(x))
    assert (sae.encode(x) != 0).any() and (sae.encode(x) == 0).any()
    if isinstance(activation, JumpReLUConfig):  # log θ loads as θ = exp(log θ), bit for bit
        assert torch.equal(loaded.activation.threshold, sae.activation.theta())
    else:
        for name, value in sae.activation.state_dict().items():
            assert torch.equal(loaded.activation.state_dict()[name], value), name

    # saved again, it is written in today's format and loads to the same SAE
    loaded.save(tmp_path / "v2")
    assert read_meta(tmp_path / "v2")["format"] == saekit.model.format.CHECKPOINT_FORMAT
    again = SAE.load(tmp_path / "v2")
    assert again.cfg == loaded.cfg
    assert_same_state(state(again), state(loaded))


def test_a_format_1_checkpoint_with_a_bad_flat_config_is_refused(tmp_path):
    sae = make_sae("topk")
    write_v1_checkpoint(tmp_path / "v1", sae, {**V1_DEFAULTS, "k": D_SAE + 1})
    with pytest.raises(CheckpointError, match=r"bad config.*exceeds d_sae"):
        SAE.load(tmp_path / "v1")


# ------------------------------------------------------------------------------ the directory


def test_save_leaves_no_temporary_files_and_keeps_other_files(tmp_path):
    dest = tmp_path / "run" / "sae"
    make_sae("topk", seed=0).save(dest)
    others = {"metrics.jsonl": '{"step": 1}\n{"step": 2}\n', "eval.json": '{"fvu": 0.1}'}
    for name, text in others.items():
        (dest / name).write_text(text)

    new = make_sae("jumprelu", seed=1)
    new.save(dest)  # another save over it, as a run does at its end

    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["sae"]  # no temp, no old
    assert sorted(p.name for p in dest.iterdir()) == sorted(
        ["cfg.json", "sae.safetensors", *others]
    )
    for name, text in others.items():
        assert (dest / name).read_text() == text
    loaded = SAE.load(dest)
    assert loaded.cfg == new.cfg
    x = make_data(2, 3, seed=8)
    assert_rel(loaded(x).x_hat, new.eval()(x).x_hat)


def test_save_refuses_a_directory_with_subdirectories_and_loses_nothing(tmp_path):
    """Saving swaps the whole directory, so one that holds more than files (a run directory,
    plots/) is refused with a message naming what is there, and nothing in it is touched."""
    dest = tmp_path / "sae"
    first = make_sae("topk")
    first.save(dest)
    (dest / "plots").mkdir()
    (dest / "plots" / "l0.txt").write_text("kept")
    before = (dest / "sae.safetensors").read_bytes()
    with pytest.raises(ValueError, match=r"holds directories \['plots'\]"):
        make_sae("topk", seed=1).save(dest)
    assert (dest / "plots" / "l0.txt").read_text() == "kept"
    assert (dest / "sae.safetensors").read_bytes() == before


def test_save_onto_a_regular_file_is_refused(tmp_path):
    dest = tmp_path / "not-a-dir"
    dest.write_text("mine")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        make_sae("topk").save(dest)
    assert dest.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not-a-dir"]


# ------------------------------------------------------------------------------ refusals


def read_meta(path: Path) -> dict:
    return json.loads((path / "cfg.json").read_text())


def write_meta(path: Path, meta: dict) -> None:
    (path / "cfg.json").write_text(json.dumps(meta))


def rewrite_weights(path: Path, edit) -> None:
    """Rewrite sae.safetensors with ``edit(tensors)`` and a matching sha256, so only the
    tensor check can catch the change."""
    tensors = load_file(str(path / "sae.safetensors"))
    edit(tensors)
    metadata = {"format": saekit.model.format.CHECKPOINT_FORMAT}
    write_safetensors(tensors, str(path / "sae.safetensors"), metadata=metadata)
    meta = read_meta(path)
    meta["sha256"] = hashlib.sha256((path / "sae.safetensors").read_bytes()).hexdigest()
    write_meta(path, meta)


def edit_config(**changes):
    def edit(path: Path) -> None:
        meta = read_meta(path)
        meta["config"].update(changes)
        write_meta(path, meta)

    return edit


def flip_last_byte(path: Path) -> None:
    raw = bytearray((path / "sae.safetensors").read_bytes())
    raw[-1] ^= 0x01  # inside the tensor data, after the header
    (path / "sae.safetensors").write_bytes(bytes(raw))


def set_meta(key, value):
    def edit(path: Path) -> None:
        meta = read_meta(path)
        meta[key] = value
        write_meta(path, meta)

    return edit


CORRUPTIONS = {
    "edited d_sae": (edit_config(d_sae=D_SAE + 4), r"'W_enc' has shape \(16, 8\).*\(20, 8\)"),
    "edited d_in": (edit_config(d_in=D_IN + 1), r"'W_dec' has shape"),
    "edited dtype": (edit_config(dtype="float64"), r"dtype"),
    "unknown activation in config": (
        edit_config(activation={"kind": "gelu", "k": K}),
        r"bad config.*activation\.kind: unknown activation 'gelu'",
    ),
    "field that does not apply to the kind": (
        edit_config(activation={"kind": "relu", "k": K}),
        r"bad config.*\['k'\] do\(es\) not apply to activation 'relu'",
    ),
    "k > d_sae": (
        edit_config(activation={"kind": "topk", "k": D_SAE + 1}),
        r"bad config.*activation\.k = 17 exceeds d_sae = 16",
    ),
    "activation without kind": (
        edit_config(activation={"k": K}),
        r"bad config.*mapping with 'kind'",
    ),
    "old flat field in the new format": (edit_config(k=K), r"bad config.*unknown field.*'k'"),
    "missing tensor": (
        lambda p: rewrite_weights(p, lambda t: t.pop("b_dec")),
        r"missing tensor 'b_dec'",
    ),
    "unexpected tensor": (
        lambda p: rewrite_weights(p, lambda t: t.update(extra=torch.zeros(3))),
        r"unexpected tensor 'extra'",
    ),
    "flipped byte": (flip_last_byte, r"sha256"),
    "missing weights file": (
        lambda p: (p / "sae.safetensors").unlink(),
        r"missing sae\.safetensors",
    ),
    "missing cfg.json": (lambda p: (p / "cfg.json").unlink(), r"missing cfg\.json"),
    "invalid JSON": (lambda p: (p / "cfg.json").write_text('{"format": "saekit.sae/1",'), r"JSON"),
    "wrong format string": (set_meta("format", "sparsify/1"), r"format 'sparsify/1'"),
    "no format string": (set_meta("format", None), r"format"),
    "cfg.json not an object": (lambda p: (p / "cfg.json").write_text("[1, 2]"), r"cfg\.json"),
}


@pytest.mark.parametrize("corrupt, message", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_mismatched_checkpoint_is_refused_naming_the_problem(corrupt, message, tmp_path):
    make_sae("topk").save(tmp_path)
    SAE.load(tmp_path)  # loads before the edit
    corrupt(tmp_path)
    with pytest.raises(CheckpointError, match=message):
        SAE.load(tmp_path)


def test_shape_mismatch_names_every_mis_shaped_tensor(tmp_path):
    make_sae("topk").save(tmp_path)
    edit_config(d_sae=D_SAE + 4)(tmp_path)
    with pytest.raises(CheckpointError) as info:
        SAE.load(tmp_path)
    for name in ("W_enc", "W_dec", "b_enc"):
        assert f"'{name}'" in str(info.value)
    assert "'b_dec'" not in str(info.value)  # its shape depends on d_in only


def test_missing_directory_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="missing"):
        SAE.load(tmp_path / "nowhere")


# ------------------------------------------------------------------------------ failed saves


def _fail_writing_weights(monkeypatch):
    def broken_save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(saekit.model.format, "save_file", broken_save_file)


def _fail_writing_config(monkeypatch):
    def broken_write(self, text, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pathlib.Path, "write_text", broken_write)


@pytest.mark.parametrize(
    "break_save", [_fail_writing_weights, _fail_writing_config], ids=["weights", "config"]
)
def test_a_failed_save_leaves_the_previous_checkpoint_loadable(break_save, tmp_path, monkeypatch):
    dest = tmp_path / "sae"
    old = make_sae("topk", seed=0)
    old.save(dest)
    (dest / "metrics.jsonl").write_text('{"step": 1}\n')
    new = make_sae("topk", seed=1)
    break_save(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        new.save(dest)
    monkeypatch.undo()

    assert [p.name for p in tmp_path.iterdir()] == ["sae"]  # no temporary directory left
    assert sorted(p.name for p in dest.iterdir()) == [
        "cfg.json",
        "metrics.jsonl",
        "sae.safetensors",
    ]
    assert (dest / "metrics.jsonl").read_text() == '{"step": 1}\n'
    loaded = SAE.load(dest)
    x = make_data(2, 3, seed=5)
    assert_rel(loaded(x).x_hat, old.eval()(x).x_hat)
    assert not torch.allclose(loaded(x).x_hat, new.eval()(x).x_hat)


def test_a_save_with_unserialisable_metadata_leaves_the_previous_checkpoint_loadable(tmp_path):
    dest = tmp_path / "sae"
    old = make_sae("relu", seed=0)
    old.save(dest)
    new = make_sae("relu", seed=1)
    new.cfg.metadata["source"] = object()  # json.dumps fails partway through the save
    with pytest.raises(TypeError):
        new.save(dest)
    assert [p.name for p in tmp_path.iterdir()] == ["sae"]
    loaded = SAE.load(dest)
    x = make_data(2, 3, seed=6)
    assert_rel(loaded(x).x_hat, old.eval()(x).x_hat)
