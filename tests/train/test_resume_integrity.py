"""Issue 28: resume verifies both halves of the checkpoint and the run's config.yaml before it
writes anything; every refusal is one line and leaves the run byte-identical."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from saekit.cli import main

TINY = [
    "--steps", "6", "--batch-size", "256", "--no-progress",
    "--set", "saes.0.sae.d_sae=64", "--set", "eval_tokens=512", "--set", "log_every=2",
    "--set", "checkpoint_every=3",
]  # fmt: skip
NAME = "topk-k6-M64"


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "run"
    assert main(["train", "--out", str(out), *TINY]) == 0
    return out


@pytest.fixture
def run(trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    return out


def refused(run: Path, capsys, *extra: str) -> str:
    """Resume ``run``: rc 2, one error line, every file byte-identical; returns the line."""
    before = snapshot(run)
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--no-progress", *extra]) == 2
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    errors = [x for x in lines if x.startswith("saekit: error:")]
    assert len(errors) == 1 and "Traceback" not in "\n".join(lines), lines
    assert snapshot(run) == before
    return errors[0]


STATE_JSON_EDITS = {
    "not-json": lambda text: text[: len(text) // 2],
    "a-list": lambda text: "[1, 2, 3]",
    "step-a-string": lambda text: text.replace('"step": 6', '"step": "six"', 1),
    "members-not-list": lambda text: json.dumps({**json.loads(text), "members": 3}),
}


@pytest.mark.parametrize("edit", list(STATE_JSON_EDITS))
@pytest.mark.parametrize("hash_recorded", [True, False])
def test_unreadable_state_json_is_refused_naming_it(run, capsys, edit, hash_recorded):
    meta = run / "checkpoint" / "state.json"
    if not hash_recorded:  # a checkpoint written before the JSON's hash was recorded
        (run / "checkpoint" / "state.json.sha256").unlink()
    meta.write_text(STATE_JSON_EDITS[edit](meta.read_text()))
    line = refused(run, capsys)
    assert str(meta) in line


def test_valid_but_edited_state_json_fails_its_hash(run, capsys):
    meta = run / "checkpoint" / "state.json"
    meta.write_text(meta.read_text().replace('"step": 6', '"step": 3', 1))
    assert "sha256 mismatch" in refused(run, capsys)


def test_truncated_state_tensors_refused_before_anything_is_written(run, capsys):
    tensors = run / "checkpoint" / "state.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:-10])
    assert str(tensors) in refused(run, capsys)


@pytest.mark.parametrize(
    "field,value",
    [("saes.0.sae.d_sae", 32), ("saes.0.sae.activation.k", 4), ("seed", 7), ("saes.0.lr", 0.5)],
)
def test_edited_config_yaml_is_refused_naming_the_field(run, capsys, field, value):
    path = run / "config.yaml"
    data = yaml.safe_load(path.read_text())
    node = data
    *parents, last = field.split(".")
    for part in parents:
        node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
    node[last] = value
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    line = refused(run, capsys)
    assert field in line and "--force" in line and "new run" in line


def test_force_resumes_with_the_checkpoint_config_and_says_so(run, capsys):
    path = run / "config.yaml"
    path.write_text(path.read_text().replace("seed: 0", "seed: 7"))
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--force", "--steps", "8", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "seed" in err and "checkpoint's config" in err
    assert yaml.safe_load(path.read_text())["seed"] == 0


@pytest.mark.parametrize("damage", ["missing", "garbage", "not-a-config"])
def test_missing_or_garbled_config_yaml_is_reported_not_rewritten(run, capsys, damage):
    path = run / "config.yaml"
    if damage == "missing":
        path.unlink()
    elif damage == "garbage":
        path.write_text("saes: [: {\n")
    else:
        path.write_text("saes: 3\n")
    line = refused(run, capsys)
    assert "config.yaml" in line and "--force" in line
    assert path.exists() == (damage != "missing")


def test_checkpoint_copied_from_another_architecture_is_refused(run, tmp_path, capsys):
    other = tmp_path / "other"
    extra = ["--set", "saes.0.sae.activation.kind=batchtopk"]
    assert main(["train", "--out", str(other), *TINY, *extra]) == 0
    shutil.rmtree(run / "checkpoint")
    shutil.copytree(other / "checkpoint", run / "checkpoint")
    line = refused(run, capsys)
    assert "activation.kind" in line or "saes.0" in line


def test_steps_edited_in_config_yaml_is_applied_like_steps(run, capsys):
    path = run / "config.yaml"
    path.write_text(path.read_text().replace("steps: 6", "steps: 9"))
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert "steps = 9 instead of 6" in capsys.readouterr().err
    steps = [json.loads(x)["step"] for x in (run / NAME / "metrics.jsonl").open()]
    assert steps[-1] == 9


def test_resume_reads_a_log_with_undecodable_bytes(run, capsys):
    """A metrics.jsonl line cut by a kill mid-character is dropped, not a UnicodeDecodeError
    (found by the CLI fuzz, after config.yaml had been rewritten)."""
    log = run / NAME / "metrics.jsonl"
    log.write_bytes(log.read_bytes() + b'{"step": 7, "lo\xae')
    assert main(["train", "--resume", str(run), "--steps", "8", "--no-progress"]) == 0
    steps = [json.loads(x)["step"] for x in log.open()]
    assert steps == sorted(steps) and steps[-1] == 8
