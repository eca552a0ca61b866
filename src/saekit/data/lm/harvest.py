"""Harvesting for a cache or a run: model batches -> activations of the kept tokens, with the
document index of each token and outlier tokens dropped.

Outliers: a few tokens carry activations far larger than the rest (BOS, and others: "massive
activations", Sun et al. 2024, arXiv:2402.17762; a 135M Llama showed norms of 772 against a
median of 108, issue 18). They dominate the reconstruction loss and, with a large mean/σ
ratio in the data, are a named cause of dead latents. ``outlier_norm = c`` drops every token
whose activation norm exceeds c times the median norm of the kept tokens of the same model
batch (at any hook): a rule that needs no state, so resumed runs and caches drop the same
tokens. Off by default.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from saekit.data.lm.harvester import Harvester, prefetched, unpack_batch
from saekit.data.lm.text import DOCUMENT_IDS


@dataclass
class HarvestStats:
    """Tokens a harvest kept and outlier tokens it dropped."""

    tokens: int = 0
    outliers: int = 0

    def summary(self) -> dict[str, float | int]:
        seen = self.tokens + self.outliers
        return {"outlier_tokens": self.outliers, "outlier_fraction": self.outliers / max(seen, 1)}


def outlier_mask(acts: dict[str, Tensor], hooks: Iterable[str], factor: float) -> Tensor:
    """[n] True for the tokens to keep: norm ≤ ``factor`` × the median norm, at every hook."""
    keep = None
    for hook in hooks:
        norms_N = acts[hook].float().norm(dim=-1)
        ok_N = norms_N <= factor * norms_N.median() if len(norms_N) else norms_N.bool()
        keep = ok_N if keep is None else keep & ok_N.to(keep.device)
    assert keep is not None
    return keep


def harvest(
    harvester: Harvester,
    batches: Iterable[Any],
    *,
    prefetch: int = 0,
    outlier_norm: float | None = None,
    stats: HarvestStats | None = None,
) -> Iterator[dict[str, Tensor]]:
    """``harvester`` on each batch of token ids (as :meth:`Harvester.stream`); a batch that
    carries ``DOCUMENT_IDS`` ([B, T], ``token_batches(with_documents=True)``) gets the document
    index of each kept token ([n_kept]) under the same key. ``outlier_norm``: drop outlier
    tokens (module docstring), counted in ``stats``. ``prefetch``: as in ``stream``."""
    hooks = [str(h) for h in harvester.hooks]

    def one(batch: Any) -> dict[str, Tensor]:
        input_ids, attention_mask = unpack_batch(batch)
        out = harvester(input_ids, attention_mask)
        if isinstance(batch, Mapping) and DOCUMENT_IDS in batch:
            keep_BT = harvester.token_filter.mask(input_ids, attention_mask)
            out[DOCUMENT_IDS] = batch[DOCUMENT_IDS][keep_BT.cpu()]
        n_before = len(out[hooks[0]])
        if outlier_norm is not None:
            keep_N = outlier_mask(out, hooks, outlier_norm)
            out = {key: value[keep_N.to(value.device)] for key, value in out.items()}
        if stats is not None:
            stats.tokens += len(out[hooks[0]])
            stats.outliers += n_before - len(out[hooks[0]])
        return out

    if prefetch <= 0:
        return (one(b) for b in batches)
    return prefetched((one(b) for b in batches), prefetch)
