"""`saekit bench synth` (saekit.synthbench.bench): configs, a tiny end-to-end run, the table."""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from test_saelens_world import node, write_world

from saekit.synthbench import bench as sb
from saekit.train.config import build_run_config

BENCH_SYNTH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_synth.py"


def tiny_protocol() -> sb.Protocol:
    world = replace(sb.scaled_protocol().world, n_features=96, d=12, n_roots=4, depth=2,
                    correlation_rank=3, ortho_steps=5)  # fmt: skip
    return sb.Protocol("tiny", world, 24, 4 * 256, 256, 3e-3, {20: 3, 25: 4}, 1024, 2048)


def test_every_architecture_is_a_valid_run_entry():
    protocol = tiny_protocol()
    entries = [sb.member_entry(a, 4, protocol, seed=1) for a in sb.ARCHITECTURES]
    cfg = build_run_config({"data": {"synthetic": {"d": 12}}, "saes": entries, "out_dir": "x"})
    assert [s.name for s in cfg.saes] == [e["name"] for e in entries]
    with pytest.raises(ValueError, match="unknown architecture"):
        sb.member_entry("TopK-ish", 4, protocol, 0)


@pytest.mark.slow
def test_a_tiny_bench_trains_scores_and_prints_beside_the_published_table():
    protocol = tiny_protocol()
    archs = ["BatchTopK", "JumpReLU", "Matching Pursuit"]
    runs = [sb.train_seed(protocol, archs, s) for s in (0, 1)]
    assert set(runs[0]) == {(a, label) for a in archs for label in (20, 25)}
    batchtopk = runs[0]["BatchTopK", 25]
    assert 0 <= batchtopk.f1 <= 1 and 0 < batchtopk.mcc <= 1
    assert batchtopk.l0 == pytest.approx(4, rel=0.35)  # calibrated threshold ~ k
    table = sb.format_table(protocol, [r for r in runs])
    assert "0.732" in table and "±" in table  # the published value beside mean ± std


def test_bench_synth_trains_on_a_saved_world_and_says_how_many_threads(tmp_path, capsys):
    """--world reads a SAELens-format world; the default thread choice is printed (1 on CPU)."""
    write_world(tmp_path / "w", [node(0, node(2), node(3)), node(1, node(4), node(5))], 40)
    spec = importlib.util.spec_from_file_location("bench_synth", BENCH_SYNTH)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    argv = ["--samples", "512", "--arch", "BatchTopK", "--world", str(tmp_path / "w")]
    threads = torch.get_num_threads()
    try:
        assert script.main(argv) == 0
    finally:
        torch.set_num_threads(threads)  # the script sets the process's threads
    out = capsys.readouterr()
    assert f"protocol scaled on {tmp_path / 'w'}" in out.out
    assert "threads: 1 (1 per SAE process" in out.err
    assert sb.default_threads()[0] == 1  # on CPU
