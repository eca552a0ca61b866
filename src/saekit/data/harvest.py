"""Harvesting for a cache or a run: model batches -> activations of the kept tokens, with the
document index of each token and outlier tokens dropped; and the ``saekit cache`` command.

Outliers: a few tokens carry activations far larger than the rest (BOS, and others: "massive
activations", Sun et al. 2024, arXiv:2402.17762; a 135M Llama showed norms of 772 against a
median of 108, issue 18). They dominate the reconstruction loss and, with a large mean/σ
ratio in the data, are a named cause of dead latents. ``outlier_norm = c`` drops every token
whose activation norm exceeds c times the median norm of the kept tokens of the same model
batch (at any hook): a rule that needs no state, so resumed runs and caches drop the same
tokens. Off by default.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from saekit.data.hf import Harvester, prefetched, unpack_batch
from saekit.data.text import DOCUMENT_IDS


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


def cache_command(args: argparse.Namespace) -> None:
    """``saekit cache``: harvest ``args.hook`` of ``args.model`` on the documents into a cache
    at ``args.out``, recording each shard's documents (saekit.data.cache)."""
    from saekit.data.cache import write_cache
    from saekit.data.documents import text_source
    from saekit.data.hf import HookPoint, TokenFilter
    from saekit.data.models import check_hook, forward_kwargs, load_lm
    from saekit.data.text import packing_token_ids, token_batches
    from saekit.eval.command import text_documents

    for flag, value in (("--model", args.model), ("--hook", args.hook), ("--out", args.out)):
        if not value:
            raise ValueError(f"saekit cache needs {flag}")
    hook = str(HookPoint.parse(args.hook))
    check_hook(args.model, hook, args.model_class, args.local_files_only)
    docs = text_documents(args)
    model, tokenizer, kind = load_lm(
        args.model,
        args.model_dtype or "float32",
        args.device,
        args.local_files_only,
        args.model_class,
    )
    bos, _ = packing_token_ids(tokenizer, args.bos_token, args.eos_token)
    token_filter = TokenFilter.from_tokenizer(
        tokenizer,
        bos_token_id=bos,
        exclude_padding=not args.keep_padding,
        exclude_bos=not args.keep_bos,
        exclude_special=args.exclude_special,
    )
    harvester = Harvester(
        model, hook, token_filter=token_filter, device="cpu", forward_kwargs=forward_kwargs(kind)
    )
    contexts = token_batches(
        docs,
        tokenizer,
        context_length=args.context_length,
        batch_size=args.batch_size,
        bos_token=args.bos_token,
        eos_token=args.eos_token,
        seed=args.seed,
        with_documents=True,
    )
    settings = ("dataset", "text_file", "split", "dataset_config", "text_field", "seed")
    settings += ("context_length", "batch_size", "keep_bos", "keep_padding", "exclude_special")
    settings += ("bos_token", "eos_token")
    metadata = {k: getattr(args, k) for k in settings}
    metadata.update(model_dtype=args.model_dtype or "float32", model_class=kind)
    metadata["text"] = text_source(
        args.dataset,
        args.text_file,
        args.split or "train",
        args.dataset_config,
        args.text_field or "text",
    )
    metadata["outlier_norm"] = args.outlier_norm
    stats = HarvestStats()
    outputs = harvest(harvester, contexts, prefetch=2, outlier_norm=args.outlier_norm, stats=stats)
    acts = _counted(outputs, hook, args.max_tokens, args.progress)
    try:
        write_cache(
            args.out,
            acts,
            hook,
            args.model,
            args.dtype,
            shard_tokens=args.shard_tokens,
            max_tokens=args.max_tokens,
            metadata=metadata,
        )
    finally:
        acts.close()  # closes the bar now, not at garbage collection (after "verified")
    if args.outlier_norm is not None:
        print(
            f"saekit: dropped {stats.outliers:,} outlier tokens (norm > {args.outlier_norm:g} x"
            f" the median) of {stats.tokens + stats.outliers:,} harvested",
            file=sys.stderr,
        )


def _counted(outputs: Iterable[Any], hook: str, total: int | None, show: bool) -> Any:
    """Pass harvester outputs through, counting tokens on a progress bar; with ``total``
    (--max-tokens) it counts only the tokens the cache keeps, so it stops at the total."""
    from tqdm.auto import tqdm

    with tqdm(total=total, disable=not show, unit="tok", unit_scale=True) as bar:
        for out in outputs:
            n = len(out[hook])
            bar.update(n if total is None else min(n, total - bar.n))
            yield out
