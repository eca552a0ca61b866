"""Whether an activation cache holds held-out documents to evaluate on (issue 28): said when the
cache is written, before the pipeline trains, and by ``saekit eval --cache``."""

from __future__ import annotations

from typing import Any


def held_out_problem(manifest: dict[str, Any], where: Any) -> str | None:
    """Why the cache at ``where`` holds no held-out document to evaluate on, or None: its last
    shard (held out) records documents, but none lies wholly inside it (one long document
    spans the last shards), so ``saekit eval --cache`` with --model, and the pipeline's
    evaluation, would evaluate nothing."""
    held = manifest.get("held_out")
    if held is None or held.get("documents"):
        return None
    return (
        f"the activation cache {where} holds no whole document in its held-out last shard "
        f"(shard {held.get('shard')}: a document spans the last shards), so nothing can be "
        "evaluated on held-out documents; raise --shard-tokens (pipeline: cache.shard_tokens) "
        "above the longest document's tokens, or cache more, shorter documents"
    )
