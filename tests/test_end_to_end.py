"""End to end: the demo (`saekit train` with no arguments: saekit.train.presets.train_config())
recovers the synthetic data's true features. Slow (about a minute on 2 CPU cores) but part of
`make test`: it is the one check that the pieces, put together, still learn what they should.

It runs on one thread: on a shared 2-core machine two threads oversubscribe and a step is ~4x
slower (0.26 s against 0.06 s measured under load); one thread computes the same run."""

from __future__ import annotations

import json

import pytest

from saekit.cli import main
from saekit.model.sae import SAE
from saekit.train import presets


@pytest.mark.slow
def test_demo_recovers_the_true_features(tmp_path, capsys, one_thread):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--no-progress"]) == 0
    (report,) = json.loads((out / "summary.json").read_text())
    default = presets.train_config()
    assert report["true_l0"] == pytest.approx(presets.TRUE_L0, rel=0.2)
    assert report["recovered_share"] > 0.9, report
    k = default["saes"][0]["sae"]["activation"]["k"]
    assert k - 0.5 < report["l0"] <= k  # TopK: k per token (a kept value may be 0)
    sae = SAE.load(out / report["name"])
    assert float(sae.scale) == 1.0 and sae.cfg.d_sae == presets.D_SAE
    assert report["name"] in capsys.readouterr().out  # the summary table was printed
