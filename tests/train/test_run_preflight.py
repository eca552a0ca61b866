"""Issue 28: what a new run checks before its directory is created, and what a run that fails
after that leaves behind (nothing that makes the corrected command demand --force)."""

from __future__ import annotations

import pytest

from saekit.cli import main

TINY = [
    "--steps", "6", "--batch-size", "256", "--no-progress",
    "--set", "saes.0.sae.d_sae=64", "--set", "eval_tokens=512", "--set", "checkpoint_every=100",
]  # fmt: skip


def one_error(capsys) -> str:
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    errors = [x for x in err if x.startswith("saekit: error:")]
    assert len(errors) == 1 and not any("Traceback" in x for x in err), err
    return errors[0]


@pytest.mark.parametrize(
    "override,expected",
    [
        ("saes.0.sae.d_sae=1000000000000", "GiB"),
        ("saes.0.name=summary.json", "summary.json"),
        ("saes.0.name=config.yaml", "config.yaml"),
        ("saes.0.sae.d_in=7", "d_in = 7"),
        ("saes.99.lr=1", "index 99 is past the end"),
    ],
)
def test_refused_before_the_run_directory_exists(tmp_path, capsys, override, expected):
    out = tmp_path / "run"
    capsys.readouterr()
    assert main(["train", "--out", str(out), *TINY, "--set", override]) == 2
    assert expected in one_error(capsys)
    assert not out.exists()


def test_a_run_failing_before_its_first_checkpoint_leaves_nothing_blocking(tmp_path, capsys):
    out = tmp_path / "run"
    capsys.readouterr()
    assert main(["train", "--out", str(out), *TINY, "--set", "saes.0.lr=1e30"]) == 1
    assert "loss is nan" in one_error(capsys)
    assert not out.exists()
    assert main(["train", "--out", str(out), *TINY]) == 0  # the corrected command, no --force
    assert (out / "summary.json").is_file()


def test_a_failed_start_in_an_existing_directory_keeps_its_other_files(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["train", "--out", str(out), *TINY, "--set", "saes.0.lr=1e30"]) == 1
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert main(["train", "--out", str(out), *TINY]) == 0


def test_a_failure_after_a_checkpoint_keeps_the_run(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--out", str(out), *TINY, "--set", "checkpoint_every=3"]
    assert main([*argv, "--set", "saes.0.lr=1e30"]) == 1
    assert (out / "checkpoint" / "state.json").is_file() and (out / "config.yaml").is_file()
    capsys.readouterr()
    assert main(argv) == 2 and "already holds a run" in capsys.readouterr().err
