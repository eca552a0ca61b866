"""One process's part of a dictionary whose latents are split over processes (latent
parallelism, :mod:`saekit.train.latent_parallel`), and the two autograd pieces that make its
step exact.

Latent rank t of T holds latents [t·M/T, (t+1)·M/T): rows of W_enc, b_enc, W_dec and of the
activation's per-latent parameters. Everything else (b_dec, W_skip, the scales) is replicated.

- :func:`sum_partials`: the sum over the latent group of each part's partial sums (the decoder's
  Σ_i z_i W_dec,i and what else adds over latents), ONE all-reduce forward; backward the
  identity, since every part computes the same loss from the same sum, so each already holds
  the whole gradient of that sum (Megatron-LM's "g" operator, Shoeybi et al. 2019, §3).
- :func:`scale_grad`: a replicated parameter used after that sum (b_dec in the decoder offset,
  W_skip) gets the same gradient on every part, while one used before it (b_dec as the encoder's
  centre) gets only this part's share. Scaling the first by 1/T lets one SUM over the group of
  the replicated gradients give exactly (replicated part) + Σ_t (part t's share).

Imports nothing from saekit but the ``Comm`` protocol.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from saekit.core.comm import Comm


class LatentShard(NamedTuple):
    """Where this process's latents sit in the dictionary, and whom it selects them with."""

    comm: Comm
    """The latent group: the T processes holding the other latents of the same tokens."""
    world: Comm
    """Every process of the run (D data groups × T): BatchTopK selects over the whole batch."""
    data: Comm
    """The data group: the D processes holding this part for the other tokens of the batch."""
    index: int
    """t, this part's latent rank."""
    count: int
    """T, the number of parts."""
    d_sae: int
    """M, the latents of the whole dictionary."""

    @property
    def width(self) -> int:
        """M / T latents here."""
        return self.d_sae // self.count

    @property
    def offset(self) -> int:
        """The global index of this part's first latent, t·M/T."""
        return self.index * self.width


def single_shard(d_sae: int, comm: Comm) -> LatentShard:
    """The whole dictionary on one part (T = 1): ``comm`` is then the identity."""
    return LatentShard(comm, comm, comm, 0, 1, d_sae)


class _SumPartials(torch.autograd.Function):
    @staticmethod
    def forward(ctx, partial: Tensor, comm: Comm, what: str) -> Tensor:
        total = partial.detach().clone().contiguous()
        return comm.all_reduce(total, "sum", what)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None, None


def sum_partials(partial: Tensor, comm: Comm, what: str = "partial sums") -> Tensor:
    """Σ over the latent group of ``partial`` (a new tensor); the gradient passes unchanged."""
    if comm.world_size == 1:
        return partial
    return _SumPartials.apply(partial, comm, what)


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, factor: float) -> Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.factor, None


def scale_grad(x: Tensor, factor: float) -> Tensor:
    """``x`` forward; its gradient multiplied by ``factor`` backward (1: ``x`` itself)."""
    if factor == 1.0:
        return x
    return _ScaleGrad.apply(x, factor)
