"""The command line end to end on a tiny GPT-2 saved to disk: cache, train, eval, errors.

Everything runs in-process through ``saekit.cli.main`` with local paths (no network).
"""

from __future__ import annotations

import json
import random
import shutil

import pytest
from conftest import SMALL_RUN_ARGS, TINY_SAE_ARGS, make_tiny_gpt2

from saekit.cli import main
from saekit.model.config import SAEConfig
from saekit.model.sae import SAE

HOOK = "transformer.h.1:input"


@pytest.fixture(scope="module")
def lm(tmp_path_factory, tiny_tokenizer):
    """(model directory, text file): a tiny GPT-2 with its tokenizer, 150 documents."""
    root = tmp_path_factory.mktemp("cli")
    make_tiny_gpt2().save_pretrained(root / "tiny-gpt2")
    tiny_tokenizer.save_pretrained(root / "tiny-gpt2")
    rng = random.Random(0)
    docs = [
        " ".join(f"w{rng.randrange(50)}" for _ in range(rng.randrange(5, 40))) for _ in range(150)
    ]
    (root / "docs.txt").write_text("\n\n".join(docs))
    return root / "tiny-gpt2", root / "docs.txt"


def lm_args(lm, text=True):
    model, docs = lm
    args = ["--model", str(model), "--hook", HOOK, "--local-files-only", "--context-length", "16"]
    return args + (["--text-file", str(docs)] if text else [])


@pytest.fixture(scope="module")
def cache_dir(lm, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "acts"
    argv = ["cache", *lm_args(lm), "--batch-size", "8", "--shard-tokens", "512", "--out", str(out)]
    assert main([*argv, "--max-tokens", "2000", "--no-progress"]) == 0
    return out


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("saekit: error: ")
    return err[-1]


def test_cache_writes_verified_shards_and_verify_rereads_them(cache_dir, capsys):
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    assert manifest["total_tokens"] == 2000 and manifest["d"] == 64 and manifest["complete"]
    assert manifest["hooks"] == [{"name": HOOK, "width": 64}] and len(manifest["shards"]) == 4
    assert manifest["metadata"]["context_length"] == 16
    assert main(["cache", "verify", str(cache_dir)]) == 0
    assert "2,000 tokens in 4 shard(s), d = 64" in capsys.readouterr().out


def test_cache_progress_bar_stops_at_max_tokens(lm, tmp_path, capsys):
    argv = ["cache", *lm_args(lm), "--batch-size", "8", "--out", str(tmp_path / "c")]
    assert main([*argv, "--max-tokens", "1000"]) == 0  # batches of 8 × 15 = 120 tokens
    bar = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert "1.00k/1.00k" in bar


def test_cache_verify_names_a_corrupt_shard(cache_dir, tmp_path, capsys):
    copy = shutil.copytree(cache_dir, tmp_path / "copy")
    shard = copy / "shard_000001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert main(["cache", "--verify", str(copy)]) == 2
    assert "shard_000001.safetensors: sha256 mismatch" in error_line(capsys)


def test_train_on_a_cache_writes_a_loadable_self_describing_sae(cache_dir, lm, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--set", "data.source=cache", "--set", f"data.cache_dir={cache_dir}"]
    assert main([*argv, *SMALL_RUN_ARGS, *TINY_SAE_ARGS, "--out", str(out)]) == 0
    assert "topk-k4-M64" in capsys.readouterr().out
    sae = SAE.load(out / "topk-k4-M64")
    assert (sae.cfg.d_in, sae.cfg.hook, sae.cfg.model_name) == (64, HOOK, str(lm[0]))
    report = json.loads((out / "topk-k4-M64" / "eval.json").read_text())
    assert report["n_tokens"] == 256  # from the held-out last shard
    resolved = (out / "config.yaml").read_text()
    assert "cache_dir:" in resolved and "synthetic" not in resolved

    assert main(["eval", "--sae", str(out / "topk-k4-M64"), "--cache", str(cache_dir)]) == 0
    printed = capsys.readouterr().out
    assert "FVU" in printed and "L0" in printed and "CE" not in printed


@pytest.fixture(scope="module")
def cache_trained_sae(cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    argv = ["train", "--cache", str(cache_dir), *SMALL_RUN_ARGS, *TINY_SAE_ARGS, "--out", str(out)]
    assert main(argv) == 0
    return out / "topk-k4-M64"


def test_eval_with_the_model_prints_ce_and_kl_and_writes_json(
    cache_trained_sae, lm, tmp_path, capsys
):
    path = tmp_path / "eval.json"
    argv = ["eval", "--sae", str(cache_trained_sae), *lm_args(lm)]
    assert main([*argv, "--batch-size", "4", "--n-batches", "3", "--json", str(path)]) == 0
    printed = capsys.readouterr().out
    for label in ("FVU", "explained variance", "L0", "dead", "dense", "CE score", "KL score"):
        assert label in printed
    report = json.loads(path.read_text())
    for key in ("fvu", "explained_variance", "l0", "dead_fraction", "dense_fraction"):
        assert isinstance(report[key], float)
    for key in ("ce_clean", "ce_sae", "ce_zero", "ce_score", "kl_sae", "kl_zero", "kl_score"):
        assert isinstance(report[key], float)
    assert report["hook"] == HOOK  # read from the SAE's cfg.json
    assert report["n_tokens"] > 0 and report["l0"] == pytest.approx(4.0)
    # the last position of each of the 3 × 4 contexts is spliced but predicts nothing (unless
    # it is a separator, never spliced): the printout says which count CE averages over
    n, n_predicted = report["n_tokens"], report["n_predicted_tokens"]
    assert n - 3 * 4 <= n_predicted < n
    assert f"{n} spliced; CE/KL over the {n_predicted} of them" in printed


def test_eval_refuses_an_sae_whose_width_differs_from_the_model(lm, tmp_path, capsys):
    SAE(SAEConfig(d_in=48, d_sae=16, activation={"kind": "topk", "k": 2}, hook=HOOK)).save(
        tmp_path / "sae"
    )
    assert main(["eval", "--sae", str(tmp_path / "sae"), *lm_args(lm)]) == 2
    line = error_line(capsys)
    assert "d_in = 48" in line and "width 64" in line


def test_unknown_hook_is_one_line_naming_close_matches(lm, tmp_path, capsys):
    model, docs = lm
    argv = ["cache", "--model", str(model), "--hook", "transformer.h.9", "--local-files-only"]
    assert main([*argv, "--text-file", str(docs), "--out", str(tmp_path / "c")]) == 2
    line = error_line(capsys)
    assert "unknown module 'transformer.h.9'" in line and "transformer.h.1" in line


def test_missing_text_file_and_missing_model_are_one_line_errors(lm, tmp_path, capsys):
    model, _ = lm
    argv = ["train", "--model", str(model), "--hook", HOOK, "--text-file", "nope.txt"]
    assert main(argv) == 2
    assert "data.text_file: no such file 'nope.txt'" in error_line(capsys)
    argv = ["cache", "--model", str(tmp_path / "no-model"), "--hook", HOOK, "--local-files-only"]
    assert main([*argv, "--text-file", str(lm[1]), "--out", str(tmp_path / "c")]) == 2
    assert "cannot load model" in error_line(capsys)


def test_train_with_a_missing_config_file_names_it(capsys):
    assert main(["train", "--config", "missing.yaml"]) == 2
    assert "missing.yaml" in error_line(capsys)


def test_train_with_k_above_d_sae_names_both(capsys):
    assert main(["train", "--set", "saes.0.sae.activation.k=100000", "--no-progress"]) == 2
    line = error_line(capsys)
    assert "k = 100000" in line and "d_sae = 1024" in line


def test_online_training_from_the_cli_then_eval(lm, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", *lm_args(lm), "--model-batch-size", "4", *SMALL_RUN_ARGS, *TINY_SAE_ARGS]
    assert main([*argv, "--set", "data.shuffle_buffer_tokens=512", "--out", str(out)]) == 0
    sae = SAE.load(out / "topk-k4-M64")
    assert (sae.cfg.d_in, sae.cfg.hook, sae.cfg.model_name) == (64, HOOK, str(lm[0]))
    capsys.readouterr()
    argv = ["eval", "--sae", str(out / "topk-k4-M64"), *lm_args(lm), "--n-batches", "2"]
    assert main(argv) == 0
    assert "CE score" in capsys.readouterr().out


def test_every_command_module_adds_its_parsers_with_its_run_and_the_summary_names_them():
    """cli.py lists the command modules; each exposes add_parser(subparsers) and run(args), and
    its parsers run it; every module of saekit/commands but the shared flags is listed."""
    import argparse
    from pathlib import Path

    from saekit import cli

    sub = argparse.ArgumentParser().add_subparsers()
    for module in cli.COMMANDS:
        before = set(sub.choices)
        module.add_parser(sub)
        added = set(sub.choices) - before
        assert added, module.__name__
        for name in added:
            assert sub.choices[name].get_default("func") is module.run, name
            assert f" {name} " in " ".join(cli.__doc__.replace("`", " ").split()), name
    folder = Path(cli.__file__).parent / "commands"
    modules = {p.stem for p in folder.glob("*.py")} - {"__init__", "flags"}
    assert modules == {m.__name__.rsplit(".", 1)[1] for m in cli.COMMANDS}
