"""What the sources of real models share: a stream of batches read once, cycled by epoch.

A disk cache (:mod:`saekit.data.sources.cache`) and a model run online
(:mod:`saekit.data.sources.hf`) both implement
:class:`~saekit.data.sources.interface.ActivationSource`: ``batches(start)`` is an endless,
deterministic stream of ``[batch_size, d]`` float32 batches (batch ``i`` depends only on the data,
the seed, rank and world size), ``sample_for_init()`` ~16k training tokens (dataset scale and
b_dec: for the model source the first ones, taken from the stream the next ``batches(0)``
continues, so nothing is read twice; for the cache, drawn across up to 8 training shards),
``eval_batches`` a held-out part that training never sees.

- :class:`CacheSource` reads a directory written by ``saekit cache``. Held out: the **last shard**,
  when the cache has at least 2 shards; with a single shard a warning is issued and evaluation
  reuses training data.
- :class:`HFSource` runs a ``transformers`` model on text (a hub dataset, a local dataset path or
  a text/JSONL file). Held out: the **leading documents** (in dataset order, before shuffling)
  holding at least ``eval_tokens + context_length`` tokens; ``saekit eval`` on the same dataset
  reads these same documents first. If the whole dataset is shorter than that, a warning is
  issued and evaluation reuses training data.

Epochs: when the data runs out the stream starts over with the epoch number mixed into the
seed (``seed * 1_000_003 + epoch``, as :meth:`ActivationCache.iter_batches` does), so every epoch
has a new order. Each epoch's incomplete last batch is dropped so every step sees exactly
``batch_size`` tokens. Resume (``batches(start)``) skips batches: whole epochs arithmetically for
the cache, by regenerating them for the online source (model forwards, no SAE steps).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch
from torch import Tensor

from saekit.data.sources.interface import ActivationSource

INIT_TOKENS = 16_384
"""Tokens of ``sample_for_init`` (scale and b_dec estimates)."""


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch (the mixing of :meth:`ActivationCache.iter_batches`)."""
    return seed * 1_000_003 + epoch


def full_batches(batches: Iterator[Tensor], batch_size: int) -> Iterator[Tensor]:
    return (b for b in batches if len(b) == batch_size)


class StreamSource(ActivationSource):
    """``sample_for_init`` takes the first training batches from the very stream that the next
    ``batches(0)`` continues, so the data is read once: the trainer asks for the sample, then
    for ``batches(0)``, and a fresh stream would fill its shuffle buffer (for a model source:
    run the model on up to ``shuffle_buffer_tokens`` tokens) a second time before step 0."""

    init_tokens: int
    _started: Iterator[Tensor] | None = None

    def _stream(self, start: int) -> Iterator[Tensor]:
        raise NotImplementedError

    def batches(self, start: int = 0) -> Iterator[Tensor]:
        if start == 0 and self._started is not None:
            stream, self._started = self._started, None
            return stream
        return self._stream(start)

    def sample_for_init(self) -> Tensor:
        """The first ``init_tokens`` training tokens (fewer if the data is shorter)."""
        stream = self._stream(0)
        taken, n = [], 0
        for batch in stream:
            taken.append(batch)
            n += len(batch)
            if n >= self.init_tokens:
                break
        if not taken:
            raise ValueError("the activation source yielded no tokens")
        self._started = itertools.chain(taken, stream)
        return torch.cat(taken)[: self.init_tokens]


def rebatch_up_to(chunks: Iterator[Tensor], batch_size: int, n_tokens: int) -> Iterator[Tensor]:
    """At most ``n_tokens`` rows of ``chunks`` re-cut into batches of ``batch_size``."""
    pending: list[Tensor] = []
    n_pending = n_total = 0
    for chunk in chunks:
        chunk = chunk[: n_tokens - n_total]
        pending.append(chunk)
        n_pending += len(chunk)
        n_total += len(chunk)
        while n_pending >= batch_size:
            flat = torch.cat(pending)
            yield flat[:batch_size]
            pending, n_pending = [flat[batch_size:]], n_pending - batch_size
        if n_total >= n_tokens:
            break
    if n_pending:
        yield torch.cat(pending)
