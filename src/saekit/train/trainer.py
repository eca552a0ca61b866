"""The trainer: one activation stream feeds many SAEs, each with its own objective and optimizer.

Per step and per SAE (``Member.train_step``): forward; dead mask from the counters *before* this
batch is counted; loss; backward; (TopK family) drop the gradient parallel to decoder rows; clip;
Adam; (TopK family) renormalise decoder rows; update the dead-latent counters, the BatchTopK
threshold and the λ controller. Nothing in a step syncs with the host; logging reads all metrics
of an interval in one transfer.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from saekit import losses
from saekit.activations import BatchTopK, SparseCode
from saekit.eval.metrics import latent_counts
from saekit.sae import SAE
from saekit.train.config import RunConfig, SAETrainConfig
from saekit.train.distributed import LocalComm
from saekit.train.objective import training_loss

TOPK_FAMILY = ("topk", "batchtopk")


class TrainingInterrupted(RuntimeError):
    """Raised after a SIGINT/SIGTERM once the checkpoint is written."""


def lr_factor(step: int, total_steps: int, warmup_steps: int, decay_start: float) -> float:
    """Linear warm-up from 0, constant, then linear decay to 0 over the last (1 − decay_start)."""
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    decay_from = decay_start * total_steps
    if step < decay_from or total_steps <= decay_from:
        return warm
    return warm * max(0.0, (total_steps - step) / (total_steps - decay_from))


class Member:
    """One SAE of a run with its optimizer, counters, controller and prefix generator."""

    def __init__(self, cfg: SAETrainConfig, total_steps: int, device: torch.device | str):
        self.cfg = cfg
        self.total_steps = total_steps
        gen = torch.Generator().manual_seed(cfg.seed)
        self.sae = SAE(cfg.sae, device="cpu")
        self.sae.reset_parameters(generator=gen)
        self.sae.to(device)
        self.device = torch.device(device)
        self.optimizer = torch.optim.Adam(
            [p for p in self.sae.parameters() if p.requires_grad],
            lr=cfg.learning_rate,
            betas=cfg.adam_betas,
            fused=True,  # reads its step count on the device: the default Adam calls .item()
        )
        M = cfg.sae.d_sae
        self.tokens_since_fired = torch.zeros(M, dtype=torch.int64, device=self.device)
        self.prefix_generator = torch.Generator().manual_seed(cfg.seed + 1)
        self.controller = (
            losses.LambdaController(
                cfg.penalty_coefficient, cfg.target_l0, rate=cfg.controller_rate
            )
            if cfg.target_l0 is not None and cfg.penalty is not None
            else None
        )
        self.penalty_coefficient = torch.tensor(cfg.penalty_coefficient, device=self.device)
        self.initialised = False
        self.comm = LocalComm()  # the Trainer's comm: combines counters across ranks

    @property
    def topk_family(self) -> bool:
        return self.cfg.sae.activation in TOPK_FAMILY

    def init_from_data(self, x: Tensor, scale: float | None = None) -> None:
        self.sae.init_from_data(x, scale=scale, method=self.cfg.b_dec_init)
        self.initialised = True

    def dead_mask(self) -> Tensor:
        return self.tokens_since_fired >= self.cfg.dead_tokens

    def prefixes(self) -> list[int] | None:
        cfg = self.cfg
        if cfg.matryoshka == "random":
            return losses.sample_prefixes(
                cfg.sae.d_sae,
                cfg.matryoshka_n_prefixes,
                min_prefix=cfg.matryoshka_min_prefix,
                generator=self.prefix_generator,
            )
        if cfg.matryoshka == "fixed":
            return losses.fixed_prefixes(cfg.matryoshka_groups)
        return None

    def lambda_value(self) -> Tensor:
        return self.controller.lam if self.controller is not None else self.penalty_coefficient

    def train_step(
        self, x: Tensor, step: int, after_backward: Callable[[Member], None] | None = None
    ) -> dict[str, Tensor]:
        """One optimisation step on batch ``x`` [N, d]; returns detached metric tensors."""
        cfg, sae = self.cfg, self.sae
        sae.train()
        factor = lr_factor(step, self.total_steps, cfg.warmup_steps, cfg.decay_start)
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.learning_rate * factor
        dead = self.dead_mask()  # before this batch is counted
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.autocast_bf16)
        with autocast:
            out = sae(x)
            loss, parts = training_loss(cfg, sae, out, dead, self.lambda_value(), self.prefixes())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if after_backward is not None:
            after_backward(self)
        if self.topk_family:
            sae.remove_parallel_grad_()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
        self.optimizer.step()
        if self.topk_family:
            sae.normalize_decoder_()

        with torch.no_grad():
            per_token, per_latent = latent_counts(out.latents)
            self.update_counters(*self.comm.combine_fired(per_latent > 0, x.shape[0]))
            if isinstance(sae.activation, BatchTopK) and isinstance(out.latents, SparseCode):
                batch_min = self.comm.combine_batch_min(BatchTopK.batch_min_positive(out.latents))
                sae.activation.update_threshold(batch_min)
            l0 = per_token.double().mean()
            if self.controller is not None:
                self.controller.step(self.comm.average(l0))
            # The batch's FVU, for the log only (float32: no [N, d] float64 copies per step).
            err = (out.x_n - out.x_hat_n).pow(2).sum()
            var = (out.x_n - out.x_n.mean(0)).pow(2).sum()
            parts.update(
                l0=l0,
                fvu=(err / var).double(),
                dead_fraction=dead.double().mean(),
                lam=self.lambda_value().double(),
            )
        return parts

    def update_counters(self, fired: Tensor, n_tokens: int) -> None:
        """Reset counters of latents that fired; add the batch's tokens to the others."""
        self.tokens_since_fired = torch.where(
            fired, torch.zeros_like(self.tokens_since_fired), self.tokens_since_fired + n_tokens
        )

    # ------------------------------------------------------------------ state

    def state_tensors(self) -> dict[str, Tensor]:
        """Everything resumable that is a tensor (the SAE unfolded, optimizer moments...)."""
        state = {f"sae.{k}": v for k, v in self.sae.state_dict().items()}
        opt = self.optimizer.state_dict()
        for idx, pstate in opt["state"].items():
            for key, value in pstate.items():
                state[f"opt.{idx}.{key}"] = torch.as_tensor(value)
        state["tokens_since_fired"] = self.tokens_since_fired
        state["prefix_generator"] = self.prefix_generator.get_state()
        if self.controller is not None:
            for key, value in self.controller.state_dict().items():
                state[f"controller.{key}"] = torch.as_tensor(value)
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
        self.prefix_generator.set_state(tensors["prefix_generator"])
        if self.controller is not None:
            self.controller.load_state_dict(
                {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("controller.")}
            )
        self.initialised = meta["initialised"]


# ---------------------------------------------------------------------- the run


@dataclass
class LogRecord:
    step: int
    tokens: int
    values: dict[str, float]


class Trainer:
    """Trains every SAE of a ``RunConfig`` on one stream of batches."""

    def __init__(self, cfg: RunConfig, source: ActivationSource, comm: LocalComm | None = None):
        cfg.validate()
        self.cfg = cfg
        self.source = source
        self.members = [Member(s, cfg.steps, cfg.device) for s in cfg.saes]
        self.comm = comm if comm is not None else LocalComm()  # see train/distributed.py
        for member in self.members:
            member.comm = self.comm
        self.step = 0
        self.out_dir = Path(cfg.out_dir)
        self._stop_signal: int | None = None
        self.log_callbacks: list[Callable[[Member, LogRecord], None]] = []
        self.after_backward: Callable[[Member], None] | None = None

    def initialise(self) -> None:
        """Estimate the dataset scale and b_dec from the first batches (not used for training)."""
        sample = self.source.sample_for_init()
        for member in self.members:
            if not member.initialised:
                member.init_from_data(sample)
        self.comm.sync_initial_state(self)

    def fit(self, progress: bool | None = None) -> None:
        """Train until ``cfg.steps``; checkpoint every ``checkpoint_every`` and on a signal."""
        cfg = self.cfg
        if self.step == 0:
            self.initialise()
        show = cfg.progress if progress is None else progress
        bar = _progress_bar(cfg.steps, self.step, show)
        sums: list[dict[str, Tensor]] = [{} for _ in self.members]
        n_in_interval = 0
        batches = self.source.batches(start=self.step)
        with self._signal_handlers():
            while self.step < cfg.steps:
                x = next(batches).to(cfg.device, non_blocking=True)
                for member, acc in zip(self.members, sums, strict=True):
                    parts = member.train_step(x, self.step, self.after_backward)
                    for key, value in parts.items():
                        acc[key] = acc[key] + value if key in acc else value.double()
                self.step += 1
                n_in_interval += 1
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    self._log(sums, n_in_interval, bar)
                    sums = [{} for _ in self.members]
                    n_in_interval = 0
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
                stop = self.comm.agree_stop(self._stop_signal, self.step)
                if stop is not None:
                    self.save_checkpoint()
                    bar.close()
                    raise TrainingInterrupted(
                        f"stopped by signal {stop} at step {self.step}; checkpoint "
                        f"in {self.checkpoint_dir}; resume with: saekit train --resume "
                        f"{self.out_dir}"
                    )
        bar.close()
        self.save_checkpoint()

    def _log(self, sums: list[dict[str, Tensor]], n: int, bar) -> None:
        """One host transfer for all metrics of all members since the last log."""
        keys = [sorted(acc) for acc in sums]
        flat = torch.stack([sums[i][k] for i, ks in enumerate(keys) for k in ks])
        flat = self.comm.reduce_metrics(flat).cpu().tolist()
        pos = 0
        tokens = self.step * self.cfg.batch_size
        for member, ks in zip(self.members, keys, strict=True):
            values = {k: v / n for k, v in zip(ks, flat[pos : pos + len(ks)], strict=True)}
            pos += len(ks)
            values["lr"] = member.optimizer.param_groups[0]["lr"]
            if not math.isfinite(values["loss"]):
                raise FloatingPointError(
                    f"SAE {member.cfg.name}: loss is {values['loss']} at step {self.step} "
                    "(NaN or inf activations, or a learning rate too high)"
                )
            if not self.comm.writes_logs:
                continue
            record = LogRecord(self.step, tokens, values)
            path = self.out_dir / member.cfg.name / "metrics.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as f:
                f.write(json.dumps({"step": record.step, "tokens": tokens, **values}) + "\n")
            for callback in self.log_callbacks:
                callback(member, record)
        first = self.members[0].cfg.name
        v0 = {k: v / n for k, v in zip(keys[0], flat[: len(keys[0])], strict=True)}
        bar.set_postfix_str(
            f"{first}: loss {v0['loss']:.4f} L0 {v0['l0']:.1f} FVU {v0['fvu']:.3f} "
            f"dead {v0['dead_fraction']:.2f}"
        )

    # ------------------------------------------------------------------ checkpoints

    @property
    def checkpoint_dir(self) -> Path:
        return self.out_dir / "checkpoint"

    def save_checkpoint(self) -> Path:
        return self.comm.save_checkpoint(self)

    def load_checkpoint(self) -> None:
        self.comm.load_checkpoint(self)

    @contextlib.contextmanager
    def _signal_handlers(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            self._stop_signal = signum

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


# ---------------------------------------------------------------------- sources


class ActivationSource:
    """A deterministic, restartable stream of batches [batch_size, d]."""

    def batches(self, start: int = 0) -> Iterator[Tensor]:
        raise NotImplementedError

    def sample_for_init(self) -> Tensor:
        """Tokens for the scale and b_dec estimates."""
        raise NotImplementedError

    def eval_batches(
        self, n_tokens: int, batch_size: int
    ) -> Iterator[tuple[Tensor, Tensor | None]]:
        """Held-out (x, true coefficients or None) batches covering ``n_tokens``."""
        raise NotImplementedError


class SyntheticSource(ActivationSource):
    """Batches of the built-in generator: batch i is a pure function of (seed, i)."""

    INIT_INDEX = 10**9  # batches for initialisation and evaluation never overlap training ones
    EVAL_INDEX = 2 * 10**9

    def __init__(self, data, batch_size: int, init_tokens: int = 16_384):
        self.data = data
        self.batch_size = batch_size
        self.init_tokens = init_tokens

    def batches(self, start: int = 0) -> Iterator[Tensor]:
        return self.data.stream(self.batch_size, start=start)

    def sample_for_init(self) -> Tensor:
        return self.data.batch(self.INIT_INDEX, self.init_tokens).x

    def eval_batches(
        self, n_tokens: int, batch_size: int
    ) -> Iterator[tuple[Tensor, Tensor | None]]:
        for i in range(math.ceil(n_tokens / batch_size)):
            batch = self.data.batch(self.EVAL_INDEX + i, min(batch_size, n_tokens - i * batch_size))
            yield batch.x, batch.coefficients


def _progress_bar(total: int, initial: int, show: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        disable=not show,
        unit="step",
        dynamic_ncols=True,
        mininterval=0.5,
    )
