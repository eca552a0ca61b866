"""Batch sources of a multi-process run (see :mod:`saekit.train.parallel` for the semantics).

- :class:`ShardedSource`: data parallel on generated data, each rank generates its own batches.
- :class:`BroadcastSource`: sweep parallel on a model or cache source, rank 0 reads each batch
  and broadcasts it to the others (latent parallelism: rank 0 of each latent group).
- :class:`RowSliceSource`: latent parallelism on generated data, each data group its rows of
  the whole batch.

Model and cache sources split their stream by (rank, world_size) themselves (their ``build``).
Which a source uses is its config's choice (``SourceConfig.sweep_source`` and
``data_parallel_sources`` in :mod:`saekit.data.sources.config`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import torch
from torch import Tensor

from saekit.core.comm import Comm
from saekit.data.sources.interface import ActivationSource


class GeneratedSource(Protocol):
    """A source whose batch i is ``data.batch(i, batch_size)`` (saekit.data.sources.synthetic)."""

    data: Any
    batch_size: int

    def batches(self, start: int = 0) -> Iterator[Tensor]: ...

    def sample_for_init(self) -> Tensor: ...

    def eval_batches(
        self, n_tokens: int, batch_size: int
    ) -> Iterator[tuple[Tensor, Tensor | None]]: ...


class DistributedContext(Protocol):
    device: torch.device


class BroadcastComm(Comm, Protocol):
    """What BroadcastSource needs of the run's communicator (saekit.train.comm.ProcessGroupComm):
    the collectives, and the device its tensors live on."""

    ctx: DistributedContext


class ShardedSource(ActivationSource):
    """Data parallel on synthetic data: rank r at step i reads batch index ``i·world + r`` of
    ``inner.batch_size`` (= batch_size / world) tokens; a pure function of (seed, index)."""

    def __init__(self, inner: GeneratedSource, rank: int, world_size: int):
        self.inner = inner  # built with the per-rank batch size
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


class RowSliceSource(ActivationSource):
    """Latent parallelism on generated data: data group ``part`` of ``parts`` trains on rows
    [part·n, (part + 1)·n) of the whole batch i (n = batch_size / parts), so together the data
    groups train on exactly one process's batch i, whatever their number."""

    def __init__(self, inner: GeneratedSource, part: int, parts: int):
        self.inner = inner  # built with the whole batch size
        self.part, self.parts = part, parts

    def batches(self, start: int = 0) -> Iterator[Tensor]:
        n = self.inner.batch_size // self.parts
        for x in self.inner.batches(start):
            yield x[self.part * n : (self.part + 1) * n]

    def sample_for_init(self) -> Tensor:
        return self.inner.sample_for_init()

    def eval_batches(
        self, n_tokens: int, batch_size: int
    ) -> Iterator[tuple[Tensor, Tensor | None]]:
        return self.inner.eval_batches(n_tokens, batch_size)


_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


class BroadcastSource(ActivationSource):
    """Sweep parallel on a real source: rank 0 reads each batch and broadcasts it.

    Every rank calls the same methods in the same order (the trainer's loop guarantees it for
    ``batches`` and ``sample_for_init``); evaluation batches are broadcast once and kept, since
    ranks evaluate different numbers of SAEs.
    """

    def __init__(self, inner: ActivationSource | None, comm: BroadcastComm):
        self.inner = inner  # only on rank 0
        self.comm = comm
        if inner is not None:
            self.measured_width, self.description = inner.measured_width, inner.description
        self._eval: list[tuple[Tensor, Tensor | None]] | None = None

    def _broadcast(self, x: Tensor | None, what: str) -> Tensor | None:
        """Rank 0's tensor (or None: the end) on every rank: a 4-int header, then the data."""
        device = self.comm.ctx.device
        header = torch.zeros(4, dtype=torch.int64, device=device)
        if self.comm.is_main and x is not None:
            header[0], header[1] = 1, _DTYPES.index(x.dtype)
            header[2], header[3] = x.shape[0], (x.shape[1] if x.dim() > 1 else 0)
        self.comm.broadcast(header, 0, f"header of {what}")
        present, dtype_idx, n, d = header.tolist()
        if not present:
            return None
        shape = (n, d) if d else (n,)
        if self.comm.is_main:
            buf = x.to(device).contiguous()
        else:
            buf = torch.empty(shape, dtype=_DTYPES[dtype_idx], device=device)
        self.comm.broadcast(buf, 0, what)
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
