"""``saekit eval``'s report of a saved SAE: typed, and written as before."""

from __future__ import annotations

import json
from dataclasses import replace

from saekit.commands.evaluate import format_eval
from saekit.eval.decoder_norms import LayerNormSummary, SourceNormSummary
from saekit.eval.metrics import ReconstructionMetrics
from saekit.eval.parts import PartScores, PartsReport
from saekit.eval.saved_report import CacheData, DocumentData, SavedReport, SpliceScores
from saekit.eval.splice import SpliceResult

METRIC_KEYS = [
    "n_tokens", "fvu", "explained_variance", "mse", "l0", "dead_fraction", "dense_fraction",
]  # fmt: skip
# written by the dict-built report before it was typed: a transcoder on a causal LM's documents,
# some of them its training documents; and an SAE on a cache's held-out shard
MODEL_KEYS = [
    "sae", "hook", "model", "model_class", "text", "documents_from", "target_hook", "ce_clean",
    "ce_sae", "ce_zero", "ce_score", "kl_sae", "kl_zero", "kl_score", "n_spliced",
    "n_predicted_tokens", "documents", "document_ranges", "training_documents_evaluated",
    *METRIC_KEYS, "d_in", "d_sae", "l0_histogram",
]  # fmt: skip
CACHE_KEYS = ["sae", "hook", "cache", "model", *METRIC_KEYS, "d_in", "d_sae", "l0_histogram"]

METRICS = ReconstructionMetrics(96, 0.25, 0.75, 1.5, 4.0, 0.125, 0.0)
SPLICE = SpliceResult(3.5, 3.75, 5.0, 0.8, 0.25, 1.5, 0.833, 0.3, 84, 96)


def model_report(**changes) -> SavedReport:
    data = DocumentData(
        model="gpt2",
        model_class="causal-lm",
        text={"dataset": None, "text_file": "docs.txt", "split": "train"},
        documents_from="--text-file",
        documents=12,
        document_ranges=[[0, 12]],
        target_hook="blocks.1.mlp.out",
        splice=SpliceScores.of(SPLICE),
        training_documents_evaluated=2,
    )
    for key, value in changes.items():
        setattr(data, key, value)
    return SavedReport("run/tc", "blocks.1.mlp.in", data, METRICS, 8, 32, [0, 10, 86])


def round_trip(report: SavedReport) -> SavedReport:
    return SavedReport.from_json(json.loads(json.dumps(report.to_json(), indent=2)))


def test_a_model_report_round_trips_and_writes_todays_keys_in_order():
    report = model_report()
    assert list(report.to_json()) == MODEL_KEYS
    assert round_trip(report) == report


def test_a_cache_report_round_trips_and_writes_todays_keys_in_order():
    report = SavedReport("run/sae", "h", CacheData("c", None), METRICS, 8, 32, [0, 96])
    assert list(report.to_json()) == CACHE_KEYS
    assert round_trip(report) == report


def test_the_splice_scores_are_the_splice_result_less_its_fvu_and_predicted_tokens_renamed():
    scores = SpliceScores.of(SPLICE)
    assert scores.n_predicted_tokens == SPLICE.n_tokens and scores.n_spliced == SPLICE.n_spliced
    assert (scores.ce_score, scores.kl_sae) == (SPLICE.ce_score, SPLICE.kl_sae)


def test_optional_parts_absent_from_an_older_file_read_as_none():
    report = model_report(target_hook=None, splice=None, training_documents_evaluated=None)
    written = report.to_json()
    assert "ce_clean" not in written and "target_hook" not in written
    assert round_trip(report) == report
    printed = format_eval(report)
    assert "CE" not in printed and "target" not in printed and "training" not in printed


def test_the_printout_reads_the_parts():
    printed = format_eval(model_report())
    assert "hook blocks.1.mlp.in -> target blocks.1.mlp.out)" in printed
    assert "12 (--text-file), 2 of them training documents of the SAE" in printed
    assert "96 spliced; CE/KL over the 84 of them" in printed
    assert "CE score 0.8000" in printed


def clt_parts() -> PartsReport:
    layers = [
        PartScores("m.layers.0.mlp", 0.25, 1.5, 3.0, 0.125, "m.layers.0.mlp:input", 0.3),
        PartScores("m.layers.1.mlp", 0.5, 2.5, 4.0, 0.0, "m.layers.1.mlp:input", 0.75),
    ]
    return PartsReport("layer", layers, LayerNormSummary([0] * 19 + [32], [1.0], 0))


def test_a_clt_report_adds_its_layers_and_round_trips():
    report = replace(model_report(target_hook=None), parts=clt_parts())
    written = report.to_json()
    assert list(written)[: len(MODEL_KEYS) - 1] == [k for k in MODEL_KEYS if k != "target_hook"]
    assert list(written)[-2:] == ["per_layer", "decoder_norms"]
    assert written["per_layer"][1]["spliced_fvu"] == 0.75
    assert round_trip(report) == report
    printed = format_eval(report)
    assert "1        0.5000   0.7500     4.00   0.0%  m.layers.1.mlp <- m.layers.1.mlp:input" in (
        printed
    )
    assert "mean per layer: 1.00" in printed


def test_a_crosscoder_report_adds_its_sources_and_round_trips():
    sources = [PartScores("base", 0.25, 1.0), PartScores("chat", 0.5, 2.0)]
    norms = SourceNormSummary(["base", "chat"], 20, [3, 5], 2, 1, [1] * 20)
    report = SavedReport(
        "run/cc",
        "h",
        CacheData("c", None),
        METRICS,
        8,
        32,
        [0, 96],
        PartsReport("source", sources, norms),
    )
    written = report.to_json()
    assert written["per_source"] == [
        {"name": "base", "fvu": 0.25, "mse": 1.0},
        {"name": "chat", "fvu": 0.5, "mse": 2.0},
    ]
    assert round_trip(report) == report
    assert "decoder norms: shared 20, only base 3, only chat 5, other 2" in format_eval(report)
    # an SAE's report, of any version, has no parts
    assert SavedReport.from_json(model_report().to_json()).parts is None
