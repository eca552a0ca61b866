"""``data.source: cache``: training batches from a directory written by ``saekit cache``.

Held out: the **last shard**, when the cache has at least 2 shards; with a single shard a warning
is issued and evaluation reuses training data.

Hooks: a run trains on ``data.hook`` (an SAE) or ``data.hook`` + ``data.target_hook`` (a
transcoder) of the cache's hooks, or on ``data.input_hooks`` (+ ``data.target_hooks``: a
crosscoder's sources, a cross-layer transcoder's inputs and targets); a cache of 1 or 2 hooks
needs none, one of 3 or more is refused without them (saekit.data.hook_columns.selected_hooks).
Batches hold only those columns. A cache of several models (``saekit cache --models``) names its
hooks ``LABEL/HOOK`` (``base/model.layers.13``), and so does the selection.
"""

from __future__ import annotations

import copy
import itertools
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saekit.data.cache.reading import ActivationCache, CacheError
from saekit.data.documents.held_out import cache_documents
from saekit.data.hook_columns import hook_groups, select_columns, selected_hooks
from saekit.data.sources.config import SourceConfig
from saekit.data.sources.interface import StreamSettings
from saekit.data.sources.stream import INIT_TOKENS, StreamSource, full_batches, rebatch_up_to


class CacheSource(StreamSource):
    """Training batches from an activation cache (``saekit cache``), shuffled, cycled by epoch.

    Training reads every shard but the last (held out for ``eval_batches``) when the cache has
    at least 2 shards, else all of them. Token order within an epoch: shards in a seeded order
    through a :class:`ShuffleBuffer` of ``shuffle_buffer_tokens`` (0: file order).
    """

    def __init__(
        self,
        cache_dir: str | Path,
        batch_size: int,
        shuffle_buffer_tokens: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        init_tokens: int = INIT_TOKENS,
        hooks: list[str] | None = None,
    ) -> None:
        self.cache = ActivationCache(cache_dir)
        if not self.cache.complete:
            raise ValueError(
                f"activation cache {cache_dir} is incomplete ({self.cache.n_tokens} tokens): its"
                " `saekit cache` run was interrupted; run it again with the same arguments"
            )
        self.batch_size = batch_size
        self.shuffle_buffer_tokens = shuffle_buffer_tokens
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.init_tokens = init_tokens
        self.hooks = [name for name, _ in self.cache.hooks] if hooks is None else hooks
        """The hooks the run trains on: batches are their columns, in this order."""
        self.columns = select_columns(self.cache.hooks, self.hooks)
        widths = dict(self.cache.hooks)
        self.d = self.measured_width = sum(widths[name] for name in self.hooks)
        self.description = f"the activation cache {cache_dir}"
        self.held_out = self.cache.held_out_shard is not None
        self.train_cache = self._training_view() if self.held_out else self.cache
        if self.train_cache.shards and world_size > len(self.train_cache.shards):
            raise ValueError(
                f"activation cache {cache_dir} has {len(self.train_cache.shards)} training"
                f" shard(s), fewer than world_size = {world_size}; write smaller shards"
            )
        per_rank = [
            sum(
                self.train_cache.shards[i].n_tokens
                for i in self.train_cache.rank_shards(r, world_size)
            )
            for r in range(world_size)
        ]
        self.batches_per_epoch = min(per_rank) // batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"activation cache {cache_dir} has {min(per_rank)} training tokens per rank,"
                f" fewer than one batch of batch_size = {batch_size}"
            )

    def sample_for_init(self) -> Tensor:
        """Spread over the training shards, not the stream's start (see ``spread_sample``)."""
        return self.train_cache.spread_sample(
            self.init_tokens, self.seed + 0x5EED, columns=self.columns
        )

    def _training_view(self) -> ActivationCache:
        """The cache without its held-out shard (a shallow copy; the files are shared)."""
        view = copy.copy(self.cache)
        view.shards = [s for i, s in enumerate(self.cache.shards) if i != self.cache.held_out_shard]
        view.n_tokens = sum(s.n_tokens for s in view.shards)
        return view

    def _epoch(self, epoch: int) -> Iterator[Tensor]:
        batches = self.train_cache.iter_batches(
            self.batch_size,
            self.shuffle_buffer_tokens,
            self.seed,
            self.rank,
            self.world_size,
            epoch=epoch,
            dtype=torch.float32,
            columns=self.columns,
        )
        return full_batches(batches, self.batch_size)

    def _stream(self, start: int) -> Iterator[Tensor]:
        epoch, skip = divmod(start, self.batches_per_epoch)
        for e in itertools.count(epoch):
            yield from itertools.islice(self._epoch(e), skip if e == epoch else 0, None)

    def eval_batches(
        self, n_tokens: int, batch_size: int
    ) -> Iterator[tuple[Tensor, Tensor | None]]:
        for x in held_out_batches(self.cache, n_tokens, batch_size, self.columns):
            yield x, None


def held_out_batches(
    cache: ActivationCache, n_tokens: int, batch_size: int, columns: slice | Tensor = slice(None)
) -> Iterator[Tensor]:
    """Float32 batches (their ``columns``) of the cache's held-out shard (the last when it has at
    least 2, the one :class:`CacheSource` never trains on), else, with a warning, of its only
    shard."""
    held = cache.held_out_shard
    if held is None:
        warnings.warn(
            f"activation cache {cache.directory} has a single shard: nothing is held out, so"
            " evaluation reuses training data (a smaller --shard-tokens gives more shards)",
            stacklevel=2,
        )
    indices = [held] if held is not None else range(len(cache.shards))
    chunks = (cache.load_shard(i, columns).float() for i in indices)
    return rebatch_up_to(chunks, batch_size, n_tokens)


@dataclass
class CacheSourceConfig(SourceConfig):
    """A directory written by ``saekit cache`` (its manifest names the model and hooks)."""

    kind = "cache"
    cache_dir: str | None = None
    """The activation cache directory."""
    shuffle_buffer_tokens: int = 262_144
    """Tokens held in the token-level shuffle buffer (0 reads in file order)."""
    hook: str | None = None
    """Train on this hook of the cache (needed when it holds 3 or more hooks)."""
    target_hook: str | None = None
    """With ``hook``: train transcoders from ``hook`` to this hook of the cache."""
    input_hooks: list[str] | None = None
    """A dictionary over N hooks of the cache: a crosscoder's sources, or a cross-layer
    transcoder's inputs, layer by layer (saekit/data/hook_columns.py)."""
    target_hooks: list[str] | None = None
    """A cross-layer transcoder's targets, in the order of ``input_hooks``."""

    def validate(self) -> None:
        if self.shuffle_buffer_tokens < 0:
            raise ValueError("data.shuffle_buffer_tokens must be >= 0")
        if not self.cache_dir:
            raise ValueError("data.cache_dir is required when data.source is 'cache'")
        if not Path(self.cache_dir).is_dir():
            raise ValueError(f"data.cache_dir: no such directory {self.cache_dir!r}")
        self._hooks  # noqa: B018  (refuses a selection the cache cannot give)

    @cached_property
    def _cache(self) -> ActivationCache:
        """The manifest (read once; the source's own check of its widths and origin)."""
        return ActivationCache(self.cache_dir)

    @property
    def _hooks(self) -> list[str]:
        """The hooks the run trains on: [input] or [input, target]."""
        names = [name for name, _ in self._cache.hooks]
        return selected_hooks(
            names,
            self.hook,
            self.target_hook,
            self.describe(),
            self.input_hooks,
            self.target_hooks,
        )

    def describe(self) -> str:
        return f"the activation cache {self.cache_dir}"

    def input_width(self) -> int:
        return dict(self._cache.hooks)[self._hooks[0]]

    def has_target(self) -> bool:  # a transcoder's stream: [input | target]
        return bool(self.hook_groups()[1])

    def hook_groups(self) -> tuple[list[str], list[str]]:
        return hook_groups(self._hooks, self.input_hooks)

    def hook_width(self, name: str) -> int | None:
        return dict(self._cache.hooks)[name]

    def target_width(self) -> int | None:
        targets = self.hook_groups()[1]
        return dict(self._cache.hooks)[targets[0]] if targets else None

    def origin(self) -> dict[str, str]:
        inputs, targets = self.hook_groups()
        origin = {"model_name": self._cache.model, "hook": inputs[0]}
        if targets:
            origin["target_hook"] = targets[0]
        return origin

    def context_size(self) -> int | None:
        """The context length the manifest records (None: the cache is gone or unreadable; an
        export then leaves context_size unset rather than fail)."""
        try:
            value = self._cache.manifest.get("metadata", {}).get("context_length")
        except (CacheError, OSError):
            return None
        return value if isinstance(value, int) else None

    def input_paths(self) -> list[tuple[str, str | None]]:
        return [("data.cache_dir", self.cache_dir)]

    def provenance(self, eval_tokens: int) -> dict[str, Any]:
        """The cache, its text source and the documents of its training shards (exact)."""
        text, training, _ = cache_documents(self._cache)
        cache_dir = str(Path(self.cache_dir).resolve())
        record = {"source": "cache", "cache_dir": cache_dir, "text": text, "documents": training}
        models = self._cache.manifest.get("models")
        if models:  # which model each LABEL/HOOK names (saekit.data.lm.model_set)
            record["models"] = dict(models)
        return record

    def build(self, run: StreamSettings, rank: int = 0, world_size: int = 1) -> CacheSource:
        return CacheSource(
            self.cache_dir,
            run.batch_size,
            self.shuffle_buffer_tokens,
            run.seed,
            rank=rank,
            world_size=world_size,
            hooks=self._hooks,
        )
