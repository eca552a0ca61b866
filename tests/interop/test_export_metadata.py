"""Issue 28: exports of cache-trained SAEs record the cache's context length; an unreadable
eval.json or config.yaml beside the SAE is one line naming it."""

from __future__ import annotations

import json

import pytest
import torch

from saekit.cli import main
from saekit.data.cache.writing import write_cache
from saekit.model.config import SAEConfig
from saekit.model.sae import SAE


@pytest.fixture
def run(tmp_path):
    torch.manual_seed(0)
    SAE(SAEConfig(d_in=8, d_sae=16, activation={"kind": "topk", "k": 2})).save(tmp_path / "r" / "s")
    batches = [torch.randn(300, 8)]
    write_cache(
        tmp_path / "c", batches, "h", "m", metadata={"context_length": 48}, shard_tokens=100
    )
    config = f"data: {{source: cache, cache_dir: {tmp_path / 'c'}}}\n"
    (tmp_path / "r" / "config.yaml").write_text(config)
    return tmp_path / "r"


def test_cache_trained_export_records_the_context_length(run, tmp_path):
    assert main(["export", str(run), "--to", "saelens", "--out", str(tmp_path / "sl")]) == 0
    cfg = json.loads((tmp_path / "sl" / "s" / "cfg.json").read_text())
    assert cfg["metadata"]["context_size"] == 48


@pytest.mark.parametrize("name,text", [("s/eval.json", "{bad"), ("config.yaml", "data: [: x")])
def test_unreadable_files_beside_the_sae_are_named(run, tmp_path, capsys, name, text):
    (run / name).write_text(text)
    assert main(["export", str(run), "--to", "saelens", "--out", str(tmp_path / "sl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(run / name) in err[0], err
