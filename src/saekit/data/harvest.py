"""Harvesting for a cache or a run: model batches -> activations of the kept tokens, with the
document index of each token; and the ``saekit cache`` command built on it."""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from torch import Tensor

from saekit.data.hf import Harvester, prefetched, unpack_batch
from saekit.data.text import DOCUMENT_IDS


def harvest(
    harvester: Harvester, batches: Iterable[Any], *, prefetch: int = 0
) -> Iterator[dict[str, Tensor]]:
    """``harvester`` on each batch of token ids (as :meth:`Harvester.stream`); a batch that
    carries ``DOCUMENT_IDS`` ([B, T], ``token_batches(with_documents=True)``) gets the document
    index of each kept token ([n_kept]) under the same key. ``prefetch``: as in ``stream``."""

    def one(batch: Any) -> dict[str, Tensor]:
        input_ids, attention_mask = unpack_batch(batch)
        out = harvester(input_ids, attention_mask)
        if isinstance(batch, Mapping) and DOCUMENT_IDS in batch:
            keep_BT = harvester.token_filter.mask(input_ids, attention_mask)
            out[DOCUMENT_IDS] = batch[DOCUMENT_IDS][keep_BT.cpu()]
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
    acts = _counted(harvest(harvester, contexts, prefetch=2), hook, args.max_tokens, args.progress)
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


def _counted(outputs: Iterable[Any], hook: str, total: int | None, show: bool) -> Any:
    """Pass harvester outputs through, counting tokens on a progress bar; with ``total``
    (--max-tokens) it counts only the tokens the cache keeps, so it stops at the total."""
    from tqdm.auto import tqdm

    with tqdm(total=total, disable=not show, unit="tok", unit_scale=True) as bar:
        for out in outputs:
            n = len(out[hook])
            bar.update(n if total is None else min(n, total - bar.n))
            yield out
