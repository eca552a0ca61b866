"""Outlier tokens dropped by activation norm (a multiple of the median; off by default), counted
in the run summary and by ``saekit cache``. The trap: a tiny GPT-2 whose embedding of one word
is 50 times longer than the others, read at the embedding hook."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import make_tiny_gpt2

from saekit.cli import main
from saekit.data.lm.harvest import HarvestStats, harvest
from saekit.data.lm.harvester import TOKEN_IDS, Harvester, TokenFilter
from saekit.data.lm.text import DOCUMENT_IDS
from saekit.train.config import build_run_config
from saekit.train.run import run_training

LOUD = 10  # token id of the word w7 in the tiny tokenizer (3 special tokens first)
HOOK = "transformer.wte"


def loud_gpt2():
    model = make_tiny_gpt2()
    with torch.no_grad():
        model.transformer.wte.weight[LOUD] *= 50
    return model


@pytest.fixture(scope="module")
def loud_lm(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("loud")
    loud_gpt2().save_pretrained(root / "m")
    tiny_tokenizer.save_pretrained(root / "m")
    rng = random.Random(0)
    docs = [
        " ".join(f"w{rng.randrange(50)}" for _ in range(rng.randrange(5, 40))) for _ in range(80)
    ]
    (root / "docs.txt").write_text("\n\n".join(docs))
    return root / "m", root / "docs.txt"


def test_harvest_drops_exactly_the_tokens_beyond_the_norm_factor(token_ids):
    ids = token_ids.clone()
    ids[:, 0] = 1  # BOS, dropped by the token filter before any norm is taken
    ids[0, 3] = ids[2, 5] = ids[2, 9] = LOUD
    doc_ids = torch.arange(ids.numel()).reshape(ids.shape)
    harvester = Harvester(
        loud_gpt2(), HOOK, token_filter=TokenFilter(bos_token_id=1), return_tokens=True
    )
    batch = {"input_ids": ids, DOCUMENT_IDS: doc_ids}
    stats = HarvestStats()
    (out,) = harvest(harvester, [batch], outlier_norm=5.0, stats=stats)
    assert (stats.tokens, stats.outliers) == (4 * 15 - 3, 3)
    assert LOUD not in out[TOKEN_IDS].tolist()
    assert len(out[HOOK]) == len(out[DOCUMENT_IDS]) == len(out[TOKEN_IDS]) == 57
    assert not {3, 2 * 16 + 5, 2 * 16 + 9} & set(out[DOCUMENT_IDS].tolist())
    (kept_all,) = harvest(harvester, [batch])  # off by default
    assert len(kept_all[HOOK]) == 60


def test_an_online_run_drops_outliers_and_counts_them_in_the_summary(loud_lm, tmp_path):
    model, docs = loud_lm
    raw = {
        "data": {
            "source": "hf",
            "model": str(model),
            "hook": HOOK,
            "text_file": str(docs),
            "context_length": 16,
            "model_batch_size": 4,
            "local_files_only": True,
            "shuffle_buffer_tokens": 256,
            "outlier_norm": 5.0,
        },
        "saes": [{"sae": {"d_sae": 32, "activation": {"kind": "topk", "k": 4}}, "lr": 1e-3}],
        "batch_size": 64,
        "steps": 6,
        "eval_tokens": 128,
        "progress": False,
        "out_dir": str(tmp_path / "run"),
    }
    trainer, _ = run_training(build_run_config(raw))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())[0]
    stats = trainer.source.harvest_stats
    assert summary["outlier_tokens"] == stats.outliers > 0  # w7 is 1 word in 50: ~2% of tokens
    assert 0.005 < summary["outlier_fraction"] < 0.05
    loud_norm = float(trainer.source.model.transformer.wte.weight[LOUD].detach().norm())
    for x in trainer.source.batches(0):  # a fresh stream: no loud token reaches training
        assert float(x.norm(dim=-1).max()) < loud_norm / 10
        break
    raw["data"]["outlier_norm"] = 0.5
    with pytest.raises(ValueError, match="data.outlier_norm must be > 1"):
        build_run_config(raw)


def test_saekit_cache_drops_outliers_and_says_how_many(loud_lm, tmp_path, capsys):
    model, docs = loud_lm
    argv = ["cache", "--model", str(model), "--hook", HOOK, "--text-file", str(docs)]
    argv += ["--local-files-only", "--context-length", "16", "--out", str(tmp_path / "c")]
    assert main([*argv, "--outlier-norm", "5", "--no-progress"]) == 0
    err = capsys.readouterr().err
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["metadata"]["outlier_norm"] == 5.0
    dropped = int(err.split("dropped ")[1].split(" outlier")[0].replace(",", ""))
    assert dropped > 0 and f"of {manifest['total_tokens'] + dropped:,} harvested" in err
