"""``saekit eval --suite``: every SAE of a sweep on the core, absorption and sparse-probing
suites, a JSON each and the table side by side; the bootstrap interval against a loop."""

from __future__ import annotations

import json
import random

import pytest
import torch

from saekit.cli import main
from saekit.eval.suite import bootstrap_mean, parse_suites


def test_bootstrap_mean_matches_a_loop_reference():
    values = [0.0, 1.0, 0.5, 0.25, 1.0]
    rng = random.Random(0)
    means = []
    for _ in range(1000):
        sample = [values[int(rng.random() * len(values))] for _ in values]
        means.append(sum(sample) / len(sample))
    means.sort()
    interval = bootstrap_mean(values + [float("nan")])
    assert interval.value == pytest.approx(sum(values) / 5)
    assert (interval.low, interval.high) == pytest.approx((means[25], means[974]))
    with pytest.raises(ValueError, match="unknown"):
        parse_suites("core,autointerp")


def test_suite_over_a_sweep(tmp_path, one_thread):
    from test_absorption import planted_model

    model, tokenizer, sae, _ = planted_model(n_per_letter=120, n_planted=6)
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    words = [w for w in tokenizer.get_vocab() if w[0] in "abc" and len(w) > 1]
    rng = random.Random(0)
    docs = [" ".join(rng.choice(words) for _ in range(20)) for _ in range(20)]
    (tmp_path / "docs.txt").write_text("\n\n".join(docs))
    with (tmp_path / "task.csv").open("w") as f:
        f.write("text,label\n" + "".join(f"{w},{w[0] == 'a'}\n" for w in words))
    sae.cfg.hook = "transformer.wte"
    for name, bias in (("wide", -0.5), ("narrow", -1.5)):
        with torch.no_grad():
            sae.b_enc[:3] = bias
        sae.save(tmp_path / "sweep" / name)
    code = main(
        ["eval", "--sae", str(tmp_path / "sweep"), "--model", str(tmp_path / "m"),
         "--text-file", str(tmp_path / "docs.txt"), "--local-files-only", "--n-batches", "2",
         "--suite", "core,absorption,sparse_probing", "--probe-data", str(tmp_path / "task.csv"),
         "--suite-out", str(tmp_path / "out")]
    )  # fmt: skip
    assert code == 0
    out = tmp_path / "out"
    reports = sorted(out.glob("*.json"))
    assert [p.name for p in reports] == ["00_narrow.json", "01_wide.json"]
    narrow, wide = (json.loads(p.read_text()) for p in reports)
    assert narrow["core"]["l0"] < wide["core"]["l0"]
    for r in (narrow, wide):
        ab = r["absorption"]
        assert ab["n_letters_evaluated"] == 3
        assert ab["mean_absorption_fraction"]["low"] <= ab["mean_absorption_fraction"]["value"]
        task = r["sparse_probing"][0]
        assert task["task"] == "task" and [s["k"] for s in task["scores"]] == [None, 1, 2, 5, 20]
        acc = task["scores"][1]["accuracy"]
        assert acc["low"] <= acc["value"] <= acc["high"]
    table = (out / "suite.md").read_text().splitlines()
    assert table[0].startswith("| SAE | l0 |") and len(table) == 4
    assert (out / "suite.png").stat().st_size > 0
