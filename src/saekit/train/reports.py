"""The final evaluation of each SAE of a run (:func:`saekit.train.outputs.evaluate_member`): written
as its ``eval.json`` and, without the histogram, as its row of the run's ``summary.json``.

The JSON is flat (the nested parts' keys sit beside the metrics, in the order below) and each part
is written only when it applies; :meth:`MemberReport.from_json` reads a file written by any
version (a part whose keys are absent is None; other keys are not read).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from saekit.eval.metrics import ReconstructionMetrics
from saekit.eval.parts import PartsReport


def _has(cls: type, d: dict[str, Any]) -> bool:
    return all(f.name in d for f in fields(cls))


@dataclass(frozen=True)
class GroundTruthScores:
    """How well the SAE recovered the features of synthetic data
    (:mod:`saekit.eval.ground_truth`)."""

    true_l0: float
    """Mean number of active true features per token of the generator."""
    mean_max_cos: float
    """Mean over true features of the max |cos| with any decoder row."""
    recovered_share: float
    """Share of true features whose max |cos| with a decoder row exceeds 0.9."""
    mcc: float
    """Mean |cos| of a one-to-one (Hungarian) matching of true features to latents."""
    absorption: float | None = None
    """Hierarchical data: absorbed / counted (parent, child) pairs
    (:func:`saekit.eval.ground_truth.absorption_counts`), NaN when none was counted; None for
    other data."""

    def to_json(self) -> dict[str, float]:
        d = asdict(self)
        if self.absorption is None:
            del d["absorption"]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> GroundTruthScores:
        absorption = d.get("absorption")
        return cls(d["true_l0"], d["mean_max_cos"], d["recovered_share"], d["mcc"], absorption)


@dataclass(frozen=True)
class ThresholdScores:
    """A BatchTopK SAE's inference threshold θ, calibrated on the held-out batches
    (:func:`saekit.eval.calibrate.calibrate_batchtopk`); the SAE is saved and evaluated with it."""

    threshold: float
    """The calibrated θ: the one the saved SAE uses and the metrics were taken with."""
    threshold_ema: float
    """The θ training kept as an exponential moving average."""
    l0_ema: float
    """The inference L0 the EMA θ gives on the same tokens."""
    calibration_tokens: int | None = None
    """The held-out tokens θ was calibrated on (the first ones); the metrics are measured on
    the rest. None in reports written before the split."""

    def to_json(self) -> dict[str, float]:
        d = asdict(self)
        if self.calibration_tokens is None:
            del d["calibration_tokens"]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ThresholdScores:
        return cls(d["threshold"], d["threshold_ema"], d["l0_ema"], d.get("calibration_tokens"))


@dataclass(frozen=True)
class OutlierCounts:
    """Tokens of a model run's held-out batches dropped as outliers (``data.outlier_norm``)."""

    outlier_tokens: int
    """Tokens dropped: norm above ``outlier_norm`` × the median norm."""
    outlier_fraction: float
    """Their share of the tokens harvested."""

    def to_json(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> OutlierCounts:
        return cls(d["outlier_tokens"], d["outlier_fraction"])


@dataclass
class MemberReport:
    """One SAE's held-out evaluation at the end of a run (built up part by part)."""

    name: str
    """The SAE's name (its directory in the run)."""
    metrics: ReconstructionMetrics
    """Reconstruction and sparsity, ratios of sums over the held-out tokens."""
    ground_truth: GroundTruthScores | None = None
    """Synthetic data: recovery of the generator's features; None for other data."""
    l0_histogram: list[int] | None = None
    """Entry j counts tokens with j active latents (the last bin also holds larger counts); None
    in a ``summary.json`` row."""
    threshold: ThresholdScores | None = None
    """BatchTopK: the calibrated inference threshold; None for other activations."""
    outliers: OutlierCounts | None = None
    """A model run with ``data.outlier_norm``: the outliers dropped; None otherwise."""
    l0_target: float | None = None
    """The inference L0 the SAE aims at (k, or the penalty's target_l0); None without one."""
    parts: PartsReport | None = None
    """A cross-layer transcoder or a crosscoder: scores per target layer or source and the
    decoder norms' summary; None for an SAE or a transcoder."""

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, **self.metrics.to_json()}
        if self.ground_truth is not None:
            d.update(self.ground_truth.to_json())
        if self.l0_histogram is not None:
            d["l0_histogram"] = self.l0_histogram
        if self.threshold is not None:
            d.update(self.threshold.to_json())
        if self.outliers is not None:
            d.update(self.outliers.to_json())
        if self.l0_target is not None:
            d["l0_target"] = self.l0_target
        if self.parts is not None:
            d.update(self.parts.to_json())
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> MemberReport:
        return cls(
            name=d["name"],
            metrics=ReconstructionMetrics.from_json(d),
            ground_truth=GroundTruthScores.from_json(d) if "true_l0" in d else None,
            l0_histogram=d.get("l0_histogram"),
            threshold=ThresholdScores.from_json(d) if _has(ThresholdScores, d) else None,
            outliers=OutlierCounts.from_json(d) if _has(OutlierCounts, d) else None,
            l0_target=d.get("l0_target"),
            parts=PartsReport.from_json(d),
        )
