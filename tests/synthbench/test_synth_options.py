"""`saekit bench synth --option` (saekit.synthbench.options): item 5's option rows, their run
entries, and the paired differences the table prints."""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import replace

import pytest
import torch
from test_saelens_world import node, write_world
from test_synth_bench import BENCH_SYNTH, scores, tiny_protocol

from saekit.synthbench import bench as sb
from saekit.synthbench import options as so
from saekit.train.config import build_run_config


def test_decreasing_k_is_the_ceiling_of_k_times_the_level_share():
    for k in (1, 4, 11, 25):
        for levels in (1, 2, 4, 5):
            want = [max(1, math.ceil(k * j / levels)) for j in range(1, levels + 1)]
            assert so.decreasing_k(k, levels) == want
    assert so.decreasing_k(11, 4) == [3, 6, 9, 11]


def test_an_option_row_is_the_matryoshka_recipe_with_one_change():
    protocol = tiny_protocol()
    base = sb.member_entry("Matryoshka", 4, protocol, seed=1)
    for name in so.OPTIONS:
        entry = sb.member_entry(so.label(name), 4, protocol, seed=1)
        assert entry["name"] == f"Matryoshka_+_{name}-L0_4"
        changed = {key for key in {*entry, *base} if entry.get(key) != base.get(key)}
        assert changed - {"name"}, f"option {name} changed nothing"
        assert changed <= {"name", "sae", "matryoshka", "reconstruction_tilt"}
    entries = [sb.member_entry(so.label(name), 4, protocol, seed=1) for name in so.OPTIONS]
    cfg = build_run_config({"data": {"synthetic": {"d": 12}}, "saes": entries, "out_dir": "x"})
    assert [s.name for s in cfg.saes] == [e["name"] for e in entries]  # every option is a key
    levels = sb.member_entry(so.label("decreasing-k"), 4, protocol, seed=1)["matryoshka"]
    assert levels["level_k"] == so.decreasing_k(4, len(base["matryoshka"]["groups"]))
    with pytest.raises(ValueError, match="unknown option row"):
        sb.member_entry("Matryoshka + warp-drive", 4, protocol, 0)
    with pytest.raises(ValueError, match="unknown option row"):
        sb.member_entry("BatchTopK + lista", 4, protocol, 0)


def test_option_rows_print_paired_differences_and_stay_out_of_the_rankings():
    protocol = replace(tiny_protocol(), l0={25: 4})
    seeds = [
        {("BatchTopK", 25): scores(0.70, 0.75, 4.0), ("Matryoshka", 25): scores(0.60, 0.70, 4.0),
         (so.label("detached"), 25): scores(0.65, 0.70, 4.0)},
        {("BatchTopK", 25): scores(0.72, 0.75, 4.0), ("Matryoshka", 25): scores(0.64, 0.72, 4.0),
         (so.label("detached"), 25): scores(0.73, 0.75, 4.0)},
    ]  # fmt: skip
    table = sb.format_table(protocol, seeds, peer=[{k: v for k, v in s.items()
                                                    if so.option_of(k[0]) is None}
                                                   for s in seeds])  # fmt: skip
    rows = [line for line in table.splitlines() if line.startswith("| Matryoshka + detached")]
    assert len(rows) == 1 and "| saekit |" in rows[0]  # saekit's only: the peer has no options
    assert "| Matryoshka | SAELens |" in table
    ranked = [line for line in table.splitlines() if line.startswith("- saekit, L0 25, F1")]
    assert ranked[0].startswith("- saekit, L0 25, F1: BatchTopK > Matryoshka (")
    # F1 differences per seed: 0.05 and 0.09 → mean 0.07, std 0.0283; MCC 0.00 and 0.03
    line = next(line for line in table.splitlines() if line.startswith("- Matryoshka + detached"))
    assert "F1 +0.070 ± 0.028 vs Matryoshka" in line
    assert "MCC +0.015 ± 0.021 vs Matryoshka" in line
    assert "vs the best published recipe (BatchTopK) 0.710" in line and "F1 0.690" in line


def test_seeds_run_apart_print_as_one_table(tmp_path, capsys):
    """--first-seed S --json F per process, then --from-json F... prints one table over all
    their seeds (the seeds read back as written), with an option row."""
    write_world(tmp_path / "w", [node(0, node(2), node(3)), node(1, node(4), node(5))], 40)
    spec = importlib.util.spec_from_file_location("bench_synth", BENCH_SYNTH)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    threads = torch.get_num_threads()
    common = ["--samples", "512", "--eval-tokens", "1024", "--l0", "25", "--arch", "Matryoshka",
              "--option", "detached", "--world", str(tmp_path / "w")]  # fmt: skip
    try:
        for seed in (0, 1):
            path = tmp_path / f"seed{seed}.json"
            assert script.main([*common, "--first-seed", str(seed), "--json", str(path)]) == 0
        dumps = [json.loads((tmp_path / f"seed{s}.json").read_text()) for s in (0, 1)]
        capsys.readouterr()
        reads = ["--from-json", str(tmp_path / "seed0.json"), "--from-json",
                 str(tmp_path / "seed1.json")]  # fmt: skip
        assert script.main(["--l0", "25", *reads]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "2 seed(s)" in out and "| Matryoshka + detached | saekit | 25 (11) |" in out
    f1s = [d["seeds"][0]["Matryoshka|25"]["f1"] for d in dumps]
    assert f1s[0] != f1s[1]  # two seeds, not one twice
    mean = (f1s[0] + f1s[1]) / 2
    row = next(line for line in out.splitlines() if line.startswith("| Matryoshka | saekit"))
    assert f"| {mean:.3f} ± " in row
