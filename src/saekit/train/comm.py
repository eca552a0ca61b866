"""Collectives over a ``torch.distributed`` process group (torchrun or ``--nproc``).

:class:`ProcessGroupComm` implements :class:`saekit.core.comm.Comm` and nothing else: all-reduce
with an op, broadcast, gather, barrier, the agreement to stop. What the ranks do with them (data
and sweep parallelism, who writes checkpoints) is in :mod:`saekit.train.parallel`.

Failure: every collective runs under the process group's timeout (``SAEKIT_DIST_TIMEOUT``
seconds, default 1800, see :mod:`saekit.train.launch`; gloo honours it, NCCL's watchdog aborts
the process). A rank that dies makes the others' next collective fail at once; one that hangs
makes it fail after the timeout. Either way they raise :class:`DistributedFailure`, naming the
collective, and exit non-zero.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from saekit.core.comm import ReduceOp
from saekit.train.launch import TIMEOUT_ENV, DistContext, DistributedFailure

# avg is a sum divided here: gloo has no AVG, and the division stays in the tensor's dtype.
_OPS = {
    "sum": dist.ReduceOp.SUM,
    "avg": dist.ReduceOp.SUM,
    "min": dist.ReduceOp.MIN,
    "max": dist.ReduceOp.MAX,
}

# torch 2.13 renamed all_gather_into_tensor (now deprecated) to all_gather_single
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class ProcessGroupComm:
    """The collectives of this process's group; ``hint`` ends the message of a failure (what
    the user can do: the run's resume command). ``group``: a sub-group of the run's ranks
    (``dist.new_group``, e.g. one latent group of :mod:`saekit.train.mesh`), whose own ranks
    ``rank``, ``src`` and the gather's destination 0 are; None: every rank."""

    def __init__(self, ctx: DistContext, hint: str = "", group: Any = None):
        self.ctx = ctx
        self.group = group
        self.rank = ctx.rank if group is None else dist.get_rank(group)
        self.world_size = ctx.world_size if group is None else dist.get_world_size(group)
        self.is_main = self.rank == 0
        self.hint = hint
        self._where = f"rank {ctx.rank}/{ctx.world_size}" + (
            "" if group is None else f" (rank {self.rank}/{self.world_size} of its group)"
        )

    def _run(self, what: str, fn: Callable[..., Any], *args, **kwargs) -> Any:
        """Run one collective; turn a failure into a :class:`DistributedFailure` naming it."""
        try:
            return fn(*args, **kwargs)
        except DistributedFailure:
            raise
        except RuntimeError as exc:  # gloo/NCCL errors (DistBackendError is a RuntimeError)
            cause = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            hint = f" {self.hint}" if self.hint else ""
            raise DistributedFailure(
                f"{self._where}: {what} failed: another rank died or did "
                f"not respond within {self.ctx.timeout_s:g} s ({TIMEOUT_ENV}).{hint} "
                f"Cause: {cause}"
            ) from exc

    def all_reduce(self, x: Tensor, op: ReduceOp = "sum", what: str = "tensor") -> Tensor:
        self._run(f"all_reduce({what})", dist.all_reduce, x.view(-1), _OPS[op], self.group)
        if op == "avg":
            x.div_(self.world_size)
        return x

    def all_gather(self, x: Tensor, what: str = "tensor") -> Tensor:
        """Into one flat buffer (the concatenation form: gloo refuses the stacked one)."""
        out = x.new_empty(self.world_size * x.numel())
        self._run(f"all_gather({what})", _ALL_GATHER, out, x.reshape(-1).contiguous(), self.group)
        return out.view(self.world_size, *x.shape)

    def broadcast(self, x: Tensor, src: int = 0, what: str = "tensor") -> Tensor:
        self._run(f"broadcast({what})", dist.broadcast, x, group=self.group, group_src=src)
        return x

    def gather(self, payload: bytes, what: str = "bytes") -> list[bytes] | None:
        """Padded to the longest payload; tensors, never pickles."""
        device = self.ctx.device
        data = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if payload else None
        size = torch.tensor([len(payload)], dtype=torch.int64, device=device)
        sizes = [torch.zeros_like(size) for _ in range(self.world_size)]
        self._run(f"all_gather(sizes of {what})", dist.all_gather, sizes, size, self.group)
        lengths = [int(s.item()) for s in sizes]
        padded = torch.zeros(max(lengths), dtype=torch.uint8, device=device)
        if data is not None:
            padded[: len(payload)] = data.to(device)
        bufs = [torch.empty_like(padded) for _ in lengths] if self.is_main else None
        self._run(f"gather({what})", dist.gather, padded, bufs, group=self.group, group_dst=0)
        if bufs is None:
            return None
        return [bytes(b[:n].cpu().numpy().tobytes()) for b, n in zip(bufs, lengths, strict=True)]

    def barrier(self, what: str = "barrier") -> None:
        if self.ctx.backend == "gloo":  # names the ranks that did not arrive
            self._run(what, dist.monitored_barrier, self.group, wait_all_ranks=True)
        else:
            self._run(what, dist.barrier, self.group)

    def agree_stop(self, signum: int | None) -> int | None:
        """One tiny all-reduce (MAX of the signal numbers, 0 for none)."""
        flag = torch.tensor([signum or 0], dtype=torch.int64, device=self.ctx.device)
        self.all_reduce(flag, "max", "stop flag")
        return int(flag.item()) or None
