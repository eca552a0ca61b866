"""Issue 28: inputs that used to be accepted (or gave a traceback) and now get one clear line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from saekit.cli import main
from saekit.model.config import SAEConfig
from saekit.model.format import CheckpointError
from saekit.model.sae import SAE
from saekit.train.config import build_run_config
from saekit.train.config_files import load_config_file
from saekit.train.presets import train_config


def small_sae() -> SAE:
    torch.manual_seed(0)
    return SAE(SAEConfig(d_in=8, d_sae=16, activation={"kind": "topk", "k": 2}))


@pytest.mark.parametrize("make", [lambda x: x.numpy(), lambda x: x.tolist()])
def test_encode_of_a_non_tensor_is_one_line(make):
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="torch.Tensor.*torch.as_tensor"):
        small_sae().encode(make(x))
    assert isinstance(make(x), (np.ndarray, list))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_inference_forward_refuses_non_finite_input(bad):
    sae = small_sae().eval()
    x = torch.randn(4, 8)
    x[1, 3] = bad
    with pytest.raises(ValueError, match="NaN.*inf"):
        sae(x)
    with pytest.raises(ValueError, match="NaN.*inf"):
        sae.encode(x)


def test_init_from_data_of_the_wrong_width_is_refused():
    sae = small_sae()
    scale = sae.scale.clone()
    with pytest.raises(ValueError, match="trailing dimension.*d_in = 8"):
        sae.init_from_data(torch.randn(10, 12))  # 120 values: reshapes to [15, 8] silently
    assert torch.equal(sae.scale, scale)


def test_nan_weights_are_refused_on_load_naming_the_tensor(tmp_path):
    sae = small_sae()
    with torch.no_grad():
        sae.W_dec[3, 1] = float("nan")
    sae.save(tmp_path / "sae")
    with pytest.raises(CheckpointError, match="W_dec.*NaN or inf"):
        SAE.load(tmp_path / "sae")


def test_cfg_json_without_sha256_says_so(tmp_path):
    small_sae().save(tmp_path / "sae")
    path = tmp_path / "sae" / "cfg.json"
    meta = json.loads(path.read_text())
    del meta["sha256"]
    path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="records no sha256"):
        SAE.load(tmp_path / "sae")
    assert SAE.load(tmp_path / "sae", verify=False).cfg.d_sae == 16


def _run(**changes):
    data = train_config()
    data["out_dir"] = "/nonexistent/never-written"
    data.update(changes)
    return data


def test_eval_tokens_of_one_is_refused():
    with pytest.raises(ValueError, match="eval_tokens must be >= 2"):
        build_run_config(_run(eval_tokens=1))


def test_k_aux_larger_than_d_sae_is_refused():
    data = _run()
    data["saes"][0]["sae"]["d_sae"] = 32
    data["saes"][0]["revival"] = {"kind": "auxk", "k_aux": 33}
    with pytest.raises(ValueError, match="k_aux = 33 exceeds sae.d_sae = 32"):
        build_run_config(data)


def test_duplicate_yaml_keys_are_refused(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("steps: 5\nsaes:\n  - sae: {d_sae: 8, d_sae: 9}\n")
    with pytest.raises(ValueError, match="duplicate key 'd_sae'"):
        load_config_file(path)


def test_cache_max_tokens_zero_is_refused(tmp_path, capsys):
    argv = ["cache", "--model", "m", "--hook", "h", "--text-file", "t.txt"]
    assert main([*argv, "--out", str(tmp_path / "c"), "--max-tokens", "0"]) == 2
    assert "--max-tokens must be positive" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_eval_of_a_synthetic_sae_on_a_cache_takes_the_cache_hook(tmp_path, capsys):
    from saekit.data.cache.writing import write_cache

    small_sae().save(tmp_path / "sae")  # no hook recorded, as after synthetic training
    write_cache(tmp_path / "c", [torch.randn(300, 8)], "h", "m", shard_tokens=100)
    assert main(["eval", "--sae", str(tmp_path / "sae"), "--cache", str(tmp_path / "c")]) == 0
    assert main(["eval", "--sae", str(tmp_path / "sae")]) == 2
    assert "--cache" in capsys.readouterr().err


def test_edited_cache_manifest_and_shard_header_are_named(tmp_path):
    from saekit.data.cache.reading import ActivationCache, CacheError
    from saekit.data.cache.writing import write_cache

    write_cache(tmp_path / "c", [torch.randn(300, 8)], "h", "m", shard_tokens=100)
    manifest = tmp_path / "c" / "manifest.json"
    text = manifest.read_text()
    manifest.write_text(text.replace('"bytes"', '"bqtes"', 1))
    with pytest.raises(CacheError, match="manifest.json: shards.0 is malformed"):
        ActivationCache(tmp_path / "c")
    manifest.write_text(text)
    shard = tmp_path / "c" / "shard_000000.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[9] = 0xAE  # inside the JSON header: not UTF-8
    shard.write_bytes(bytes(raw))
    with pytest.raises(CacheError, match="shard_000000.safetensors: corrupt safetensors header"):
        ActivationCache(tmp_path / "c").load_shard(0)


def test_small_messages(tmp_path, capsys):
    """A kind given as a bare string names the missing field; --help lists convert and
    circuit-tracer; a BatchTopK SAE refused by sparsify is called batchtopk; a transcoder
    cache's summary names its target hook."""
    from saekit.data.cache.writing import write_cache

    with pytest.raises(
        ValueError, match=r"saes.0.sae.activation: missing required field\(s\) \['k'\]"
    ):
        build_run_config({**_run(), "saes": [{"sae": {"d_sae": 8, "activation": "topk"}}]})
    for argv in (["--help"], ["export", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
    out = capsys.readouterr().out
    assert "convert" in out.split("positional arguments")[0] and "circuit-tracer" in out
    sae = SAE(SAEConfig(d_in=8, d_sae=16, activation={"kind": "batchtopk", "k": 2}))
    sae.save(tmp_path / "b")
    assert (
        main(["export", str(tmp_path / "b"), "--to", "sparsify", "--out", str(tmp_path / "o")]) == 2
    )
    assert "this SAE is 'batchtopk'" in capsys.readouterr().err
    pairs = [{"x": torch.randn(50, 8), "y": torch.randn(50, 4)}]
    write_cache(tmp_path / "t", pairs, "x", "m", shard_tokens=100, target_hook="y")
    assert main(["cache", "verify", str(tmp_path / "t")]) == 0
    assert "hook(s) x (8), y (4)" in capsys.readouterr().out  # the target hook is named too
