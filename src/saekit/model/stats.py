"""Statistics of the activations a dictionary is fitted to: the width and finiteness check,
the scale check and the geometric median (b_dec's robust initialisation)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def check_activations(x: Tensor, width: int, name: str = "d_in") -> None:
    """Clear errors for a trailing width other than ``width`` (the config's ``name``) and for
    non-finite values."""
    if not isinstance(x, Tensor):
        raise ValueError(
            f"activations must be a torch.Tensor, got {type(x).__name__}: convert with "
            "torch.as_tensor(x)"
        )
    if x.ndim == 0 or x.shape[-1] != width:
        raise ValueError(
            f"activations have trailing dimension {tuple(x.shape)[-1:] or '()'} (shape "
            f"{tuple(x.shape)}), but this SAE has {name} = {width}"
        )
    if not torch.isfinite(x).all():
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        raise ValueError(f"activations contain {n_nan} NaN and {n_inf} inf values")


def check_scale(scale: float) -> None:
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"dataset scale must be positive and finite, got {scale}")


def geometric_median(x: Tensor, iters: int = 100, tol: float = 1e-7) -> Tensor:
    """Weiszfeld's algorithm for the point minimising Σ_n ‖x_n − c‖."""
    c = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - c).norm(dim=-1).clamp_min(1e-12)
        c_new = (w.unsqueeze(1) * x).sum(0) / w.sum()
        if (c_new - c).norm() <= tol * c.norm().clamp_min(1.0):
            return c_new
        c = c_new
    return c
