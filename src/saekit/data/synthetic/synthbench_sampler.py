"""Sparse batches of a SynthSAEBench world (saekit.data.synthetic.synthbench_world): no
dense [N, F] draw.

A token fires about Σ p_i ≈ 35 of the F = 16,384 features, so a batch is drawn as a list of
(token, feature, value) entries, top-down:

1. Roots and free features. Without correlation, feature i's count over the batch is
   Binomial(N, p_i) at distinct uniform positions (features with p ≥ ``DENSE_COLUMN_P``, a
   few dozen, draw their column densely). With the low-rank copula, feature i fires on token
   n with p_ni = Φ̄((t_i − ε_n·w_i)/s_i): candidates are drawn the same way at the batch bound
   q_i = max_n p_ni and kept with probability p_ni / q_i (thinning: exact).
2. Magnitudes ReLU(μ_i + σ_i·N(0,1)); entries that come out 0 do not fire. BOS-like tokens
   (share ``bos_share``) lose every entry.
3. Level by level, children are drawn only under firing parents. Given ε a child's copula
   variable is independent of its parent's, so this has the distribution of drawing every
   feature and then gating (the compensated child rates are near 1, which is why the dense
   draw would need thousands of raw firings per token). A child's magnitude is scaled by
   parent value / parent mean (v2), and one uniformly random winner is kept among a token's
   firing siblings (mutual exclusion).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import Tensor

from saekit.data.synthetic.generator import batch_seed
from saekit.data.synthetic.saelens_sampler import saelens_batch
from saekit.data.synthetic.saelens_world import load_saelens_world
from saekit.data.synthetic.synthbench_world import SynthBenchConfig, SynthBenchWorld

DENSE_COLUMN_P = 0.05
"""Features whose candidate rate reaches this draw their column densely (distinct positions
by rejection get slow as a count nears N)."""


class SparseFirings(NamedTuple):
    token: Tensor
    """[E] token index of each firing."""
    feature: Tensor
    """[E] feature index."""
    value: Tensor
    """[E] magnitude (> 0)."""
    n_tokens: int

    def dense(self, n_features: int) -> Tensor:
        """[N, F] coefficients."""
        out = torch.zeros(self.n_tokens, n_features)
        out[self.token, self.feature] = self.value
        return out


class SynthBenchBatch(NamedTuple):
    x: Tensor
    """[N, d] activations."""
    firings: SparseFirings
    """The true features behind x."""
    bos: Tensor
    """[N] bool: BOS-like tokens."""


def _normal_sf(z: Tensor) -> Tensor:
    """Φ̄(z) = P(N(0,1) > z)."""
    return 0.5 * torch.erfc(z / math.sqrt(2))


def distinct_positions(counts_F: Tensor, n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """(feature [C], position [C]): counts_F[i] distinct uniform positions in [0, n) per feature.

    Drawn with replacement, then duplicates redrawn until none remain: the accepted set is
    uniform over the subsets of that size (every ordering is equally likely).
    """
    feature = torch.repeat_interleave(torch.arange(counts_F.numel()), counts_F)
    position = torch.randint(n, (feature.numel(),), generator=g)
    while True:
        key = feature * n + position
        sorted_key, order = torch.sort(key)
        dup = torch.zeros_like(key, dtype=torch.bool)
        dup[order[1:]] = sorted_key[1:] == sorted_key[:-1]
        n_dup = int(dup.sum())
        if n_dup == 0:
            return feature, position
        position[dup] = torch.randint(n, (n_dup,), generator=g)


def sparse_bernoulli(prob_F: Tensor, n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """(token, feature) of independent Bernoulli(prob_F[i]) draws over n tokens, sparsely."""
    dense_cols = torch.nonzero(prob_F >= DENSE_COLUMN_P).flatten()
    sparse_p = torch.where(prob_F >= DENSE_COLUMN_P, torch.zeros_like(prob_F), prob_F)
    counts = torch.binomial(torch.full_like(sparse_p, float(n)), sparse_p, generator=g).long()
    feature, token = distinct_positions(counts, n, g)
    if dense_cols.numel():
        u = torch.rand(n, dense_cols.numel(), generator=g)
        tok_d, col_d = torch.nonzero(u < prob_F[dense_cols].float(), as_tuple=True)
        token = torch.cat([token, tok_d])
        feature = torch.cat([feature, dense_cols[col_d]])
    return token, feature


def _conditional_probability(
    world: SynthBenchWorld, eps_NR: Tensor | None, token: Tensor, feature: Tensor
) -> Tensor:
    """[E] P(feature fires on token | ε_token) = Φ̄((t_i − ε_n·w_i)/s_i); p_i without copula."""
    if eps_NR is None:
        return world.probabilities[feature].float()
    w, s, t = world.factor, world.own_std, world.thresholds
    a_E = (eps_NR[token] * w[feature]).sum(-1)
    return _normal_sf((t[feature] - a_E) / s[feature])


def _top_level_firings(
    world: SynthBenchWorld, top_F: Tensor, eps_NR: Tensor | None, n: int, g: torch.Generator
) -> tuple[Tensor, Tensor]:
    """(token, feature) of the roots and free features (``top_F`` indices), sparsely.

    With the copula, candidates come at the batch bound q_i = max_n p_ni and are kept with
    probability p_ni / q_i (thinning: exact).
    """
    if eps_NR is None:
        token, local = sparse_bernoulli(world.probabilities[top_F], n, g)
        return token, top_F[local]
    w, s, t = world.factor[top_F], world.own_std[top_F], world.thresholds[top_F]
    a_NF = eps_NR @ w.T  # [n, F_top] the shared part of each copula variable (no draw)
    q_F = _normal_sf((t - a_NF.amax(0)) / s).double()
    token, local = sparse_bernoulli(q_F, n, g)
    feature = top_F[local]
    p_E = _normal_sf((t[local] - a_NF[token, local]) / s[local])
    keep = torch.rand(token.numel(), generator=g) * q_F[local].float() < p_E
    return token[keep], feature[keep]


def _magnitudes(world: SynthBenchWorld, feature: Tensor, g: torch.Generator) -> Tensor:
    """[E] ReLU(μ_i + σ_i·N(0,1))."""
    mean, std = world.magnitude_mean[feature], world.magnitude_std[feature]
    return (mean + std * torch.randn(feature.numel(), generator=g)).relu()


def _one_winner(group: Tensor, g: torch.Generator) -> Tensor:
    """[E] bool: one uniformly random True per distinct value of ``group``."""
    score = torch.rand(group.numel(), generator=g)
    by_score = torch.argsort(score)
    by_group = by_score[torch.sort(group[by_score], stable=True).indices]
    ranked_group = group[by_group]
    winner_sorted = torch.ones_like(ranked_group, dtype=torch.bool)
    winner_sorted[:-1] = ranked_group[:-1] != ranked_group[1:]  # the last (highest) of a group
    winner = torch.zeros_like(winner_sorted)
    winner[by_group] = winner_sorted
    return winner


def _children_of(
    world: SynthBenchWorld,
    eps_NR: Tensor | None,
    token: Tensor,
    parent: Tensor,
    parent_value: Tensor,
    g: torch.Generator,
) -> tuple[Tensor, Tensor, Tensor]:
    """The next level under firing parents: each child drawn given ε (conditionally
    independent of its parent, as in the dense copula), scaled by parent value / parent mean
    (v2), then one random winner among a token's firing siblings (mutual exclusion)."""
    b = world.cfg.branching
    tok = token.repeat_interleave(b)
    par = parent.repeat_interleave(b)
    child = world.first_child[par] + torch.arange(b).repeat(parent.numel())
    p_E = _conditional_probability(world, eps_NR, tok, child)
    value = _magnitudes(world, child, g)
    fires = (torch.rand(child.numel(), generator=g) < p_E) & (value > 0)
    if world.cfg.scale_children:
        scale = parent_value / world.magnitude_mean[parent]
        scale = torch.where(world.scales_children[parent], scale, torch.ones_like(scale))
        value = value * scale.repeat_interleave(b)
    tok, par, child, value = tok[fires], par[fires], child[fires], value[fires]
    win = _one_winner(tok * world.cfg.n_features + par, g)
    win = win | ~world.exclusive[par]  # a parent without mutual exclusion keeps every child
    return tok[win], child[win], value[win]


class SynthBenchData:
    """Batches of a world: ``batch(i, n)`` is a pure function of (cfg.seed, stream_seed, i, n)."""

    def __init__(self, cfg: SynthBenchConfig, stream_seed: int = 0, world=None):
        if world is None:
            world = load_saelens_world(cfg) if cfg.world_path else SynthBenchWorld(cfg)
        self.cfg = world.cfg if cfg.world_path else cfg  # a read world's own shape
        self.world = world
        self.stream_seed = stream_seed

    @property
    def directions(self) -> Tensor:
        return self.world.directions

    @property
    def parent_of(self) -> Tensor:
        return self.world.parent

    def firings(self, n: int, g: torch.Generator) -> tuple[SparseFirings, Tensor]:
        world = self.world
        eps_NR = (
            None if world.factor is None else torch.randn(n, world.factor.shape[1], generator=g)
        )
        token, feature = _top_level_firings(world, world.top_level, eps_NR, n, g)
        value = _magnitudes(world, feature, g)
        bos = torch.rand(n, generator=g) < self.cfg.bos_share
        keep = (value > 0) & ~bos[token]
        tokens, features, values = [token[keep]], [feature[keep]], [value[keep]]
        for level in range(1, world.cfg.depth + 1 if world.cfg.n_roots else 1):
            at = world.depth[features[-1]] == level - 1
            tok, child, val = _children_of(
                world, eps_NR, tokens[-1][at], features[-1][at], values[-1][at], g
            )
            tokens.append(tok)
            features.append(child)
            values.append(val)
        firings = SparseFirings(torch.cat(tokens), torch.cat(features), torch.cat(values), n)
        return firings, bos

    def generator_seed(self, index: int) -> int:
        """The seed of batch ``index``'s generator (with sampler saelens, SAELens's
        ``torch.manual_seed(s); sample(n)`` makes the same batch: saelens_sampler)."""
        return batch_seed(self.cfg.seed ^ (self.stream_seed << 32), index)

    def batch(self, index: int, n: int) -> SynthBenchBatch:
        g = torch.Generator().manual_seed(self.generator_seed(index))
        if self.cfg.sampler == "saelens":  # SAELens's own draws (saelens_sampler)
            x, acts = saelens_batch(self.world, n, g)
            token, feature = acts.nonzero(as_tuple=True)
            firings = SparseFirings(token, feature, acts[token, feature], n)
            return SynthBenchBatch(x, firings, torch.zeros(n, dtype=torch.bool))
        firings, bos = self.firings(n, g)
        coeffs = torch.sparse_coo_tensor(
            torch.stack([firings.token, firings.feature]),
            firings.value,
            (n, self.cfg.n_features),
            check_invariants=False,
        )
        x = torch.sparse.mm(coeffs, self.directions) + self.world.bias  # [N, d]
        return SynthBenchBatch(x, firings, bos)

    def stream(self, batch_size: int, start: int = 0) -> Iterator[Tensor]:
        index = start
        while True:
            yield self.batch(index, batch_size).x
            index += 1
