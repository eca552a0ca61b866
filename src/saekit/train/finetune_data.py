"""The fine-tune's documents (:mod:`saekit.train.finetune`): the SAE's training and held-out
documents by its own record, or by the leading-documents rule without one."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from typing import Any

from saekit.data.documents.ranges import Ranges
from saekit.model.sae import SAE


def document_batches(
    args: argparse.Namespace,
) -> tuple[SAE, Any, Callable[[], Iterator[Any]], Callable[[], Iterator[Any]]]:
    """(SAE, harvest set-up, training batches, held-out batches) for ``saekit finetune``."""
    import itertools

    from saekit.data.documents.held_out import held_out_documents, training_documents
    from saekit.data.documents.reading import open_text, select, text_source
    from saekit.data.lm.text import token_batches
    from saekit.eval.saved import harvest_setup

    sae = SAE.load(args.sae, device=args.device)
    if not sae.cfg.hook:
        raise ValueError(f"{args.sae}/cfg.json records no hook point")
    if sae.cfg.transcoder and not sae.cfg.target_hook:
        raise ValueError(f"{args.sae} is a transcoder whose cfg.json names no target_hook")
    setup = harvest_setup(args, sae.cfg.hook, exclude_bos=not args.keep_bos)
    if setup.kind != "causal-lm":
        raise ValueError(f"fine-tuning on next-token KL needs a causal LM; {args.model} is not")
    record = sae.cfg.metadata.get("training_data")
    held: Ranges
    trained: Ranges | None
    if (
        record is not None
        and record.get("text") is not None
        and not (args.dataset or args.text_file)
    ):
        text = record["text"]
        held = held_out_documents(record, setup.tokenizer)
        trained = training_documents(record, setup.tokenizer)
    else:
        if not (args.dataset or args.text_file):
            raise ValueError("give the documents: --dataset or --text-file (no training record)")
        field = args.text_field or "text"
        text = text_source(args.dataset, args.text_file, args.split or "train",
                           args.dataset_config, field)  # fmt: skip
        held = [[0, args.held_out_docs]]
        trained = [[args.held_out_docs, None]]

    def batches(ranges: Ranges | None, limit: int | None) -> Iterator[Any]:
        docs = open_text(text, streaming=not args.no_streaming)
        picked = (d for _, d in select(docs, ranges)) if ranges is not None else docs
        stream = token_batches(
            picked,
            setup.tokenizer,
            context_length=args.context_length,
            batch_size=args.batch_size,
            bos_token=args.bos_token,
            eos_token=args.eos_token,
        )
        return stream if limit is None else itertools.islice(stream, limit)

    return (
        sae,
        setup,
        lambda: batches(trained, None),
        lambda: batches(held, args.eval_batches),
    )
