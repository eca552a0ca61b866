"""A run's per-SAE report (eval.json, summary.json rows): typed, and written as before."""

from __future__ import annotations

import json
import math

from saekit.cli import main
from saekit.eval.decoder_norms import SourceNormSummary
from saekit.eval.metrics import ReconstructionMetrics
from saekit.eval.parts import PartScores, PartsReport
from saekit.train.reports import GroundTruthScores, MemberReport, OutlierCounts, ThresholdScores

# written by the dict-built report before it was typed (a BatchTopK SAE on synthetic data;
# absorption: hierarchical data; outliers: a model run with data.outlier_norm), in order
ALL_KEYS = [
    "name", "n_tokens", "fvu", "explained_variance", "mse", "l0", "dead_fraction",
    "dense_fraction", "true_l0", "mean_max_cos", "recovered_share", "mcc", "absorption",
    "l0_histogram", "threshold", "threshold_ema", "l0_ema", "calibration_tokens",
    "outlier_tokens", "outlier_fraction", "l0_target",
]  # fmt: skip
# today's eval.json of `saekit sweep`'s batchtopk-k6-M1024
BATCHTOPK_SYNTHETIC_KEYS = [
    "name", "n_tokens", "fvu", "explained_variance", "mse", "l0", "dead_fraction",
    "dense_fraction", "true_l0", "mean_max_cos", "recovered_share", "mcc", "l0_histogram",
    "threshold", "threshold_ema", "l0_ema", "calibration_tokens", "l0_target",
]  # fmt: skip


def full_report() -> MemberReport:
    metrics = ReconstructionMetrics(512, 0.25, 0.75, 1.5, 5.75, 0.125, 0.0625)
    return MemberReport(
        name="batchtopk-k6",
        metrics=metrics,
        ground_truth=GroundTruthScores(6.0, 0.875, 0.5, 0.8125, absorption=0.25),
        l0_histogram=[0, 3, 9],
        threshold=ThresholdScores(0.875, 1.75, 0.25, 256),
        outliers=OutlierCounts(3, 0.00625),
        l0_target=6.0,
    )


def round_trip(report: MemberReport) -> MemberReport:
    return MemberReport.from_json(json.loads(json.dumps(report.to_json(), indent=2)))


def test_a_report_with_every_part_round_trips_and_writes_todays_keys_in_order():
    report = full_report()
    assert list(report.to_json()) == ALL_KEYS
    assert round_trip(report) == report


def test_absent_parts_are_none_and_not_written():
    bare = MemberReport("relu", full_report().metrics)
    assert list(bare.to_json()) == ALL_KEYS[:8]
    assert round_trip(bare) == bare
    no_absorption = GroundTruthScores(6.0, 0.875, 0.5, 0.8125)
    assert "absorption" not in no_absorption.to_json()
    nan = GroundTruthScores(6.0, 0.875, 0.5, 0.8125, absorption=float("nan"))
    assert math.isnan(GroundTruthScores.from_json(json.loads(json.dumps(nan.to_json()))).absorption)


def test_a_written_run_reads_back_to_the_same_bytes(tmp_path):
    """eval.json and summary.json of a BatchTopK run: today's keys, and from_json ∘ to_json
    gives the file's bytes again."""
    argv = ["train", "--out", str(tmp_path), "--steps", "4", "--no-progress"]
    sets = ["batch_size=256", "eval_tokens=512", "data.synthetic.n_features=64"]
    sets += ["saes.0.sae.d_sae=128", "saes.0.sae.activation.kind=batchtopk"]
    assert main([*argv, *(a for s in sets for a in ("--set", s))]) == 0
    (row,) = json.loads((tmp_path / "summary.json").read_text())
    path = tmp_path / row["name"] / "eval.json"
    report = MemberReport.from_json(json.loads(path.read_text()))
    assert list(report.to_json()) == BATCHTOPK_SYNTHETIC_KEYS
    assert json.dumps(report.to_json(), indent=2) == path.read_text()
    summary_row = MemberReport.from_json(row)
    assert summary_row.l0_histogram is None and summary_row.threshold == report.threshold
    assert list(row) == [k for k in BATCHTOPK_SYNTHETIC_KEYS if k != "l0_histogram"]
    assert summary_row.to_json() == row


def test_a_crosscoder_or_clt_member_adds_its_parts_last():
    sources = [PartScores("base", 0.25, 1.0), PartScores("chat", 0.5, 2.0)]
    norms = SourceNormSummary(["base", "chat"], 20, [3, 5], 2, 1, [1] * 20)
    report = MemberReport("cc", full_report().metrics, parts=PartsReport("source", sources, norms))
    assert list(report.to_json()) == [*ALL_KEYS[:8], "per_source", "decoder_norms"]
    assert round_trip(report) == report
    assert MemberReport.from_json(full_report().to_json()).parts is None
