"""`saekit report --synthetic`: each latent's matched true feature and |cos|, the true features no
latent recovered, and the command's refusals (fast: no browser, no model)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from saekit.cli import main
from saekit.data.synthetic.generator import SyntheticConfig, SyntheticData
from saekit.model.config import SAEConfig
from saekit.model.sae import SAE

SYNTH = {"d": 16, "n_features": 24, "mean_l0": 3.0, "seed": 5}
PLANTED = {0: 4, 1: 0, 2: 17, 3: 9}  # latent -> the true feature its decoder row is


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run directory with config.yaml and an SAE whose latents 0-3 are planted true features
    (encoder = decoder row, b_enc = 0) and whose other latents are random."""
    root = tmp_path_factory.mktemp("synthetic-report")
    (root / "config.yaml").write_text(yaml.safe_dump({"data": {"synthetic": SYNTH}}))
    truth = SyntheticData(SyntheticConfig(**SYNTH))
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=16, d_sae=12, activation={"kind": "topk", "k": 4}))
    with torch.no_grad():
        sae.b_dec.copy_(truth.mean)  # nonzero data mean: the decoder bias carries it
        for latent, feature in PLANTED.items():
            sae.W_dec[latent] = truth.directions[feature]
            sae.W_enc[latent] = truth.directions[feature] * 3
            sae.b_enc[latent] = 0.0
    sae.save(root / "sae")
    return root, truth


def report(root, *extra):
    argv = ["report", str(root / "sae"), "--synthetic", "--max-tokens", "3000"]
    return main(argv + ["--batch-size", "4", "--context-length", "256", "--no-progress", *extra])


def test_synthetic_report_matches_planted_features_and_lists_unrecovered(run):
    root, truth = run
    assert report(root, "--latents", "6", "--top-k", "7") == 0
    data = json.loads((root / "sae" / "report" / "report.json").read_text())
    assert [e["id"] for e in data["latents"]] == list(range(6))
    for latent, feature in PLANTED.items():
        entry = data["latents"][latent]
        assert entry["truth"]["feature"] == feature
        assert entry["truth"]["cos"] == pytest.approx(1.0, abs=1e-6)
        # its top examples are tokens where its feature is active
        assert len(entry["top"]) == 7 and all(ctx["aux"] > 0 for ctx in entry["top"])
    W_dec = SAE.load(root / "sae").W_dec.detach().double()
    cos = torch.nn.functional.normalize(truth.directions.double(), dim=1) @ (
        torch.nn.functional.normalize(W_dec, dim=1).T
    )
    best = cos.abs().max(dim=1).values
    expected = [f for f in range(SYNTH["n_features"]) if best[f] < 0.9]
    assert [u["feature"] for u in data["unrecovered"]] == expected
    assert not set(PLANTED.values()) & set(expected)
    page = (root / "sae" / "report" / "unrecovered.html").read_text()
    assert page.count("<tr><td") == len(expected)
    assert data["summary"]["n_tokens"] == 3000


def test_report_refuses_bad_requests(run, tmp_path, capsys):
    root, _ = run
    assert report(root, "--latent-ids", "3", "12") == 2
    assert "--latent-ids [12] out of range: the SAE has 12 latents" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("keep me")
    assert report(root, "--out", str(tmp_path)) == 2
    assert "is not a saekit report" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    assert main(["report", str(root / "sae"), "--no-progress"]) == 2
    assert "give --model" in capsys.readouterr().err
