"""Per-latent top-k tokens with their context windows, in memory bounded by latents × slots.

A :class:`Slots` holds, for each of M latents, k slots ordered best first: a score, the token's
stream key, its activation, and a window of token ids and of the latent's activations around it.
Each batch is merged in with one sort of its candidates (the firing (token, latent) pairs, a
small share of the batch for sparse latents) and one sort of the 2k slots per latent
(vectorised over latents; nothing loops over tokens).

Two uses:

- top activations: score = the activation. **Tie rule**: larger activation first; equal
  activations, the token seen first in the stream first (smaller key; key = context number × T
  + position, T the context length).
- a uniform sample of the firing tokens (for quantile samples): score = -u, u ~ U(0, 1) per
  firing (token, latent) pair; keeping the k smallest u is a uniform sample without
  replacement of all firing tokens seen so far (the bottom-k sketch, Cohen & Kaplan 2007,
  "Summarizing data using bottom-k sketches", PODC).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

EMPTY_KEY = torch.iinfo(torch.int64).max
"""Key of an empty slot (score -inf)."""


def select_top(score_n: Tensor, latent_n: Tensor, n_latents: int, k: int) -> tuple[Tensor, Tensor]:
    """Per latent, its k best candidates: (scores [M, k], candidate indices [M, k]), ordered by
    score descending and, among equal scores, candidate index ascending; -inf and index 0 pad
    latents with fewer than k candidates.

    One stable sort by score, then one stable sort by latent: each latent's candidates end up
    contiguous, best first, ties in their original order; the first k of each group are kept.
    """
    by_score = score_n.sort(descending=True, stable=True).indices
    order_n = by_score[latent_n[by_score].sort(stable=True).indices]
    group_n = latent_n[order_n]
    counts_M = torch.bincount(group_n, minlength=n_latents)
    starts_M = counts_M.cumsum(0) - counts_M
    rank_n = torch.arange(order_n.numel()) - starts_M[group_n]
    kept = rank_n < k
    score_Mk = torch.full((n_latents, k), float("-inf"), dtype=torch.float64)
    index_Mk = torch.zeros(n_latents, k, dtype=torch.int64)
    score_Mk[group_n[kept], rank_n[kept]] = score_n[order_n[kept]].double()
    index_Mk[group_n[kept], rank_n[kept]] = order_n[kept]
    return score_Mk, index_Mk


@dataclass
class Slots:
    """k slots per latent in no particular order (:meth:`sorted`: best first); empty slots have
    score -inf and key :data:`EMPTY_KEY`."""

    score: Tensor
    """[M, k] the ordering score (float64)."""
    key: Tensor
    """[M, k] the token's stream key (int64)."""
    value: Tensor
    """[M, k] the latent's activation on the token."""
    tokens: Tensor
    """[M, k, W] token ids of the window (-1 outside the context)."""
    acts: Tensor
    """[M, k, W] the latent's activation on each window token (0 outside)."""
    aux: Tensor
    """[M, k] a per-(token, latent) value carried along (synthetic data: the coefficient of
    the latent's matched true feature on that token), 0 when none is given."""
    left: int
    """Window tokens before the selected one (it sits at index ``left``)."""

    @classmethod
    def empty(cls, n_latents: int, k: int, left: int, right: int) -> Slots:
        W = left + 1 + right
        return cls(
            score=torch.full((n_latents, k), float("-inf"), dtype=torch.float64),
            key=torch.full((n_latents, k), EMPTY_KEY, dtype=torch.int64),
            value=torch.zeros(n_latents, k),
            tokens=torch.full((n_latents, k, W), -1, dtype=torch.int64),
            acts=torch.zeros(n_latents, k, W),
            aux=torch.zeros(n_latents, k),
            left=left,
        )

    @property
    def filled(self) -> Tensor:
        """[M, k] which slots hold a token."""
        return torch.isfinite(self.score)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors())

    def _tensors(self) -> tuple[Tensor, ...]:
        return (self.score, self.key, self.value, self.tokens, self.acts, self.aux)

    @torch.no_grad()
    def update(
        self,
        score_n: Tensor,
        flat_n: Tensor,
        latent_n: Tensor,
        z_BTM: Tensor,
        ids_BT: Tensor,
        offset: int,
        aux_BTM: Tensor | None = None,
    ) -> None:
        """Merge one batch of contexts. Candidates: scores ``score_n`` of the (position
        ``flat_n`` = b·T + t, latent ``latent_n``) pairs, in ascending flat order for each
        latent; activations ``z_BTM``, token ids ``ids_BT``, optional ``aux_BTM`` (see
        :attr:`aux`); the batch's first token has stream key ``offset``.

        Slots are kept unordered (:meth:`sorted` orders them): a batch writes windows only into
        the slots its tokens take, so after the first batches a merge costs little more than
        its candidates."""
        B, T, M = z_BTM.shape
        k = self.score.shape[1]
        # A candidate scoring at most the worst kept one cannot enter: a tie goes to the kept,
        # earlier token. While a latent has an empty slot its worst is -inf.
        enters = score_n > self.score.min(dim=1).values[latent_n]
        score_n, flat_n, latent_n = score_n[enters], flat_n[enters], latent_n[enters]
        if score_n.numel() == 0:
            return
        best_Mk, cand_Mk = select_top(score_n, latent_n, M, k)
        key_Mk = torch.where(torch.isfinite(best_Mk), flat_n[cand_Mk] + offset, EMPTY_KEY)
        # The k best of kept + batch by (score desc, key asc): sort by key, then stably by score.
        score_M2k = torch.cat([self.score, best_Mk], dim=1)
        by_key = torch.cat([self.key, key_Mk], dim=1).argsort(dim=1, stable=True)
        by_score = score_M2k.gather(1, by_key).sort(dim=1, descending=True, stable=True).indices
        chosen = torch.zeros_like(score_M2k, dtype=torch.bool)
        chosen.scatter_(1, by_key.gather(1, by_score[:, :k]), True)
        # Each latent loses as many kept slots as batch tokens enter; nonzero lists both in
        # row-major order, so the i-th evicted slot and the i-th entering token share a latent.
        rows, slots = (~chosen[:, :k]).nonzero(as_tuple=True)
        cand = cand_Mk[chosen[:, k:]]
        flat = flat_n[cand]
        b, t = flat // T, flat % T
        pos_nW = t.unsqueeze(-1) + torch.arange(-self.left, self.tokens.shape[2] - self.left)
        inside_nW = (pos_nW >= 0) & (pos_nW < T)
        pos_nW = pos_nW.clamp(0, T - 1)
        b_nW = b.unsqueeze(-1).expand_as(pos_nW)
        self.score[rows, slots] = score_n[cand].double()
        self.key[rows, slots] = flat + offset
        self.value[rows, slots] = z_BTM[b, t, rows].float()
        self.tokens[rows, slots] = torch.where(inside_nW, ids_BT[b_nW, pos_nW], -1)
        acts_nW = z_BTM[b_nW, pos_nW, rows.unsqueeze(-1).expand_as(pos_nW)].float()
        self.acts[rows, slots] = torch.where(inside_nW, acts_nW, 0.0)
        if aux_BTM is not None:
            self.aux[rows, slots] = aux_BTM[b, t, rows].float()

    def sorted(self) -> Slots:
        """The slots of each latent best first: score descending, then key ascending (empty
        slots last)."""
        by_key = self.key.argsort(dim=1, stable=True)
        order = by_key.gather(
            1, self.score.gather(1, by_key).sort(dim=1, descending=True, stable=True).indices
        )
        return Slots(*(t.gather(1, _expand(order, t)) for t in self._tensors()), left=self.left)


def _expand(order_Mk: Tensor, like: Tensor) -> Tensor:
    """The [M, k] gather index broadcast over ``like``'s trailing dimensions."""
    shape = order_Mk.shape + like.shape[2:]
    return order_Mk.view(*order_Mk.shape, *([1] * (like.ndim - 2))).expand(shape)


class ActivationHistogram:
    """Per latent, an exact histogram of its nonzero activations over [0, hi) in ``n_bins``
    equal bins, hi found as the stream goes: hi starts at the first batch's largest activation
    and doubles (merging neighbouring bins) whenever an activation reaches it. Values equal to
    hi are counted in the last bin before doubling is needed, so hi ≥ every value seen."""

    def __init__(self, n_latents: int, n_bins: int = 32):
        if n_bins % 2:
            raise ValueError(f"histogram bins must be even (doubling merges pairs), got {n_bins}")
        self.counts = torch.zeros(n_latents, n_bins, dtype=torch.int64)
        self.hi = torch.zeros(n_latents, dtype=torch.float64)

    @torch.no_grad()
    def update(self, value_n: Tensor, latent_n: Tensor) -> None:
        """Add firing activations ``value_n`` (> 0) of latents ``latent_n``."""
        M, n_bins = self.counts.shape
        value_n = value_n.double()
        top_M = torch.zeros(M, dtype=torch.float64).scatter_reduce(
            0, latent_n, value_n, "amax", include_self=True
        )
        unset = (self.hi == 0) & (top_M > 0)
        self.hi = torch.where(unset, top_M, self.hi)
        while bool((grow_M := top_M > self.hi).any()):
            half = self.counts.view(M, n_bins // 2, 2).sum(-1)
            merged = torch.cat([half, torch.zeros_like(half)], dim=1)
            self.counts = torch.where(grow_M.unsqueeze(1), merged, self.counts)
            self.hi = torch.where(grow_M, self.hi * 2, self.hi)
        width_n = (self.hi / n_bins).clamp_min(torch.finfo(torch.float64).tiny)[latent_n]
        bin_n = (value_n / width_n).floor().clamp(0, n_bins - 1).long()
        flat = latent_n * n_bins + bin_n
        self.counts += torch.bincount(flat, minlength=M * n_bins).view(M, n_bins)
