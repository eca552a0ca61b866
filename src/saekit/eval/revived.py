"""What a revived latent became (docs/research.md, question 3: residual peeking).

A latent dead at a snapshot of training and firing at the end is "revived". Its final decoder
row d is classified, in this order:

- ``feature``: max |cos(d, f)| ≥ ``feature_cos`` over the true directions, and no latent that
  was live at the snapshot already had that feature at ≥ ``feature_cos``;
- ``duplicate``: the same, but a live latent had that feature already;
- ``error``: |cos(d, e_j)| ≥ ``error_cos`` for some latent j live at the snapshot, e_j the mean
  residual x − x̂ of the snapshot SAE over the tokens where j fires (what AuxK asked dead
  latents to fit while j was wrong) — an error-corrector of j;
- ``composite``: d lies within ``composite_cos`` of the span of its 3 best-matching features;
- ``other``.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import Tensor

from saekit.eval.ground_truth import cosine_matrix

CLASSES = ("feature", "duplicate", "error", "composite", "other")


def unit_rows(x: Tensor) -> Tensor:
    x = x.double()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def error_directions(z_NM: Tensor, residual_ND: Tensor) -> Tensor:
    """[M, d] mean residual over the tokens where each latent fires (0 for one that never does)."""
    fires = (z_NM != 0).double()
    counts = fires.sum(0).clamp_min(1)[:, None]
    return fires.T @ residual_ND.double() / counts


def classify_revived(
    W_dec_end_MD: Tensor,
    W_dec_snap_MD: Tensor,
    revived_M: Tensor,
    live_snap_M: Tensor,
    errors_MD: Tensor,
    directions_FD: Tensor,
    feature_cos: float = 0.8,
    error_cos: float = 0.5,
    composite_cos: float = 0.9,
) -> list[str]:
    """The class of each revived latent (module docstring), in latent order."""
    cos_end = cosine_matrix(directions_FD, W_dec_end_MD).abs()  # [F, M]
    cos_snap = cosine_matrix(directions_FD, W_dec_snap_MD).abs()
    covered = (cos_snap[:, live_snap_M] >= feature_cos).any(1)  # [F] held by a live latent
    err = unit_rows(errors_MD[live_snap_M])
    err = err[errors_MD[live_snap_M].norm(dim=-1) > 0]
    out = []
    for i in torch.nonzero(revived_M).flatten().tolist():
        d = unit_rows(W_dec_end_MD[i : i + 1].detach().cpu())[0]
        best, f = cos_end[:, i].max(0)
        if float(best) >= feature_cos:
            out.append("duplicate" if bool(covered[f]) else "feature")
            continue
        if err.numel() and float((err @ d).abs().max()) >= error_cos:
            out.append("error")
            continue
        top = cos_end[:, i].topk(min(3, cos_end.shape[0])).indices
        basis, _ = torch.linalg.qr(unit_rows(directions_FD[top]).T)  # [d, 3] orthonormal
        if float((basis.T @ d).norm()) >= composite_cos:
            out.append("composite")
            continue
        out.append("other")
    return out


def class_shares(classes: list[str]) -> dict[str, float]:
    """Share of each class (0 for all when nothing was revived)."""
    counts = Counter(classes)
    total = max(len(classes), 1)
    return {c: counts[c] / total for c in CLASSES}
