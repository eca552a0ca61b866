"""Data-parallel and sweep-parallel training on ``torch.distributed`` (torchrun or ``--nproc``).

The trainer holds a ``comm`` object; :class:`LocalComm` (the default) does nothing, so a single
process never touches ``torch.distributed``. Under torchrun,
:func:`saekit.train.run_distributed.run_distributed` replaces it:

**parallel = "data"** (:class:`DataParallelComm`): every rank trains every SAE on its part of each
step's batch. ``batch_size`` stays the *global* tokens per step; each rank reads
``batch_size / world`` of them (synthetic data: rank r at step i reads batch index ``i·world + r``
of ``batch_size / world`` tokens). Per step and SAE: one bucketed ``all_reduce`` of the gradients
(averaged; ``None`` grads stay ``None`` only if they are ``None`` on every rank), one of the
"fired" mask (MAX = logical OR; the counters then add the global batch), and for BatchTopK one
MIN of the smallest kept activation, so every rank holds identical weights, Adam moments,
``tokens_since_fired`` and θ. With the λ controller, L0 is averaged too. Logged metrics are
averaged over ranks in the one transfer of each log interval. Rank 0 writes logs, checkpoints and
the final SAEs; the others wait at a barrier.

Differences from one process on the concatenated batch (everything else matches to float
rounding; see tests/test_distributed.py):

- BatchTopK keeps the k·N_local largest activations of each rank's batch, not the k·N_global
  largest of the concatenated batch (sparsify does the same): the L0 per token is still k on
  average, but which activations are kept differs slightly. θ follows the union of the kept sets:
  its EMA input is the MIN over ranks of each rank's smallest positive kept activation.
- Per-batch statistics inside a loss are per rank: AuxK's normaliser V (``auxk_normalizer:
  residual``) and the BatchTopK threshold of the pre-activation revival loss. With
  ``auxk_normalizer: none`` AuxK matches exactly.
- Logged FVU is the mean over ranks of each rank's batch FVU (as it is already a mean over steps).
- Resuming on a different world size continues at the same step with the same global batch, but
  reads other tokens (rank r reads index ``step·world' + r``, of ``batch_size / world'`` tokens):
  a statistically identical stream, not the identical one. Same world size: exact.

**parallel = "sweep"** (:class:`SweepComm`): SAE i trains on rank ``i % world``; every rank sees
the whole batch (synthetic: each rank generates it, which is cheap; other sources: rank 0 reads
and broadcasts each batch, :class:`saekit.data.sources.distributed.BroadcastSource`). Each SAE gets
exactly the result of training it alone. Ranks meet once per log interval (stop agreement) and at
checkpoints, where the members' states are gathered to rank 0 and written as one ordinary
checkpoint (resumable on any world size, or by one process). Final SAEs and reports are gathered
to rank 0, which writes them and ``summary.json``; each rank writes ``metrics.jsonl`` of its own
SAEs (so ``out_dir`` must be on a filesystem every rank shares, as it must for resuming).

Failure: every collective runs under the process group's timeout (``SAEKIT_DIST_TIMEOUT``
seconds, default 1800, see :mod:`saekit.train.launch`; gloo honours it, NCCL's watchdog aborts
the process). A rank that dies makes the others' next collective fail at once; one that hangs
makes it fail after the timeout. Either way they raise :class:`DistributedFailure`, naming the
collective, and exit non-zero; the last checkpoint stays loadable (it is written atomically). A
signal is honoured at the next log interval, where the ranks agree to stop together.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import Tensor

from saekit.core.atomic import atomic_write_text
from saekit.core.configs import to_dict
from saekit.train.checkpoint import (
    MemberState,
    checkpoint_dir,
    read_training_checkpoint,
    write_training_checkpoint,
)
from saekit.train.config import RunConfig
from saekit.train.launch import TIMEOUT_ENV, DistContext, DistributedFailure

if TYPE_CHECKING:
    from saekit.train.member import Member

PARALLEL_FILE = "parallel.json"  # world size of the last checkpoint (data position on resume)


class LocalComm:
    """One process: every hook is the identity. The trainer's default ``comm``."""

    rank = 0
    world_size = 1
    is_main = True
    writes_logs = True
    """Whether this rank writes metrics.jsonl of its members and calls log callbacks."""

    def reduce_grads(self, member: Member) -> None:
        """Called after ``loss.backward()``, before the gradient edits, clip and Adam step."""

    def combine_fired(self, fired: Tensor, n_tokens: int) -> tuple[Tensor, int]:
        """The fired mask [M] and token count of the whole step's batch."""
        return fired, n_tokens

    def combine_batch_min(self, batch_min: Tensor) -> Tensor:
        """The smallest positive kept BatchTopK activation of the whole step (0-d)."""
        return batch_min

    def average(self, value: Tensor) -> Tensor:
        """A per-batch statistic averaged over ranks (the λ controller's L0)."""
        return value

    def reduce_metrics(self, values: Tensor) -> Tensor:
        """The [n] metric sums of a log interval, made global."""
        return values

    def agree_stop(self, signum: int | None, step: int) -> int | None:
        """The signal to stop on after ``step``, the same on every rank (None: go on)."""
        return signum

    def sync_initial_state(self, members: list[Member]) -> None:
        """After the data-dependent initialisation: make every rank's SAEs identical."""

    def save_checkpoint(
        self, run_dir: Path, step: int, config: dict[str, Any], states: list[MemberState]
    ) -> Path:
        """Checkpoint this rank's members' ``states`` (with the torch RNG state)."""
        return write_training_checkpoint(run_dir, step, config, states, torch.get_rng_state())

    def load_checkpoint(self, run_dir: Path, names: list[str]) -> tuple[int, list[MemberState]]:
        """The step and the states of this rank's members (named ``names``); restores the RNG."""
        checkpoint = read_training_checkpoint(run_dir, names)
        torch.set_rng_state(checkpoint.torch_rng)
        return checkpoint.step, checkpoint.members


class ProcessGroupComm(LocalComm):
    """What data and sweep parallelism share: the group, barriers, stop agreement, failures."""

    def __init__(self, ctx: DistContext, cfg: RunConfig):
        self.ctx = ctx
        self.rank = ctx.rank
        self.world_size = ctx.world_size
        self.is_main = ctx.is_main
        self.cfg = cfg

    def collective(self, what: str, fn: Callable[..., Any], *args, **kwargs) -> Any:
        """Run one collective; turn a failure into a :class:`DistributedFailure` naming it."""
        try:
            return fn(*args, **kwargs)
        except DistributedFailure:
            raise
        except RuntimeError as exc:  # gloo/NCCL errors (DistBackendError is a RuntimeError)
            cause = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise DistributedFailure(
                f"rank {self.rank}/{self.world_size}: {what} failed: another rank died or did "
                f"not respond within {self.ctx.timeout_s:g} s ({TIMEOUT_ENV}). The last "
                f"checkpoint in {checkpoint_dir(Path(self.cfg.out_dir))} is loadable; resume "
                f"with: saekit train --resume {self.cfg.out_dir}. Cause: {cause}"
            ) from exc

    def barrier(self, what: str = "barrier") -> None:
        if self.ctx.backend == "gloo":  # names the ranks that did not arrive
            self.collective(what, dist.monitored_barrier, wait_all_ranks=True)
        else:
            self.collective(what, dist.barrier)

    def agree_stop(self, signum: int | None, step: int) -> int | None:
        """Ranks meet at each log step (one tiny all_reduce) and stop together."""
        if step % self.cfg.log_every and step != self.cfg.steps:
            return None
        flag = torch.tensor([signum or 0], dtype=torch.int64, device=self.ctx.device)
        self.collective("all_reduce(stop flag)", dist.all_reduce, flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) or None

    def gather_bytes(self, payload: bytes, what: str) -> list[bytes] | None:
        """Every rank's ``payload`` on rank 0 (None elsewhere); tensors, never pickles."""
        device = self.ctx.device
        data = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if payload else None
        size = torch.tensor([len(payload)], dtype=torch.int64, device=device)
        sizes = [torch.zeros_like(size) for _ in range(self.world_size)]
        self.collective(f"all_gather(sizes of {what})", dist.all_gather, sizes, size)
        lengths = [int(s.item()) for s in sizes]
        padded = torch.zeros(max(lengths), dtype=torch.uint8, device=device)
        if data is not None:
            padded[: len(payload)] = data.to(device)
        bufs = [torch.empty_like(padded) for _ in lengths] if self.is_main else None
        self.collective(f"gather({what})", dist.gather, padded, bufs, dst=0)
        if bufs is None:
            return None
        return [bytes(b[:n].cpu().numpy().tobytes()) for b, n in zip(bufs, lengths, strict=True)]

    def gather_indexed(
        self, tensors: dict[int, dict[str, Tensor]], meta: dict[int, Any], what: str
    ) -> tuple[dict[int, dict[str, Tensor]], dict[int, Any]] | None:
        """Gather per-SAE tensors and JSON metadata, keyed by global SAE index, to rank 0."""
        flat = {
            f"{i}.{key}": value.detach().contiguous().cpu()
            for i, own in tensors.items()
            for key, value in own.items()
        }
        payload = save_safetensors_bytes(
            flat, metadata={"meta": json.dumps({str(i): m for i, m in meta.items()})}
        )
        parts = self.gather_bytes(payload, what)
        if parts is None:
            return None
        all_tensors: dict[int, dict[str, Tensor]] = {}
        all_meta: dict[int, Any] = {}
        for part in parts:
            part_tensors = load_safetensors_bytes(part)
            header = json.loads(part[8 : 8 + int.from_bytes(part[:8], "little")])
            for key, value in json.loads(header["__metadata__"]["meta"]).items():
                i = int(key)
                all_meta[i] = value
                start = f"{key}."
                all_tensors[i] = {
                    k[len(start) :]: v for k, v in part_tensors.items() if k.startswith(start)
                }
        return all_tensors, all_meta


class DataParallelComm(ProcessGroupComm):
    """Every rank trains every SAE on its part of the batch; gradients averaged."""

    @property
    def writes_logs(self) -> bool:  # type: ignore[override]
        return self.is_main

    def reduce_grads(self, member: Member) -> None:
        """Average every gradient over ranks in ONE all_reduce per dtype (one in practice).

        Sparse grads are densified. Which parameters have a gradient is decided by the code path,
        which is the same on every rank (the step never branches on data), so ``None`` grads are
        simply left out and stay ``None``, and Adam skips what one process would skip.
        """
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for p in member.sae.parameters():
            if p.requires_grad and p.grad is not None:
                by_dtype.setdefault(p.dtype, []).append(p)
        for group in by_dtype.values():
            bucket = torch.cat(
                [(p.grad.to_dense() if p.grad.is_sparse else p.grad).reshape(-1) for p in group]
            )  # [Σ numel]
            self.collective(f"all_reduce(gradients of {member.cfg.name})", dist.all_reduce, bucket)
            bucket.div_(self.world_size)
            offset = 0
            for p in group:
                p.grad = bucket[offset : offset + p.numel()].view_as(p)
                offset += p.numel()

    def combine_fired(self, fired: Tensor, n_tokens: int) -> tuple[Tensor, int]:
        fired_any = fired.to(torch.uint8)
        self.collective("all_reduce(fired mask)", dist.all_reduce, fired_any, dist.ReduceOp.MAX)
        return fired_any.bool(), n_tokens * self.world_size

    def combine_batch_min(self, batch_min: Tensor) -> Tensor:
        value = batch_min.detach().reshape(1).clone()
        self.collective(
            "all_reduce(BatchTopK batch min)", dist.all_reduce, value, dist.ReduceOp.MIN
        )
        return value.reshape(())

    def average(self, value: Tensor) -> Tensor:
        total = value.detach().reshape(-1).clone()
        self.collective("all_reduce(statistic)", dist.all_reduce, total)
        return (total / self.world_size).reshape(value.shape)

    def reduce_metrics(self, values: Tensor) -> Tensor:
        return self.average(values)

    def sync_initial_state(self, members: list[Member]) -> None:
        """Rank 0's initialised SAEs (scale, b_dec, weights) to every rank: one broadcast."""
        for member in members:
            tensors = list(member.sae.state_dict().values())
            for dtype in {t.dtype for t in tensors}:
                same = [t for t in tensors if t.dtype == dtype]
                bucket = torch.cat([t.reshape(-1) for t in same])
                self.collective(f"broadcast(initial {member.cfg.name})", dist.broadcast, bucket, 0)
                offset = 0
                for t in same:
                    t.copy_(bucket[offset : offset + t.numel()].view_as(t))
                    offset += t.numel()

    def save_checkpoint(
        self, run_dir: Path, step: int, config: dict[str, Any], states: list[MemberState]
    ) -> Path:
        if self.is_main:
            super().save_checkpoint(run_dir, step, config, states)
            write_parallel_record(run_dir, "data", self.world_size, step)
        self.barrier("barrier(after checkpoint)")
        return checkpoint_dir(run_dir)

    def load_checkpoint(self, run_dir: Path, names: list[str]) -> tuple[int, list[MemberState]]:
        step, states = super().load_checkpoint(run_dir, names)
        readers = data_readers(run_dir, step)
        if self.is_main and readers != self.world_size:
            print(
                f"saekit: resuming at step {step} on {self.world_size} processes a checkpoint "
                f"whose stream was read by {readers}: same global batch, but rank r now reads "
                f"batch index step·{self.world_size} + r, so the tokens differ from the "
                "uninterrupted run's",
                file=sys.stderr,
            )
        return step, states


def write_parallel_record(run_dir: Path, parallel: str, world_size: int, step: int) -> None:
    """Beside the checkpoint (not in it: its format is the single-process one)."""
    record = {"parallel": parallel, "world_size": world_size, "step": step}
    atomic_write_text(Path(run_dir) / PARALLEL_FILE, json.dumps(record) + "\n")


def data_readers(run_dir: Path, step: int) -> int:
    """Into how many parts the run checkpointed at ``step`` split each batch: its data-parallel
    world size, else 1 (one process or a sweep; also for a record left by an older checkpoint)."""
    path = Path(run_dir) / PARALLEL_FILE
    record = json.loads(path.read_text()) if path.is_file() else {}
    if record.get("parallel") == "data" and record.get("step") == step:
        return int(record["world_size"])
    return 1


class SweepComm(ProcessGroupComm):
    """SAE i trains on rank i % world; every rank sees every batch."""

    def __init__(self, ctx: DistContext, cfg: RunConfig):
        super().__init__(ctx, cfg)
        self.mine = sweep_indices(len(cfg.saes), ctx.rank, ctx.world_size)

    def save_checkpoint(
        self, run_dir: Path, step: int, config: dict[str, Any], states: list[MemberState]
    ) -> Path:
        """Gather every member's state to rank 0 and write one ordinary checkpoint."""
        own = list(zip(self.mine, states, strict=True))
        gathered = self.gather_indexed(
            {i: s.tensors for i, s in own},
            {i: {"name": s.name, "meta": s.meta} for i, s in own},
            "checkpoint state",
        )
        if gathered is not None:
            tensors, meta = gathered
            every = [
                MemberState(meta[i]["name"], tensors[i], meta[i]["meta"])
                for i in range(len(self.cfg.saes))
            ]
            whole = {**config, "saes": to_dict(self.cfg)["saes"]}  # this rank's config has its own
            super().save_checkpoint(run_dir, step, whole, every)
            write_parallel_record(run_dir, "sweep", self.world_size, step)
        self.barrier("barrier(after checkpoint)")
        return checkpoint_dir(run_dir)

    def load_checkpoint(self, run_dir: Path, names: list[str]) -> tuple[int, list[MemberState]]:
        """Read the whole checkpoint (checking every SAE of the sweep); keep this rank's."""
        step, states = super().load_checkpoint(run_dir, [s.name for s in self.cfg.saes])
        return step, [states[i] for i in self.mine]


def sweep_indices(n_saes: int, rank: int, world_size: int) -> list[int]:
    """The SAEs rank ``rank`` trains in a sweep: i with i % world_size == rank."""
    return [i for i in range(n_saes) if i % world_size == rank]
