"""Token-level shuffle buffer and the dataset scale estimate.

Activations harvested from one context are strongly correlated, so batches are drawn from a
buffer that mixes many contexts. The buffer fills to ``capacity`` tokens, permutes what it
holds, hands out batches until it is half empty, then tops itself up and permutes again (the
refresh-at-half scheme of dictionary_learning's ``ActivationBuffer``). Every input token is
emitted exactly once per pass, the order depends only on the seed, and :meth:`state_dict`
captures everything needed to resume mid-pass exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor


class ShuffleBuffer:
    """Shuffle ``[n, d]`` activation batches at token level into ``[batch_size, d]`` batches.

    Resume: ``state_dict()`` taken after a batch was received, loaded into a fresh buffer with
    ``load_state_dict``, then ``iterate(source)`` over the same deterministic source yields the
    remaining batches bit for bit (the buffer skips the ``tokens_in`` source tokens it already
    consumed; those it still held are in the state).
    """

    def __init__(
        self, capacity: int, batch_size: int, *, seed: int = 0, drop_last: bool = False
    ) -> None:
        if batch_size < 1 or capacity < batch_size:
            raise ValueError(f"need 1 <= batch_size <= capacity, got {batch_size}, {capacity}")
        self.capacity = capacity
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.generator = torch.Generator().manual_seed(seed)
        self.storage: Tensor | None = None  # [capacity, d]
        self.n_held = 0  # rows [read_pos, n_held) of storage are live
        self.read_pos = 0
        self.tokens_in = 0  # source tokens moved into storage so far
        self.tokens_out = 0
        self.exhausted = False

    @property
    def live(self) -> int:
        return self.n_held - self.read_pos

    def iterate(self, source: Iterable[Tensor]) -> Iterator[Tensor]:
        """Yield shuffled batches until ``source`` and the buffer are empty."""
        chunks = _skip_tokens(iter(source), self.tokens_in)
        pending: Tensor | None = None  # part of a source chunk that did not fit yet
        while True:
            if not self.exhausted and (
                self.live <= self.capacity // 2 or self.live < self.batch_size
            ):
                pending = self._refill(chunks, pending)
            if self.live >= self.batch_size or (self.live > 0 and self.exhausted):
                if self.live < self.batch_size and self.drop_last:
                    return
                take = min(self.batch_size, self.live)
                assert self.storage is not None
                batch = self.storage[self.read_pos : self.read_pos + take].clone()
                self.read_pos += take
                self.tokens_out += take
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
            self.tokens_in += take
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

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: live tokens, RNG state and counters."""
        held = None
        if self.storage is not None:
            held = self.storage[self.read_pos : self.n_held].clone()
        return {
            "held": held,
            "rng_state": self.generator.get_state(),
            "tokens_in": self.tokens_in,
            "tokens_out": self.tokens_out,
            "exhausted": int(self.exhausted),
            "capacity": self.capacity,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if (state["capacity"], state["batch_size"]) != (self.capacity, self.batch_size):
            raise ValueError(
                f"state is for capacity={state['capacity']}, batch_size={state['batch_size']};"
                f" this buffer has capacity={self.capacity}, batch_size={self.batch_size}"
            )
        held = state["held"]
        self.storage = None
        self.n_held = self.read_pos = 0
        if held is not None:
            self.storage = held.new_empty(self.capacity, held.shape[1])
            self.storage[: len(held)] = held
            self.n_held = len(held)
        self.generator.set_state(state["rng_state"])
        self.tokens_in = int(state["tokens_in"])
        self.tokens_out = int(state["tokens_out"])
        self.exhausted = bool(state["exhausted"])


def _skip_tokens(chunks: Iterator[Tensor], n_skip: int) -> Iterator[Tensor]:
    """Drop the first ``n_skip`` tokens (rows) of a stream of ``[n, d]`` chunks."""
    for chunk in chunks:
        if n_skip >= len(chunk):
            n_skip -= len(chunk)
            continue
        yield chunk[n_skip:] if n_skip else chunk
        n_skip = 0
    if n_skip:
        raise ValueError(f"the source ended {n_skip} tokens before the resume point")


def estimate_scale(activation_batches: Iterable[Tensor], n_tokens: int) -> float:
    """s = sqrt(E‖x‖² / d) over the first ``n_tokens`` tokens, so that x / s has E‖x/s‖² = d.

    Accumulates in float64. Uses fewer tokens if the batches run out first.
    """
    total_sq = 0.0
    seen = 0
    d = None
    for batch in activation_batches:
        batch = batch.reshape(-1, batch.shape[-1])[: n_tokens - seen]
        d = batch.shape[1]
        total_sq += float(batch.double().pow(2).sum())
        seen += len(batch)
        if seen >= n_tokens:
            break
    if not seen or d is None:
        raise ValueError("estimate_scale got no activations")
    scale = math.sqrt(total_sq / seen / d)
    if not math.isfinite(scale) or scale == 0.0:
        raise ValueError(f"activation scale is {scale} (all zero or non-finite activations?)")
    return scale
