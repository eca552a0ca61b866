"""What a run writes besides checkpoints, and the evaluation behind its reports.

Run directory layout::

    <out_dir>/config.yaml            the full resolved config
    <out_dir>/checkpoint/            resumable training state (saekit.train.checkpoint)
    <out_dir>/<sae name>/sae.safetensors, cfg.json   the trained SAE (scale folded)
    <out_dir>/<sae name>/metrics.jsonl               training log (the trainer appends)
    <out_dir>/<sae name>/eval.json                   final evaluation
    <out_dir>/summary.json                           one row per SAE
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch
import yaml
from torch import Tensor

from saekit.core.atomic import atomic_write_text
from saekit.core.configs import to_dict
from saekit.core.encoding import as_dense
from saekit.data.sources.interface import ActivationSource
from saekit.eval import ground_truth
from saekit.eval.calibrate import (
    Calibration,
    calibrate_batchtopk,
    calibration_tokens,
    l0_target,
    off_target,
    threshold_set,
    tokens_after,
)
from saekit.eval.dictionaries import add_forward, is_multi_hook, part_accumulator, parts_report
from saekit.eval.metrics import MetricAccumulator, ReconstructionMetrics
from saekit.model.sae import SAE
from saekit.train.config import RunConfig
from saekit.train.member import Member
from saekit.train.reports import GroundTruthScores, MemberReport, OutlierCounts, ThresholdScores


def write_run_config(cfg: RunConfig) -> None:
    """``<out_dir>/config.yaml``, creating ``out_dir``."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))


@torch.no_grad()
def evaluate_member(
    member: Member, source: ActivationSource, n_tokens: int, batch_size: int
) -> MemberReport:
    """Held-out metrics (ratio of sums over the whole set) and, on synthetic data, recovery.

    A BatchTopK SAE is evaluated with its inference threshold calibrated on the first half of
    the held-out tokens and its metrics measured on the second half (saekit.eval.calibrate;
    reported as ``threshold``, which :func:`save_outputs` saves, beside the EMA θ and the L0 it
    gave, and ``calibration_tokens``); any SAE whose inference L0 is more than 10% off its
    target gets a warning.
    """
    sae = member.sae.eval()
    calibration = None
    if sae.activation.calibrated_threshold:
        calibration = _calibrate(sae, source, n_tokens, batch_size)
    with threshold_set(sae, None if calibration is None else calibration.threshold):
        skip = 0 if calibration is None else calibration.n_tokens
        report = _evaluate(member, source, n_tokens, batch_size, skip)
    if calibration is not None:
        report.threshold = ThresholdScores(
            threshold=calibration.threshold,
            threshold_ema=calibration.threshold_ema,
            l0_ema=calibration.l0_ema,
            calibration_tokens=calibration.n_tokens,
        )
    stats = getattr(source, "harvest_stats", None)  # a model run online
    if stats is not None and source.data.outlier_norm is not None:
        report.outliers = OutlierCounts(**stats.summary())
    penalty = member.cfg.penalty
    target = l0_target(sae.cfg, None if penalty is None else penalty.target_l0)
    if target is not None:
        report.l0_target = target
        theta = None if report.threshold is None else report.threshold.threshold
        message = off_target(member.cfg.name, report.metrics.l0, target, theta)
        if message is not None:  # stacklevel 1: torch.no_grad's wrapper is the caller
            warnings.warn(message, stacklevel=1)
    return report


def _calibrate(sae: SAE, source: ActivationSource, n_tokens: int, batch_size: int) -> Calibration:
    """θ calibrated on the first half of the held-out tokens, the rest left to evaluate
    (saekit.eval.calibrate.calibration_tokens); a source with fewer than ``n_tokens`` held-out
    tokens is split in half of what it has."""

    def held_out() -> Iterator[Tensor]:
        return (sae.split_stream(x)[0] for x, _ in source.eval_batches(n_tokens, batch_size))

    calibration = calibrate_batchtopk(sae, held_out, calibration_tokens(n_tokens), apply=False)
    if calibration.n_tokens < calibration_tokens(n_tokens):  # the source ran out: all were read
        half = calibration_tokens(calibration.n_tokens)
        if half == 0:
            raise ValueError("BatchTopK calibration needs at least 2 held-out tokens, got 1")
        calibration = calibrate_batchtopk(sae, held_out, half, apply=False)
    return calibration


def _evaluate(
    member: Member, source: ActivationSource, n_tokens: int, batch_size: int, skip: int = 0
) -> MemberReport:
    """Held-out metrics on the tokens after the first ``skip`` (the calibration part)."""
    sae = member.sae
    device = next(sae.parameters()).device
    acc = MetricAccumulator(sae.cfg.target_width, sae.cfg.n_latents, device=device)
    parts = part_accumulator(sae, device) if is_multi_hook(sae) else None  # per layer/source
    synthetic = source.known_features()  # the built-in generator, for ground truth
    absorbed = pairs = 0
    hierarchical = synthetic is not None and synthetic.cfg.kind == "hierarchical"
    for batch, coefficients in tokens_after(source.eval_batches(n_tokens, batch_size), skip):
        x, target = sae.split_stream(batch.to(device))
        out = sae(x, target)
        acc.add(x if target is None else target, out.x_hat, out.latents)  # FVU of the target
        if parts is not None:
            add_forward(parts, x if target is None else target, out.x_hat, out.latents)
        if hierarchical:
            a, t = ground_truth.absorption_counts(
                synthetic.directions,
                synthetic.parent_of,
                coefficients,
                as_dense(out.latents),
                sae.W_dec,
            )
            absorbed, pairs = absorbed + a, pairs + t
    result = acc.result()
    scores = None
    if synthetic is not None:
        rec = ground_truth.recovery(synthetic.directions, sae.W_dec)
        scores = GroundTruthScores(
            true_l0=synthetic.true_l0,
            mean_max_cos=rec.mean_max_cos,
            recovered_share=rec.recovered_share,
            mcc=rec.mcc,
            absorption=(absorbed / pairs if pairs else float("nan")) if hierarchical else None,
        )
    metrics = ReconstructionMetrics.of(result)
    report = MemberReport(member.cfg.name, metrics, scores, l0_histogram=result.l0_histogram)
    if parts is not None:
        report.parts = parts_report(sae, parts)
    return report


def save_outputs(
    out_dir: Path, saes: dict[str, SAE], reports: list[MemberReport], *, saved: bool = False
) -> None:
    """Each SAE (by name, in the order of ``reports``) with its eval.json, and summary.json
    (``saved``: the SAEs were already written, before the evaluation)."""
    out = Path(out_dir)
    for (name, sae), report in zip(saes.items(), reports, strict=True):
        calibrated = None if report.threshold is None else report.threshold.threshold
        if calibrated is not None or not saved:  # BatchTopK: saved again with the calibrated θ
            with threshold_set(sae, calibrated):
                sae.save(out / name)
        atomic_write_text(out / name / "eval.json", json.dumps(report.to_json(), indent=2))
    summary = [replace(r, l0_histogram=None).to_json() for r in reports]
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))


COLUMNS = [
    ("name", "SAE", "{}"),
    ("l0", "L0", "{:.2f}"),
    ("l0_ema", "L0 at EMA θ", "{:.2f}"),
    ("fvu", "FVU", "{:.4f}"),
    ("dead_fraction", "dead", "{:.1%}"),
    ("mean_max_cos", "mean max|cos|", "{:.3f}"),
    ("recovered_share", "recovered>0.9", "{:.1%}"),
    ("mcc", "MCC", "{:.3f}"),
    ("absorption", "absorption", "{:.1%}"),
]


def format_table(reports: list[MemberReport]) -> str:
    """A markdown table of the reports (columns present in any report)."""
    rows_json = [r.to_json() for r in reports]
    cols = [c for c in COLUMNS if any(c[0] in r for r in rows_json)]
    rows = [[c[1] for c in cols], ["---"] * len(cols)]
    for r in rows_json:
        rows.append([c[2].format(r[c[0]]) if c[0] in r else "" for c in cols])
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)
