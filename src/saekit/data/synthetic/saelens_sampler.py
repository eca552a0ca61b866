"""SAELens's own sampling of a world, draw for draw (``sae_lens.synthetic``: dense path).

``saelens_batch(world, n, g)`` makes the random draws ``SyntheticModel.sample_with_features``
makes, in the same order and with the same arithmetic, from ``g`` instead of torch's global
generator: so ``torch.manual_seed(s); model.sample_with_features(n)`` in SAELens and
``saelens_batch(world, n, torch.Generator().manual_seed(s))`` here give the same x and the same
feature activations (tests/interop/test_saelens_world_real.py). Their order is

1. copula: ε ~ N(0, I)^{n×r}, η ~ N(0, I)^{n×F}, fire where ε Wᵀ + η·s > threshold (without a
   copula, one Bernoulli per (token, feature));
2. one N(0, 1) per firing, in row-major order: ReLU(μ + σ·z);
3. level by level: children gated (or scaled by parent / parent mean) by their parent, then
   one uniform score per (token, group with > 1 active child) × widest group, the highest
   winning, for the mutually exclusive groups whose parent sits at that level.

This costs O(n·F) per batch (the η draw and a dense [n, F] tensor), which is why saekit's own
sampler (:mod:`saekit.data.synthetic.synthbench_sampler`) draws sparsely instead: it cannot
make the same draws (it never draws η for features that do not fire), so its samples match
SAELens's in distribution only, and are tested that way.
"""

from __future__ import annotations

import torch
from torch import Tensor

from saekit.data.synthetic.synthbench_world import SynthBenchWorld


def _gate_level(acts: Tensor, world: SynthBenchWorld, level: int) -> None:
    """SAELens step 1 of a level: children at ``level`` times their parent's gate or scale."""
    feats = torch.nonzero(world.depth == level).flatten()
    if feats.numel() == 0 or level == 0:
        return
    parents = world.parent[feats]
    parent_vals, child_vals = acts[:, parents], acts[:, feats]
    active = parent_vals > 0
    rescale = world.scales_children[parents]
    if rescale.any():
        scale = torch.where(
            active, parent_vals / world.magnitude_mean[parents], torch.zeros_like(parent_vals)
        )
        factor = torch.where(rescale, scale, active.to(child_vals.dtype))
        acts[:, feats] = child_vals * factor
    else:
        acts[:, feats] = child_vals * active


def _exclude_level(acts: Tensor, world: SynthBenchWorld, level: int, g: torch.Generator) -> None:
    """SAELens step 2: one random winner among the active children of each exclusive parent at
    ``level`` (scores over the widest group of the whole world, as SAELens pads them)."""
    groups = torch.nonzero((world.depth == level) & world.exclusive).flatten()
    if groups.numel() == 0:
        return
    b = world.cfg.branching
    siblings = world.first_child[groups].unsqueeze(1) + torch.arange(b)  # [G, b]
    parent_active = acts[:, groups] > 0
    n = acts.shape[0]
    active = (acts[:, siblings.flatten()].view(n, -1, b) > 0) & parent_active.unsqueeze(2)
    batch_idx, group_idx = torch.where(active.sum(2) > 1)
    if batch_idx.numel() == 0:
        return
    conflict_active = active[batch_idx, group_idx]
    scores = torch.rand(batch_idx.numel(), b, generator=g)
    scores[~conflict_active] = -1e9
    winner = torch.zeros_like(conflict_active)
    winner.scatter_(1, scores.argmax(1, keepdim=True), True)
    c, s = torch.where(conflict_active & ~winner)
    acts[batch_idx[c], siblings[group_idx[c], s]] = 0


def saelens_features(world: SynthBenchWorld, n: int, g: torch.Generator) -> Tensor:
    """[n, F] feature activations, SAELens's draws (module docstring)."""
    F = world.cfg.n_features
    probs = world.probabilities.float()
    if world.factor is not None:
        eps = torch.randn(n, world.factor.shape[1], generator=g)
        eta = torch.randn(n, F, generator=g)
        gauss = eps @ world.factor.T + eta * world.own_std
        rows, cols = (gauss > world.thresholds.unsqueeze(0)).nonzero(as_tuple=True)
    else:
        rows, cols = torch.bernoulli(probs.unsqueeze(0).expand(n, -1), generator=g).nonzero(
            as_tuple=True
        )
    z = torch.randn(cols.numel(), generator=g) * world.magnitude_std[cols]
    acts = torch.zeros(n, F)
    acts[rows, cols] = (world.magnitude_mean[cols] + z).relu()
    if world.cfg.n_roots:
        for level in range(world.cfg.depth + 1):
            _gate_level(acts, world, level)
            _exclude_level(acts, world, level, g)
    return acts.relu()


def saelens_batch(world: SynthBenchWorld, n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """([n, d] x, [n, F] feature activations): SAELens's ``sample_with_features``."""
    acts = saelens_features(world, n, g)
    return acts @ world.directions + world.bias, acts
