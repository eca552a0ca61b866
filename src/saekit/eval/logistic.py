"""Binary logistic-regression probes in float64: the one home of the probe fits that absorption
(:mod:`saekit.eval.absorption`) and k-sparse probing (:mod:`saekit.eval.sparse_probing`) share.

:func:`fit_logistic` minimises scikit-learn's ``LogisticRegression(penalty="l2", C=C)``
objective (the probe SAEBench and sae-probes fit; scikit-learn is not a saekit dependency)::

    ½‖w‖² + C · Σ_i s_i · log(1 + exp(−ỹ_i (x_i·w + b)))        ỹ_i = ±1, b unpenalised

with s_i = 1, or with ``balanced`` scikit-learn's ``class_weight="balanced"`` weights
n / (2 n_class(i)). The objective is strictly convex, so L-BFGS in float64 reaches the same
optimum scikit-learn's lbfgs solver does (to its tolerance), whatever the start.

:func:`fit_l1_logistic` is SAEBench's L1 "multi-probe" for one class (``train_sparse_multi_probe``
in sae_bench/evals/absorption/k_sparse_probing.py): the mean binary cross-entropy with the
positives weighted n_neg / n_pos, plus ``l1`` · ‖w‖₁ (SAEBench: ``k_sparse_probe_l1_decay`` =
0.01). SAEBench runs Adam for 50 epochs; here accelerated proximal gradient descent (FISTA,
soft-thresholding) to convergence: the exact optimum instead of Adam's approximation of it. Only
the ranking of the weights is used (the top-k latents).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class LogisticProbe:
    """A fitted binary probe: score(x) = x·w + b; predicts the positive class when score > 0."""

    weight: Tensor
    """[D] float64."""
    bias: float

    def score(self, x_ND: Tensor) -> Tensor:
        return x_ND.to(torch.float64) @ self.weight + self.bias

    def predict(self, x_ND: Tensor) -> Tensor:
        return self.score(x_ND) > 0


def _check(x_ND: Tensor, y_N: Tensor) -> tuple[Tensor, Tensor]:
    if x_ND.ndim != 2 or y_N.shape != (x_ND.shape[0],):
        raise ValueError(f"probe data: x must be [N, D] and y [N], got {x_ND.shape}, {y_N.shape}")
    y = y_N.to(torch.bool)
    if y.all() or not y.any():
        raise ValueError("a probe needs examples of both classes")
    return x_ND.detach().to(torch.float64), y


def sample_weights(y_N: Tensor, balanced: bool) -> Tensor:
    """scikit-learn's class weights: 1, or n / (2 · n_class) per example when ``balanced``."""
    s = torch.ones(len(y_N), dtype=torch.float64)
    if balanced:
        n_pos = float(y_N.sum())
        s = torch.where(y_N, len(y_N) / (2 * n_pos), len(y_N) / (2 * (len(y_N) - n_pos)))
    return s


def fit_logistic(
    x_ND: Tensor, y_N: Tensor, *, C: float = 1.0, balanced: bool = False, max_iter: int = 500
) -> LogisticProbe:
    """The L2 logistic regression of the module docstring, fitted with L-BFGS in float64."""
    x, y = _check(x_ND, y_N)
    signs = torch.where(y, 1.0, -1.0).to(torch.float64)
    s = sample_weights(y, balanced)
    params = torch.zeros(x.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [params],
        lr=1,
        max_iter=max_iter,
        tolerance_grad=1e-10,
        tolerance_change=1e-14,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def objective() -> Tensor:
        opt.zero_grad()
        w, b = params[:-1], params[-1]
        margins = signs * (x @ w + b)
        loss = 0.5 * (w * w).sum() + C * (s * F.softplus(-margins)).sum()
        loss.backward()
        return loss

    for _ in range(20):  # L-BFGS restarts until the gradient vanishes (ill-conditioned data)
        opt.step(objective)
        if params.grad is None or float(params.grad.abs().max()) < 1e-9:
            break
    w = params.detach()
    return LogisticProbe(weight=w[:-1].clone(), bias=float(w[-1]))


def fit_l1_logistic(
    x_ND: Tensor, y_N: Tensor, *, l1: float = 0.01, max_iter: int = 5000, tol: float = 1e-8
) -> LogisticProbe:
    """SAEBench's L1 probe objective (module docstring) by proximal gradient descent."""
    x, y = _check(x_ND, y_N)
    n_pos = float(y.sum())
    pos_weight = (len(y) - n_pos) / n_pos  # SAEBench's _calc_pos_weights
    s = torch.where(y, pos_weight, 1.0).to(torch.float64)
    target = y.to(torch.float64)
    # step 1/L: the BCE's gradient is Lipschitz with L ≤ max(s) · ‖[x 1]‖₂² / (4 N)
    x1 = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], 1)
    lipschitz = float(s.max()) * float(torch.linalg.matrix_norm(x1, 2)) ** 2 / (4 * len(x))
    step = 1.0 / max(lipschitz, 1e-12)
    params = torch.zeros(x.shape[1] + 1, dtype=torch.float64)
    momentum, t = params, 1.0  # FISTA: ISTA with Nesterov's momentum (Beck & Teboulle 2009)
    for it in range(max_iter):
        p = torch.sigmoid(x1 @ momentum)
        grad = x1.T @ (s * (p - target)) / len(x)
        new = momentum - step * grad
        w = new[:-1]  # soft-threshold the weights, never the bias
        new[:-1] = torch.sign(w) * (w.abs() - step * l1).clamp_min(0)
        t_next = (1 + (1 + 4 * t * t) ** 0.5) / 2
        momentum = new + ((t - 1) / t_next) * (new - params)
        done = it % 25 == 24 and float((new - params).abs().max()) < tol
        params, t = new, t_next
        if done:
            break
    return LogisticProbe(weight=params[:-1].clone(), bias=float(params[-1]))


def f1_score(predicted_N: Tensor, actual_N: Tensor) -> float:
    """F1 of the positive class (0 when nothing is predicted or present, as scikit-learn)."""
    tp = float((predicted_N & actual_N).sum())
    denominator = float(predicted_N.sum()) + float(actual_N.sum())
    return 2 * tp / denominator if denominator else 0.0


def roc_auc(score_N: Tensor, actual_N: Tensor) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties ½."""
    pos, neg = score_N[actual_N].double(), score_N[~actual_N].double()
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).double().mean()
    ties = (pos[:, None] == neg[None, :]).double().mean()
    return float(greater + 0.5 * ties)
