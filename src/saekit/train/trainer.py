"""The trainer: one activation stream feeds many SAEs, each with its own objective and optimizer.

The loop (:meth:`Trainer.fit`), per batch: every member takes one step
(:meth:`saekit.train.member.Member.train_step`, whose docstring lists the step top to bottom);
every ``log_every`` steps all metrics of the interval are read in one host transfer (data
parallel: averaged over ranks) and logged; every ``checkpoint_every`` steps, and on a signal, the
trainer writes a checkpoint (:func:`saekit.train.parallel.save_checkpoint`: which rank writes
what under data and sweep parallelism); the ranks agree whether to stop. ``comm`` holds the
run's collectives (:mod:`saekit.core.comm`; one process: the identity).
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from saekit.core.atomic import atomic_write_text
from saekit.core.comm import Comm, LocalComm
from saekit.core.configs import to_dict
from saekit.data.sources.interface import ActivationSource
from saekit.model.format import CheckpointError
from saekit.train import parallel
from saekit.train.checkpoint import MemberState, checkpoint_dir
from saekit.train.config import RunConfig
from saekit.train.member import Member


class TrainingInterrupted(RuntimeError):
    """Raised after a SIGINT/SIGTERM once the checkpoint is written."""


# ---------------------------------------------------------------------- the run


@dataclass
class LogRecord:
    step: int
    tokens: int
    values: dict[str, float]


class Trainer:
    """Trains the SAEs of a ``RunConfig`` on one stream of batches: all of them, or under sweep
    parallelism this rank's share (``indices``)."""

    def __init__(self, cfg: RunConfig, source: ActivationSource, comm: Comm | None = None):
        cfg.validate()
        self.cfg = cfg
        self.source = source
        self.comm: Comm = comm if comm is not None else LocalComm()
        self.indices = parallel.trained_here(cfg.parallel, len(cfg.saes), self.comm)
        self.batch_comm = parallel.batch_comm(cfg.parallel, self.comm)
        self.writes_logs = parallel.writes_logs(cfg.parallel, self.comm)
        self.members = [self.make_member(i) for i in self.indices]
        self.step = 0
        self._sums: list[dict[str, Tensor]] = [{} for _ in self.members]
        self._n_in_interval = 0
        self.out_dir = Path(cfg.out_dir)
        self._stop_signal: int | None = None
        self.log_callbacks: list[Callable[[Member, LogRecord], None]] = []

    def make_member(self, i: int) -> Member:
        """The member that trains SAE i here (latent parallelism: its part,
        saekit.train.latent_parallel)."""
        return Member(self.cfg.saes[i], self.cfg.steps, self.cfg.device, self.batch_comm)

    def initialise(self) -> None:
        """Estimate the dataset scale and b_dec from the first batches (not used for training)."""
        sample = self.source.sample_for_init()
        for member in self.members:
            if not member.initialised:
                member.init_from_data(sample)
        for member in self.members:
            member.share_initial_state()

    def fit(self, progress: bool | None = None) -> None:
        """Train until ``cfg.steps``; checkpoint every ``checkpoint_every`` and on a signal."""
        cfg = self.cfg
        if self.step == 0:
            self.initialise()
        show = cfg.progress if progress is None else progress
        bar = _progress_bar(cfg.steps, self.step, show)
        sums = self._sums  # the log interval's running sums (checkpointed: a resume logs the same)
        batches = self.source.batches(start=self.step)
        with self._signal_handlers():
            while self.step < cfg.steps:
                x = next(batches).to(cfg.device, non_blocking=True)
                for member, acc in zip(self.members, sums, strict=True):
                    parts = member.train_step(x, self.step).as_dict()
                    for key, value in parts.items():
                        acc[key] = acc[key] + value if key in acc else value.double()
                self.step += 1
                self._n_in_interval += 1
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    self._log(sums, self._n_in_interval, bar)
                    sums = self._sums = [{} for _ in self.members]
                    self._n_in_interval = 0
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
                stop = self._agree_stop()
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

    def _agree_stop(self) -> int | None:
        """The signal to stop on now (None: go on). Ranks meet once per log interval and at the
        last step (one tiny all-reduce); one process stops at once."""
        cfg = self.cfg
        if self.comm.world_size > 1 and self.step % cfg.log_every and self.step != cfg.steps:
            return None
        return self.comm.agree_stop(self._stop_signal)

    def _log(self, sums: list[dict[str, Tensor]], n: int, bar) -> None:
        """One host transfer for all metrics of all members since the last log."""
        keys = [sorted(acc) for acc in sums]
        flat = torch.stack([sums[i][k] for i, ks in enumerate(keys) for k in ks])
        flat = self.batch_comm.all_reduce(flat, "avg", "metrics").cpu().tolist()
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
            if not self.writes_logs:
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
        return checkpoint_dir(self.out_dir)

    def save_checkpoint(self) -> Path:
        """Every member's state with its log interval's sums; see train/parallel.py for who writes
        what when there are several ranks."""
        states = {}
        for i, member, sums in zip(self.indices, self.members, self._sums, strict=True):
            tensors = {**member.state_tensors(), **{f"log.{k}": v for k, v in sums.items()}}
            meta = {**member.state_meta(), "log_steps": self._n_in_interval}
            states[i] = MemberState(member.cfg.name, tensors, meta)
        return parallel.save_checkpoint(
            self.comm, self.cfg.parallel, self.out_dir, self.step, to_dict(self.cfg), states
        )

    def load_checkpoint(self) -> None:
        """Continue from ``<out_dir>/checkpoint``: every member's state, the step, the RNG."""
        step, states = parallel.load_checkpoint(
            self.comm,
            self.cfg.parallel,
            self.out_dir,
            [s.name for s in self.cfg.saes],
            self.indices,
        )
        for member, state in zip(self.members, states, strict=True):
            try:
                member.load_state(state.tensors, state.meta)
            except (RuntimeError, KeyError, ValueError) as exc:
                raise CheckpointError(
                    f"{self.checkpoint_dir}: SAE {member.cfg.name}: {exc}"
                ) from exc
        self.step = step
        device = torch.device(self.cfg.device)
        self._sums = [
            {k[4:]: v.to(device) for k, v in state.tensors.items() if k.startswith("log.")}
            for state in states
        ]
        self._n_in_interval = int(states[0].meta.get("log_steps", 0)) if states else 0
        self.trim_metrics()

    def trim_metrics(self) -> None:
        """Drop ``metrics.jsonl`` records after the current step (written after the checkpoint by
        a run that was then killed), so a resumed log equals the uninterrupted one."""
        if not self.writes_logs:
            return
        for member in self.members:
            path = self.out_dir / member.cfg.name / "metrics.jsonl"
            if not path.is_file():
                continue
            kept = []
            for line in path.read_text(errors="replace").splitlines():  # bad bytes: dropped
                try:
                    if json.loads(line)["step"] <= self.step:
                        kept.append(line + "\n")
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a line cut short by the kill
            atomic_write_text(path, "".join(kept))

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
