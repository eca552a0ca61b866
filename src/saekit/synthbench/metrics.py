"""SynthSAEBench metrics (arXiv 2602.14687), as the paper and SAELens' synthetic evals define them.

- Each latent's matched feature is the true direction with the largest |cos| to its decoder
  row. As a detector of that feature over tokens (fires: z ≠ 0; true: coefficient > 0):
  precision TP/(TP+FP), recall TP/(TP+FN), F1 their harmonic mean, each 0 where its
  denominator is 0 (so a dead latent scores 0), averaged over ALL latents.
- MCC: mean |cos| over the pairs of a one-to-one (Hungarian) matching of latents to features,
  i.e. over min(M, F) pairs (note: saekit.eval.ground_truth.recovery divides by F instead).
- Uniqueness: distinct matched features / M.
- Explained variance: 1 − Σ‖x − x̂‖² / (Σ‖x‖² − N‖x̄‖²), sums over all tokens (float64).
- Shrinkage: mean over tokens with ‖x‖ > 1e-6 of ‖x̂‖ / ‖x‖ (1 = none, < 1 = shrunk).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from saekit.eval.ground_truth import cosine_matrix

MIN_INPUT_NORM = 1e-6


@dataclass
class SynthScores:
    precision: float
    recall: float
    f1: float
    mcc: float
    uniqueness: float
    explained_variance: float
    shrinkage: float
    l0: float
    dead: int
    """Latents that never fired on the evaluation tokens."""

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def matched_features(W_dec_MD: Tensor, directions_FD: Tensor) -> Tensor:
    """[M] index of the true feature with the largest |cos| to each decoder row."""
    return cosine_matrix(directions_FD, W_dec_MD).abs().argmax(0)


def mcc(W_dec_MD: Tensor, directions_FD: Tensor) -> float:
    """Mean |cos| of the Hungarian matching, over its min(M, F) pairs."""
    abs_cos = cosine_matrix(directions_FD, W_dec_MD).abs().numpy()
    rows, cols = linear_sum_assignment(abs_cos, maximize=True)
    return float(abs_cos[rows, cols].mean())


def uniqueness(W_dec_MD: Tensor, directions_FD: Tensor) -> float:
    return torch.unique(matched_features(W_dec_MD, directions_FD)).numel() / W_dec_MD.shape[0]


def detection_scores(tp: Tensor, fp: Tensor, fn: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-latent (precision, recall, F1) from counts, 0 where a denominator is 0."""
    tp, fp, fn = tp.double(), fp.double(), fn.double()
    zero = torch.zeros_like(tp)
    precision = torch.where(tp + fp > 0, tp / (tp + fp).clamp_min(1), zero)
    recall = torch.where(tp + fn > 0, tp / (tp + fn).clamp_min(1), zero)
    total = precision + recall
    f1 = torch.where(total > 0, 2 * precision * recall / total.clamp_min(1e-300), zero)
    return precision, recall, f1


class SynthMetricAccumulator:
    """Streams evaluation batches; :meth:`result` gives the :class:`SynthScores`."""

    def __init__(self, W_dec_MD: Tensor, directions_FD: Tensor):
        self.W_dec = W_dec_MD.detach().cpu()
        self.directions = directions_FD.detach().cpu()
        self.matched = matched_features(self.W_dec, self.directions)
        M = self.W_dec.shape[0]
        self.tp = torch.zeros(M, dtype=torch.float64)
        self.fp = torch.zeros(M, dtype=torch.float64)
        self.fn = torch.zeros(M, dtype=torch.float64)
        self.fired = torch.zeros(M, dtype=torch.bool)
        self.sum_x = torch.zeros(self.W_dec.shape[1], dtype=torch.float64)
        self.sum_sq = self.sum_err = self.sum_shrink = self.sum_l0 = 0.0
        self.n = self.n_shrink = 0

    def add(self, x: Tensor, x_hat: Tensor, z: Tensor, coefficients: Tensor) -> None:
        """x, x_hat [..., d]; z [..., M] latents; coefficients [..., F] true coefficients."""
        d, M = x.shape[-1], z.shape[-1]
        x, x_hat = x.reshape(-1, d).double().cpu(), x_hat.reshape(-1, d).double().cpu()
        fires = z.reshape(-1, M).detach().cpu() != 0
        truth = coefficients.reshape(-1, coefficients.shape[-1]).cpu()[:, self.matched] > 0
        self.tp += (fires & truth).sum(0)
        self.fp += (fires & ~truth).sum(0)
        self.fn += (~fires & truth).sum(0)
        self.fired |= fires.any(0)
        self.sum_l0 += float(fires.sum())
        self.sum_x += x.sum(0)
        self.sum_sq += float(x.pow(2).sum())
        self.sum_err += float((x - x_hat).pow(2).sum())
        norms = x.norm(dim=-1)
        valid = norms > MIN_INPUT_NORM
        self.sum_shrink += float((x_hat.norm(dim=-1)[valid] / norms[valid]).sum())
        self.n_shrink += int(valid.sum())
        self.n += x.shape[0]

    def result(self) -> SynthScores:
        if self.n == 0:
            raise ValueError("synth metrics: no evaluation tokens were added")
        precision, recall, f1 = detection_scores(self.tp, self.fp, self.fn)
        variance = self.sum_sq - float(self.sum_x.pow(2).sum()) / self.n
        return SynthScores(
            precision=float(precision.mean()),
            recall=float(recall.mean()),
            f1=float(f1.mean()),
            mcc=mcc(self.W_dec, self.directions),
            uniqueness=uniqueness(self.W_dec, self.directions),
            explained_variance=1 - self.sum_err / variance,
            shrinkage=self.sum_shrink / max(self.n_shrink, 1),
            l0=self.sum_l0 / self.n,
            dead=int((~self.fired).sum()),
        )
