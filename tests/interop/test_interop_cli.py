"""`saekit export` / `saekit import` end to end, refusals and bad files (one line each, nothing
unpickled), hook names, release names; `saekit eval` on an imported SAE."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from harness import D_IN, D_SAE, K, assert_close, make_input, random_sae  # noqa: E402

from saekit.cli import main  # noqa: E402
from saekit.interop import export_sae, import_sae
from saekit.interop.names import hf_hook_name, sparsify_hookpoint, transformer_lens_name  # noqa: E402
from saekit.interop.portable import InteropError
from saekit.interop.releases import resolve_release  # noqa: E402
from saekit.model.config import SAEConfig
from saekit.model.sae import SAE


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    return err


def test_export_then_import_from_the_command_line(tmp_path, capsys):
    sae = random_sae({"kind": "topk", "k": K})
    text = {"dataset": "Elriggs/openwebtext-100k", "split": "train"}
    sae.cfg.metadata["training_data"] = {"source": "hf", "text": text}
    sae.save(tmp_path / "run" / "topk")
    (tmp_path / "run" / "config.yaml").write_text("data: {source: hf, context_length: 64}\n")
    (tmp_path / "run" / "topk" / "eval.json").write_text(
        json.dumps({"l0": 4.5, "dead_fraction": 0.25})
    )
    assert (
        main(["export", str(tmp_path / "run"), "--to", "saelens", "--out", str(tmp_path / "sl")])
        == 0
    )
    cfg = json.loads((tmp_path / "sl" / "topk" / "cfg.json").read_text())
    assert cfg["metadata"]["saekit"]["l0"] == 4.5
    assert cfg["metadata"]["context_size"] == 64
    assert cfg["metadata"]["dataset_path"] == "Elriggs/openwebtext-100k"
    assert cfg["metadata"]["model_name"] == "gpt2"
    assert cfg["metadata"]["saekit"]["dead_latents"] == D_SAE // 4
    assert cfg["metadata"]["saekit"]["training_architecture"]["kind"] == "topk"
    out = tmp_path / "imported"
    assert (
        main(["import", str(tmp_path / "sl" / "topk"), "--from", "saelens", "--out", str(out)]) == 0
    )
    back = SAE.load(out)
    x = make_input()
    assert_close(back(x).x_hat.detach(), sae(x).x_hat.detach(), "reconstruction")
    assert main(["export", str(out), "--to", "sparsify", "--out", str(tmp_path / "sp")]) == 0
    assert (tmp_path / "sp" / "h.2" / "sae.safetensors").is_file()
    assert (
        main(["import", str(tmp_path / "sp"), "--from", "sparsify", "--out", str(tmp_path / "b")])
        == 0
    )
    assert_close(SAE.load(tmp_path / "b")(x).x_hat.detach(), sae(x).x_hat.detach(), "sparsify")


def test_eval_reads_an_imported_sae(tmp_path, capsys):
    """An imported SAE is a saekit directory: `saekit eval --sae` reads it (here on a cache)."""
    from saekit.data.cache.writing import write_cache

    sae = random_sae({"kind": "jumprelu"})
    export_sae(sae, "saelens", tmp_path / "sl")
    assert main(["import", str(tmp_path / "sl"), "--out", str(tmp_path / "imported")]) == 0
    g = torch.Generator().manual_seed(0)
    batches = [3.0 * torch.randn(64, D_IN, generator=g) for _ in range(4)]
    write_cache(tmp_path / "cache", batches, "transformer.h.3:input", "gpt2", shard_tokens=128)
    capsys.readouterr()
    argv = ["eval", "--sae", str(tmp_path / "imported"), "--cache", str(tmp_path / "cache")]
    argv += ["--json", str(tmp_path / "eval.json"), "--batch-size", "1", "--n-batches", "1"]
    assert main(argv) == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["n_tokens"] > 0 and 0 < report["l0"] < D_SAE


def test_sparsify_refuses_what_it_cannot_serve(tmp_path, capsys):
    sae = random_sae({"kind": "jumprelu"})
    sae.save(tmp_path / "j")
    assert (
        main(["export", str(tmp_path / "j"), "--to", "sparsify", "--out", str(tmp_path / "o")]) == 2
    )
    assert "sparsify serves top-k SAEs only" in error_line(capsys)


def test_several_transcoders_make_one_circuit_tracer_set(tmp_path, capsys):
    from transcoders import random_transcoder

    dirs = []
    for layer in (1, 0, 2):
        random_transcoder({"kind": "relu"}, True, d_out=D_IN, layer=layer).save(
            tmp_path / f"l{layer}"
        )
        dirs.append(str(tmp_path / f"l{layer}"))
    out = tmp_path / "set"
    assert main(["export", *dirs, "--to", "circuit-tracer", "--out", str(out)]) == 0
    assert (out / "config.yaml").is_file() and (out / "layer_2.safetensors").is_file()
    assert main(["export", *dirs[::2], "--to", "circuit-tracer", "--out", str(tmp_path / "g")]) == 0
    assert "layers [0] are missing" in capsys.readouterr().err
    assert main(["export", *dirs, "--to", "saelens", "--out", str(tmp_path / "sl")]) == 2
    assert "several sources make one circuit-tracer transcoder set" in error_line(capsys)


def test_a_topk_transcoder_is_refused(tmp_path):
    """SAELens has ReLU and JumpReLU transcoders only (sae_lens/saes/transcoder.py)."""
    cfg = SAEConfig(D_IN, D_SAE, {"kind": "topk", "k": K}, d_out=D_IN + 2, skip=True)
    with pytest.raises(InteropError, match="SAELens has no topk transcoder"):
        export_sae(SAE(cfg), "saelens", tmp_path / "o")


def test_an_activation_with_no_equivalent_is_refused(tmp_path, capsys):
    """SAELens' matching_pursuit stops on a repeated atom and uses raw decoder rows."""
    random_sae({"kind": "matching_pursuit", "k": K}).save(tmp_path / "mp")
    assert (
        main(["export", str(tmp_path / "mp"), "--to", "saelens", "--out", str(tmp_path / "o")]) == 2
    )
    assert "activation 'matching_pursuit' has no exact equivalent" in error_line(capsys)


def saelens_dir(path, cfg, tensors):
    path.mkdir(parents=True)
    (path / "cfg.json").write_text(json.dumps(cfg))
    save_file(tensors, str(path / "sae_weights.safetensors"))
    return path


def plain_tensors():
    return {
        "W_enc": torch.randn(D_IN, D_SAE),
        "b_enc": torch.zeros(D_SAE),
        "W_dec": torch.randn(D_SAE, D_IN),
        "b_dec": torch.zeros(D_IN),
    }


@pytest.mark.parametrize(
    "cfg, extra, message",
    [
        ({"architecture": "skip_transcoder"}, {"W_skip": torch.randn(D_IN, D_IN)}, "d_out"),
        (
            {"architecture": "skip_transcoder", "d_out": D_IN + 1},
            {"W_skip": torch.randn(D_IN, D_IN + 1)},
            "tensor W_dec has shape",
        ),
        ({"architecture": "gated"}, {}, "missing ['b_gate', 'b_mag', 'r_mag']"),
        ({"architecture": "matching_pursuit"}, {}, "no saekit equivalent"),
        ({"architecture": "standard", "normalize_activations": "layer_norm"}, {}, "layer_norm"),
        (
            {"architecture": "standard"},
            {"W_skip": torch.randn(D_IN, D_IN)},
            "unexpected ['W_skip']",
        ),
        ({"architecture": "topk", "k": 0}, {}, "topk needs an integer k"),
    ],
)
def test_saelens_import_refusals(tmp_path, capsys, cfg, extra, message):
    path = saelens_dir(
        tmp_path / "s", {"d_in": D_IN, "d_sae": D_SAE, **cfg}, {**plain_tensors(), **extra}
    )
    assert main(["import", str(path), "--from", "saelens", "--out", str(tmp_path / "o")]) == 2
    assert message in error_line(capsys)
    assert not (tmp_path / "o").exists()


def test_sparsify_skip_connection_and_transcoder_refused(tmp_path):
    for flag in ("skip_connection", "transcode"):
        path = tmp_path / flag / "layers.3"
        path.mkdir(parents=True)
        (path / "cfg.json").write_text(json.dumps({"k": 4, "d_in": D_IN, flag: True}))
        with pytest.raises(InteropError, match=flag):
            import_sae(tmp_path / flag, "sparsify")


def test_bad_files_give_one_line(tmp_path, capsys):
    good = plain_tensors()
    shape = saelens_dir(
        tmp_path / "shape", {"architecture": "standard", "d_in": D_IN + 1, "d_sae": D_SAE}, good
    )
    corrupt = saelens_dir(
        tmp_path / "corrupt", {"architecture": "standard", "d_in": D_IN, "d_sae": D_SAE}, good
    )
    (corrupt / "sae_weights.safetensors").write_bytes(b"\x00garbage" * 10)
    not_json = saelens_dir(tmp_path / "json", {}, good)
    (not_json / "cfg.json").write_text("{not json")
    unknown = saelens_dir(
        tmp_path / "unknown", {"architecture": "temporal", "d_in": D_IN, "d_sae": D_SAE}, good
    )
    cases = {
        shape: "has shape (48, 16), cfg.json (d_in = 17, d_sae = 48) implies (48, 17)",
        corrupt: "cannot read sae_weights",
        not_json: "not valid JSON",
        unknown: "'temporal'",
    }
    for path, message in cases.items():
        assert main(["import", str(path), "--out", str(tmp_path / "o")]) == 2
        assert message in error_line(capsys)


class _Marker:
    """Unpickling this would create a file; weights_only loading must refuse it."""

    path = ""

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_dictionary_learning_pickles_are_never_unpickled(tmp_path, capsys):
    marker = tmp_path / "unpickled"
    evil = _Marker()
    evil.path = str(marker)
    (tmp_path / "dl").mkdir()
    torch.save({"W_enc": torch.zeros(2), "payload": evil}, tmp_path / "dl" / "ae.pt")
    trainer = {"dict_class": "JumpReluAutoEncoder", "activation_dim": D_IN, "dict_size": D_SAE}
    (tmp_path / "dl" / "config.json").write_text(json.dumps({"trainer": trainer}))
    argv = [
        "import",
        str(tmp_path / "dl"),
        "--from",
        "dictionary_learning",
        "--out",
        str(tmp_path / "o"),
    ]
    assert main(argv) == 2
    assert "cannot read ae.pt as tensors" in error_line(capsys)
    assert not marker.exists()


def test_hook_names_between_conventions():
    assert transformer_lens_name("transformer.h.8:input") == "blocks.8.hook_resid_pre"
    assert transformer_lens_name("transformer.h.8") == "blocks.8.hook_resid_post"
    assert transformer_lens_name("model.layers.5:input") == "blocks.5.hook_resid_pre"
    assert transformer_lens_name("model.layers.5.mlp") == "blocks.5.hook_mlp_out"
    assert transformer_lens_name("transformer.h.8.mlp.c_fc") is None
    assert hf_hook_name("blocks.8.hook_resid_pre", "gpt2-small") == "transformer.h.8:input"
    assert hf_hook_name("blocks.20.hook_resid_post", "gemma-2-2b") == "model.layers.20"
    assert hf_hook_name("blocks.3.hook_attn_out", "Qwen/Qwen2.5-7B") == "model.layers.3.self_attn"
    assert hf_hook_name("blocks.3.hook_resid_pre", "unknown-model") is None
    assert sparsify_hookpoint("model.layers.8") == "layers.8"
    assert sparsify_hookpoint("transformer.h.0:input") == "transformer.h.0.input"


def test_release_names_resolve_through_the_saelens_directory(tmp_path):
    directory = tmp_path / "pretrained_saes.yaml"
    directory.write_text(
        "gpt2-small-res-jb:\n  repo_id: jbloom/GPT2-Small-SAEs-Reformatted\n"
        "  conversion_func: null\n"
        "  saes:\n  - id: blocks.8.hook_resid_pre\n    path: blocks.8.hook_resid_pre\n"
        "gemma-scope-2b-pt-res:\n  repo_id: google/gemma-scope-2b-pt-res\n"
        "  conversion_func: gemma_2\n"
        "  saes: []\n"
    )
    found = resolve_release("gpt2-small-res-jb", "blocks.8.hook_resid_pre", directory)
    assert found == ("jbloom/GPT2-Small-SAEs-Reformatted", "blocks.8.hook_resid_pre")
    assert resolve_release("owner/repo", "layers.3", directory) == ("owner/repo", "layers.3")
    with pytest.raises(InteropError, match="another format"):
        resolve_release("gemma-scope-2b-pt-res", "x", directory)
    with pytest.raises(InteropError, match="no SAE 'blocks.99"):
        resolve_release("gpt2-small-res-jb", "blocks.99.hook_resid_pre", directory)
