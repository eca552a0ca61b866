"""Where the latents sit in each dictionary's tensors, and a part's exact random initialisation,
for latent parallelism (:mod:`saekit.train.latent_member`).

A part of a dictionary with M latents (per layer, for a cross-layer transcoder) on latent rank t
of T is the same architecture with M/T latents: global latent t·M/T + i is its latent i
(a CLT's: latent i of every layer, so every layer is split over the T ranks). Each per-latent
tensor holds its latents along one axis, possibly in G equal groups (:func:`latent_axes`):

    SAE, transcoder        W_enc [M, d], b_enc [M], W_dec [M, d_out]       axis 0
    crosscoder             W_enc, W_dec [S, M, d]                           axis 1
                           b_enc [M]                                        axis 0
    cross-layer transcoder W_enc [L, M, d_in], b_enc [L, M]                 axis 1
                           W_dec[l] [M, L − l, d_out]                       axis 0
                           flat per-latent [L·M] (θ, dead counters)         axis 0, G = L groups

so the parts join along that axis group by group (:func:`join_parts`) and a checkpoint's rows
of any other split are sliced the same way (saekit.train.latent_checkpoint).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from saekit.core.shard import LatentShard
from saekit.model.clt import CrossLayerTranscoder
from saekit.model.crosscoder import Crosscoder
from saekit.model.dictionary import Dictionary

CHUNK_ELEMENTS = 1 << 20
"""Rows of the random init are drawn ~1M numbers at a time (memory of one chunk, not [M, d])."""

Axis = tuple[int, int]
"""(dim, groups): the latents lie along ``dim``, in ``groups`` equal consecutive groups."""


def normal_rows(
    generator: torch.Generator, rows: int, cols: int, start: int, count: int, groups: int = 1
) -> Tensor:
    """Rows [g·rows/groups + start, … + count) for each group g (one group: [start, start +
    count)) of ``torch.randn(rows, cols, generator=generator)``, float32, bit for bit, drawing
    the whole stream (the generator ends where that call leaves it) in chunks whose sizes are
    multiples of 16 numbers, the last one at least 16: torch's CPU normal sampler transforms 16
    uniforms at a time and redraws the last 16 of a tensor whose size is not a multiple of 16
    (aten/src/ATen/native/cpu/DistributionTemplates.h, normal_fill), so such chunks consume and
    transform the stream exactly as one call does (tests/train/test_latent_member.py checks odd
    shapes)."""
    step = 16 // math.gcd(cols, 16)  # rows per 16-aligned block
    chunk = max(step, CHUNK_ELEMENTS // cols // step * step)
    bounds = list(range(0, rows, chunk)) + [rows]
    if len(bounds) > 2 and (bounds[-1] - bounds[-2]) * cols < 16:
        del bounds[-2]  # the tail joins the chunk before it
    per_group = rows // groups
    wanted = [(g * per_group + start, count) for g in range(groups)]
    out = torch.empty(groups * count, cols)
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        block = torch.randn(b - a, cols, generator=generator)
        for j, (first, n) in enumerate(wanted):
            lo, hi = max(a, first), min(b, first + n)
            if lo < hi:
                out[j * count + lo - first : j * count + hi - first] = block[lo - a : hi - a]
    return out


def _unit(W: Tensor) -> Tensor:
    return W / W.norm(dim=-1, keepdim=True)


@torch.no_grad()
def init_part_(part: Dictionary, seed: int, shard: LatentShard) -> None:
    """This part's rows of the whole dictionary's ``reset_parameters(generator=Generator()
    .manual_seed(seed))`` (SAE.reset_parameters, Crosscoder.reset_parameters,
    CrossLayerTranscoder.reset_parameters: the same draws, in the same order), never the whole
    matrix; the biases are already 0."""
    gen = torch.Generator().manual_seed(seed)
    M, a, n = shard.d_sae, shard.offset, shard.width
    if isinstance(part, CrossLayerTranscoder):
        L, d_in, d_out = part.cfg.n_layers, part.cfg.d_in, part.cfg.d_out
        for layer, W in enumerate(part.W_dec):
            raw = normal_rows(gen, M, (L - layer) * d_out, a, n).view(n, L - layer, d_out)
            W.copy_(_unit(raw.view(n, -1)).view_as(raw))
            if d_in == d_out:
                part.W_enc[layer].copy_(_unit(raw[:, 0, :]))
        if d_in != d_out:
            W = normal_rows(gen, L * M, d_in, a, n, groups=L)
            part.W_enc.copy_(_unit(W).view(L, n, d_in))
        return
    if isinstance(part, Crosscoder):
        S, d = part.cfg.n_sources, part.cfg.d_in
        W = _unit(normal_rows(gen, M, S * d, a, n))
        part._set_rows_(part.W_dec.data, W)
        part._set_rows_(part.W_enc.data, W)
        return
    (_, d_out), (_, d_in) = part.W_dec.shape, part.W_enc.shape
    W = _unit(normal_rows(gen, M, d_out, a, n))
    part.W_dec.copy_(W)
    if d_in != d_out:
        W = _unit(normal_rows(gen, M, d_in, a, n))
    part.W_enc.copy_(W)


def flat_groups(part: Dictionary) -> int:
    """The groups of a flat per-latent vector (θ, the dead counters): a CLT's L layers, else 1."""
    return part.cfg.n_layers if isinstance(part, CrossLayerTranscoder) else 1


def latent_axes(part: Dictionary) -> dict[str, Axis]:
    """State-dict key -> axis of every per-latent tensor (module doc): W_enc, b_enc, W_dec (a
    CLT's W_dec.<l>) and the activation's per-latent parameters and buffers; the rest (b_dec,
    W_skip, the scales, a global threshold) is replicated."""
    dense = isinstance(part, (CrossLayerTranscoder, Crosscoder))  # W_enc [G, M, d]
    axes: dict[str, Axis] = {"W_enc": (1, 1) if dense else (0, 1)}
    axes["b_enc"] = (1, 1) if isinstance(part, CrossLayerTranscoder) else (0, 1)
    if isinstance(part, CrossLayerTranscoder):
        axes |= {f"W_dec.{layer}": (0, 1) for layer in range(part.cfg.n_layers)}
    else:
        axes["W_dec"] = (1, 1) if isinstance(part, Crosscoder) else (0, 1)
    for name, value in part.activation.state_dict().items():
        if value.dim() >= 1:
            axes[f"activation.{name}"] = (0, flat_groups(part))
    return axes


def join_parts(parts: list[Tensor], axis: Axis) -> Tensor:
    """The whole tensor from its T parts in latent order: group by group along the axis."""
    dim, groups = axis
    if groups == 1:
        return torch.cat(parts, dim)
    return torch.cat([p.unflatten(dim, (groups, -1)) for p in parts], dim + 1).flatten(dim, dim + 1)
