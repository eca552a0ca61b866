"""The documents of a text source, by index: what an SAE trained on and what was held out.

A document's index counts the documents of its text source in the source's own order (dataset
or file order, before any shuffling) from 0. Sets of indices are kept as sorted, disjoint,
half-open ranges ``[[start, stop], ...]`` (:mod:`saekit.data.documents.ranges`; ``stop`` None: to
the end of the source), so a cache manifest or an SAE's cfg.json stays small however many
documents there are. Which documents a run held out: :mod:`saekit.data.documents.held_out`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from saekit.data.documents.ranges import Ranges, spans
from saekit.data.lm.text import load_hf_documents, read_documents, tokenize_documents


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
    from saekit.data.lm.models import first_line

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
