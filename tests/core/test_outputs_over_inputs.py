"""Issue 28: every command that writes refuses an output that is, or lies inside, one of its
inputs, with one line and before writing anything (export --out SAE overwrote the SAE's own
cfg.json; import --out SOURCE its source's; eval --json SAE/sae.safetensors the weights)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from saekit.cli import main
from saekit.core.paths import refuse_output_over_inputs
from saekit.data.cache.writing import write_cache
from saekit.model.config import SAEConfig
from saekit.model.sae import SAE


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def sae_dir(tmp_path):
    cfg = SAEConfig(d_in=8, d_sae=16, activation={"kind": "topk", "k": 2}, hook="h")
    torch.manual_seed(0)
    SAE(cfg).save(tmp_path / "sae")
    return tmp_path / "sae"


def refused(argv: list[str], root: Path, capsys, flag: str = "--out") -> str:
    before = snapshot(root)
    capsys.readouterr()
    assert main(argv) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(err) == 1 and err[0].startswith("saekit: error:") and flag in err[0], err
    assert snapshot(root) == before
    return err[0]


@pytest.mark.parametrize("to", ["saelens", "sparsify", "circuit-tracer"])
@pytest.mark.parametrize("where", ["itself", "inside"])
def test_export_onto_its_source_is_refused(sae_dir, capsys, to, where):
    out = sae_dir if where == "itself" else sae_dir / "exported"
    refused(["export", str(sae_dir), "--to", to, "--out", str(out)], sae_dir, capsys)
    assert not (sae_dir / "exported").exists()


def test_import_onto_its_source_is_refused(sae_dir, tmp_path, capsys):
    lens = tmp_path / "lens"
    assert main(["export", str(sae_dir), "--to", "saelens", "--out", str(lens)]) == 0
    refused(["import", str(lens), "--from", "saelens", "--out", str(lens)], lens, capsys)
    refused(["import", str(lens), "--out", str(lens / "sub")], lens, capsys)


def test_eval_json_onto_the_weights_is_refused(sae_dir, capsys):
    argv = ["eval", "--sae", str(sae_dir), "--json", str(sae_dir / "sae.safetensors")]
    refused(argv, sae_dir, capsys, flag="--json")


def test_convert_inside_its_source_is_refused(sae_dir, capsys):
    argv = ["convert", str(sae_dir), "--to", "jumprelu", "--out", str(sae_dir / "jr")]
    refused(argv, sae_dir, capsys)


def test_train_out_dir_inside_its_cache_is_refused(tmp_path, capsys):
    cache = tmp_path / "cache"
    g = torch.Generator().manual_seed(0)
    write_cache(cache, [torch.randn(512, 16, generator=g)], "h", "m", shard_tokens=128)
    argv = ["train", "--cache", str(cache), "--out", str(cache / "run"), "--steps", "2"]
    refused(argv + ["--no-progress"], cache, capsys, flag="out_dir")


def test_helper_sees_through_dot_dot_and_links(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (tmp_path / "link").symlink_to(src)
    for out in (src / ".." / "src", tmp_path / "link", tmp_path / "link" / "x" / "y"):
        with pytest.raises(ValueError, match="input SAE"):
            refuse_output_over_inputs(out, [("SAE", src)])
    refuse_output_over_inputs(tmp_path / "other", [("SAE", src), ("--model", "org/hub-id")])
    refuse_output_over_inputs(src / "report", [("SAE", src)], may_hold=[src])
    with pytest.raises(ValueError, match="is the input"):
        refuse_output_over_inputs(src, [("SAE", src)], may_hold=[src])
