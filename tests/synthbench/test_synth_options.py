"""`saekit bench synth --option` (saekit.synthbench.options): item 5's option rows, their run
entries, and the paired differences the table prints."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
from test_synth_bench import scores, tiny_protocol

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
