"""Evaluating a saved SAE (``saekit eval``, :mod:`saekit.commands.evaluate`): its reconstruction
metrics and, with a causal LM, the model's CE and KL with the SAE spliced in
(:mod:`saekit.eval.splice`). Reads the command's flags (an ``argparse.Namespace``).

Data:

- ``--cache C`` alone: the cache's held-out shard (reconstruction only);
- ``--model M --cache C``: the documents the cache held out (its manifest's ``held_out``), read
  from the text the cache was made from;
- ``--model M --split heldout``: the documents the SAE's own training held out (its cfg.json's
  ``metadata.training_data``);
- ``--model M --dataset/--text-file``: those documents in dataset order.

Whatever the documents, the ones the SAE trained on are counted and a warning printed when any
were evaluated: a score on training text overstates the SAE (issue 18: CE score 1.0017 on
training text against 0.9907 held out).

A transcoder (cfg.json's ``d_out``) reads its input hook and is scored on its ``target_hook``:
FVU of the target, and CE/KL with its prediction spliced in place of the target's output. It
reads a transcoder cache (``saekit cache --target-hook``) with ``--cache`` alone.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from saekit.core.paths import document_inputs, refuse_output_over_inputs
from saekit.data.cache.reading import held_out_problem
from saekit.data.documents.ranges import Ranges
from saekit.eval.calibrate import l0_target, off_target
from saekit.eval.metrics import MetricAccumulator, ReconstructionMetrics
from saekit.eval.saved_report import CacheData, DocumentData, SavedReport, SpliceScores
from saekit.model.sae import SAE

HELD_OUT = "heldout"
"""``--split heldout``: the documents the SAE's training held out."""


def text_documents(args: argparse.Namespace) -> Iterator[str]:
    """The documents named by --dataset / --text-file and their options, in dataset order."""
    from saekit.data.documents.reading import documents

    if not (args.dataset or args.text_file):
        raise ValueError("give the documents: --dataset ID|PATH or --text-file PATH")
    return documents(
        dataset=args.dataset,
        text_file=args.text_file,
        split=args.split or "train",
        config_name=args.dataset_config,
        field=args.text_field or "text",
        streaming=not args.no_streaming,
    )


def evaluate_saved(args: argparse.Namespace, sae: SAE | None = None) -> SavedReport:
    """The report of ``saekit eval`` of an SAE or a transcoder (printed by :func:`format_eval`;
    ``sae``: the one ``--sae`` holds, already loaded; any dictionary:
    :func:`saekit.eval.saved_multi.evaluate`)."""
    inputs = [("--sae", args.sae), ("--cache", args.cache), *document_inputs(args)]
    refuse_output_over_inputs(args.json, inputs, flag="--json")
    sae = SAE.load(args.sae, device=args.device) if sae is None else sae
    model_names(args, reads_several=False)  # --models: refused in one line
    d_in, d_sae = sae.cfg.d_in, sae.cfg.d_sae
    if not (args.model or args.cache):
        raise ValueError(
            "give --model with --dataset or --text-file (CE/KL and reconstruction) or --cache"
            " (reconstruction only)"
        )
    hook = args.hook or sae.cfg.hook
    if not hook and args.cache and not args.model:  # e.g. an SAE trained on synthetic data
        from saekit.data.cache.reading import ActivationCache

        hook = ActivationCache(args.cache).hook
    if not hook:
        raise ValueError(f"{args.sae}/cfg.json records no hook point: pass --hook")
    if sae.cfg.transcoder and args.model and not sae.cfg.target_hook:
        raise ValueError(f"{args.sae} is a transcoder whose cfg.json names no target_hook")
    acc = MetricAccumulator(sae.cfg.target_width, d_sae, device=args.device)

    @torch.no_grad()
    def reconstruct(x: Tensor) -> Tensor:
        out = sae(x.to(sae.W_dec.dtype))
        acc.add_latents(out.latents)
        if not sae.cfg.transcoder:  # a transcoder's target: the splice adds it to acc
            acc.add_reconstruction(x, out.x_hat)
        return out.x_hat

    data: CacheData | DocumentData
    if args.model:
        hook, data = _on_model(args, sae, hook, reconstruct, acc)
    else:
        data = _on_cache(args, sae, hook, reconstruct, acc)
    if int(acc.n) == 0:
        raise ValueError("no tokens were evaluated")
    result = acc.result()
    metrics = ReconstructionMetrics.of(result)
    report = SavedReport(str(args.sae), hook, data, metrics, d_in, d_sae, result.l0_histogram)
    theta = float(sae.activation.threshold) if sae.activation.calibrated_threshold else None
    message = off_target(str(args.sae), metrics.l0, l0_target(sae.cfg), theta)
    if message is not None:
        print(f"saekit: warning: {message}", file=sys.stderr)
    return report


def _on_cache(
    args: argparse.Namespace,
    sae: SAE,
    hook: str,
    reconstruct: Callable[[Tensor], Tensor],
    acc: MetricAccumulator,
) -> CacheData:
    from saekit.data.cache.reading import ActivationCache
    from saekit.data.hook_columns import select_columns
    from saekit.data.lm.harvester import HookPoint
    from saekit.data.sources.cache import held_out_batches

    cache = ActivationCache(args.cache)
    names = [str(HookPoint.parse(h)) for h in (hook, sae.cfg.target_hook) if h is not None]
    names = names[: 1 + sae.cfg.transcoder]  # the SAE's hooks: [input] or [input, target]
    widths = dict(cache.hooks)
    if len(names) == 1 + sae.cfg.transcoder and all(n in widths for n in names):  # their columns
        columns, selected = select_columns(cache.hooks, names), names
    elif len(cache.hooks) > 2:
        raise ValueError(f"the cache {args.cache} holds hooks {list(widths)}, not {names}")
    else:  # the whole rows, as a cache of the SAE's hooks would give them
        columns, selected = slice(None), list(widths)
        held = ", ".join(widths)
        print(f"saekit: warning: the cache holds hook(s) {held}, not {names}", file=sys.stderr)
    width = sum(widths[n] for n in selected)
    if (widths[selected[0]], width) != (sae.cfg.d_in, sae.cfg.stream_width):
        name = "d_in + d_out" if sae.cfg.transcoder else "d_in"
        raise ValueError(
            f"SAE {name} = {sae.cfg.stream_width} but the cache {args.cache} has width {width}"
            f" at hook(s) {', '.join(selected)}"
        )
    context_length = args.context_length or 128
    n_tokens = args.n_batches * args.batch_size * context_length
    batches = held_out_batches(cache, n_tokens, args.batch_size * context_length, columns)
    for batch in batches:
        x, target = sae.split_stream(batch.to(args.device))
        x_hat = reconstruct(x)
        if target is not None:
            acc.add_reconstruction(target, x_hat)
    return CacheData(cache=str(args.cache), model=cache.model)


def model_names(args: argparse.Namespace, reads_several: bool) -> str | None:
    """``--model``, or ``--models`` (several models on the same tokens) as ``base=ID, chat=ID``
    when the dictionary reads several hooks (a crosscoder of LABEL/HOOK hooks; an SAE,
    transcoder or --suite reads one model and refuses it in one line); None: neither given."""
    from saekit.data.lm.model_set import describe_models, parse_model_specs

    if not getattr(args, "models", None):
        return args.model
    if not reads_several:
        raise ValueError("--models: an SAE or transcoder reads one model's hook; give --model")
    return describe_models(parse_model_specs(args.models))


def harvest_setup(
    args: argparse.Namespace,
    hook: str,
    hooks: list[str] | None = None,
    **filter_options: bool,
) -> Any:
    """``data.models.load_for_harvest`` from the model flags ``cache`` and ``eval`` share; with
    ``args.models`` (``--models base=ID chat=ID``: several models on the same tokens)
    ``data.lm.model_set.load_model_set`` of the models ``hooks`` (default ``[hook]``, named
    ``LABEL/HOOK``) name: the same interface (``harvester``, ``width``, ``tokenizer``, ...)."""
    from saekit.data.lm.model_set import load_harvest, parse_model_specs

    specs = getattr(args, "models", None)
    return load_harvest(
        args.model,
        parse_model_specs(specs) if specs else None,
        hooks or [hook],
        where="--models",
        dtype=args.model_dtype or "float32",
        device=args.device,
        local_files_only=args.local_files_only,
        model_class=args.model_class,
        bos_token=args.bos_token,
        eos_token=args.eos_token,
        **filter_options,
    )


def _on_model(
    args: argparse.Namespace,
    sae: SAE,
    hook: str,
    reconstruct: Callable[[Tensor], Tensor],
    acc: MetricAccumulator,
) -> tuple[str, DocumentData]:
    """The hook as the model names it, and the documents' part of the report."""
    from saekit.data.documents.ranges import to_ranges
    from saekit.data.lm.harvester import HookPoint, unpack_batch
    from saekit.data.lm.models import activation_width
    from saekit.eval.splice import splice_eval

    setup = harvest_setup(args, hook, exclude_bos=not args.keep_bos)
    model, tokenizer, kind, hook = setup.model, setup.tokenizer, setup.kind, setup.hook
    token_filter = setup.token_filter
    # a transcoder predicts its target hook from this one: scored (and spliced) there
    target = str(HookPoint.parse(sae.cfg.target_hook)) if sae.cfg.transcoder else None
    for name, point, expected in (("d_in", hook, sae.cfg.d_in), ("d_out", target, sae.cfg.d_out)):
        width = None if point is None else activation_width(model, point, kind)
        if width != expected:
            raise ValueError(
                f"SAE {name} = {expected} but model {args.model} has width {width} at hook {point}"
            )
    text, indices, origin = eval_documents(args, sae, tokenizer)
    evaluated: set[int] = set()
    contexts = document_contexts(args, tokenizer, text, indices, token_filter, evaluated)
    splice_scores = None
    if kind == "causal-lm":
        splice = splice_eval(
            model,
            target or hook,
            reconstruct,
            contexts,
            token_filter=token_filter,
            input_hook=None if target is None else hook,
            reconstruction=None if target is None else acc,
        )
        splice_scores = SpliceScores.of(splice)
    else:
        print(
            f"saekit: note: CE/KL are next-token losses of a causal LM; {args.model} loads as"
            f" {kind}: reconstruction metrics only",
            file=sys.stderr,
        )
        harvester = setup.harvester(*([target] if target else []))
        for batch in contexts:
            acts = harvester(*unpack_batch(batch))
            x_hat = reconstruct(acts[hook].to(args.device))
            if target is not None:
                acc.add_reconstruction(acts[target].to(args.device), x_hat)
    data = DocumentData(
        model=args.model,
        model_class=kind,
        text=text,
        documents_from=origin,
        documents=len(evaluated),
        document_ranges=to_ranges(evaluated),
        target_hook=target,
        splice=splice_scores,
    )
    data.training_documents_evaluated = check_overlap(
        sae, tokenizer, text, data.documents, data.document_ranges
    )
    return hook, data


def eval_documents(
    args: argparse.Namespace, sae: SAE, tokenizer: Any
) -> tuple[dict[str, Any], Ranges | None, str]:
    """(text source, document indices or None for all, where they come from) to evaluate
    (``saekit eval``) or read (``saekit report``, which has no ``--cache``)."""
    from saekit.data.cache.reading import ActivationCache
    from saekit.data.documents.held_out import cache_documents, held_out_documents
    from saekit.data.documents.reading import text_source

    if getattr(args, "cache", None):
        cache = ActivationCache(args.cache)
        problem = held_out_problem(cache.manifest, args.cache)
        if problem:
            raise ValueError(problem)
        text, _, held = cache_documents(cache)
        if held is None or text is None:
            raise ValueError(
                f"the activation cache {args.cache} records no held-out documents (a single"
                " shard, or written without document indices): give --dataset or --text-file"
            )
        return text, held, f"held out by the activation cache {args.cache}"
    if args.split == HELD_OUT:
        record = sae.cfg.metadata.get("training_data")
        if record is None or record.get("text") is None:
            raise ValueError(
                f"--split {HELD_OUT}: {args.sae}/cfg.json records no training documents"
                " (synthetic data, or a cache without document indices)"
            )
        return record["text"], held_out_documents(record, tokenizer), "held out by its training"
    if not (args.dataset or args.text_file):
        raise ValueError(
            "give the documents: --dataset ID|PATH or --text-file PATH, or the held-out ones:"
            f" --cache DIR or --split {HELD_OUT}"
        )
    split = args.split or "train"
    field = args.text_field or "text"
    text = text_source(args.dataset, args.text_file, split, args.dataset_config, field)
    return text, None, "--dataset" if args.dataset else "--text-file"


def document_contexts(
    args: argparse.Namespace,
    tokenizer: Any,
    text: dict[str, Any],
    indices: Ranges | None,
    token_filter: Any,
    evaluated: set[int],
    n_batches: int | None = None,
) -> Iterator[dict[str, Tensor]]:
    """``n_batches`` (default --n-batches) batches of the documents, packed in dataset order;
    adds the index of every document with an evaluated token to ``evaluated``."""
    from saekit.data.documents.reading import open_text, select
    from saekit.data.lm.text import DOCUMENT_IDS, token_batches

    docs = open_text(text, streaming=not args.no_streaming)
    pairs = enumerate(docs) if indices is None else select(docs, indices)
    numbered, texts = itertools.tee(pairs)
    batches = token_batches(
        (doc for _, doc in texts),
        tokenizer,
        context_length=args.context_length or 128,
        batch_size=args.batch_size,
        bos_token=args.bos_token,
        eos_token=args.eos_token,
        indices=(i for i, _ in numbered),
        with_documents=True,
    )
    for batch in itertools.islice(batches, args.n_batches if n_batches is None else n_batches):
        keep_BT = token_filter.mask(batch["input_ids"])
        evaluated.update(batch[DOCUMENT_IDS][keep_BT].tolist())
        yield batch


def check_overlap(
    sae: SAE,
    tokenizer: Any,
    text: Any,
    documents: int,
    document_ranges: Any,
    verbs: tuple[str, str] = ("evaluated", "evaluate"),
) -> int | None:
    """The number of the ``documents`` read (``document_ranges`` of ``text``) that the SAE
    trained on (its cfg.json's record), with a warning when any (``verbs``: what the command did
    and does with documents; ``saekit report`` reads them); None when nothing recorded can be
    compared."""
    from saekit.data.documents.held_out import training_documents
    from saekit.data.documents.ranges import count, intersect

    record = sae.cfg.metadata.get("training_data")
    if record is None or record.get("text") != text:
        return None  # other text, or nothing recorded: nothing to compare
    training = training_documents(record, tokenizer)
    if training is None:
        return None
    seen = count(intersect(document_ranges, training))
    if seen:
        where = record.get("cache_dir") or "its training run"
        print(
            f"saekit: warning: {seen} of the {documents} {verbs[0]} documents are"
            f" training documents of this SAE (trained on {where}): these scores are not held"
            f" out; {verbs[1]} the held-out documents with --split {HELD_OUT}",
            file=sys.stderr,
        )
    return seen
