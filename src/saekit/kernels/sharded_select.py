"""Selections over every part of a latent-sharded dictionary (:mod:`saekit.core.shard`): each
part proposes candidates from its own latents, every part gathers all proposals, and each then
knows which of ITS candidates the whole dictionary keeps.

Exact: a latent among the k largest of all M is among the k largest of its own part, so the
union of the parts' candidates holds every winner. Every part ranks the same gathered values
with the same ``topk``, so all agree on the winners (ties included) and exactly k (per row) or
``n_keep`` (overall) are kept.
"""

from __future__ import annotations

import torch
from torch import Tensor

from saekit.core.comm import Comm


def chosen_per_row(values_Nc: Tensor, k: int, comm: Comm, what: str) -> Tensor:
    """Which of this part's candidates [N, c] are among their row's k largest of every part's
    candidates (each part proposes c per row; −inf never wins over a finite value): bool
    [N, c]. One all-gather of [N, c] values."""
    every_PNc = comm.all_gather(values_Nc.detach().contiguous(), what)
    parts, n_rows, c = every_PNc.shape
    candidates = every_PNc.permute(1, 0, 2).reshape(n_rows, parts * c)
    winners = candidates.topk(k, dim=-1, sorted=False).indices
    hit = torch.zeros(n_rows, parts * c, dtype=torch.bool, device=values_Nc.device)
    hit.scatter_(1, winners, True)
    return hit[:, comm.rank * c : (comm.rank + 1) * c]


def kth_per_row(values_Nc: Tensor, k: int, comm: Comm, what: str) -> Tensor:
    """Each row's k-th largest value among every part's candidates [N, c] (the same on every
    part; −inf if fewer than k are finite): [N]. One all-gather of [N, c] values."""
    every_PNc = comm.all_gather(values_Nc.detach().contiguous(), what)
    parts, n_rows, c = every_PNc.shape
    candidates = every_PNc.permute(1, 0, 2).reshape(n_rows, parts * c)
    return candidates.topk(k, dim=-1, sorted=False).values.min(-1).values


def chosen_overall(values_C: Tensor, n_keep: int, comm: Comm, what: str) -> Tensor:
    """Which of this part's C candidates are among the ``n_keep`` largest of every part's
    (each part proposes C): bool [C]. One all-gather of [C] values."""
    every_PC = comm.all_gather(values_C.detach().contiguous(), what)
    winners = every_PC.reshape(-1).topk(n_keep, sorted=False).indices
    hit = torch.zeros(every_PC.numel(), dtype=torch.bool, device=values_C.device)
    hit.scatter_(0, winners, True)
    return hit.view_as(every_PC)[comm.rank]
