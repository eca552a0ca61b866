"""Collectives: what the ranks of a run can do together, and the one-process identity.

A ``Comm`` does collectives and nothing else: all-reduce with an op, all-gather, broadcast,
gather, barrier and the agreement to stop. Who calls which collective when (the gradient
all-reduce of a data-parallel step, which rank writes a checkpoint) is the caller's: the step
(:mod:`saekit.train.member`), the trainer and :mod:`saekit.train.parallel`. The process-group
implementation is :class:`saekit.train.comm.ProcessGroupComm`; :class:`LocalComm` is one process,
where every collective is the identity.

``what`` names the payload in the error a failed collective raises.
"""

from __future__ import annotations

from typing import Literal, Protocol

from torch import Tensor

ReduceOp = Literal["sum", "avg", "min", "max"]
"""How an all-reduce combines the ranks' tensors (avg = sum / world_size)."""

COLLECTIVES = frozenset(
    {"all_reduce", "all_gather", "broadcast", "gather", "barrier", "agree_stop"}
)
"""The public methods of a comm (tests/train/test_comm.py holds every comm class to them)."""


class Comm(Protocol):
    """The collectives over the ranks of a run (or of the ranks that share each batch)."""

    rank: int
    world_size: int
    is_main: bool
    """Rank 0."""

    def all_reduce(self, x: Tensor, op: ReduceOp = "sum", what: str = "tensor") -> Tensor:
        """``x`` combined over ranks with ``op``, in place (``x`` contiguous); returns ``x``."""
        ...

    def all_gather(self, x: Tensor, what: str = "tensor") -> Tensor:
        """Every rank's ``x`` (same shape and dtype on each), stacked in rank order: a new
        tensor [world_size, *x.shape]."""
        ...

    def broadcast(self, x: Tensor, src: int = 0, what: str = "tensor") -> Tensor:
        """Rank ``src``'s ``x`` on every rank, in place (same shape and dtype); returns ``x``."""
        ...

    def gather(self, payload: bytes, what: str = "bytes") -> list[bytes] | None:
        """Every rank's ``payload``, in rank order, on rank 0; None on the others."""
        ...

    def barrier(self, what: str = "barrier") -> None:
        """Wait until every rank arrives."""
        ...

    def agree_stop(self, signum: int | None) -> int | None:
        """The signal to stop on, the same on every rank: any rank's (None: go on)."""
        ...


class LocalComm:
    """One process: every collective is the identity."""

    rank = 0
    world_size = 1
    is_main = True

    def all_reduce(self, x: Tensor, op: ReduceOp = "sum", what: str = "tensor") -> Tensor:
        return x

    def all_gather(self, x: Tensor, what: str = "tensor") -> Tensor:
        return x.unsqueeze(0)

    def broadcast(self, x: Tensor, src: int = 0, what: str = "tensor") -> Tensor:
        return x

    def gather(self, payload: bytes, what: str = "bytes") -> list[bytes] | None:
        return [payload]

    def barrier(self, what: str = "barrier") -> None:
        pass

    def agree_stop(self, signum: int | None) -> int | None:
        return signum
