"""``saekit eval`` of any saved dictionary (:func:`evaluate`): an SAE or a transcoder through
:func:`saekit.eval.saved.evaluate_saved`, a cross-layer transcoder or a crosscoder here.

A cross-layer transcoder (CLT) with a causal LM (``--model``) is spliced in for every MLP it
covers at once (:mod:`saekit.eval.replacement`): CE and KL scores against the clean and the
zero-ablated model, each target's FVU (clean and spliced) and each layer's L0. A crosscoder with
``--model`` reads its source hooks from that model. With ``--cache`` alone either reads its hooks'
columns from the cache's held-out shard (a ``saekit cache --hooks`` of every hook it names) and
reports the reconstruction per part. Both add their decoder norms' summary
(:mod:`saekit.eval.dictionaries`). The documents, held-out choice and training-documents warning
are those of :mod:`saekit.eval.saved`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

from saekit.core.paths import document_inputs, refuse_output_over_inputs
from saekit.eval.dictionaries import (
    add_forward,
    is_multi_hook,
    norm_summary,
    part_accumulator,
    parts_report,
    stream_hooks,
)
from saekit.eval.metrics import EvalResult, ReconstructionMetrics
from saekit.eval.parts import PartsReport
from saekit.eval.saved import (
    check_overlap,
    document_contexts,
    eval_documents,
    evaluate_saved,
    model_names,
)
from saekit.eval.saved_report import CacheData, DocumentData, SavedReport, SpliceScores
from saekit.model.clt import CrossLayerTranscoder
from saekit.model.dictionary import load_dictionary


def evaluate(args: argparse.Namespace) -> SavedReport:
    """The report of ``saekit eval`` for whatever ``--sae`` holds."""
    inputs = [("--sae", args.sae), ("--cache", args.cache), *document_inputs(args)]
    refuse_output_over_inputs(args.json, inputs, flag="--json")
    dictionary = load_dictionary(args.sae, device=args.device)
    if not is_multi_hook(dictionary):
        return evaluate_saved(args, dictionary)
    kind = (
        "cross-layer transcoder" if isinstance(dictionary, CrossLayerTranscoder) else "crosscoder"
    )
    if args.hook:
        raise ValueError(f"--hook: a {kind} reads the hooks its cfg.json names; drop --hook")
    model = model_names(args, reads_several=True)  # --model, or --models of LABEL/HOOK hooks
    if getattr(args, "models", None) and isinstance(dictionary, CrossLayerTranscoder):
        raise ValueError(
            "--models: a cross-layer transcoder is spliced into one model; give --model"
        )
    if not (model or args.cache):
        raise ValueError(
            "give --model with --dataset or --text-file (CE/KL and reconstruction) or --cache"
            " (reconstruction only)"
        )
    hooks = stream_hooks(dictionary)
    if hooks is None:
        raise ValueError(f"{args.sae}/cfg.json names no hooks: this {kind} cannot read a model")
    if model:
        data, whole, parts = _on_model(args, dictionary, hooks, model)
    else:
        data, whole, parts = _on_cache(args, dictionary, hooks)
    cfg = dictionary.cfg
    inputs_only = cfg.hooks or []
    return SavedReport(
        str(args.sae),
        ", ".join(inputs_only),
        data,
        ReconstructionMetrics.of(whole),
        cfg.d_in,
        cfg.n_latents,
        whole.l0_histogram,
        parts,
    )


def _on_cache(args: argparse.Namespace, dictionary: Any, hooks: list[str]) -> tuple:
    from saekit.data.cache.reading import ActivationCache
    from saekit.data.hook_columns import select_columns
    from saekit.data.lm.harvester import HookPoint
    from saekit.data.sources.cache import held_out_batches

    cache = ActivationCache(args.cache)
    names = [str(HookPoint.parse(h)) for h in hooks]
    held = dict(cache.hooks)
    missing = [n for n in names if n not in held]
    if missing:
        raise ValueError(
            f"the cache {args.cache} holds hooks {list(held)}, not {missing}: cache every hook"
            f" the dictionary reads (saekit cache --hooks {' '.join(names)})"
        )
    columns = select_columns(cache.hooks, names)
    context_length = args.context_length or 128
    n_tokens = args.n_batches * args.batch_size * context_length
    acc = part_accumulator(dictionary, device=args.device)
    dictionary.eval()
    with torch.no_grad():
        for batch in held_out_batches(cache, n_tokens, args.batch_size * context_length, columns):
            x, target = dictionary.split_stream(batch.to(args.device))
            out = dictionary(x)
            add_forward(acc, x if target is None else target, out.x_hat, out.latents)
    whole, _ = acc.result()
    return CacheData(cache=str(args.cache), model=cache.model), whole, parts_report(dictionary, acc)


def _on_model(args: argparse.Namespace, dictionary: Any, hooks: list[str], name: str) -> tuple:
    """``name``: the model, or the model set (--models: a crosscoder of LABEL/HOOK hooks)."""
    from saekit.data.documents.ranges import to_ranges
    from saekit.data.lm.harvester import unpack_batch
    from saekit.eval.replacement import LayeredDictionary, replacement_eval
    from saekit.eval.saved import harvest_setup

    cfg = dictionary.cfg
    setup = harvest_setup(args, hooks[0], hooks, exclude_bos=not args.keep_bos)
    tokenizer, kind = setup.tokenizer, setup.kind
    n_inputs = len(cfg.hooks)
    for i, hook in enumerate(hooks):
        expected = cfg.d_in if i < n_inputs else cfg.d_out
        width = setup.width(hook)
        if width != expected:
            raise ValueError(
                f"the dictionary's width at {hook} is {expected} but model {name} has {width}"
            )
    text, indices, origin = eval_documents(args, dictionary, tokenizer)
    evaluated: set[int] = set()
    contexts = document_contexts(args, tokenizer, text, indices, setup.token_filter, evaluated)
    splice = None
    if isinstance(dictionary, CrossLayerTranscoder) and kind == "causal-lm":
        result = replacement_eval(
            setup.model, LayeredDictionary.of(dictionary), contexts, token_filter=setup.token_filter
        )
        whole: EvalResult = result.whole
        splice = SpliceScores.of(result.splice)
        parts = PartsReport("layer", result.layers, norm_summary(dictionary))
    else:
        if isinstance(dictionary, CrossLayerTranscoder):
            print(
                f"saekit: note: CE/KL are next-token losses of a causal LM; {name} loads as"
                f" {kind}: reconstruction metrics only",
                file=sys.stderr,
            )
        harvester = setup.harvester(*hooks[1:])
        acc = part_accumulator(dictionary, device=args.device)
        dictionary.eval()
        with torch.no_grad():
            for batch in contexts:
                acts = harvester(*unpack_batch(batch))
                row = torch.cat([acts[h].to(args.device) for h in harvester_names(hooks)], -1)
                x, target = dictionary.split_stream(row)
                out = dictionary(x)
                add_forward(acc, x if target is None else target, out.x_hat, out.latents)
        whole, _ = acc.result()
        parts = parts_report(dictionary, acc)
    data = DocumentData(
        model=name,
        model_class=kind,
        text=text,
        documents_from=origin,
        documents=len(evaluated),
        document_ranges=to_ranges(evaluated),
        splice=splice,
    )
    data.training_documents_evaluated = check_overlap(
        dictionary, tokenizer, text, data.documents, data.document_ranges
    )
    return data, whole, parts


def harvester_names(hooks: list[str]) -> list[str]:
    """The keys a Harvester gives the hooks' activations under (the hook points normalised)."""
    from saekit.data.lm.harvester import HookPoint

    return [str(HookPoint.parse(h)) for h in hooks]
