"""Checks a run passes before its directory is created (issue 28): sizes that cannot be
allocated are refused with one line instead of an allocation error after ``config.yaml`` was
written.

The estimate is a floor, not a forecast: per SAE, its parameters four times (weights, gradients
and Adam's two moments) in the parameter dtype, plus one float32 [batch, d_sae] pre-activation
matrix and its gradient. A run whose floor exceeds the device's whole memory cannot start.
Under latent parallelism the floor is one process's: d_sae / T latents, batch_size / D tokens.
"""

from __future__ import annotations

import os

import torch

from saekit.train.config import RunConfig
from saekit.train.mesh import ParallelMesh

_BYTES = {"float32": 4, "float64": 8, "bfloat16": 2, "float16": 2}


def estimated_bytes(cfg: RunConfig) -> list[tuple[str, int]]:
    """(SAE name, bytes it needs at least) for every SAE of the run."""
    out = []
    D, T = 1, 1  # latent parallelism: a process holds d_sae / T latents of batch_size / D tokens
    if isinstance(cfg.parallel, ParallelMesh):
        D, T = max(1, cfg.parallel.data), cfg.parallel.latent
    for i, s in enumerate(cfg.saes):
        sae = s.sae
        width = sae.d_in + sae.target_width
        params = sae.d_sae // T * (width + 1) + sae.target_width + sae.d_in
        per_token = 2 * 4 * sae.n_latents // T * (cfg.batch_size // D)
        out.append((s.name or f"saes.{i}", 4 * _BYTES.get(sae.dtype, 4) * params + per_token))
    return out


def device_memory(device: str) -> int | None:
    """The device's total memory in bytes (None when unknown)."""
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(dev.index or 0).total_memory
    if dev.type == "cpu":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None
    return None


def check_fits(cfg: RunConfig) -> None:
    """One-line ValueError when the SAEs cannot fit in the device's memory at all."""
    total = device_memory(cfg.device)
    if total is None:
        return
    sizes = estimated_bytes(cfg)
    need = sum(b for _, b in sizes)
    if need > total:
        name, biggest = max(sizes, key=lambda x: x[1])
        raise ValueError(
            f"the SAEs need at least {need / 2**30:,.1f} GiB (weights, gradients, Adam's moments"
            f" and one batch; SAE {name}: {biggest / 2**30:,.1f} GiB) but {cfg.device} has "
            f"{total / 2**30:,.1f} GiB: lower d_sae or batch_size"
        )
