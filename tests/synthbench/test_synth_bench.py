"""`saekit bench synth` (saekit.synthbench.bench): configs, a tiny end-to-end run, the table."""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from test_saelens_world import node, write_world

from saekit.data.sources.synthbench import SynthBenchSource
from saekit.data.synthetic.synthbench_sampler import SynthBenchData
from saekit.synthbench import bench as sb
from saekit.synthbench.metrics import SynthScores
from saekit.train.config import build_run_config

BENCH_SYNTH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_synth.py"


def tiny_protocol() -> sb.Protocol:
    world = replace(sb.scaled_protocol().world, n_features=96, d=12, n_roots=4, depth=2,
                    correlation_rank=3, ortho_steps=5)  # fmt: skip
    return sb.Protocol("tiny", world, 24, 4 * 256, 256, 3e-3, {20: 3, 25: 4}, 1024,
                       matryoshka_widths=(4, 12))  # fmt: skip


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


def scores(f1: float, mcc: float, l0: float) -> SynthScores:
    return SynthScores(precision=f1, recall=f1, f1=f1, mcc=mcc, uniqueness=1.0,
                       explained_variance=0.8, shrinkage=0.9, l0=l0, dead=0)  # fmt: skip


def test_a_row_off_its_target_l0_is_marked_and_left_out_of_the_rankings():
    """Matched: every seed within 5% of k (k = 4: 3.81 and 4.19 pass, 4.21 and 3.79 do not)."""
    assert sb.matched([3.81, 4.19], 4) and not sb.matched([4.0, 4.21], 4)
    assert not sb.matched([3.79], 4)
    protocol = replace(tiny_protocol(), l0={25: 4})
    seed = {("BatchTopK", 25): scores(0.7, 0.75, 4.0),
            ("Matryoshka", 25): scores(0.9, 0.80, 4.1),
            ("JumpReLU", 25): scores(0.99, 0.99, 2.0),  # best, but at half the L0
            ("Standard L1", 25): scores(0.5, 0.60, 3.9)}  # fmt: skip
    table = sb.format_table(protocol, [seed, seed], peer=[seed, seed])
    jump = [line for line in table.splitlines() if line.startswith("| JumpReLU")]
    assert len(jump) == 2 and all("not matched" in line for line in jump)
    assert "| BatchTopK | SAELens |" in table  # both trainers' rows
    ranked = [line for line in table.splitlines() if line.startswith("- saekit, L0 25, F1")]
    assert ranked[0].startswith("- saekit, L0 25, F1: Matryoshka > BatchTopK > Standard L1 (")
    assert "left out: JumpReLU" in ranked[0] and "rank correlation +1.00" in ranked[0]


def test_spearman_matches_the_closed_form_without_ties():
    ours = {"a": 0.1, "b": 0.5, "c": 0.3, "d": 0.9}
    theirs = {"a": 0.2, "b": 0.1, "c": 0.4, "d": 0.8}
    # ranks ours (1 = best): d1 b2 c3 a4; theirs: d1 c2 a3 b4; Σd² = 0 + 4 + 1 + 1 = 6
    assert sb.spearman(ours, theirs) == pytest.approx(1 - 6 * 6 / (4 * (16 - 1)))
    assert sb.spearman(ours, ours) == pytest.approx(1.0)


def test_the_peer_job_names_saekits_own_batch_seeds():
    """Batch i of the job is seeded as saekit's batch i (and held-out batch j as saekit's)."""
    protocol = tiny_protocol()
    data = SynthBenchData(protocol.world, stream_seed=3)
    job = sb.peer_job(protocol, data, ["BatchTopK"], 3)
    assert len(job["train_seeds"]) == 4 and job["archs"] == [["BatchTopK", 3], ["BatchTopK", 4]]
    g = torch.Generator().manual_seed(job["train_seeds"][2])
    assert torch.equal(g.initial_seed() * torch.ones(1), data.generator_seed(2) * torch.ones(1))
    assert [n for _, n in job["eval"]] == [1024]
    assert job["eval"][0][0] == data.generator_seed(SynthBenchSource.EVAL_INDEX)


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
