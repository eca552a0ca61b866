"""Activation sources of real models for the trainer: a disk cache or a model run online.

Both implement :class:`~saekit.data.source.ActivationSource`: ``batches(start)`` is an endless,
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

import copy
import itertools
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from saekit.data.buffer import ShuffleBuffer
from saekit.data.cache import ActivationCache
from saekit.data.documents import documents, leading_document_count
from saekit.data.harvest import HarvestStats, harvest
from saekit.data.hf import HookPoint
from saekit.data.models import activation_width, load_for_harvest
from saekit.data.source import ActivationSource
from saekit.data.text import token_batches

if TYPE_CHECKING:
    from saekit.train.config import DataConfig, RunConfig

INIT_TOKENS = 16_384
"""Tokens of ``sample_for_init`` (scale and b_dec estimates)."""


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch (the mixing of :meth:`ActivationCache.iter_batches`)."""
    return seed * 1_000_003 + epoch


def _full_batches(batches: Iterator[Tensor], batch_size: int) -> Iterator[Tensor]:
    return (b for b in batches if len(b) == batch_size)


class _StreamSource(ActivationSource):
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


def _rebatch_up_to(chunks: Iterator[Tensor], batch_size: int, n_tokens: int) -> Iterator[Tensor]:
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


# ---------------------------------------------------------------------- cache


class CacheSource(_StreamSource):
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
        self.d = self.cache.d
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
        return self.train_cache.spread_sample(self.init_tokens, self.seed + 0x5EED)

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
        )
        return _full_batches(batches, self.batch_size)

    def _stream(self, start: int) -> Iterator[Tensor]:
        epoch, skip = divmod(start, self.batches_per_epoch)
        for e in itertools.count(epoch):
            yield from itertools.islice(self._epoch(e), skip if e == epoch else 0, None)

    def eval_batches(
        self, n_tokens: int, batch_size: int
    ) -> Iterator[tuple[Tensor, Tensor | None]]:
        for x in held_out_batches(self.cache, n_tokens, batch_size):
            yield x, None


def held_out_batches(cache: ActivationCache, n_tokens: int, batch_size: int) -> Iterator[Tensor]:
    """Float32 batches of the cache's held-out shard (the last when it has at least 2, the one
    :class:`CacheSource` never trains on), else, with a warning, of its only shard."""
    held = cache.held_out_shard
    if held is None:
        warnings.warn(
            f"activation cache {cache.directory} has a single shard: nothing is held out, so"
            " evaluation reuses training data (a smaller --shard-tokens gives more shards)",
            stacklevel=2,
        )
    indices = [held] if held is not None else range(len(cache.shards))
    chunks = (cache.load_shard(i).float() for i in indices)
    return _rebatch_up_to(chunks, batch_size, n_tokens)


# ---------------------------------------------------------------------- online


class HFSource(_StreamSource):
    """Activations of a ``transformers`` model at one hook point, harvested while training.

    Per epoch: the training documents (all but the held-out leading ones) are shuffled (seeded
    with the epoch), split between ranks, tokenised and packed into contexts of
    ``context_length`` (BOS first, EOS between documents), run through the model
    ``model_batch_size`` contexts at a time (in a background thread when ``prefetch > 0``, so
    the forward overlaps SAE steps), filtered (padding, BOS unless ``keep_bos``) and mixed at
    token level in a :class:`ShuffleBuffer` before being cut into batches of ``batch_size``.
    """

    def __init__(
        self,
        data: DataConfig,
        batch_size: int,
        seed: int,
        eval_tokens: int,
        device: str = "cpu",
        rank: int = 0,
        world_size: int = 1,
        init_tokens: int = INIT_TOKENS,
    ) -> None:
        self.data = data
        self.batch_size = batch_size
        self.seed = seed
        self.eval_tokens = eval_tokens
        self.rank = rank
        self.world_size = world_size
        self.init_tokens = init_tokens
        setup = load_for_harvest(
            data.model,
            data.hook,
            dtype=data.model_dtype,
            device=device,
            local_files_only=data.local_files_only,
            model_class=data.model_class,
            bos_token=data.bos_token,
            eos_token=data.eos_token,
            exclude_bos=not data.keep_bos,
        )
        self.model, self.tokenizer, kind = setup.model, setup.tokenizer, setup.kind
        self.hook, self.bos_id = setup.hook, setup.bos_id
        # a transcoder's target: harvested in the same pass, its columns after the input's
        target = [] if data.target_hook is None else [str(HookPoint.parse(data.target_hook))]
        self.hooks = [self.hook, *target]
        self.harvester = setup.harvester(*target, dtype=torch.float32)
        self.d = sum(activation_width(self.model, hook, kind) for hook in self.hooks)
        self._n_eval_docs: int | None = None
        self.harvest_stats = HarvestStats()
        """Training tokens harvested and outliers dropped (``data.outlier_norm``) so far."""

    def _documents(self) -> Iterator[str]:
        data = self.data
        return documents(
            dataset=data.dataset,
            text_file=data.text_file,
            split=data.dataset_split,
            config_name=data.dataset_config,
            field=data.text_field,
            streaming=data.streaming,
        )

    @property
    def n_eval_docs(self) -> int:
        """Leading documents held out for evaluation (0 when the dataset is too short)."""
        if self._n_eval_docs is None:
            target = self.eval_tokens + self.data.context_length
            count, seen = leading_document_count(self._documents(), self.tokenizer, target)
            if seen < target:
                warnings.warn(
                    f"the dataset has only {seen} tokens, fewer than eval_tokens +"
                    f" context_length = {target}: nothing is held out, evaluation reuses"
                    " training data",
                    stacklevel=2,
                )
                count = 0
            self._n_eval_docs = count
        return self._n_eval_docs

    def _contexts(self, docs: Iterator[str], seed: int | None, rank: int, world: int):
        return token_batches(
            docs,
            self.tokenizer,
            context_length=self.data.context_length,
            batch_size=self.data.model_batch_size,
            bos_token=self.data.bos_token,
            eos_token=self.data.eos_token,
            seed=seed,
            rank=rank,
            world_size=world,
        )

    def _activations(self, contexts, stats: HarvestStats | None = None) -> Iterator[Tensor]:
        outputs = harvest(
            self.harvester,
            contexts,
            prefetch=self.data.prefetch,
            outlier_norm=self.data.outlier_norm,
            stats=stats,
        )
        for out in outputs:
            yield torch.cat([out[hook] for hook in self.hooks], dim=-1).cpu()

    def _epoch(self, epoch: int) -> Iterator[Tensor]:
        docs = itertools.islice(self._documents(), self.n_eval_docs, None)
        s = epoch_seed(self.seed, epoch)
        contexts = self._contexts(docs, s, self.rank, self.world_size)
        capacity = max(self.data.shuffle_buffer_tokens, self.batch_size)
        buffer = ShuffleBuffer(capacity, self.batch_size, seed=s)
        activations = self._activations(contexts, self.harvest_stats)
        return _full_batches(buffer.iterate(activations), self.batch_size)

    def _stream(self, start: int) -> Iterator[Tensor]:
        def endless() -> Iterator[Tensor]:
            for epoch in itertools.count():
                n = 0
                for batch in self._epoch(epoch):
                    n += 1
                    yield batch
                if n == 0:
                    raise ValueError(
                        f"the training documents of {self.data.dataset or self.data.text_file}"
                        f" (after {self.n_eval_docs} held out for evaluation) give fewer than"
                        f" batch_size = {self.batch_size} tokens"
                    )

        return itertools.islice(endless(), start, None)

    def eval_batches(
        self, n_tokens: int, batch_size: int
    ) -> Iterator[tuple[Tensor, Tensor | None]]:
        docs = self._documents()
        if self.n_eval_docs:
            docs = itertools.islice(docs, self.n_eval_docs)
        contexts = self._contexts(docs, None, 0, 1)
        for x in _rebatch_up_to(self._activations(contexts), batch_size, n_tokens):
            yield x, None


# ---------------------------------------------------------------------- factory


def make_lm_source(cfg: RunConfig, rank: int = 0, world_size: int = 1) -> CacheSource | HFSource:
    """The source of ``cfg.data`` (cache or hf); checks every SAE's d_in against its width."""
    data = cfg.data
    source: CacheSource | HFSource
    if data.source == "cache":
        source = CacheSource(
            data.cache_dir,
            cfg.batch_size,
            data.shuffle_buffer_tokens,
            cfg.seed,
            rank=rank,
            world_size=world_size,
        )
        where = f"the activation cache {data.cache_dir}"
    elif data.source == "hf":
        source = HFSource(
            data,
            cfg.batch_size,
            cfg.seed,
            cfg.eval_tokens,
            device=cfg.device,
            rank=rank,
            world_size=world_size,
        )
        where = f"hook {data.hook} of model {data.model}"
    else:
        raise ValueError(f"data.source {data.source!r} is not a model source (cache or hf)")
    for i, s in enumerate(cfg.saes):
        if s.sae.stream_width != source.d:
            field = "d_in + d_out" if s.sae.transcoder else "d_in"
            raise ValueError(
                f"saes.{i}.sae.{field} = {s.sae.stream_width} but the activations at {where} have"
                f" width {source.d}; set saes.{i}.sae.{field}={source.d}"
            )
    return source
