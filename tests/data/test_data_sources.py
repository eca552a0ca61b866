"""The data source config family (saekit.data.sources): one module per kind, each owning its
fields; a field of another source refused in one line; nothing outside saekit.data switching
on a source's kind; the synthbench source (added as one module + one registry line) trains."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import json
from pathlib import Path

import pytest
import torch
from conftest import SMALL_RUN_ARGS

from saekit.cli import main
from saekit.core.configs import to_dict
from saekit.data.sources.config import SourceConfig
from saekit.data.sources.registry import source_config
from saekit.data.sources.synthbench import SynthBenchSource
from saekit.data.synthetic.synthbench_sampler import SynthBenchData
from saekit.data.synthetic.synthbench_world import SynthBenchConfig
from saekit.model.sae import SAE
from saekit.train.config import build_run_config, stream_settings
from saekit.train.config_files import apply_overrides
from saekit.train.presets import train_config

SRC = Path(__file__).resolve().parents[2] / "src" / "saekit"
SOURCES = SRC / "data" / "sources"
KINDS = SourceConfig.kinds()


# ------------------------------------------------------------------------- the registry
def test_every_kind_has_its_module_and_every_kind_module_is_registered():
    assert set(KINDS) >= {"synthetic", "synthbench", "hf", "cache"}
    for kind in KINDS:
        cls = SourceConfig._kinds[kind]
        assert cls.__module__ == f"saekit.data.sources.{kind}", (kind, cls.__module__)
    # the registry's one import line names exactly the kind modules
    registry = ast.parse((SOURCES / "registry.py").read_text())
    imported = {
        alias.name
        for node in ast.walk(registry)
        if isinstance(node, ast.ImportFrom) and node.module == "saekit.data.sources"
        for alias in node.names
    }
    assert imported == set(KINDS)
    defining = set()
    for path in SOURCES.glob("*.py"):
        module = importlib.import_module(f"saekit.data.sources.{path.stem}")
        for value in vars(module).values():
            if (
                isinstance(value, type)
                and issubclass(value, SourceConfig)
                and "kind" in value.__dict__
                and value.__module__ == module.__name__
            ):
                defining.add(path.stem)
    assert defining == set(KINDS)


# ----------------------------------------------------------------------- foreign fields
def _foreign_fields(kind: str) -> list[str]:
    own = {f.name for f in dataclasses.fields(SourceConfig._kinds[kind])}
    return sorted({f.name for k in KINDS for f in dataclasses.fields(SourceConfig._kinds[k])} - own)


@pytest.mark.parametrize("kind", KINDS)
def test_a_field_of_another_source_is_refused_in_one_line(kind):
    foreign = _foreign_fields(kind)
    assert foreign, kind
    for name in foreign:
        with pytest.raises(ValueError) as info:
            SourceConfig.parse({"source": kind, name: "not-a-default"}, "data")
        message = str(info.value)
        assert message == f"data.{name} means nothing for data.source {kind!r}"
        assert "\n" not in message


def test_the_issues_examples_are_refused_by_the_run_config():
    for override, field in [
        ("data.model=gpt2", "model"),
        ("data.hook=h.0", "hook"),
        ("data.dataset=wiki", "dataset"),
        ("data.model_dtype=float64", "model_dtype"),  # an invalid value: refused, not ignored
        ("data.cache_dir=/tmp", "cache_dir"),
    ]:
        with pytest.raises(ValueError, match=rf"^data\.{field} means nothing for data\.source "):
            build_run_config(apply_overrides(train_config(), [override]))


def test_a_field_unknown_to_every_source_is_named():
    with pytest.raises(ValueError, match=r"^data: unknown field\(s\) \['bogus'\]"):
        SourceConfig.parse({"source": "cache", "bogus": 1}, "data")


# Every field of the flat DataConfig that run configs carried before sources owned their config.
OLD_FLAT_DEFAULTS = {
    "cache_dir": None, "shuffle_buffer_tokens": 262144, "model": None, "model_class": "auto",
    "hook": None, "target_hook": None, "dataset": None, "dataset_split": "train",
    "dataset_config": None, "text_file": None, "text_field": "text", "streaming": True,
    "context_length": 128, "model_batch_size": 32, "model_dtype": "float32",
    "local_files_only": False, "bos_token": "auto", "eos_token": "auto", "keep_bos": False,
    "prefetch": 2, "outlier_norm": None,
}  # fmt: skip


def test_an_old_flat_config_still_loads_and_writes_only_its_sources_fields():
    old = train_config()
    old["data"].update(OLD_FLAT_DEFAULTS)  # a config.yaml written before this change
    cfg = build_run_config(old)
    assert to_dict(cfg.data) == to_dict(build_run_config(train_config()).data)
    assert set(to_dict(cfg.data)) == {"source", "synthetic"}
    old["data"]["model_dtype"] = "float64"  # not the default: refused, not dropped
    with pytest.raises(ValueError, match="data.model_dtype means nothing"):
        build_run_config(old)


def test_a_data_section_without_source_is_synthetic():
    assert source_config({}).kind == "synthetic"
    assert source_config({"synthetic": {"d": 8, "n_features": 16}}).input_width() == 8


def test_setting_data_source_takes_the_previous_sources_fields_with_it(tmp_path):
    data = apply_overrides(train_config(), ["data.source=cache", f"data.cache_dir={tmp_path}"])
    assert data["data"] == {"source": "cache", "cache_dir": str(tmp_path)}
    # the same source again keeps its settings; a field set after the switch is checked
    same = apply_overrides(train_config(), ["data.source=synthetic"])
    assert same["data"] == train_config()["data"]
    with pytest.raises(ValueError, match="data.synthetic means nothing for data.source 'hf'"):
        build_run_config(apply_overrides(train_config(), ["data.source=hf", "data.synthetic.d=3"]))


# --------------------------------------------------------------- no kind switch outside data/
def kind_comparisons(tree: ast.AST, kinds: set[str]) -> list[int]:
    """Lines comparing with a source kind name (==, !=, in, not in; match cases too)."""

    def names_a_kind(node: ast.AST) -> bool:
        if isinstance(node, ast.Constant):
            return node.value in kinds
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return any(names_a_kind(e) for e in node.elts)
        return False

    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and any(
            names_a_kind(n) for n in [node.left, *node.comparators]
        ):
            lines.append(node.lineno)
        if isinstance(node, ast.MatchValue) and names_a_kind(node.value):
            lines.append(node.lineno)
    return lines


def test_the_scan_sees_kind_comparisons():
    code = (
        'a = cfg.data.source == "cache"\nb = s in ("hf", "x")\nc = "synthetic" != k\n'
        'match k:\n    case "synthbench":\n        pass\nd = x == "other"\n'
    )
    assert kind_comparisons(ast.parse(code), set(KINDS)) == [1, 2, 3, 5]


def test_nothing_outside_data_compares_with_a_source_kind():
    found = []
    for path in sorted(SRC.rglob("*.py")):
        if (SRC / "data") in path.parents:
            continue
        for line in kind_comparisons(ast.parse(path.read_text()), set(KINDS)):
            found.append(f"{path.relative_to(SRC)}:{line}")
    assert not found, "comparisons with a data source kind outside saekit/data: " + ", ".join(found)


# ------------------------------------------------------------------------------ synthbench
WORLD = {"n_features": 48, "d": 12, "n_roots": 4, "branching": 2, "depth": 1}
WORLD_ARGS = [arg for k, v in WORLD.items() for arg in ("--set", f"data.synthbench.{k}={v}")]


def test_the_synthbench_source_yields_its_worlds_batches():
    cfg = build_run_config(
        {
            "data": {"source": "synthbench", "synthbench": WORLD},
            "saes": [{"sae": {"d_sae": 32, "activation": {"kind": "topk", "k": 3}}}],
            "batch_size": 16,
            "seed": 5,
        }
    )
    assert cfg.saes[0].sae.d_in == WORLD["d"] and cfg.data.provenance(100) is None
    source = cfg.data.build(stream_settings(cfg))
    assert isinstance(source, SynthBenchSource)
    reference = SynthBenchData(SynthBenchConfig(**WORLD), stream_seed=5)
    assert torch.equal(next(source.batches(start=3)), reference.batch(3, 16).x)
    x, coefficients = next(source.eval_batches(10, 10))
    truth = reference.batch(SynthBenchSource.EVAL_INDEX, 10)
    assert torch.equal(x, truth.x)
    assert torch.equal(coefficients, truth.firings.dense(WORLD["n_features"]))


def test_saekit_train_on_the_synthbench_source(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--set", "data.source=synthbench", *WORLD_ARGS, *SMALL_RUN_ARGS]
    sae_args = ["--set", "saes.0.sae.d_sae=32", "--set", "saes.0.sae.activation.k=3"]
    assert main([*argv, *sae_args, "--out", str(out)]) == 0
    name = "topk-k3-M32"
    assert name in capsys.readouterr().out
    sae = SAE.load(out / name)
    assert sae.cfg.d_in == WORLD["d"]
    report = json.loads((out / name / "eval.json").read_text())
    assert report["n_tokens"] > 0 and 0 < report["fvu"] < 1.5
    assert "synthbench:" in (out / "config.yaml").read_text()
