"""Token-level shuffle buffer.

Activations harvested from one context are strongly correlated, so batches are drawn from a
buffer that mixes many contexts. The buffer fills to ``capacity`` tokens, permutes what it
holds, hands out batches until it is half empty, then tops itself up and permutes again (the
refresh-at-half scheme of dictionary_learning's ``ActivationBuffer``). Every input token is
emitted exactly once per pass and the order depends only on the seed, so a source resumes by
replaying the pass (``saekit.data.sources.stream``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import Tensor


class ShuffleBuffer:
    """Shuffle ``[n, d]`` activation batches at token level into ``[batch_size, d]`` batches
    (the last one of a pass may be smaller)."""

    def __init__(self, capacity: int, batch_size: int, *, seed: int = 0) -> None:
        if batch_size < 1 or capacity < batch_size:
            raise ValueError(f"need 1 <= batch_size <= capacity, got {batch_size}, {capacity}")
        self.capacity = capacity
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.storage: Tensor | None = None  # [capacity, d]
        self.n_held = 0  # rows [read_pos, n_held) of storage are live
        self.read_pos = 0
        self.exhausted = False

    @property
    def live(self) -> int:
        return self.n_held - self.read_pos

    def iterate(self, source: Iterable[Tensor]) -> Iterator[Tensor]:
        """Yield shuffled batches until ``source`` and the buffer are empty."""
        chunks = iter(source)
        pending: Tensor | None = None  # part of a source chunk that did not fit yet
        while True:
            if not self.exhausted and (
                self.live <= self.capacity // 2 or self.live < self.batch_size
            ):
                pending = self._refill(chunks, pending)
            if self.live >= self.batch_size or (self.live > 0 and self.exhausted):
                take = min(self.batch_size, self.live)
                assert self.storage is not None
                batch = self.storage[self.read_pos : self.read_pos + take].clone()
                self.read_pos += take
                yield batch
            elif self.exhausted:
                return

    def _refill(self, chunks: Iterator[Tensor], pending: Tensor | None) -> Tensor | None:
        """Compact the live rows to the front, top up from the source, permute."""
        if self.storage is not None and self.read_pos > 0:
            live = self.storage[self.read_pos : self.n_held].clone()
            self.storage[: len(live)] = live
            self.n_held, self.read_pos = len(live), 0
        while self.n_held < self.capacity:
            if pending is None:
                pending = next(chunks, None)
                if pending is None:
                    self.exhausted = True
                    break
                pending = pending.reshape(-1, pending.shape[-1]) if pending.ndim != 2 else pending
            self._ensure_storage(pending)
            assert self.storage is not None
            take = min(self.capacity - self.n_held, len(pending))
            self.storage[self.n_held : self.n_held + take] = pending[:take]
            self.n_held += take
            pending = pending[take:] if take < len(pending) else None
        if self.storage is not None and self.n_held > 0:
            perm = torch.randperm(self.n_held, generator=self.generator)
            self.storage[: self.n_held] = self.storage[perm.to(self.storage.device)]
        return pending

    def _ensure_storage(self, chunk: Tensor) -> None:
        if self.storage is None:
            self.storage = chunk.new_empty(self.capacity, chunk.shape[1])
        elif chunk.shape[1] != self.storage.shape[1] or chunk.dtype != self.storage.dtype:
            raise ValueError(
                f"source chunk [*, {chunk.shape[1]}] {chunk.dtype} does not match the buffer's"
                f" [*, {self.storage.shape[1]}] {self.storage.dtype}"
            )
