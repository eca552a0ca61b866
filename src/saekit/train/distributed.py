"""Data-parallel and sweep-parallel training on ``torch.distributed`` (torchrun or ``--nproc``).

The trainer holds a ``comm`` object; :class:`LocalComm` (the default) does nothing, so a single
process never touches ``torch.distributed``. Under torchrun, :func:`run_distributed` replaces it:

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
and broadcasts each batch, :class:`BroadcastSource`). Each SAE gets exactly the result of training
it alone. Ranks meet once per log interval (stop agreement) and at checkpoints, where the
members' states are gathered to rank 0 and written as one ordinary checkpoint (resumable on any
world size, or by one process). Final SAEs and reports are gathered to rank 0, which writes them
and ``summary.json``; each rank writes ``metrics.jsonl`` of its own SAEs (so ``out_dir`` must be
on a filesystem every rank shares, as it must for resuming).

Failure: every collective runs under the process group's timeout (``SAEKIT_DIST_TIMEOUT``
seconds, default 1800; gloo honours it, NCCL's watchdog aborts the process). A rank that dies
makes the others' next collective fail at once; one that hangs makes it fail after the timeout.
Either way they raise :class:`DistributedFailure`, naming the collective, and exit non-zero; the
last checkpoint stays loadable (it is written atomically). A signal is honoured at the next log
interval, where the ranks agree to stop together.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import Tensor

from saekit.train.checkpoint import read_training_checkpoint, write_training_checkpoint
from saekit.train.config import RunConfig

if TYPE_CHECKING:
    from saekit.train.trainer import Member, Trainer

TIMEOUT_ENV = "SAEKIT_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0
PARALLEL_FILE = "parallel.json"  # world size of the last checkpoint (data position on resume)


class DistributedFailure(RuntimeError):
    """A collective failed: another rank died, or stopped responding within the timeout."""


# ---------------------------------------------------------------------- launch and init


def world_size_from_env() -> int:
    """WORLD_SIZE as torchrun sets it (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched() -> bool:
    """True in a worker of a multi-process torchrun launch."""
    return world_size_from_env() > 1


def is_main_process() -> bool:
    """Rank 0, or a single process."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def launch_command(nproc: int, argv: list[str]) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc_per_node N -m saekit <argv>``,
    with ``--nproc`` removed from ``argv``."""
    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            rest.append(arg)
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "saekit",
        *rest,
    ]


def launch(nproc: int, argv: list[str]) -> int:
    """Run ``saekit <argv>`` on ``nproc`` local processes under torchrun; its exit status.

    Ctrl-C reaches the workers directly (same process group); we wait for them to write their
    checkpoint instead of killing torchrun.
    """
    proc = subprocess.Popen(launch_command(nproc, argv))
    while True:
        try:
            return proc.wait()
        except KeyboardInterrupt:
            continue


@dataclass
class DistContext:
    """This process's place in the process group."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    timeout_s: float
    owns_group: bool
    """True when :func:`init_from_env` created the group (and so destroys it)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def timeout_from_env() -> float:
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_TIMEOUT_S
    value = float(raw)
    if not value > 0:
        raise ValueError(f"{TIMEOUT_ENV} must be a positive number of seconds, got {raw!r}")
    return value


def init_from_env(device: str = "cpu", timeout_s: float | None = None) -> DistContext:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT).

    Backend nccl for CUDA devices (each rank on ``cuda:LOCAL_RANK``), gloo otherwise. An existing
    group is reused (and then left for its creator to destroy).
    """
    timeout_s = timeout_from_env() if timeout_s is None else float(timeout_s)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.device(device).type == "cuda"
    dev = torch.device("cuda", local_rank) if cuda else torch.device(device)
    if cuda:
        torch.cuda.set_device(dev)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(
            backend="nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s)
        )
    return DistContext(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        device=dev,
        backend=dist.get_backend(),
        timeout_s=timeout_s,
        owns_group=owns,
    )


# ---------------------------------------------------------------------- comms


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

    def sync_initial_state(self, trainer: Trainer) -> None:
        """After the data-dependent initialisation: make every rank's SAEs identical."""

    def save_checkpoint(self, trainer: Trainer) -> Path:
        return write_training_checkpoint(trainer)

    def load_checkpoint(self, trainer: Trainer) -> None:
        read_training_checkpoint(trainer)


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
                f"checkpoint in {Path(self.cfg.out_dir) / 'checkpoint'} is loadable; resume "
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

    def sync_initial_state(self, trainer: Trainer) -> None:
        """Rank 0's initialised SAEs (scale, b_dec, weights) to every rank: one broadcast."""
        for member in trainer.members:
            tensors = list(member.sae.state_dict().values())
            for dtype in {t.dtype for t in tensors}:
                same = [t for t in tensors if t.dtype == dtype]
                bucket = torch.cat([t.reshape(-1) for t in same])
                self.collective(f"broadcast(initial {member.cfg.name})", dist.broadcast, bucket, 0)
                offset = 0
                for t in same:
                    t.copy_(bucket[offset : offset + t.numel()].view_as(t))
                    offset += t.numel()

    def save_checkpoint(self, trainer: Trainer) -> Path:
        if self.is_main:
            write_training_checkpoint(trainer)
            _write_parallel_record(trainer, "data", self.world_size)
        self.barrier("barrier(after checkpoint)")
        return trainer.checkpoint_dir

    def load_checkpoint(self, trainer: Trainer) -> None:
        read_training_checkpoint(trainer)
        readers = _data_readers(trainer)
        if self.is_main and readers != self.world_size:
            print(
                f"saekit: resuming at step {trainer.step} on {self.world_size} processes a "
                f"checkpoint whose stream was read by {readers}: same global batch, but rank r "
                f"now reads batch index step·{self.world_size} + r, so the tokens differ from "
                "the uninterrupted run's",
                file=sys.stderr,
            )


def _write_parallel_record(trainer: Trainer, parallel: str, world_size: int) -> None:
    """Beside the checkpoint (not in it: its format is the single-process one)."""
    record = {"parallel": parallel, "world_size": world_size, "step": trainer.step}
    (trainer.out_dir / PARALLEL_FILE).write_text(json.dumps(record) + "\n")


def _data_readers(trainer: Trainer) -> int:
    """Into how many parts the checkpointed run split each batch: its data-parallel world size,
    else 1 (one process or a sweep; also for a record left by an older checkpoint)."""
    path = trainer.out_dir / PARALLEL_FILE
    record = json.loads(path.read_text()) if path.is_file() else {}
    if record.get("parallel") == "data" and record.get("step") == trainer.step:
        return int(record["world_size"])
    return 1


class SweepComm(ProcessGroupComm):
    """SAE i trains on rank i % world; every rank sees every batch."""

    def __init__(self, ctx: DistContext, cfg: RunConfig):
        super().__init__(ctx, cfg)
        self.mine = sweep_indices(len(cfg.saes), ctx.rank, ctx.world_size)

    def save_checkpoint(self, trainer: Trainer) -> Path:
        """Gather every member's state to rank 0 and write one ordinary checkpoint."""
        tensors: dict[str, Tensor] = {}
        meta: dict[str, Any] = {}
        for i, member in zip(self.mine, trainer.members, strict=True):
            for key, value in member.state_tensors().items():
                tensors[f"{i}.{key}"] = value.detach().contiguous().cpu()
            meta[str(i)] = member.state_meta()
        payload = save_safetensors_bytes(tensors, metadata={"meta": json.dumps(meta)})
        parts = self.gather_bytes(payload, "checkpoint state")
        if parts is not None:
            members = [None] * len(self.cfg.saes)
            for part in parts:
                part_tensors, part_meta = _load_payload(part)
                for key, member_meta in part_meta.items():
                    i = int(key)
                    own = _with_prefix(part_tensors, key)
                    members[i] = _SavedMember(self.cfg.saes[i], own, member_meta)
            whole = SimpleNamespace(
                checkpoint_dir=trainer.checkpoint_dir,
                members=members,
                step=trainer.step,
                cfg=dataclasses.replace(trainer.cfg, saes=self.cfg.saes),
            )
            write_training_checkpoint(whole)
            _write_parallel_record(trainer, "sweep", self.world_size)
        self.barrier("barrier(after checkpoint)")
        return trainer.checkpoint_dir

    def load_checkpoint(self, trainer: Trainer) -> None:
        """Read the whole checkpoint; keep this rank's members."""
        own = dict(zip(self.mine, trainer.members, strict=True))
        slots = [
            own.get(i, SimpleNamespace(cfg=s, load_state=lambda tensors, meta: None))
            for i, s in enumerate(self.cfg.saes)
        ]
        whole = SimpleNamespace(out_dir=trainer.out_dir, members=slots, step=0)
        read_training_checkpoint(whole)
        trainer.step = whole.step


@dataclass
class _SavedMember:
    """A member's gathered state, shaped like a Member for ``write_training_checkpoint``."""

    cfg: Any
    tensors: dict[str, Tensor]
    meta: dict[str, Any]

    def state_tensors(self) -> dict[str, Tensor]:
        return self.tensors

    def state_meta(self) -> dict[str, Any]:
        return self.meta


def _load_payload(payload: bytes) -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors = load_safetensors_bytes(payload)
    header_len = int.from_bytes(payload[:8], "little")
    header = json.loads(payload[8 : 8 + header_len])
    return tensors, json.loads(header.get("__metadata__", {}).get("meta", "{}"))


def _with_prefix(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The entries named ``<prefix>.<key>``, keyed by ``<key>``."""
    start = f"{prefix}."
    return {k[len(start) :]: v for k, v in tensors.items() if k.startswith(start)}


def sweep_indices(n_saes: int, rank: int, world_size: int) -> list[int]:
    """The SAEs rank ``rank`` trains in a sweep: i with i % world_size == rank."""
    return [i for i in range(n_saes) if i % world_size == rank]


# ---------------------------------------------------------------------- sources


class ShardedSource:
    """Data parallel on synthetic data: rank r at step i reads batch index ``i·world + r`` of
    ``inner.batch_size`` (= batch_size / world) tokens; a pure function of (seed, index)."""

    def __init__(self, inner: Any, rank: int, world_size: int):
        self.inner = inner  # a SyntheticSource built with the per-rank batch size
        self.rank = rank
        self.world_size = world_size

    def batches(self, start: int = 0) -> Iterator[Tensor]:
        index = start * self.world_size + self.rank
        while True:
            yield self.inner.data.batch(index, self.inner.batch_size).x
            index += self.world_size

    def sample_for_init(self) -> Tensor:
        return self.inner.sample_for_init()

    def eval_batches(
        self, n_tokens: int, batch_size: int
    ) -> Iterator[tuple[Tensor, Tensor | None]]:
        return self.inner.eval_batches(n_tokens, batch_size)


_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


class BroadcastSource:
    """Sweep parallel on a real source: rank 0 reads each batch and broadcasts it.

    Every rank calls the same methods in the same order (the trainer's loop guarantees it for
    ``batches`` and ``sample_for_init``); evaluation batches are broadcast once and kept, since
    ranks evaluate different numbers of SAEs.
    """

    def __init__(self, inner: Any | None, comm: ProcessGroupComm):
        self.inner = inner  # only on rank 0
        self.comm = comm
        self._eval: list[tuple[Tensor, Tensor | None]] | None = None

    def _broadcast(self, x: Tensor | None, what: str) -> Tensor | None:
        """Rank 0's tensor (or None: the end) on every rank: a 4-int header, then the data."""
        device = self.comm.ctx.device
        header = torch.zeros(4, dtype=torch.int64, device=device)
        if self.comm.is_main and x is not None:
            header[0], header[1] = 1, _DTYPES.index(x.dtype)
            header[2], header[3] = x.shape[0], (x.shape[1] if x.dim() > 1 else 0)
        self.comm.collective(f"broadcast(header of {what})", dist.broadcast, header, 0)
        present, dtype_idx, n, d = header.tolist()
        if not present:
            return None
        shape = (n, d) if d else (n,)
        if self.comm.is_main:
            buf = x.to(device).contiguous()
        else:
            buf = torch.empty(shape, dtype=_DTYPES[dtype_idx], device=device)
        self.comm.collective(f"broadcast({what})", dist.broadcast, buf, 0)
        return buf

    def batches(self, start: int = 0) -> Iterator[Tensor]:
        stream = self.inner.batches(start) if self.comm.is_main else None
        while True:
            x = self._broadcast(next(stream, None) if stream is not None else None, "batch")
            if x is None:
                return
            yield x

    def sample_for_init(self) -> Tensor:
        x = self.inner.sample_for_init() if self.comm.is_main else None
        return self._broadcast(x, "initialisation sample")

    def eval_batches(
        self, n_tokens: int, batch_size: int
    ) -> Iterator[tuple[Tensor, Tensor | None]]:
        if self._eval is None:
            self._eval = []
            items = self.inner.eval_batches(n_tokens, batch_size) if self.comm.is_main else None
            while True:
                item = next(items, None) if items is not None else None
                x = self._broadcast(item[0] if item is not None else None, "eval batch")
                if x is None:
                    break
                coefficients = self._broadcast(
                    item[1] if item is not None else None, "eval coefficients"
                )
                self._eval.append((x, coefficients))
        return iter(self._eval)


# ---------------------------------------------------------------------- the run


def run_distributed(
    cfg: RunConfig, resume: bool = False, timeout_s: float | None = None
) -> tuple[Trainer, list[dict[str, Any]]]:
    """``run_training`` on every rank of a torchrun launch; the reports on rank 0 ([] elsewhere).

    The process group is created from the environment (or reused); ``cfg.parallel`` picks data or
    sweep parallelism.
    """
    ctx = init_from_env(cfg.device, timeout_s)
    try:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        trainer, eval_source = build_trainer(ctx, cfg)
        if ctx.is_main:
            _write_run_config(cfg)
        if resume:
            trainer.load_checkpoint()
        trainer.fit()
        if cfg.parallel == "sweep":
            reports = _finish_sweep(trainer, eval_source, cfg)
        else:
            reports = _finish_data(trainer, eval_source, cfg)
        return trainer, reports
    finally:
        if ctx.owns_group:
            _destroy_quietly()


def build_trainer(ctx: DistContext, cfg: RunConfig) -> tuple[Trainer, Any]:
    """This rank's trainer (its comm, source and members) and the source to evaluate on."""
    from saekit.train.run import make_source
    from saekit.train.trainer import Trainer

    world = ctx.world_size
    rank_cfg = dataclasses.replace(
        cfg, device=str(ctx.device), progress=cfg.progress and ctx.is_main
    )
    if cfg.parallel == "sweep":
        if len(cfg.saes) < world:
            raise ValueError(
                f"parallel: sweep spreads the SAEs over the processes: {len(cfg.saes)} SAE(s) "
                f"for {world} processes leaves some idle; use parallel: data or fewer processes"
            )
        comm = SweepComm(ctx, cfg)
        if cfg.data.source == "synthetic":
            source = make_source(cfg)  # each rank generates the same batches: cheaper than sending
        else:
            from saekit.data.lm_source import make_lm_source

            source = BroadcastSource(make_lm_source(rank_cfg) if ctx.is_main else None, comm)
        rank_cfg = dataclasses.replace(rank_cfg, saes=[cfg.saes[i] for i in comm.mine])
        return Trainer(rank_cfg, source, comm), source

    if cfg.batch_size % world:
        raise ValueError(
            f"batch_size {cfg.batch_size} must be divisible by the number of processes {world} "
            "(parallel: data splits each step's batch evenly)"
        )
    local = dataclasses.replace(rank_cfg, batch_size=cfg.batch_size // world)
    if cfg.data.source == "synthetic":
        eval_source = make_source(local)
        source = ShardedSource(eval_source, ctx.rank, world)
    else:  # model sources split their stream by (rank, world_size) themselves
        from saekit.data.lm_source import make_lm_source

        source = eval_source = make_lm_source(local, ctx.rank, world)
    comm = DataParallelComm(ctx, cfg)
    trainer = Trainer(rank_cfg, source, comm)
    trainer.after_backward = comm.reduce_grads
    return trainer, eval_source


def _destroy_quietly() -> None:
    try:
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - the group may be broken by the very failure we report
        pass


def _write_run_config(cfg: RunConfig) -> None:
    import yaml

    from saekit.atomic import atomic_write_text
    from saekit.train.config import to_dict

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _finish_data(trainer: Trainer, eval_source: Any, cfg: RunConfig) -> list[dict[str, Any]]:
    """Rank 0 evaluates and saves (its SAEs are every rank's); the others wait."""
    from saekit.train.run import evaluate_member, save_outputs

    reports: list[dict[str, Any]] = []
    if trainer.comm.is_main:
        reports = [
            evaluate_member(m, eval_source, cfg.eval_tokens, cfg.batch_size)
            for m in trainer.members
        ]
        save_outputs(trainer, reports)
    trainer.comm.barrier("barrier(after final evaluation)")
    return reports


def _finish_sweep(trainer: Trainer, eval_source: Any, cfg: RunConfig) -> list[dict[str, Any]]:
    """Each rank evaluates its SAEs; weights and reports gathered to rank 0, which saves them."""
    from saekit.sae import SAE
    from saekit.train.run import evaluate_member, save_outputs

    comm = trainer.comm
    own_reports, tensors = {}, {}
    for i, member in zip(comm.mine, trainer.members, strict=True):
        own_reports[str(i)] = evaluate_member(member, eval_source, cfg.eval_tokens, cfg.batch_size)
        for key, value in member.sae.state_dict().items():
            tensors[f"{i}.{key}"] = value.detach().contiguous().cpu()
    payload = save_safetensors_bytes(tensors, metadata={"meta": json.dumps(own_reports)})
    parts = comm.gather_bytes(payload, "final SAEs and reports")
    reports: list[dict[str, Any]] = []
    if parts is not None:
        members: list[Any] = [None] * len(cfg.saes)
        by_index: dict[int, dict[str, Any]] = {}
        for part in parts:
            part_tensors, part_reports = _load_payload(part)
            for key, report in part_reports.items():
                i = int(key)
                sae = SAE(cfg.saes[i].sae, device="cpu")
                sae.load_state_dict(_with_prefix(part_tensors, key))
                members[i] = SimpleNamespace(cfg=cfg.saes[i], sae=sae)
                by_index[i] = report
        reports = [by_index[i] for i in range(len(cfg.saes))]
        save_outputs(SimpleNamespace(out_dir=Path(cfg.out_dir), members=members), reports)
    comm.barrier("barrier(after final save)")
    return reports
