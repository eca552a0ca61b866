"""Text sources, tokenisation and packing into fixed-length contexts.

Documents come from plain text files, JSONL files or Hugging Face ``datasets`` (streaming or
local). They are shuffled deterministically by seed, split between data-parallel ranks (every
rank sees the same shuffled order and keeps documents ``rank, rank + world_size, ...``), then
tokenised and packed: documents are concatenated with a separator token (EOS) after each one and
cut into contexts of ``context_length`` tokens, each optionally starting with BOS.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


def read_text_file(path: str | Path, *, doc_separator: str | None = "\n\n") -> Iterator[str]:
    """Documents of a plain text file: split on ``doc_separator`` (None: the whole file)."""
    text = Path(path).read_text(encoding="utf-8")
    parts = [text] if doc_separator is None else text.split(doc_separator)
    for part in parts:
        if part.strip():
            yield part


def read_jsonl(path: str | Path, *, field: str = "text") -> Iterator[str]:
    """One document per line of a JSONL file, taken from ``field``."""
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if field not in record:
                raise KeyError(f"{path}:{line_no}: no field {field!r} (fields: {sorted(record)})")
            yield record[field]


def read_documents(
    path: str | Path, *, field: str = "text", doc_separator: str | None = "\n\n"
) -> Iterator[str]:
    """Documents of a ``.jsonl`` file (by ``field``) or of any other text file."""
    if Path(path).suffix in (".jsonl", ".ndjson"):
        return read_jsonl(path, field=field)
    return read_text_file(path, doc_separator=doc_separator)


def load_hf_documents(
    dataset: Any,
    *,
    split: str = "train",
    field: str = "text",
    config_name: str | None = None,
    streaming: bool = True,
    data_files: Any = None,
    seed: int | None = None,
    shuffle_buffer: int = 10_000,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[str]:
    """Documents of a Hugging Face dataset: a hub id / local path, or a ``Dataset`` /
    ``IterableDataset`` object already built.

    ``seed`` shuffles (exactly for map-style datasets, through a ``shuffle_buffer`` for
    streaming ones); then each rank keeps its own share of the documents.
    """
    import datasets

    if isinstance(dataset, (str, Path)):
        dataset = datasets.load_dataset(
            str(dataset), config_name, split=split, streaming=streaming, data_files=data_files
        )
    if isinstance(dataset, datasets.Dataset):
        if seed is not None:
            dataset = dataset.shuffle(seed=seed)
        if world_size > 1:
            dataset = dataset.shard(num_shards=world_size, index=rank, contiguous=False)
        docs: Iterable[Any] = dataset
    else:
        if seed is not None:
            dataset = dataset.shuffle(seed=seed, buffer_size=shuffle_buffer)
        docs = shard_documents(dataset, rank, world_size)
    for record in docs:
        yield record[field]


def shard_documents(docs: Iterable[Any], rank: int, world_size: int) -> Iterator[Any]:
    """Round-robin split: rank ``r`` keeps items ``r, r + world_size, ...``."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    return itertools.islice(docs, rank, None, world_size)


def shuffle_documents(docs: Iterable[Any], seed: int, buffer_size: int = 10_000) -> Iterator[Any]:
    """Deterministic buffered shuffle: each item is emitted once, mixed within ``buffer_size``."""
    rng = random.Random(seed)
    buffer: list[Any] = []
    for doc in docs:
        if len(buffer) < buffer_size:
            buffer.append(doc)
            continue
        j = rng.randrange(buffer_size)
        yield buffer[j]
        buffer[j] = doc
    rng.shuffle(buffer)
    yield from buffer


def tokenize_documents(
    docs: Iterable[str], tokenizer: Any, *, chunk_docs: int = 64
) -> Iterator[list[int]]:
    """Token ids of each document, without special tokens (packing adds them)."""
    docs = iter(docs)
    while chunk := list(itertools.islice(docs, chunk_docs)):
        yield from tokenizer(chunk, add_special_tokens=False)["input_ids"]


def pack_tokens(
    token_lists: Iterable[Sequence[int]],
    context_length: int,
    *,
    separator_id: int | None = None,
    bos_id: int | None = None,
) -> Iterator[list[int]]:
    """Concatenate documents (``separator_id`` after each) and cut contexts of exactly
    ``context_length`` tokens, each starting with ``bos_id`` when given. The incomplete tail is
    dropped.
    """
    body = context_length - (bos_id is not None)
    if body < 1:
        raise ValueError(f"context_length {context_length} leaves no room for tokens")
    head = [] if bos_id is None else [bos_id]
    pending: list[int] = []
    for ids in token_lists:
        pending.extend(ids)
        if separator_id is not None:
            pending.append(separator_id)
        start = 0
        while len(pending) - start >= body:
            yield head + pending[start : start + body]
            start += body
        del pending[:start]


def batch_contexts(contexts: Iterable[Sequence[int]], batch_size: int) -> Iterator[Tensor]:
    """Stack contexts into ``[batch_size, context_length]`` int64 tensors (last may be smaller)."""
    contexts = iter(contexts)
    while chunk := list(itertools.islice(contexts, batch_size)):
        yield torch.tensor(chunk, dtype=torch.long)


def token_batches(
    docs: Iterable[str],
    tokenizer: Any,
    *,
    context_length: int,
    batch_size: int,
    add_bos: bool = True,
    add_separator: bool = True,
    seed: int | None = None,
    shuffle_buffer: int = 10_000,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[Tensor]:
    """Documents -> shuffled (if ``seed``), rank-sharded, tokenised, packed ``[B, T]`` batches.

    The separator is the tokenizer's EOS (falling back to BOS); BOS falls back to EOS (GPT-2
    has only one such token). Deterministic for fixed documents, seed, rank and world size.
    """
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    if (add_bos and bos is None) or (add_separator and eos is None):
        raise ValueError("the tokenizer has neither a BOS nor an EOS token")
    if seed is not None:
        docs = shuffle_documents(docs, seed, shuffle_buffer)
    docs = shard_documents(docs, rank, world_size)
    contexts = pack_tokens(
        tokenize_documents(docs, tokenizer),
        context_length,
        separator_id=eos if add_separator else None,
        bos_id=bos if add_bos else None,
    )
    return batch_contexts(contexts, batch_size)
