"""`saekit pipeline CONFIG`: its config is checked whole before any stage runs, and one config
takes a tiny random GPT-2 through cache, sweep, spliced evaluation and reports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from conftest import save_tiny_lm

from saekit.cli import main
from saekit.commands.pipeline import PipelineConfig, export_to_saelens
from saekit.core.configs import from_dict
from saekit.model.config import SAEConfig
from saekit.model.sae import SAE

HOOK = "transformer.h.1:input"


@pytest.fixture(scope="module")
def lm(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("pipeline")
    save_tiny_lm(root, tiny_tokenizer)
    return root


def config(lm, tmp_path, **changes):
    cfg = {
        "out": str(tmp_path / "out"),
        "model": str(lm / "m"),
        "hook": HOOK,
        "local_files_only": True,
        "text": {"text_file": str(lm / "docs.txt")},
        "cache": {"max_tokens": 3000, "context_length": 16, "batch_size": 8, "shard_tokens": 1000},
        "train": {
            "batch_size": 256,
            "steps": 15,
            "eval_tokens": 512,
            "saes": [
                {"sae": {"d_sae": 64, "activation": {"kind": "topk", "k": 4}}},
                {"sae": {"d_sae": 64, "activation": {"kind": "batchtopk", "k": 4}}},
            ],
        },
        "eval": {"n_batches": 2, "batch_size": 4},
        "report": {"latents": 6, "top_k": 4, "samples": 8, "max_tokens": 800},
        "export": {"saelens": False},
    }
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node = cfg
        for key in parents:
            node = node[key]
        if value is None:
            del node[last]
        else:
            node[last] = value
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"cache__bogus": 1}, "cache: unknown field(s) ['bogus']"),
        ({"text__dataset": "x"}, "text: give exactly one of dataset and text_file"),
        ({"train__data": {"source": "synthetic"}}, "train.data: set by the pipeline"),
        ({"cache__max_tokens": 1500}, "evaluation needs the held-out last shard"),
        ({"train__saes": [{"sae": {"d_sae": 8, "nope": 1}}]}, "train: saes.0.sae: unknown field"),
        ({"hook": "transformer.h.9"}, "transformer.h.9"),
    ],
)
def test_the_config_is_refused_whole_before_any_stage(lm, tmp_path, capsys, changes, message):
    path = config(lm, tmp_path, **changes)
    assert main(["pipeline", str(path)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_export_stage_writes_saelens_files(tmp_path):
    sae = SAE(SAEConfig(8, 16, {"kind": "topk", "k": 2}, hook="transformer.h.1:input"))
    sae.save(tmp_path / "sae")
    export_to_saelens(tmp_path / "sae", tmp_path / "saelens")
    cfg = json.loads((tmp_path / "saelens" / "cfg.json").read_text())
    assert (
        cfg["architecture"] == "topk" and cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_pre"
    )
    assert (tmp_path / "saelens" / "sae_weights.safetensors").is_file()


def test_the_readme_pipeline_example_is_a_valid_config():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```yaml\n(.*?)```", readme, flags=re.S) if "pipeline" in b]
    cfg = from_dict(PipelineConfig, yaml.safe_load(block))
    assert cfg.hook == "transformer.h.8:input" and len(cfg.train["saes"]) == 2


@pytest.mark.slow
def test_one_config_caches_trains_evaluates_and_reports(lm, tmp_path, capsys):
    assert main(["pipeline", str(config(lm, tmp_path)), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert [f"stage {i}/4" in err for i in range(1, 5)] == [True] * 4
    out = tmp_path / "out"
    manifest = json.loads((out / "cache" / "manifest.json").read_text())
    assert len(manifest["shards"]) == 3
    names = sorted(p.parent.name for p in (out / "train").glob("*/cfg.json"))
    assert names == ["batchtopk-k4-M64", "topk-k4-M64"]
    for name in names:
        result = json.loads((out / "eval" / f"{name}.json").read_text())
        assert result["documents_from"].startswith("held out by the activation cache")
        assert result["training_documents_evaluated"] == 0 and "ce_sae" in result
        report = json.loads((out / "report" / name / "report.json").read_text())
        assert [e["id"] for e in report["latents"]] == list(range(6))
        assert report["summary"]["documents_from"] == "held out by its training"
        assert report["summary"]["training_documents_read"] == 0 and "warning" not in err
        assert (out / "report" / name / "latent-5.html").is_file()
    # a second run refuses to replace the training run unless told to (the cache resumes)
    assert main(["pipeline", str(config(lm, tmp_path)), "--no-progress"]) == 2
