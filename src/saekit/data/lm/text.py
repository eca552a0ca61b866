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

AUTO = "auto"
NONE = "none"
DOCUMENT_IDS = "document_ids"
"""Key of the per-position document indices in the batches of ``token_batches(with_documents=...)``
and the harvests of :func:`saekit.data.lm.harvest.harvest`."""
NO_DOCUMENT = -1
"""Document index of a position that belongs to no document (BOS)."""


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
        # verbose=False: whole documents are tokenised before packing cuts them into contexts
        # of --context-length, so a document longer than the model's positions is expected and
        # harmless; transformers would print "Token indices sequence length is longer than the
        # specified maximum sequence length ... indexing errors" on every BERT run (issue 28).
        # With no padding or truncation asked for, that is the only warning verbose gates here.
        yield from tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]


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
    indexed = enumerate(token_lists)
    for ids, _ in pack_documents(indexed, context_length, separator_id=separator_id, bos_id=bos_id):
        yield ids


def pack_documents(
    indexed_token_lists: Iterable[tuple[int, Sequence[int]]],
    context_length: int,
    *,
    separator_id: int | None = None,
    bos_id: int | None = None,
) -> Iterator[tuple[list[int], list[int]]]:
    """:func:`pack_tokens` of ``(document index, ids)`` pairs: each context with the index of
    the document of every position (a separator belongs to the document it ends; BOS is
    :data:`NO_DOCUMENT`)."""
    body = context_length - (bos_id is not None)
    if body < 1:
        raise ValueError(f"context_length {context_length} leaves no room for tokens")
    head = [] if bos_id is None else [bos_id]
    head_docs = [NO_DOCUMENT] * len(head)
    pending: list[int] = []
    pending_docs: list[int] = []
    for index, ids in indexed_token_lists:
        pending.extend(ids)
        if separator_id is not None:
            pending.append(separator_id)
        pending_docs.extend([index] * (len(pending) - len(pending_docs)))
        start = 0
        while len(pending) - start >= body:
            end = start + body
            yield head + pending[start:end], head_docs + pending_docs[start:end]
            start = end
        del pending[:start]
        del pending_docs[:start]


def batch_contexts(contexts: Iterable[Sequence[int]], batch_size: int) -> Iterator[Tensor]:
    """Stack contexts into ``[batch_size, context_length]`` int64 tensors (last may be smaller)."""
    contexts = iter(contexts)
    while chunk := list(itertools.islice(contexts, batch_size)):
        yield torch.tensor(chunk, dtype=torch.long)


def packing_token_ids(
    tokenizer: Any, bos_token: str = AUTO, eos_token: str = AUTO
) -> tuple[int | None, int | None]:
    """The ids packing puts first in each context (BOS) and after each document (separator).

    ``auto``: BOS is the tokenizer's BOS, else its EOS (GPT-2 has one token for both), else its
    CLS; the separator is its EOS, else its BOS, else its SEP. So a BERT-style tokenizer, which
    has neither BOS nor EOS, packs ``[CLS] doc [SEP] doc [SEP] ...`` as in BERT pre-training
    (Devlin et al. 2019, section 3.1). ``none``: no such token; contexts are then plain cuts of
    the concatenated documents. Any other value names a token of the vocabulary.
    """

    def pick(value: str, flag: str, fallbacks: tuple[str, ...]) -> int | None:
        if value == NONE:
            return None
        if value == AUTO:
            for attr in fallbacks:
                token_id = getattr(tokenizer, f"{attr}_token_id", None)
                if token_id is not None:
                    return int(token_id)
            raise ValueError(
                f"the tokenizer has no {'/'.join(a.upper() for a in fallbacks)} token to"
                f" {'start contexts' if flag == '--bos-token' else 'separate documents'}: name"
                f" one with {flag} TOKEN, or pack without it: {flag} none"
            )
        token_id = tokenizer.convert_tokens_to_ids(value)
        unk = getattr(tokenizer, "unk_token_id", None)
        if token_id is None or (token_id == unk and value != getattr(tokenizer, "unk_token", None)):
            raise ValueError(f"{flag} {value!r} is not a token of the tokenizer's vocabulary")
        return int(token_id)

    bos = pick(bos_token, "--bos-token", ("bos", "eos", "cls"))
    eos = pick(eos_token, "--eos-token", ("eos", "bos", "sep"))
    return bos, eos


def token_batches(
    docs: Iterable[str],
    tokenizer: Any,
    *,
    context_length: int,
    batch_size: int,
    bos_token: str = AUTO,
    eos_token: str = AUTO,
    seed: int | None = None,
    shuffle_buffer: int = 10_000,
    rank: int = 0,
    world_size: int = 1,
    indices: Iterable[int] | None = None,
    with_documents: bool = False,
) -> Iterator[Any]:
    """Documents -> shuffled (if ``seed``), rank-sharded, tokenised, packed ``[B, T]`` batches.

    BOS and separator: :func:`packing_token_ids`. Deterministic for fixed documents, seed, rank
    and world size. ``with_documents``: each batch is ``{"input_ids": [B, T], DOCUMENT_IDS:
    [B, T]}``, the second holding each position's document index (``indices``, default 0, 1,
    2, ... in the order of ``docs``; :data:`NO_DOCUMENT` for BOS).
    """
    bos, eos = packing_token_ids(tokenizer, bos_token, eos_token)
    numbers = itertools.count() if indices is None else indices
    indexed: Iterable[tuple[int, str]] = zip(numbers, docs, strict=False)
    if seed is not None:
        indexed = shuffle_documents(indexed, seed, shuffle_buffer)
    indexed = shard_documents(indexed, rank, world_size)
    contexts = pack_documents(
        _tokenized(indexed, tokenizer), context_length, separator_id=eos, bos_id=bos
    )
    if not with_documents:
        return batch_contexts((ids for ids, _ in contexts), batch_size)
    return _with_documents(contexts, batch_size)


def _tokenized(
    indexed: Iterable[tuple[int, str]], tokenizer: Any
) -> Iterator[tuple[int, list[int]]]:
    indexed = iter(indexed)
    while chunk := list(itertools.islice(indexed, 64)):
        numbers, texts = zip(*chunk, strict=True)
        yield from zip(numbers, tokenize_documents(texts, tokenizer, chunk_docs=64), strict=True)


def _with_documents(
    contexts: Iterator[tuple[list[int], list[int]]], batch_size: int
) -> Iterator[dict[str, Tensor]]:
    while chunk := list(itertools.islice(contexts, batch_size)):
        ids, doc_ids = zip(*chunk, strict=True)
        yield {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            DOCUMENT_IDS: torch.tensor(doc_ids, dtype=torch.long),
        }
