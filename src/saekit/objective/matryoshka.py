"""Matryoshka SAEs (Bussmann et al. 2025; Nabeshima, "Efficient Matryoshka loss calculation",
docs/references/matryoshka-efficient-loss.txt): every prefix of the latents must
reconstruct on its own, all prefixes from one pass.

Prefixes p_1 < … < p_P = M. Per block j, δ_j = Σ_{p_{j−1} ≤ i < p_j} z_i W_dec,i and
x̂_{p_j} = b_dec + Σ_{j' ≤ j} δ_j'. Reconstruction L = (1/P) Σ_j mean_n ‖x_n − x̂_{p_j}‖².
A penalty averaged over prefixes, (1/P) Σ_j S_{p_j}, equals the plain penalty with per-latent
weights w_i = #{j : i < p_j} / P (:func:`prefix_weights`), so the penalties need no block code.

Two options of fixed levels (``matryoshka: {kind: fixed, detach_inner, level_k}``; issue 27
item 5: 2026 Matryoshka results on SynthSAEBench-16k, the benchmark of arXiv 2602.14687; the
formulas below are saekit's statement of them, no source text is in docs/references):
- detached inner levels: x̂_{p_j} = b_dec + sg(Σ_{j' < j} δ_j') + δ_j, so a block is trained for
  reconstruction by the first level that contains it alone (:func:`matryoshka_reconstruction_loss`);
- decreasing K across levels: level j decodes only the k_j largest latents below p_j
  (:func:`level_code`, :func:`level_reconstruction_loss`).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from saekit.core.encoding import SparseCode
from saekit.kernels.layout import CodeLayout
from saekit.kernels.prefix import prefix_mse
from saekit.kernels.sparse import sparse_decode
from saekit.objective.losses import (
    tilted_mean,
    tilted_reconstruction_loss,
    token_squared_errors,
)


@functools.lru_cache(maxsize=64)
def prefix_length_probs(d_sae: int, min_prefix: int = 1, alpha: float = 0.5) -> Tensor:
    """P(l) ∝ ((l−m+1)/(M−m+1))^a − ((l−m)/(M−m+1))^a for m ≤ l < M (float64, [M − m]);
    cached, so callers must not write into it."""
    if not 1 <= min_prefix < d_sae:
        raise ValueError(f"min_prefix must be in [1, d_sae), got {min_prefix} for d_sae={d_sae}")
    span = d_sae - min_prefix + 1
    steps = torch.arange(d_sae - min_prefix + 1, dtype=torch.float64) / span  # (l−m)/(M−m+1)
    cdf = steps.pow(alpha)
    probs = cdf[1:] - cdf[:-1]  # l = m … M−1
    return probs / probs.sum()


def sample_prefixes(
    d_sae: int,
    n_prefixes: int,
    min_prefix: int = 1,
    alpha: float = 0.5,
    generator: torch.Generator | None = None,
) -> list[int]:
    """P − 1 distinct lengths from :func:`prefix_length_probs` (without replacement), plus M.

    Sorted, ending with M. Drawn on the host (prefixes are Python ints: they slice tensors).
    """
    if n_prefixes < 1:
        raise ValueError(f"n_prefixes must be at least 1, got {n_prefixes}")
    if n_prefixes == 1:
        return [d_sae]
    probs = prefix_length_probs(d_sae, min_prefix, alpha)  # cached; sampling does not write
    if n_prefixes - 1 > probs.numel():
        raise ValueError(f"cannot draw {n_prefixes - 1} distinct prefixes from {probs.numel()}")
    draws = torch.multinomial(probs, n_prefixes - 1, replacement=False, generator=generator)
    return sorted((draws + min_prefix).tolist()) + [d_sae]


def fixed_prefixes(group_sizes: Sequence[int]) -> list[int]:
    """Prefix ends of consecutive latent groups: sizes [a, b, c] → [a, a+b, a+b+c]."""
    if not group_sizes or any(int(g) <= 0 for g in group_sizes):
        raise ValueError(f"group sizes must be positive, got {list(group_sizes)}")
    ends, total = [], 0
    for size in group_sizes:
        total += int(size)
        ends.append(total)
    return ends


def _check_prefixes(prefixes: Sequence[int] | Tensor, d_sae: int) -> list[int]:
    ends = [int(p) for p in (prefixes.tolist() if isinstance(prefixes, Tensor) else prefixes)]
    if not ends or ends[-1] != d_sae or any(b <= a for a, b in itertools.pairwise([0, *ends])):
        raise ValueError(f"prefixes must increase strictly and end at d_sae={d_sae}, got {ends}")
    return ends


def prefix_weights(prefixes: Sequence[int], d_sae: int, like: Tensor) -> Tensor:
    """w_i = #{j : i < p_j} / P, [M]: the weight of latent i in a prefix-averaged penalty."""
    ends = _check_prefixes(prefixes, d_sae)
    counts_M = torch.zeros(d_sae, dtype=like.dtype, device=like.device)
    for end in ends:
        counts_M[:end] += 1
    return counts_M / len(ends)


def block_deltas(
    latents: Tensor | SparseCode,
    W_dec_MD: Tensor,
    prefixes: Sequence[int],
    first_latent: int = 0,
    d_sae: int | None = None,
) -> Tensor:
    """δ_j = Σ_{p_{j−1} ≤ i < p_j} z_i W_dec,i for every block: [P, N, d].

    Dense latents: one matmul per block slice. SparseCode: bucket entries by block, one sort by
    (block, token), one sparse decode into [P·N, d]; never a [P, N, M] or dense [N, M] tensor.
    ``first_latent``, ``d_sae``: the latents and rows given are latents [first_latent, first_latent
    + rows) of a dictionary of ``d_sae`` (one part of a latent-sharded one, saekit.core.shard),
    whose prefixes these are; the blocks then hold this part's share of each δ_j (0 where a block
    has none of its latents).
    """
    rows = W_dec_MD.shape[0]
    ends = _check_prefixes(prefixes, rows if d_sae is None else d_sae)
    n_prefixes = len(ends)
    if isinstance(latents, SparseCode):
        n_tokens = latents.n_tokens
        device = latents.values.device
        boundaries = torch.tensor(ends[:-1], dtype=latents.latent.dtype, device=device)
        global_E = latents.latent + first_latent if first_latent else latents.latent
        block_E = torch.bucketize(global_E, boundaries, right=True)  # p_{j−1} ≤ i < p_j
        bag_E, order = (block_E * n_tokens + latents.token).sort()
        latent_E = latents.latent[order]
        n_bags = n_prefixes * n_tokens
        layout = CodeLayout(bag_E, latent_E, n_bags, rows)
        deltas = sparse_decode(latents.values[order], latent_E, bag_E, W_dec_MD, n_bags, layout)
        return deltas.view(n_prefixes, n_tokens, -1)
    z_NM = latents.reshape(-1, latents.shape[-1])
    bounds = [min(max(p - first_latent, 0), rows) for p in [0, *ends]]
    return torch.stack([z_NM[:, a:b] @ W_dec_MD[a:b] for a, b in itertools.pairwise(bounds)])


def matryoshka_reconstruction_loss(
    x_n: Tensor,
    latents: Tensor | SparseCode,
    W_dec_MD: Tensor,
    b_dec_D: Tensor,
    prefixes: Sequence[int],
    *,
    tilt: float = 0.0,
    detach_inner: bool = False,
) -> Tensor:
    """(1/P) Σ_j mean_n ‖x_n − x̂_{p_j}‖², every prefix from one pass (block deltas and the
    running sums of :func:`saekit.kernels.prefix.prefix_mse`). ``x_n``: the target;
    ``b_dec_D``: what every prefix starts from, b_dec [d] or a per-token offset [N, d]
    (b_dec + x_n W_skipᵀ of a skip transcoder).

    ``tilt`` t ≠ 0 (``reconstruction_tilt``): (1/P) Σ_j R_j(t), each level's per-token errors
    tilted on their own (:func:`saekit.objective.losses.tilted_mean`, its own m_j), by a plain
    running sum over the levels (prefix_mse only sums each level's errors).

    ``detach_inner`` (detached inner levels): x̂_{p_j} = b_dec + sg(Σ_{j' < j} δ_j') + δ_j. The
    value is the same; the outer levels' errors no longer pull the inner latents (and their
    decoder rows) toward fixing what the outer latents miss — inner latents absorbing outer
    features is the failure mode it targets. b_dec stays live in every level."""
    d = W_dec_MD.shape[-1]
    delta_PND = block_deltas(latents, W_dec_MD, prefixes)
    if tilt:
        return tilted_levels(delta_PND, x_n.reshape(-1, d) - b_dec_D, tilt, detach_inner)
    return prefix_mse(delta_PND, x_n.reshape(-1, d) - b_dec_D, detach_inner).mean()


def tilted_levels(
    delta_PND: Tensor, r_ND: Tensor, tilt: float, detach_inner: bool = False
) -> Tensor:
    """(1/P) Σ_j R_j(t), R_j the tilted mean (losses.tilted_mean) of level j's per-token errors
    ‖r_n − Σ_{j' ≤ j} δ_j',n‖², r = target − offset: the levels' running sum, one level at a
    time (prefix_mse's kernel keeps only each level's total, not its tokens'); ``detach_inner``:
    the inner levels' sum under sg, as in :func:`matryoshka_reconstruction_loss`."""
    levels, sum_ND = [], torch.zeros_like(r_ND)
    for delta_ND in delta_PND:
        pred_ND = (sum_ND.detach() if detach_inner else sum_ND) + delta_ND
        levels.append(tilted_mean(token_squared_errors(r_ND, pred_ND), tilt))
        sum_ND = sum_ND + delta_ND
    return torch.stack(levels).mean()


def level_code(
    latents: Tensor | SparseCode, end: int, k: int, per_token: bool
) -> Tensor | SparseCode:
    """The code of a level with its own K (decreasing K across levels): the latents restricted
    to the k largest |z_i| with i < ``end``, per token (``per_token``; a TopK's) or the k·N
    largest of the whole batch (a BatchTopK's); every other entry an exact 0. The same form and
    shape as given (a SparseCode keeps its entries and layout: only values change), so nothing
    syncs with the host. The activation says which selection is its own
    (``Activation.level_code``). Ties: any of the tied entries (torch.topk / a stable sort)."""
    if isinstance(latents, SparseCode):
        values_E = latents.values
        key_E = values_E.detach().abs().masked_fill(latents.latent >= end, -math.inf)
        n_entries = key_E.numel()
        if per_token:  # rank within the token: sort by key (descending), then stably by token
            by_key = key_E.argsort(descending=True, stable=True)
            order = by_key[latents.token[by_key].argsort(stable=True)]
            token_sorted = latents.token[order]
            first = torch.searchsorted(token_sorted, token_sorted, right=False)
            rank_sorted = torch.arange(n_entries, device=key_E.device) - first
            rank_E = torch.empty_like(rank_sorted).scatter_(0, order, rank_sorted)
            keep_E = rank_E < k
        else:
            keep_E = torch.zeros(n_entries, dtype=torch.bool, device=key_E.device)
            n_keep = min(k * latents.n_tokens, n_entries)
            keep_E[key_E.topk(n_keep, sorted=False).indices] = True
        keep_E &= latents.latent < end
        kept = torch.where(keep_E, values_E, torch.zeros_like(values_E))
        return latents._replace(values=kept)
    z_NM = latents.reshape(-1, latents.shape[-1])
    inside_M = torch.arange(z_NM.shape[1], device=z_NM.device) < end
    key_NM = z_NM.detach().abs().masked_fill(~inside_M, -math.inf)
    keep_NM = torch.zeros_like(key_NM, dtype=torch.bool)
    if per_token:
        keep_NM.scatter_(1, key_NM.topk(min(k, key_NM.shape[1]), dim=1).indices, True)
    else:
        n_keep = min(k * z_NM.shape[0], key_NM.numel())
        keep_NM.view(-1)[key_NM.reshape(-1).topk(n_keep, sorted=False).indices] = True
    return torch.where(keep_NM & inside_M, z_NM, torch.zeros_like(z_NM))


def level_reconstruction_loss(
    x_n: Tensor,
    level_latents: Sequence[Tensor | SparseCode],
    W_dec_MD: Tensor,
    b_dec_D: Tensor,
    prefixes: Sequence[int],
    detach_inner: bool = False,
    *,
    tilt: float = 0.0,
) -> Tensor:
    """(1/P) Σ_j mean_n ‖x_n − x̂_j‖² (with ``tilt`` t ≠ 0: each level's tilted mean,
    losses.tilted_reconstruction_loss) with level j's own code S_j (decreasing K across levels:
    :func:`level_code` of the k_j largest below p_j; the last level's is the full code):

        x̂_j = b_dec + Σ_{i ∈ S_j, i < p_{j−1}} z_i W_dec,i + Σ_{i ∈ S_j, i ≥ p_{j−1}} z_i W_dec,i

    ``detach_inner``: the first sum (the inner blocks' latents that level j keeps) under sg, so
    a latent's reconstruction gradient comes from the first level that contains its block, as
    in :func:`matryoshka_reconstruction_loss` (whose numbers this gives when every S_j is the
    full code below p_j). The levels are not nested sums (S_{j−1} ⊄ S_j: a block-j latent can
    outrank an inner one), so each level is decoded on its own (two blocks, one decode)."""
    ends = _check_prefixes(prefixes, W_dec_MD.shape[0])
    if len(level_latents) != len(ends):
        raise ValueError(f"{len(level_latents)} level codes for {len(ends)} prefixes")
    d = W_dec_MD.shape[-1]
    r_ND = x_n.reshape(-1, d) - b_dec_D
    total = r_ND.new_zeros(())
    for start, latents in zip([0, *ends[:-1]], level_latents, strict=True):
        # [inner (i < start), own (i ≥ start)]; the code holds nothing at or past p_j
        halves = block_deltas(latents, W_dec_MD, [start, ends[-1]] if start else [ends[-1]])
        own_ND = halves[-1]
        inner_ND = halves[0].detach() if detach_inner else halves[0]
        pred_ND = own_ND + inner_ND if start else own_ND
        total = total + tilted_reconstruction_loss(r_ND, pred_ND, tilt)
    return total / len(ends)


def frequency_order(counts_M: Tensor) -> Tensor:
    """Frequency-sorted levels (``matryoshka.sort_every``; issue 27 item 5): the permutation
    [M] (int64) that puts the latents that fired most often first, ties in their current order
    (a stable sort), so new latent j is old latent perm[j].

    Why: a Matryoshka level's latents should hold the general, frequent features (Bussmann et
    al. 2025, arXiv 2503.17547: the inner dictionaries learn general concepts); a frequent
    feature learnt by an outer latent otherwise stays there, since nothing moves a feature
    between latents. Reordering is free: the SAE computes the same function
    (saekit.model.latent_order.permute_latents_)."""
    return torch.sort(counts_M, descending=True, stable=True).indices
