"""Issue 28: a cache whose held-out last shard holds no whole document (one long document spans
the last shards) is reported when it is written, ``saekit eval --cache`` names the cause and the
fix instead of "no tokens were evaluated", and ``saekit pipeline`` stops after its cache stage,
before training."""

from __future__ import annotations

import json

import torch
import yaml
from conftest import make_tiny_gpt2

from saekit.cli import main
from saekit.model.config import SAEConfig
from saekit.model.sae import SAE

HOOK = "transformer.h.1:input"


def test_no_whole_held_out_document_is_said_when_cached_and_at_eval(
    tmp_path, tiny_tokenizer, capsys
):
    make_tiny_gpt2().save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    words = [f"w{i % 50}" for i in range(3000)]
    (tmp_path / "docs.txt").write_text(" ".join(words[:40]) + "\n\n" + " ".join(words))
    model = ["--model", str(tmp_path / "m"), "--hook", HOOK, "--local-files-only"]
    argv = ["cache", *model, "--text-file", str(tmp_path / "docs.txt"), "--context-length", "16"]
    argv += ["--shard-tokens", "256", "--max-tokens", "1000", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "c")]) == 0
    err = capsys.readouterr().err
    assert "no whole document in its held-out last shard" in err and "--shard-tokens" in err
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["held_out"]["documents"] == []
    cfg = SAEConfig(d_in=64, d_sae=32, activation={"kind": "topk", "k": 4}, hook=HOOK)
    SAE(cfg).save(tmp_path / "sae")
    torch.manual_seed(0)
    argv = ["eval", "--sae", str(tmp_path / "sae"), *model, "--cache", str(tmp_path / "c")]
    assert main(argv) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("saekit: error:")]
    assert len(err) == 1 and "no whole document" in err[0] and "--shard-tokens" in err[0], err


def test_cache_context_longer_than_the_model_positions_is_refused(tmp_path, tiny_tokenizer, capsys):
    make_tiny_gpt2().save_pretrained(tmp_path / "m")  # 64 positions
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    (tmp_path / "docs.txt").write_text(" ".join(f"w{i % 50}" for i in range(500)))
    argv = ["cache", "--model", str(tmp_path / "m"), "--hook", HOOK, "--local-files-only"]
    argv += ["--text-file", str(tmp_path / "docs.txt"), "--context-length", "100000"]
    assert main([*argv, "--out", str(tmp_path / "c"), "--no-progress"]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("saekit: error:")]
    assert len(err) == 1 and "exceeds the 64 positions" in err[0], err


def test_the_pipeline_stops_before_training_when_no_held_out_document_is_whole(
    tmp_path, tiny_tokenizer, capsys
):
    make_tiny_gpt2().save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    words = [f"w{i % 50}" for i in range(3000)]  # one long document spans the last shards
    (tmp_path / "docs.txt").write_text(" ".join(words[:40]) + "\n\n" + " ".join(words))
    out = tmp_path / "out"
    cfg = {
        "out": str(out),
        "model": str(tmp_path / "m"),
        "hook": HOOK,
        "local_files_only": True,
        "text": {"text_file": str(tmp_path / "docs.txt")},
        "cache": {"max_tokens": 1000, "context_length": 16, "batch_size": 8, "shard_tokens": 256},
        "train": {
            "batch_size": 64,
            "steps": 5,
            "eval_tokens": 128,
            "saes": [{"sae": {"d_sae": 32, "activation": {"kind": "topk", "k": 4}}}],
        },
        "report": {"latents": 4, "max_tokens": 200},
        "export": {"saelens": False},
    }
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["pipeline", str(tmp_path / "pipeline.yaml"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    errors = [x for x in err.splitlines() if x.startswith("saekit: error:")]
    assert len(errors) == 1, err
    assert "no whole document in its held-out last shard" in errors[0]
    assert "cache.shard_tokens" in errors[0] and str(out / "cache") in errors[0]
    assert "stage 1/" in err and "stage 2/" not in err  # stopped before training
    manifest = json.loads((out / "cache" / "manifest.json").read_text())
    assert manifest["held_out"]["documents"] == []  # the cache stage itself completed
    assert not (out / "train").exists() and not (out / "train.yaml").exists()
