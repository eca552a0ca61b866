"""Documents and their provenance: which documents an SAE trained on and which were held out.

A document's index counts the documents of its text source in the source's own order (dataset
or file order, before any shuffling) from 0. Sets of indices are kept as sorted, disjoint,
half-open ranges ``[[start, stop], ...]`` (``stop`` None: to the end of the source), so a cache
manifest or an SAE's cfg.json stays small however many documents there are.

Held out, by construction:

- a cache (``saekit cache``) holds out its last shard when it has at least 2; its manifest
  records the documents of every shard and, under ``held_out``, the documents whose every kept
  token is in that shard (a document that starts in the shard before is a training document);
- an online run holds out the leading documents holding ``eval_tokens + context_length``
  tokens (:func:`leading_document_count`).

``build_run_config`` writes :func:`training_record` into each SAE's ``metadata.training_data``,
so ``saekit eval`` can evaluate the held-out documents (``--split heldout``) and warn when the
documents it evaluates overlap the ones the SAE trained on.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from saekit.data.ranges import (
    Ranges,
    spans,
    subtract,
    union,
)
from saekit.data.text import load_hf_documents, read_documents, tokenize_documents

if TYPE_CHECKING:
    from saekit.data.cache import ActivationCache
    from saekit.train.config import DataConfig


# ---------------------------------------------------------------------- text sources


def text_source(
    dataset: str | None = None,
    text_file: str | None = None,
    split: str | None = "train",
    config_name: str | None = None,
    field: str = "text",
) -> dict[str, Any]:
    """What names a text source, as recorded in a cache manifest and an SAE's cfg.json (local
    paths made absolute, so the record survives a change of working directory)."""
    if text_file is not None:
        return {"text_file": str(Path(text_file).resolve()), "field": field}
    if dataset is not None and Path(dataset).exists():
        dataset = str(Path(dataset).resolve())
    return {"dataset": dataset, "split": split, "config_name": config_name, "field": field}


def documents(
    *,
    dataset: str | None = None,
    text_file: str | None = None,
    split: str | None = "train",
    config_name: str | None = None,
    field: str = "text",
    streaming: bool = True,
) -> Iterator[str]:
    """Documents in dataset order from a hub/local dataset or a text/JSONL file."""
    if (dataset is None) == (text_file is None):
        raise ValueError("give exactly one of a dataset and a text file")
    if text_file is not None:
        if not Path(text_file).is_file():
            raise ValueError(f"text file not found: {text_file}")
        return _checked(read_documents(text_file, field=field), text_file, field)
    docs = load_hf_documents(
        dataset, split=split or "train", field=field, config_name=config_name, streaming=streaming
    )
    return _checked(docs, dataset, field)


def _checked(docs: Iterator[str], name: str, field: str) -> Iterator[str]:
    """``docs`` with load errors (raised lazily, e.g. by ``load_dataset`` on the first
    document) turned into one-line ValueErrors naming the data."""
    from saekit.data.models import first_line

    try:
        yield from docs
    except KeyError as exc:
        raise ValueError(f"{name}: a record has no field {field!r} (--text-field)") from exc
    except (OSError, ConnectionError) as exc:
        raise ValueError(f"cannot load dataset {name!r}: {first_line(exc)}") from exc


def open_text(source: dict[str, Any], streaming: bool = True) -> Iterator[str]:
    """The documents of a :func:`text_source` record."""
    return documents(**source, streaming=streaming)


def select(docs: Iterable[str], ranges: Ranges) -> Iterator[tuple[int, str]]:
    """(index, document) for the indices in ``ranges``; stops reading after the last one."""
    index_spans = spans(ranges)
    end = max((b for _, b in index_spans), default=0)
    for index, doc in enumerate(docs):
        if index >= end:
            return
        if any(a <= index < b for a, b in index_spans):
            yield index, doc


def leading_document_count(docs: Iterable[str], tokenizer: Any, n_tokens: int) -> tuple[int, int]:
    """(count, tokens): the fewest leading documents holding at least ``n_tokens`` tokens (all of
    them, with ``tokens < n_tokens``, when the source is shorter)."""
    seen = n_docs = 0
    for ids in tokenize_documents(docs, tokenizer):
        n_docs += 1
        seen += len(ids)
        if seen >= n_tokens:
            break
    return n_docs, seen


# ---------------------------------------------------------------------- records


def cache_documents(cache: ActivationCache) -> tuple[dict | None, Ranges | None, Ranges | None]:
    """(text source, training documents, held-out documents) of an activation cache, each None
    when the manifest does not record it (activations written without document indices)."""
    text = cache.manifest.get("metadata", {}).get("text")
    train = [s for i, s in enumerate(cache.shards) if i != cache.held_out_shard]
    training = (
        None if any(s.documents is None for s in train) else union(*(s.documents for s in train))
    )
    held_out = cache.manifest.get("held_out", {}).get("documents")
    return text, training, held_out


def training_record(data: DataConfig, eval_tokens: int) -> dict[str, Any] | None:
    """What an SAE trained on ``data`` records in ``metadata.training_data`` (None: synthetic).

    cache: the cache, its text source and the documents of its training shards (exact); hf: the
    text source and the held-out rule (the leading ``eval_tokens + context_length`` tokens),
    resolved with the tokenizer by :func:`training_documents`.
    """
    if data.source == "cache":
        from saekit.data.cache import ActivationCache

        text, training, _ = cache_documents(ActivationCache(data.cache_dir))
        cache_dir = str(Path(data.cache_dir).resolve())
        return {"source": "cache", "cache_dir": cache_dir, "text": text, "documents": training}
    if data.source == "hf":
        return {
            "source": "hf",
            "text": text_source(
                data.dataset,
                data.text_file,
                data.dataset_split,
                data.dataset_config,
                data.text_field,
            ),
            "held_out_leading_tokens": eval_tokens + data.context_length,
        }
    return None


def held_out_documents(record: dict[str, Any], tokenizer: Any) -> Ranges:
    """The documents the run behind ``record`` held out (and never trained on)."""
    if record["source"] == "cache":
        from saekit.data.cache import ActivationCache

        _, _, held = cache_documents(ActivationCache(record["cache_dir"]))
        if held is None:
            raise ValueError(
                f"the activation cache {record['cache_dir']} records no held-out documents"
                " (a single shard, or written before caches recorded documents)"
            )
        return held
    n_docs, seen = leading_document_count(
        open_text(record["text"]), tokenizer, record["held_out_leading_tokens"]
    )
    return [[0, n_docs]] if seen >= record["held_out_leading_tokens"] else []


def training_documents(record: dict[str, Any], tokenizer: Any) -> Ranges | None:
    """The documents the run behind ``record`` trained on (None: not recorded)."""
    if record["source"] == "cache":
        return record.get("documents")
    return subtract([[0, None]], held_out_documents(record, tokenizer))
