"""One SAE's part under latent parallelism: its latents [t·M/T, (t+1)·M/T), its optimizer state
and dead counters, and the step that makes the T parts (× D data groups) train exactly as one
process trains the whole SAE on the whole batch.

The step (:meth:`LatentMember.train_step`), top to bottom, with its collectives (latent group:
the T parts of one batch; data group: the D copies of one part; world: all D·T):

1. learning rate; dead mask of this part's latents;
2. encode: local pre-activations [N, M/T], the activation's sharded selection
   (``Activation.encode_sharded``: TopK one all-gather of [N, k] candidates over the latent
   group; BatchTopK one of ~k·N over the world; ReLU/JumpReLU none);
3. the objective (:mod:`saekit.objective.sharded`): AuxK's all-gather of [N, k_aux] candidates
   (only while some part has a dead candidate), then the ONE all-reduce of the step's partial
   sums over the latent group (the decoder's Σ z W_dec [N, d_out], Matryoshka's per-block
   [P, N, d_out], AuxK's ê, the quadratic penalty's L0_n): a SUM, because x̂ = b_dec + Σ_t
   (part t's sum) is linear in the parts, and the loss needs x̂ whole on every part; reducing
   the [N, d_out] sums costs the same whatever M, where gathering the [N, M/T] latents would
   grow with M;
4. backward; the gradients of this part's rows averaged over the data group; the replicated
   parameters' (b_dec, W_skip) summed over the world and divided by D (their uses after the
   all-reduce carry 1/T, :func:`saekit.core.shard.scale_grad`, so the sum adds the decoder's
   gradient once and every part's encoder share);
5. parallel-gradient removal (per row, local), clipping at the global norm (one scalar
   all-reduce over the latent group), Adam, decoder renormalisation (local);
6. dead counters: fired mask MAX over the data group, counters add the whole batch;
7. the activation's state over the world (BatchTopK: MIN of the batch minimum);
8. one small all-reduce over the world of [L0, dead share, penalty] (each part's share), for the
   λ controller (global L0) and the logs.

Initialisation is exact too: a part draws the rows of one process's random decoder
(:func:`saekit.train.latent_parts.normal_rows`), never the whole matrix.

A crosscoder's part is a crosscoder of M/T latents (an SAE over the concatenated sources: its
partial sums are [N, S·d]); a cross-layer transcoder's part holds M/T latents of EVERY layer
(W_enc [L, M/T, d_in], W_dec[l] [M/T, L − l, d_out]): TopK selects per (token, layer) across
the parts, BatchTopK the k·N largest across all layers, and its partial sums are the
concatenated prediction [N, L·d_out] (saekit.train.latent_parts, docs/design.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor

from saekit.core.comm import Comm
from saekit.core.encoding import EncoderView, Encoding, SparseCode
from saekit.core.shard import LatentShard, scale_grad
from saekit.eval.metrics import batch_fvu, latent_counts
from saekit.model.clt import CrossLayerTranscoder
from saekit.objective.revival import DeadSet
from saekit.objective.sharded import ShardedInputs, ShardedObjective
from saekit.train.latent_parts import Axis, flat_groups, init_part_, latent_axes
from saekit.train.member import Member, StepMetrics, lr_factor
from saekit.train.member_config import SAETrainConfig
from saekit.train.mesh import Mesh


class GroupDeadSet(DeadSet):
    """A part's DeadSet, which also knows whether ANY part of its latent group has a dead
    candidate (one MAX over the group at each refresh, which every part makes at the same step:
    the tokens counted are the same everywhere)."""

    def __init__(self, dead_tokens: int, comm: Comm):
        super().__init__(dead_tokens)
        self.comm = comm
        self.anywhere = True

    def get(self, counters_M: Tensor, batch_tokens: int) -> Tensor:
        before = self.columns
        columns = super().get(counters_M, batch_tokens)
        if columns is not before:
            flag = torch.tensor([int(columns.numel() > 0)], device=columns.device)
            self.anywhere = bool(self.comm.all_reduce(flag, "max", "dead columns").item())
        return columns


class LatentMember(Member):
    """A Member holding one part of its dictionary (``self.sae``: d_sae = M / T, a CLT's per
    layer; ``self.cfg``: the whole dictionary's config; saekit.train.latent_parts)."""

    def __init__(
        self, cfg: SAETrainConfig, total_steps: int, device: torch.device | str, mesh: Mesh
    ):
        M, T = cfg.sae.d_sae, mesh.T
        part = dataclasses.replace(cfg, sae=dataclasses.replace(cfg.sae, d_sae=M // T))
        super().__init__(part, total_steps, device, mesh.world)
        self.cfg, self.mesh = cfg, mesh
        self.shard = LatentShard(mesh.latent, mesh.world, mesh.data, mesh.latent_index, T, M)
        init_part_(self.sae, cfg.seed, self.shard)
        self.dead_set = GroupDeadSet(cfg.dead_tokens, mesh.latent)
        self.objective = ShardedObjective(
            type(self.sae.activation), cfg.penalty, cfg.revival, cfg.reconstruction_tilt
        )
        self.axes = latent_axes(self.sae)
        self.part_names = set(self.axes)

    # ------------------------------------------------------------------ state

    def share_initial_state(self) -> None:
        """The replicated tensors (scale, b_dec, whitening) from world rank 0 on every rank;
        the parts' rows are already the same in each data group (drawn from the seed)."""
        if self.mesh.world.world_size == 1:
            return
        tensors = [v for k, v in self.sae.state_dict().items() if k not in self.part_names]
        for dtype in sorted({t.dtype for t in tensors}, key=str):  # the same order on every rank
            same = [t for t in tensors if t.dtype == dtype]
            bucket = torch.cat([t.reshape(-1) for t in same])
            self.mesh.world.broadcast(bucket, 0, f"initial {self.cfg.name}")
            offset = 0
            for t in same:
                t.copy_(bucket[offset : offset + t.numel()].view_as(t))
                offset += t.numel()

    def part_state_axes(self) -> dict[str, Axis]:
        """Keys of :meth:`state_tensors` holding this part's latents (the dictionary's
        per-latent tensors, their Adam moments, the dead counters) and the axis they lie along
        (saekit.train.latent_parts); the rest is replicated."""
        axes = {f"sae.{n}": axis for n, axis in self.axes.items()}
        axes["tokens_since_fired"] = (0, flat_groups(self.sae))
        names = [n for n, p in self.sae.named_parameters() if p.requires_grad]
        for idx, name in enumerate(names):
            if name in self.axes:
                axes |= {
                    f"opt.{idx}.exp_avg": self.axes[name],
                    f"opt.{idx}.exp_avg_sq": self.axes[name],
                }
        return axes

    def part_state_keys(self) -> set[str]:
        return set(self.part_state_axes())

    # ------------------------------------------------------------------ the step

    def encoder_view(self) -> EncoderView:
        """This part's view (its dictionary's: its rows), with the replicated b_dec and W_skip
        whose uses after the all-reduce (the decoder offset) carry 1/T of their gradient
        (core.shard.scale_grad); an encoder's centre (b_dec of an SAE, a crosscoder) keeps its
        own gradient, this part's share."""
        view, f = self.sae.encoder_view(), 1.0 / self.mesh.T
        W_skip = None if view.W_skip is None else scale_grad(view.W_skip, f)
        return view._replace(b_dec=scale_grad(view.b_dec, f), W_skip=W_skip)

    def encode(self, view: EncoderView, x_n: Tensor) -> Encoding:
        """This part's sharded selection: a CLT's from its L encoders' pre-activations
        (per layer; Activation.encode_preacts_sharded), the others' from the affine view."""
        activation = self.sae.activation
        if isinstance(self.sae, CrossLayerTranscoder):
            return activation.encode_preacts_sharded(self.sae.preacts(x_n), self.shard)
        return activation.encode_sharded(view, x_n, self.shard)

    def part_sum(self) -> Callable[[Tensor | SparseCode], Tensor] | None:
        """A CLT part's Σ z W_dec into every target (its ragged decoders), else None (the
        objective's one-matrix decode)."""
        return self.sae.latent_sum_n if isinstance(self.sae, CrossLayerTranscoder) else None

    def train_step(self, batch: Tensor, step: int) -> StepMetrics:
        """One step on this data group's rows ``batch`` [N, d] (module docstring)."""
        cfg, sae, mesh = self.cfg, self.sae, self.mesh
        sae.train()
        factor = lr_factor(step, self.total_steps, cfg.warmup_steps, cfg.decay_start)
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.learning_rate * factor
        dead = self.dead_mask()
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.autocast_bf16)
        with autocast:
            x, target = sae.split_stream(batch)
            x_n = sae.normalise(x)
            target_n = x_n if target is None else sae.normalise_target(target)
            view = self.encoder_view()
            enc = self.encode(view, x_n)
            lam = self.lambda_value()
            dead_cols = self.dead_set.get(self.tokens_since_fired, batch.shape[0])
            result = self.objective(
                ShardedInputs(
                    sae.activation, view, enc, x_n, target_n, dead, lam, self.prefixes(),
                    dead_cols, self.dead_set.anywhere, self.shard, self.part_sum(),
                )
            )  # fmt: skip
        self.optimizer.zero_grad(set_to_none=True)
        result.loss.backward()
        self.reduce_gradients()
        if sae.activation.unit_norm_decoder:
            sae.remove_parallel_grad_()
        if cfg.grad_clip > 0:
            self.clip_gradients(cfg.grad_clip)
        self.optimizer.step()
        if sae.activation.unit_norm_decoder:
            sae.normalize_decoder_()

        with torch.no_grad():
            per_token, per_latent = latent_counts(enc.latents)
            fired = per_latent > 0
            if mesh.D > 1:  # fired in any data group; the counters add the whole batch
                fired = mesh.data.all_reduce(fired.to(torch.uint8), "max", "fired mask").bool()
            self.update_counters(fired, batch.shape[0] * mesh.D)
            sae.activation.after_step(enc, mesh.world)
            penalty = result.penalty
            shares = [per_token.double().mean(), dead.double().sum() / cfg.sae.n_latents]
            if penalty is not None:  # a share, or the same on every part (the quadratic one)
                shares.append(penalty.detach().double() / (1 if result.penalty_is_part else mesh.T))
            totals = mesh.world.all_reduce(torch.stack(shares), "sum", "L0 and penalty") / mesh.D
            l0, dead_fraction = totals[0], totals[1]
            penalty = totals[2] if penalty is not None else None
            if self.controller is not None:
                self.controller.step(l0)
            rec, revival = result.reconstruction.detach().double(), result.revival
            revival = None if revival is None else revival.detach().double()
            loss = rec + sum(t for t in (penalty, revival) if t is not None)
            return StepMetrics(
                loss=loss,
                reconstruction=rec,
                penalty=penalty,
                revival=revival,
                l0=l0,
                fvu=batch_fvu(target_n, result.x_hat_n).double(),
                dead_fraction=dead_fraction,
                lam=lam.double(),
            )

    def reduce_gradients(self) -> None:
        """This part's rows: averaged over the data group; the replicated parameters: summed
        over the world, divided by D. One bucket per (kind, dtype)."""
        mesh = self.mesh
        rows, shared = [], []
        for name, p in self.sae.named_parameters():
            if p.requires_grad and p.grad is not None:
                (rows if name in self.part_names else shared).append(p)
        if mesh.D > 1:
            _bucket_reduce(rows, mesh.data, "avg", f"gradients of {self.cfg.name}", 1)
        if mesh.world.world_size > 1:
            _bucket_reduce(
                shared, mesh.world, "sum", f"shared gradients of {self.cfg.name}", mesh.D
            )

    def clip_gradients(self, max_norm: float) -> None:
        """``clip_grad_norm_`` at the norm of the WHOLE SAE's gradient: Σ over parts of the
        rows' squared norms (one scalar all-reduce) plus the replicated ones' (counted once)."""
        rows_sq, shared_sq = [], []
        for name, p in self.sae.named_parameters():
            if p.grad is not None:
                sq = torch.linalg.vector_norm(p.grad).double().square()
                (rows_sq if name in self.part_names else shared_sq).append(sq)
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        parts = sum(rows_sq, zero.clone())
        total = self.mesh.latent.all_reduce(parts, "sum", "gradient norm") + sum(shared_sq, zero)
        # torch.nn.utils.clip_grad_norm_'s rule: scale by max / (norm + 1e-6) when below 1
        coef = (max_norm / (total.sqrt() + 1e-6)).clamp(max=1.0)
        for p in self.sae.parameters():
            if p.grad is not None:
                p.grad.mul_(coef.to(p.grad.dtype))


def _bucket_reduce(params: list, comm: Comm, op: str, what: str, divide: int) -> None:
    """All-reduce the gradients of ``params`` in one bucket per dtype, then divide."""
    by_dtype: dict[torch.dtype, list] = {}
    for p in params:
        by_dtype.setdefault(p.dtype, []).append(p)
    for group in by_dtype.values():
        bucket = torch.cat([p.grad.reshape(-1) for p in group])
        comm.all_reduce(bucket, op, what)  # type: ignore[arg-type]
        if divide != 1:
            bucket.div_(divide)
        offset = 0
        for p in group:
            p.grad = bucket[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
