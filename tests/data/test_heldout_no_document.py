"""Issue 28: a cache whose held-out last shard holds no whole document (one long document spans
the last shards) is reported when it is written, and ``saekit eval --cache`` names the cause
and the fix instead of "no tokens were evaluated"."""

from __future__ import annotations

import json

import torch
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
