"""Per-latent top-k tokens with their context windows, in memory bounded by latents × slots.

A :class:`Slots` holds, for each of M latents, k slots ordered best first: a score, the token's
stream key, its activation, and a window of token ids and of the latent's activations around it.
Each batch is merged in with one top-k per latent over the batch and one sort of the 2k
candidates per latent (vectorised over latents; nothing loops over tokens).

Two uses:

- top activations: score = the activation. **Tie rule**: larger activation first; equal
  activations, the token seen first in the stream first (smaller key; key = context number × T
  + position, T the context length).
- a uniform sample of the firing tokens (for quantile samples): score = -u, u ~ U(0, 1) per
  firing token; keeping the k smallest u is a uniform sample without replacement of all firing
  tokens seen so far (the bottom-k sketch, Cohen & Kaplan 2007, "Summarizing data using
  bottom-k sketches", PODC).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

EMPTY_KEY = torch.iinfo(torch.int64).max
"""Key of an empty slot (score -inf)."""


def select_top(score_MN: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(scores [M, k'], indices [M, k']) of each row's k' = min(k, N) best entries, ordered by
    score descending and, among equal scores, index ascending (exact, like a stable sort).

    ``topk`` alone picks an arbitrary subset of entries tied at the k-th score; rows where more
    entries equal the k-th score than were taken are re-selected with a stable full sort.
    """
    k = min(k, score_MN.shape[1])
    vals_Mk, idx_Mk = score_MN.topk(k, dim=1)
    kth_M1 = vals_Mk[:, -1:]
    spill_M = ((score_MN >= kth_M1).sum(1) > k) & torch.isfinite(kth_M1[:, 0])
    if bool(spill_M.any()):
        rows = spill_M.nonzero().flatten()
        ordered = score_MN[rows].sort(dim=1, descending=True, stable=True)
        vals_Mk[rows] = ordered.values[:, :k]
        idx_Mk[rows] = ordered.indices[:, :k]
    by_index = idx_Mk.argsort(dim=1)
    vals_Mk, idx_Mk = vals_Mk.gather(1, by_index), idx_Mk.gather(1, by_index)
    by_score = vals_Mk.sort(dim=1, descending=True, stable=True).indices
    return vals_Mk.gather(1, by_score), idx_Mk.gather(1, by_score)


@dataclass
class Slots:
    """k slots per latent, best first; empty slots have score -inf and key :data:`EMPTY_KEY`."""

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
        score_BTM: Tensor,
        z_BTM: Tensor,
        ids_BT: Tensor,
        offset: int,
        aux_BTM: Tensor | None = None,
    ) -> None:
        """Merge one batch of contexts: ``score_BTM`` (-inf where a token is no candidate),
        activations ``z_BTM``, token ids ``ids_BT`` and optional ``aux_BTM`` (see
        :attr:`aux`); the batch's first token has stream key ``offset``."""
        B, T, M = z_BTM.shape
        k, W = self.score.shape[1], self.tokens.shape[2]
        score_MN = score_BTM.reshape(B * T, M).T.double()
        best_Mk, flat_Mk = select_top(score_MN, k)
        b_Mk, t_Mk = flat_Mk // T, flat_Mk % T
        pos_MkW = t_Mk.unsqueeze(-1) + torch.arange(-self.left, W - self.left)
        inside_MkW = (pos_MkW >= 0) & (pos_MkW < T)
        pos_MkW = pos_MkW.clamp(0, T - 1)
        b_MkW = b_Mk.unsqueeze(-1).expand_as(pos_MkW)
        latent_MkW = torch.arange(M).view(M, 1, 1).expand_as(pos_MkW)
        tokens_MkW = torch.where(inside_MkW, ids_BT[b_MkW, pos_MkW], -1)
        acts_MkW = torch.where(inside_MkW, z_BTM[b_MkW, pos_MkW, latent_MkW].float(), 0.0)
        value_Mk = z_BTM[b_Mk, t_Mk, torch.arange(M).unsqueeze(-1)].float()
        aux_Mk = (
            torch.zeros_like(value_Mk)
            if aux_BTM is None
            else aux_BTM[b_Mk, t_Mk, torch.arange(M).unsqueeze(-1)].float()
        )
        key_Mk = torch.where(torch.isfinite(best_Mk), flat_Mk + offset, EMPTY_KEY)
        # Stable sort of [kept slots, batch]: every kept key precedes every batch key, and each
        # part is already ordered by (score desc, key asc), so ties keep the earlier token.
        score_M2k = torch.cat([self.score, best_Mk], dim=1)
        order_Mk = score_M2k.sort(dim=1, descending=True, stable=True).indices[:, :k]
        merged = (
            torch.cat([old, new], dim=1).gather(1, _expand(order_Mk, old))
            for old, new in zip(
                self._tensors(),
                (best_Mk, key_Mk, value_Mk, tokens_MkW, acts_MkW, aux_Mk),
                strict=True,
            )
        )
        self.score, self.key, self.value, self.tokens, self.acts, self.aux = merged


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
    def update(self, z_NM: Tensor) -> None:
        """Add the firing (> 0) activations of N tokens."""
        z_NM = z_NM.double()
        top_M = z_NM.max(dim=0).values.clamp_min(0)
        unset = (self.hi == 0) & (top_M > 0)
        self.hi = torch.where(unset, top_M, self.hi)
        n_bins = self.counts.shape[1]
        while bool((grow_M := top_M > self.hi).any()):
            half = self.counts.view(-1, n_bins // 2, 2).sum(-1)
            merged = torch.cat([half, torch.zeros_like(half)], dim=1)
            self.counts = torch.where(grow_M.unsqueeze(1), merged, self.counts)
            self.hi = torch.where(grow_M, self.hi * 2, self.hi)
        width_M = (self.hi / n_bins).clamp_min(torch.finfo(torch.float64).tiny)
        bin_NM = (z_NM / width_M).floor().clamp(0, n_bins - 1).long()
        fired_NM = z_NM > 0
        flat = bin_NM + torch.arange(z_NM.shape[1]) * n_bins
        self.counts += torch.bincount(flat[fired_NM], minlength=self.counts.numel()).view_as(
            self.counts
        )
