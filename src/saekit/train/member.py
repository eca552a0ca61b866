"""One SAE of a run: its optimizer, dead-latent counters, λ controller and prefix generator.

The training step (``Member.train_step``), top to bottom; the trainer (:mod:`saekit.train.trainer`)
calls it for every SAE on every batch:

1. learning rate of this step (warm-up, decay);
2. dead mask from the counters *before* this batch is counted;
3. forward and loss (the objective's terms);
4. backward; data parallel: ``comm.all_reduce`` of the gradients (avg, one bucket per dtype);
5. (TopK family) drop the gradient parallel to decoder rows; clip; Adam; (TopK family)
   renormalise decoder rows;
6. dead-latent counters: which latents fired (data parallel: ``comm.all_reduce`` max, and the
   counters add the global batch);
7. the activation's own state (``after_step``: BatchTopK's θ, its batch minimum combined with
   ``comm.all_reduce`` min);
8. the λ controller (data parallel: on L0 averaged with ``comm.all_reduce`` avg);
9. (``matryoshka.sort_every``) firing counts (data parallel: ``comm.all_reduce`` sum), and
   every N steps the latents sorted by them (:meth:`Member.count_and_sort`).

``comm`` is the member's, given in the constructor: the collectives of the ranks that share this
SAE's batches (:func:`saekit.train.parallel.batch_comm`); one process, or a sweep: the identity
:class:`~saekit.core.comm.LocalComm`, and no collective runs. Nothing in a step syncs with the
host, except AuxK's dead-column set (``revival.DeadSet``): one host transfer every 25 steps.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from saekit.core.comm import Comm, LocalComm
from saekit.eval.metrics import batch_fvu, latent_counts
from saekit.model.dictionary import build_dictionary
from saekit.model.latent_order import permute_latents_
from saekit.objective import losses, matryoshka
from saekit.objective.config import FixedPrefixes, RandomPrefixes
from saekit.objective.revival import DeadSet
from saekit.objective.terms import TermInputs
from saekit.train.member_config import SAETrainConfig


class StepMetrics(NamedTuple):
    """One step's detached metrics of one SAE (0-d tensors; None where a term is absent)."""

    loss: Tensor
    reconstruction: Tensor
    """The reconstruction term (Matryoshka: the mean over prefixes; reconstruction_tilt t ≠ 0:
    the tilted R(t), losses.tilted_mean; FVU stays untilted)."""
    penalty: Tensor | None
    """The penalty's contribution λ·S."""
    revival: Tensor | None
    """The revival term's contribution."""
    l0: Tensor
    """Mean active latents per token (z ≠ 0)."""
    fvu: Tensor
    """The batch's fraction of variance unexplained (eval.metrics.batch_fvu)."""
    dead_fraction: Tensor
    """Share of latents dead at the start of the step."""
    lam: Tensor
    """λ of the penalty (0 without one)."""

    def as_dict(self) -> dict[str, Tensor]:
        return {k: v for k, v in self._asdict().items() if v is not None}


def lr_factor(step: int, total_steps: int, warmup_steps: int, decay_start: float) -> float:
    """Linear warm-up from 0, constant, then linear decay to 0 over the last (1 − decay_start)."""
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    decay_from = decay_start * total_steps
    if step < decay_from or total_steps <= decay_from:
        return warm
    return warm * max(0.0, (total_steps - step) / (total_steps - decay_from))


class Member:
    """One SAE of a run with its optimizer, counters, controller and prefix generator; ``comm``
    combines its step over the ranks that share its batches (default: one process)."""

    def __init__(
        self,
        cfg: SAETrainConfig,
        total_steps: int,
        device: torch.device | str,
        comm: Comm | None = None,
    ):
        self.cfg = cfg
        self.comm: Comm = comm if comm is not None else LocalComm()
        self.total_steps = total_steps
        gen = torch.Generator().manual_seed(cfg.seed)
        self.sae = build_dictionary(cfg.sae, device="cpu")  # an SAE, a CLT, a crosscoder
        self.sae.reset_parameters(generator=gen)
        self.sae.to(device)
        self.device = torch.device(device)
        self.optimizer = torch.optim.Adam(
            [p for p in self.sae.parameters() if p.requires_grad],
            lr=cfg.learning_rate,
            betas=cfg.adam_betas,
            fused=True,  # reads its step count on the device: the default Adam calls .item()
        )
        M = cfg.sae.n_latents
        self.tokens_since_fired = torch.zeros(M, dtype=torch.int64, device=self.device)
        self.dead_set = DeadSet(cfg.dead_tokens)  # AuxK's candidate columns, host-refreshed
        self.prefix_generator = torch.Generator().manual_seed(cfg.seed + 1)
        # frequency-sorted levels: each latent's firing tokens since the last sort
        self.sort_every = getattr(cfg.matryoshka, "sort_every", 0)
        self.fire_counts = torch.zeros(M, dtype=torch.int64, device=self.device)
        self.objective = cfg.objective()
        penalty = cfg.penalty
        # λ at least fp32, and float64 for a float64 SAE (0.3 must not become 0.30000001).
        lam_dtype = torch.promote_types(getattr(torch, cfg.sae.dtype), torch.float32)
        self.controller = None
        if penalty is not None and penalty.controller_target is not None:
            if penalty.controller == "autotune":  # the SynthSAEBench experiments' controller
                self.controller = losses.Autotuner(
                    penalty.coefficient, penalty.controller_target, penalty.controller_rate,
                    start=penalty.controller_start, dtype=lam_dtype,
                )  # fmt: skip
            else:
                self.controller = losses.LambdaController(
                    penalty.coefficient,
                    penalty.controller_target,
                    rate=penalty.controller_rate,
                    dtype=lam_dtype,
                )
        lam = penalty.coefficient if penalty is not None else 0.0
        self.penalty_coefficient = torch.tensor(lam, dtype=lam_dtype, device=self.device)
        self.initialised = False

    def init_from_data(self, batch: Tensor, scale: float | None = None) -> None:
        x, target = self.sae.split_stream(batch)
        self.sae.init_from_data(x, scale=scale, method=self.cfg.b_dec_init, target=target)
        self.initialised = True

    def share_initial_state(self) -> None:
        """After the data-dependent initialisation, data parallel: rank 0's SAE (scale, b_dec,
        weights) on every rank, one broadcast per dtype."""
        if self.comm.world_size == 1:
            return
        tensors = list(self.sae.state_dict().values())
        for dtype in sorted({t.dtype for t in tensors}, key=str):  # the same order on every rank
            same = [t for t in tensors if t.dtype == dtype]
            bucket = torch.cat([t.reshape(-1) for t in same])
            self.comm.broadcast(bucket, 0, f"initial {self.cfg.name}")
            offset = 0
            for t in same:
                t.copy_(bucket[offset : offset + t.numel()].view_as(t))
                offset += t.numel()

    def dead_mask(self) -> Tensor:
        return self.tokens_since_fired >= self.cfg.dead_tokens

    def prefixes(self) -> list[int] | None:
        spec = self.cfg.matryoshka
        if isinstance(spec, RandomPrefixes):
            return matryoshka.sample_prefixes(
                self.cfg.sae.n_latents,
                spec.n_prefixes,
                min_prefix=spec.min_prefix,
                generator=self.prefix_generator,
            )
        if isinstance(spec, FixedPrefixes):
            return matryoshka.fixed_prefixes(spec.groups)
        return None

    def lambda_value(self) -> Tensor:
        return self.controller.lam if self.controller is not None else self.penalty_coefficient

    def train_step(self, batch: Tensor, step: int) -> StepMetrics:
        """One optimisation step on ``batch`` [N, d] (a transcoder's: [N, d_in + d_out], input
        then target, SAE.split_stream), as the module docstring lists; returns detached
        metrics."""
        cfg, sae, comm = self.cfg, self.sae, self.comm
        sae.train()
        factor = lr_factor(step, self.total_steps, cfg.warmup_steps, cfg.decay_start)
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.learning_rate * factor
        dead = self.dead_mask()  # before this batch is counted
        unit_norm = sae.activation.unit_norm_decoder
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.autocast_bf16)
        with autocast:
            out = sae(*sae.split_stream(batch))
            lam = self.lambda_value()  # the λ this step's penalty uses (logged as such)
            if cfg.penalty is not None and cfg.penalty.warmup_steps:
                lam = lam * losses.warmup_factor(step, cfg.penalty.warmup_steps)
            dead_cols = self.dead_set.get(self.tokens_since_fired, batch.shape[0])
            inputs = TermInputs(sae, out, dead, lam, self.prefixes(), dead_cols)
            loss, terms = self.objective(inputs)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if comm.world_size > 1:
            self.average_gradients()
        if unit_norm:
            sae.remove_parallel_grad_()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
        self.optimizer.step()
        if unit_norm:
            sae.normalize_decoder_()

        with torch.no_grad():
            per_token, per_latent = latent_counts(out.latents)
            fired, n_tokens = per_latent > 0, batch.shape[0]
            if comm.world_size > 1:  # fired on any rank; the counters add the global batch
                fired = comm.all_reduce(fired.to(torch.uint8), "max", "fired mask").bool()
                n_tokens *= comm.world_size
            self.update_counters(fired, n_tokens)
            sae.activation.after_step(out.encoding, comm)
            if self.sort_every:
                self.count_and_sort(per_latent, step)
            l0 = per_token.double().mean()
            if self.controller is not None:
                self.controller.step(comm.all_reduce(l0.clone(), "avg", "L0"))
            penalty, revival = terms.get("penalty"), terms.get("revival")
            return StepMetrics(
                loss=loss.detach().double(),
                reconstruction=terms["reconstruction"].detach().double(),
                penalty=None if penalty is None else penalty.detach().double(),
                revival=None if revival is None else revival.detach().double(),
                l0=l0,
                fvu=batch_fvu(out.target_n, out.x_hat_n).double(),
                dead_fraction=dead.double().mean(),
                lam=lam.double(),
            )

    def average_gradients(self) -> None:
        """Average every gradient over ranks in ONE all-reduce per dtype (one in practice).

        Sparse grads are densified. Which parameters have a gradient is decided by the code path,
        which is the same on every rank (the step never branches on data), so ``None`` grads are
        simply left out and stay ``None``, and Adam skips what one process would skip.
        """
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for p in self.sae.parameters():
            if p.requires_grad and p.grad is not None:
                by_dtype.setdefault(p.dtype, []).append(p)
        for group in by_dtype.values():
            bucket = torch.cat(
                [(p.grad.to_dense() if p.grad.is_sparse else p.grad).reshape(-1) for p in group]
            )  # [Σ numel]
            self.comm.all_reduce(bucket, "avg", f"gradients of {self.cfg.name}")
            offset = 0
            for p in group:
                p.grad = bucket[offset : offset + p.numel()].view_as(p)
                offset += p.numel()

    def update_counters(self, fired: Tensor, n_tokens: int) -> None:
        """Reset counters of latents that fired; add the batch's tokens to the others."""
        self.tokens_since_fired = torch.where(
            fired, torch.zeros_like(self.tokens_since_fired), self.tokens_since_fired + n_tokens
        )
        self.dead_set.count(n_tokens, self.tokens_since_fired)

    def count_and_sort(self, per_latent: Tensor, step: int) -> None:
        """Frequency-sorted levels (``matryoshka.sort_every``): add the step's firing counts
        (data parallel: the global batch's, one sum over ranks, so every rank sorts alike), and
        after every ``sort_every``-th step sort the latents by them."""
        if self.comm.world_size > 1:
            per_latent = self.comm.all_reduce(per_latent.contiguous(), "sum", "firing counts")
        self.fire_counts += per_latent
        if (step + 1) % self.sort_every == 0:
            self.permute_latents_(matryoshka.frequency_order(self.fire_counts))
            self.fire_counts.zero_()

    @torch.no_grad()
    def permute_latents_(self, perm: Tensor) -> None:
        """Reorder the latents (new latent j is old latent perm[j]) in everything per-latent:
        the SAE's tensors (model.latent_order.permute_latents_), their optimizer state of
        their own shape (Adam's exp_avg and exp_avg_sq), the dead counters, AuxK's dead columns and
        the firing counts. The SAE's function and its next step are the same, permuted."""
        for p in permute_latents_(self.sae, perm):
            for value in self.optimizer.state.get(p, {}).values():
                if isinstance(value, Tensor) and value.dim() and value.shape == p.shape:
                    value.copy_(value.index_select(0, perm))
        before = self.tokens_since_fired
        self.tokens_since_fired = before.index_select(0, perm)
        self.dead_set.permute_(perm, before, self.tokens_since_fired)
        self.fire_counts = self.fire_counts.index_select(0, perm)

    # ------------------------------------------------------------------ state

    def state_tensors(self) -> dict[str, Tensor]:
        """Everything resumable that is a tensor (the SAE unfolded, optimizer moments...)."""
        state = {f"sae.{k}": v for k, v in self.sae.state_dict().items()}
        opt = self.optimizer.state_dict()
        for idx, pstate in opt["state"].items():
            for key, value in pstate.items():
                state[f"opt.{idx}.{key}"] = torch.as_tensor(value)
        state["tokens_since_fired"] = self.tokens_since_fired
        if self.sort_every:
            state["fire_counts"] = self.fire_counts
        state["prefix_generator"] = self.prefix_generator.get_state()
        if self.controller is not None:
            for key, value in self.controller.state_dict().items():
                # float64: as float32, rate 0.01 would resume as 0.00999999977
                state[f"controller.{key}"] = torch.as_tensor(value, dtype=torch.float64)
        return state

    def state_meta(self) -> dict:
        opt = self.optimizer.state_dict()
        return {"param_groups": opt["param_groups"], "initialised": self.initialised}

    def load_state(self, tensors: dict[str, Tensor], meta: dict) -> None:
        sae_state = {k[4:]: v for k, v in tensors.items() if k.startswith("sae.")}
        self.sae.load_state_dict(sae_state)
        opt_state: dict[int, dict[str, Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("opt."):
                _, idx, name = key.split(".", 2)
                opt_state.setdefault(int(idx), {})[name] = value.to(self.device)
        self.optimizer.load_state_dict({"state": opt_state, "param_groups": meta["param_groups"]})
        self.tokens_since_fired = tensors["tokens_since_fired"].to(self.device)
        if self.sort_every:
            self.fire_counts = tensors["fire_counts"].to(self.device)
        self.prefix_generator.set_state(tensors["prefix_generator"])
        if self.controller is not None:
            self.controller.load_state_dict(
                {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("controller.")}
            )
        self.initialised = meta["initialised"]
