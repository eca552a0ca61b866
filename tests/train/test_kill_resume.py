"""kill -9 then resume, in real processes (benchmarks/kill_resume.py runs 20 of these)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "kill_resume.py"


@pytest.mark.slow
def test_kill_minus_9_then_resume_gives_the_uninterrupted_run(tmp_path):
    spec = importlib.util.spec_from_file_location("kill_resume", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.run(2, seed=1, root=tmp_path)  # one random kill, one inside a checkpoint write
    for row in rows:
        assert row["weights bit-identical"], row
        assert row["metrics.jsonl identical"], row
        assert row["temporaries left"] == 0, row
