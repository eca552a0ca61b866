"""The documents an SAE trained on and those its run held out, from the record each SAE keeps.

Held out, by construction:

- a cache (``saekit cache``) holds out its last shard when it has at least 2; its manifest
  records the documents of every shard and, under ``held_out``, the documents whose every kept
  token is in that shard (a document that starts in the shard before is a training document);
- an online run holds out the leading documents holding ``eval_tokens + context_length``
  tokens (:func:`saekit.data.documents.reading.leading_document_count`).

``build_run_config`` writes the source's provenance record (``SourceConfig.provenance``) into
each SAE's ``metadata.training_data``, so ``saekit eval`` can evaluate the held-out documents
(``--split heldout``) and warn when the documents it evaluates overlap the ones the SAE trained
on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from saekit.data.documents.ranges import Ranges, subtract, union
from saekit.data.documents.reading import leading_document_count, open_text

if TYPE_CHECKING:
    from saekit.data.cache.reading import ActivationCache


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


def held_out_documents(record: dict[str, Any], tokenizer: Any) -> Ranges:
    """The documents the run behind ``record`` held out (and never trained on)."""
    if record["source"] == "cache":
        from saekit.data.cache.reading import ActivationCache

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
