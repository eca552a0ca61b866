"""The objective of one part of a latent-sharded dictionary (saekit.core.shard): the same loss
as :mod:`saekit.objective.terms` computes for the whole dictionary, from this part's latents.

Every part computes, in order:

1. its partial sums, the terms that add over latents and that a loss needs whole: the decoder's
   Σ_{i here} z_i W_dec,i (Matryoshka: per block, [P, N, d]), AuxK's ê from the dead latents it
   keeps and its dead count, the "preact" revival's sum over its dead latents (at the WHOLE
   dictionary's firing threshold θ, ``Activation.firing_threshold_sharded``: TopK's per token
   takes one all-gather of [N, k] candidates, BatchTopK's one scalar MIN, JumpReLU's [M/T] is
   local) and its dead count, the quadratic L0 penalty's per-token L0_n;
2. ONE all-reduce (SUM over the latent group) of all of them at once
   (:func:`saekit.core.shard.sum_partials`), the step's only [N, d]-sized collective;
3. from the sums, the terms that are not additive over latents, identically on every part:
   the reconstruction (x̂ = Σ + b_dec, or every prefix's), AuxK (whose selection over the dead
   latents of every part takes one all-gather of [N, k_aux] candidates, before step 2), the
   quadratic L0 penalty;
4. its own share of the terms that add over latents (the penalties λ·mean_n Σ_i w_i f(·); the
   "preact" revival's Σ_{i dead here} / max(n_dead, 1), n_dead the group's, from the sums).

This part backpropagates (3) + (4): the gradient of (3) reaches its latents through the
all-reduce, whose backward is the identity; (4) concerns its latents only. The replicated
parameters' gradients are summed over the group by the step (saekit.train.latent_parallel).
Refused here, in one line: AuxK on a token subset (token_fraction < 1), the "preact" revival of
an activation without ``firing_threshold_sharded``, which have no sharded form yet, and an
activation with its own reconstruction or auxiliary loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from saekit.core.comm import Comm
from saekit.core.encoding import EncoderView, Encoding, Preacts, SparseCode
from saekit.core.shard import LatentShard, sum_partials
from saekit.kernels.layout import CodeLayout
from saekit.kernels.select import auxk_select
from saekit.kernels.sharded_select import chosen_per_row
from saekit.kernels.sparse import sparse_decode
from saekit.objective import losses, matryoshka, revival
from saekit.objective.config import (
    AuxKRevival,
    InputRevival,
    L0Penalty,
    PenaltyConfig,
    PreactRevival,
    QuadraticL0Penalty,
    RevivalConfig,
)
from saekit.objective.terms import ObjectiveActivation, build_objective, resolve_revival


class ShardedInputs(NamedTuple):
    """What one part's objective reads at one step."""

    activation: ObjectiveActivation
    view: EncoderView
    """This part's rows (W_enc, b_enc, W_dec) and the replicated b_dec, W_skip."""
    enc: Encoding
    """This part's latents (local indices) and pre-activations [N, M/T]."""
    x_n: Tensor
    target_n: Tensor
    dead_mask: Tensor
    """[M/T] this part's dead latents."""
    lam: Tensor
    prefixes: list[int] | None
    """Matryoshka prefix ends over the whole dictionary, or None."""
    dead_cols: Tensor | None
    """This part's superset of its dead latents (revival.DeadSet), or None: all."""
    dead_anywhere: bool
    """Whether some part of the group has a dead candidate (False: AuxK is exactly 0)."""
    shard: LatentShard
    decode: Callable[[Tensor | SparseCode], Tensor] | None = None
    """A dictionary whose decoder is not one [M, d_out] matrix (a cross-layer transcoder's
    part): its Σ z W_dec of this part's latents, [N, d_out] without b_dec; None: W_dec's."""


class ShardedResult(NamedTuple):
    loss: Tensor
    """What this part backpropagates."""
    x_hat_n: Tensor
    """[N, d_out] the whole dictionary's reconstruction (the same on every part)."""
    reconstruction: Tensor
    penalty: Tensor | None
    penalty_is_part: bool
    """True: ``penalty`` is this part's share (the group's sum is the penalty)."""
    revival: Tensor | None


def decode_part(latents: Tensor | SparseCode, W_dec_MD: Tensor) -> Tensor:
    """Σ_i z_i W_dec,i over the latents given (no b_dec): [N, d_out]."""
    if isinstance(latents, SparseCode):
        return sparse_decode(
            latents.values, latents.latent, latents.token, W_dec_MD, latents.n_tokens,
            latents.layout,
        )  # fmt: skip
    return latents @ W_dec_MD


def auxk_part(
    preacts: Preacts,
    W_dec_MD: Tensor | None,
    dead_mask_M: Tensor,
    dead_cols: Tensor | None,
    k_aux: int,
    shard: LatentShard,
    decode: Callable[[Tensor, CodeLayout], Tensor] | None = None,
) -> Tensor:
    """This part's share of AuxK's ê [N, d_out]: its dead latents among each token's k_aux
    largest dead pre-activations of EVERY part (revival.auxk_loss's selection, made across
    parts: each proposes its own top-k_aux, padded with −∞ where it has fewer columns; over
    all of a CLT's layers at once, as one process's). ``decode``: the dictionary's own
    (revival.auxk_loss)."""
    pre_NM = preacts.detached
    cols = torch.arange(pre_NM.shape[1], device=pre_NM.device) if dead_cols is None else dead_cols
    pre_NC = pre_NM.index_select(1, cols)  # a copy: masked in place below
    index_Nc, _, value_Nc = auxk_select(pre_NC, dead_mask_M[cols], k_aux, overwrite=True)
    pad = k_aux - index_Nc.shape[1]
    latent_Nk = torch.cat([cols[index_Nc], index_Nc.new_zeros(index_Nc.shape[0], pad)], 1)
    value_Nk = torch.cat([value_Nc, value_Nc.new_full((value_Nc.shape[0], pad), -math.inf)], 1)
    kept_Nk = chosen_per_row(value_Nk, k_aux, shard.comm, "AuxK candidates") & (value_Nk > 0)
    return revival.selected_decode(preacts, latent_Nk, kept_Nk, value_Nk, W_dec_MD, decode=decode)


def batch_variance(e_ND: Tensor, data: Comm) -> Tensor | None:
    """AuxK's normaliser V = mean_n ‖e_n − ē‖² over the WHOLE batch, every data group's tokens
    (Σ_n e_n and Σ_n ‖e_n‖² summed over the data group in float64: one all-reduce of d + 1
    numbers), so AuxK's "residual" normaliser is one process's with D > 1 too; None (the
    group's own tokens are the batch) with one data group."""
    if data.world_size == 1:
        return None
    e64 = e_ND.double()
    sums = data.all_reduce(torch.cat([e64.sum(0), e64.square().sum().reshape(1)]), "sum",
                           "AuxK residual variance")  # fmt: skip
    n_tokens = e_ND.shape[0] * data.world_size
    mean_D = sums[:-1] / n_tokens
    return (sums[-1] / n_tokens - mean_D.square().sum()).to(e_ND.dtype)


class ShardedObjective:
    """One part's loss (module docstring), built from the same config as the whole
    dictionary's :func:`saekit.objective.terms.build_objective`, whose checks run first."""

    def __init__(
        self,
        activation: type[ObjectiveActivation],
        penalty: PenaltyConfig | None,
        revival_cfg: RevivalConfig | None,
        reconstruction_tilt: float = 0.0,
    ):
        build_objective(
            activation, penalty, revival_cfg, reconstruction_tilt=reconstruction_tilt
        )  # one process's
        kind = activation.config_class.kind
        if reconstruction_tilt:  # each token's error needs the parts' summed reconstruction
            raise ValueError("reconstruction_tilt has no latent-sharded form yet (parallel.latent)")
        revival_cfg = resolve_revival(revival_cfg, activation)
        if isinstance(revival_cfg, PreactRevival) and not activation.overrides(
            "firing_threshold_sharded"
        ):
            raise ValueError(
                f"revival.kind 'preact' has no latent-sharded form for sae.activation.kind "
                f"{kind!r} yet (parallel.latent > 1): use auxk or input"
            )
        if isinstance(revival_cfg, AuxKRevival) and revival_cfg.token_fraction < 1:
            raise ValueError(
                "revival.token_fraction < 1 has no latent-sharded form yet (the parts would "
                "draw their token subsets apart): use 1 with parallel.latent"
            )
        self.blocks = activation.overrides("reconstruction_loss")
        for hook, sharded in (("reconstruction_loss", "reconstruction_blocks"),
                              ("auxiliary_loss", None)):  # fmt: skip
            if activation.overrides(hook) and not (sharded and activation.overrides(sharded)):
                raise ValueError(
                    f"sae.activation.kind {kind!r} has its own {hook}, which has no "
                    "latent-sharded form yet (parallel.latent)"
                )
        self.penalty = penalty
        self.auxk = revival_cfg if isinstance(revival_cfg, AuxKRevival) else None
        self.preact = revival_cfg if isinstance(revival_cfg, PreactRevival) else None

    def __call__(self, s: ShardedInputs) -> ShardedResult:
        view, enc, shard = s.view, s.enc, s.shard
        latents, W_dec = enc.latents, view.W_dec
        n_tokens, d_out = s.x_n.shape[0], s.target_n.shape[1]
        quadratic = isinstance(self.penalty, QuadraticL0Penalty)
        auxk = self.auxk is not None and s.dead_anywhere
        # 1. the partial sums, in one flat buffer
        if self.blocks:  # the activation's own blocks (HierarchicalTopK: rank positions)
            parts = [s.activation.reconstruction_blocks(view, latents, shard)]
        elif s.prefixes is None:
            parts = [decode_part(latents, W_dec) if s.decode is None else s.decode(latents)]
        else:
            parts = [matryoshka.block_deltas(latents, W_dec, s.prefixes, shard.offset, shard.d_sae)]
        if auxk:
            n_latents = enc.preacts.detached.shape[1] * shard.count  # a CLT's: L·M
            k_aux = revival.auxk_k(self.auxk.k_aux, d_out, n_latents)
            parts.append(auxk_part(enc.preacts, W_dec, s.dead_mask, s.dead_cols, k_aux, shard,
                                   view.decode_code))  # fmt: skip
            parts.append(s.dead_mask.sum().reshape(1))  # n_dead, detached
        preact_share = None
        if self.preact is not None:  # this part's dead latents, at the whole dictionary's θ
            theta = s.activation.firing_threshold_sharded(enc, shard)
            preact_share = revival.dead_preact_sum(
                enc.preacts, s.dead_mask, theta, view.decoder_norms()
            )
            parts.append(preact_share.detach().reshape(1))  # for the logged whole
            parts.append(s.dead_mask.sum().reshape(1))  # n_dead
        steps_NM = None
        if isinstance(self.penalty, L0Penalty):
            steps_NM = s.activation.l0_step(enc.preacts)
            if quadratic:
                parts.append(steps_NM.sum(-1))  # L0_n, this part's share
        dtype = parts[0].dtype
        flat = torch.cat([p.reshape(-1).to(dtype) for p in parts])
        # 2. ONE all-reduce: the step's only [N, d]-sized collective
        sums = iter(sum_partials(flat, shard.comm, "decoder partial sums").split(
            [p.numel() for p in parts]
        ))  # fmt: skip
        # 3. the terms computed from the sums, the same on every part
        offset = view.decoder_offset_n(s.x_n)
        if s.prefixes is None and not self.blocks:
            x_hat_n = next(sums).view(n_tokens, d_out) + offset
            rec = losses.reconstruction_loss(s.target_n, x_hat_n)
        else:  # the mean of every prefix's error (Matryoshka; the activation's blocks)
            delta_PND = next(sums).view(-1, n_tokens, d_out)
            rec = matryoshka.prefix_mse(delta_PND, s.target_n - offset).mean()
            x_hat_n = delta_PND.sum(0) + offset
        revival_value = None
        if self.auxk is not None:
            revival_value = x_hat_n.new_zeros(())  # no dead candidate anywhere: exactly 0
        if auxk:
            e_hat_ND, n_dead = next(sums).view(n_tokens, d_out), next(sums)[0]
            if isinstance(self.auxk, InputRevival):
                e_ND = revival.input_target(s.target_n, offset)
            else:
                e_ND = (s.target_n - x_hat_n).detach()
            cfg = self.auxk
            variance = batch_variance(e_ND, shard.data) if cfg.normalizer == "residual" else None
            revival_value = revival.auxk_value(
                e_ND, e_hat_ND, e_ND, n_dead, k_aux, cfg.coefficient, cfg.normalizer, variance
            )
        revival_loss = revival_value
        if preact_share is not None:  # L = Σ_t share_t / max(n_dead, 1): this part's term
            whole, n_dead = next(sums)[0], next(sums)[0].clamp_min(1.0)
            revival_loss = self.preact.coefficient * preact_share / n_dead
            revival_value = self.preact.coefficient * whole / n_dead
        # 4. this part's share of the penalty (the quadratic L0 penalty: from the sums)
        penalty = None
        if self.penalty is not None:
            weights = None
            if s.prefixes is not None:
                every = matryoshka.prefix_weights(s.prefixes, shard.d_sae, W_dec)
                weights = every[shard.offset : shard.offset + shard.width]
            if quadratic:
                penalty = s.lam * losses.quadratic_l0_of(next(sums), self.penalty.target_l0)
            elif steps_NM is not None:
                penalty = s.lam * losses.l0_penalty(steps_NM, weights)
            else:
                penalty = s.lam * losses.sparsity_penalty(
                    s.activation.penalty_latents(enc), view.decoder_norms(), self.penalty, weights
                )
        loss = rec + sum(t for t in (penalty, revival_loss) if t is not None)
        return ShardedResult(loss, x_hat_n, rec, penalty, not quadratic, revival_value)
