"""Atomic writes: a failure or a crash at any moment leaves the old or the new content, whole."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from saekit.core import atomic
from saekit.core.atomic import (
    atomic_write_bytes,
    atomic_write_text,
    recover_directory,
    remove_stale_temporaries,
    replace_directory,
    temporary_name,
)


def fill_with(files: dict[str, str]):
    def fill(tmp):
        for name, text in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(text)

    return fill


def contents(directory) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): p.read_text()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def test_replace_directory_swaps_in_the_new_directory_and_leaves_nothing_else(tmp_path):
    dest = tmp_path / "checkpoint"
    replace_directory(dest, fill_with({"a.txt": "old a", "b.txt": "old b"}))
    replace_directory(dest, fill_with({"a.txt": "new a", "sub/c.txt": "new c"}))
    assert contents(dest) == {"a.txt": "new a", "sub/c.txt": "new c"}
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]


def test_a_fill_that_raises_leaves_the_old_directory_intact_and_no_temporary(tmp_path):
    dest = tmp_path / "checkpoint"
    replace_directory(dest, fill_with({"a.txt": "old a", "b.txt": "old b"}))

    def failing_fill(tmp):
        (tmp / "a.txt").write_text("half of the new")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        replace_directory(dest, failing_fill)
    assert contents(dest) == {"a.txt": "old a", "b.txt": "old b"}
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]


def test_a_crash_between_the_renames_is_recovered_to_the_complete_old_directory(tmp_path, dead_pid):
    # The state after step 1 of the swap by a process that was then killed: dest renamed away,
    # the complete new directory not yet renamed in.
    dest = tmp_path / "checkpoint"
    old = tmp_path / temporary_name("checkpoint", "old", dead_pid)
    new = tmp_path / temporary_name("checkpoint", "tmp", dead_pid)
    old.mkdir()
    (old / "state.json").write_text("step 4")
    new.mkdir()
    (new / "state.json").write_text("step 8")

    assert recover_directory(dest)
    assert contents(dest) == {"state.json": "step 4"}
    assert not old.exists()
    assert not recover_directory(dest)  # dest exists: nothing to do
    # the next write clears the dead writer's temporary and replaces the recovered directory
    replace_directory(dest, fill_with({"state.json": "step 12"}))
    assert contents(dest) == {"state.json": "step 12"}
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]


def test_a_swap_in_flight_in_a_live_process_is_left_alone(tmp_path):
    dest = tmp_path / "checkpoint"
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as writer:
        try:
            old = tmp_path / temporary_name("checkpoint", "old", writer.pid)
            old.mkdir()
            assert not recover_directory(dest)
            remove_stale_temporaries(tmp_path, "checkpoint")
            assert old.is_dir() and not dest.exists()
            assert recover_directory(dest, any_writer=True)  # the caller knows better
            assert dest.is_dir()
        finally:
            writer.kill()


def test_remove_stale_temporaries_removes_dead_writers_and_all_for_the_owner(tmp_path, dead_pid):
    (tmp_path / "manifest.json").write_text("kept")
    dead = tmp_path / temporary_name("manifest.json", "tmp", dead_pid)
    dead.write_text("partial")
    parent_pid = tmp_path / temporary_name("shard_000001.safetensors", "tmp", os.getppid())
    parent_pid.write_text("a live process's")
    other_name = tmp_path / temporary_name("other", "tmp", dead_pid)
    other_name.write_text("not asked about")

    remove_stale_temporaries(tmp_path, "manifest.json")
    assert not dead.exists() and parent_pid.exists() and other_name.exists()
    remove_stale_temporaries(tmp_path)
    assert parent_pid.exists() and not other_name.exists()
    remove_stale_temporaries(tmp_path, owner=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]


def test_atomic_write_text_writes_the_whole_text(tmp_path):
    dest = tmp_path / "summary.json"
    atomic_write_text(dest, "ünïcode ✓\n")
    assert dest.read_bytes() == "ünïcode ✓\n".encode()
    atomic_write_bytes(dest, b"\x00\x01")
    assert dest.read_bytes() == b"\x00\x01"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_a_failed_write_leaves_the_old_file_and_no_partial_file(tmp_path, monkeypatch, failing):
    dest = tmp_path / "config.yaml"
    dest.write_text("old config\n")

    def fail(*args):
        raise OSError(f"{failing} failed")

    monkeypatch.setattr(atomic.os, failing, fail)
    with pytest.raises(OSError, match=f"{failing} failed"):
        atomic_write_text(dest, "new config, " * 10_000)
    monkeypatch.undo()
    assert dest.read_text() == "old config\n"
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]
