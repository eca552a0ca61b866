"""``saekit report``: a saved SAE's feature dashboard, a static site that opens from disk.

One pass over the text (the harvesting path: packed contexts, the forward stopped at the hook)
or over held-out synthetic batches feeds :class:`saekit.report.collect.LatentCollector`; the
pages are written by :mod:`saekit.report.site`.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from saekit.commands.flags import add_model_args, add_models_arg, add_text_args
from saekit.core.paths import document_inputs, refuse_output_over_inputs


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "report",
        help="write a feature dashboard of a saved SAE (static HTML, opens from disk)",
        description="Stream text through the model and the SAE once (or held-out synthetic"
        " batches with --synthetic) and write a static site: an index (FVU, L0 and density"
        " histograms, dead/dense counts, a searchable sortable table of latents) and a page per"
        " latent (top contexts shaded by activation, quantile samples, activation histogram,"
        " logit effects, decoder-cosine neighbours).",
    )
    p.add_argument("sae", metavar="SAE", help="SAE directory (cfg.json)")
    p.add_argument("--out", metavar="DIR", help="site directory (default: SAE/report)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--latents", type=int, default=64, help="report latents 0..N-1 (64)")
    which.add_argument("--latent-ids", type=int, nargs="+", metavar="ID", help="these latents")
    p.add_argument("--top-k", type=int, default=20, help="top contexts per latent (20)")
    p.add_argument("--samples", type=int, default=64, help="sampled firing tokens per latent (64)")
    p.add_argument("--max-tokens", type=int, default=100_000, help="tokens to read (100,000)")
    p.add_argument("--context-length", type=int, default=128, help="tokens per context (128)")
    p.add_argument("--batch-size", type=int, default=8, help="contexts per model forward (8)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--model", metavar="ID|PATH", help="model hub id or local directory")
    add_models_arg(which, "a crosscoder over LABEL/HOOK hooks reads them from these models")
    add_text_args(p, dataset_config_flags=("--config", "--dataset-config"))
    add_model_args(p)
    p.add_argument(
        "--synthetic",
        action="store_true",
        help="the SAE was trained on the built-in synthetic data: report held-out batches and"
        " each latent's matched true feature (the generator from --run-config)",
    )
    p.add_argument("--run-config", metavar="PATH", help="synthetic: default SAE/../config.yaml")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    index = write_report(args)
    print(f"saekit: wrote {index} (open it in a browser; no server needed)")
    return 0


def latent_ids(args: argparse.Namespace, d_sae: int, layers: int = 1) -> Any:
    """The latents to report: --latent-ids, or the first --latents (a CLT, ``layers`` > 1: the
    first ⌈N / L⌉ of each layer, latent l·M + i being latent i of layer l)."""
    import torch

    if args.latent_ids:
        bad = [i for i in args.latent_ids if not 0 <= i < d_sae]
        if bad:
            raise ValueError(f"--latent-ids {bad} out of range: the SAE has {d_sae} latents")
        if len(set(args.latent_ids)) != len(args.latent_ids):
            raise ValueError("--latent-ids: each latent once")
        return torch.tensor(args.latent_ids)
    if args.latents <= 0:
        raise ValueError(f"--latents must be positive, got {args.latents}")
    if layers > 1:
        M = d_sae // layers
        per_layer = torch.arange(min(math.ceil(args.latents / layers), M))
        return torch.cat([layer * M + per_layer for layer in range(layers)])
    return torch.arange(min(args.latents, d_sae))


def write_report(args: argparse.Namespace) -> Path:
    """Collect, build and write the report of ``args.sae``; returns index.html's path."""
    from saekit.eval.dictionaries import is_multi_hook
    from saekit.model.dictionary import load_dictionary
    from saekit.report.collect import CollectConfig
    from saekit.report.site import write_site

    if args.max_tokens <= 0:
        raise ValueError(f"--max-tokens must be positive, got {args.max_tokens}")
    inputs = [("SAE", args.sae), ("--run-config", args.run_config), *document_inputs(args)]
    refuse_output_over_inputs(args.out, inputs, may_hold=[args.sae])  # default: SAE/report
    sae = load_dictionary(args.sae, device=args.device)
    ids = latent_ids(args, sae.cfg.n_latents, getattr(sae.cfg, "n_layers", 1))
    cfg = CollectConfig(top_k=args.top_k, samples=args.samples)
    if is_multi_hook(sae):
        if args.synthetic or args.hook:
            flag = "--synthetic" if args.synthetic else "--hook"
            raise ValueError(f"{flag}: a {sae.cfg.kind} reads the model hooks its cfg.json names")
        data = _model_report(args, sae, ids, cfg)
    elif args.synthetic:
        data = _synthetic_report(args, sae, ids, cfg)
    else:
        data = _model_report(args, sae, ids, cfg)
    return write_site(data, args.out or Path(args.sae) / "report")


def _collect(args: argparse.Namespace, sae: Any, batches: Any, ids: Any, cfg: Any) -> Any:
    """:func:`saekit.report.collect.collect_batches` under a progress bar (tokens)."""
    from tqdm.auto import tqdm

    from saekit.report.collect import collect_batches

    with tqdm(
        total=args.max_tokens,
        disable=not args.progress,
        unit="tok",
        unit_scale=True,
        desc="report",
        file=sys.stderr,
    ) as bar:
        return collect_batches(sae, batches, ids, cfg, bar.update)


def _model_report(args, sae, ids, cfg) -> dict[str, Any]:
    from saekit.data.documents.ranges import to_ranges
    from saekit.data.lm.models import check_hook
    from saekit.eval.dictionaries import is_multi_hook, stream_hooks
    from saekit.eval.saved import (
        HELD_OUT,
        check_overlap,
        document_contexts,
        eval_documents,
        harvest_setup,
        model_names,
    )
    from saekit.report.build import report_data
    from saekit.report.collect import lm_batches
    from saekit.report.features import unembedding

    multi = is_multi_hook(sae)
    hooks = stream_hooks(sae) if multi else [args.hook or sae.cfg.hook]
    model = model_names(args, multi)  # --model, or --models of a crosscoder's LABEL/HOOK hooks
    if not model:
        raise ValueError("give --model with --dataset or --text-file, or --synthetic")
    if not hooks or not hooks[0]:
        what = "no hooks" if multi else "no hook point: pass --hook"
        raise ValueError(f"{args.sae}/cfg.json records {what}")
    hook = hooks[0]
    for name in hooks if args.model else []:  # a model set checks its hooks as it loads
        check_hook(args.model, name, args.model_class, args.local_files_only)
    if args.split == HELD_OUT and (args.dataset or args.text_file):
        raise ValueError(
            f"--split {HELD_OUT} reads the text the SAE's cfg.json records: drop"
            " --dataset/--text-file"
        )
    if args.split != HELD_OUT and not (args.dataset or args.text_file):
        raise ValueError(
            f"give --model with --dataset or --text-file (or --split {HELD_OUT}), or --synthetic"
        )
    setup = harvest_setup(args, hook, hooks, exclude_bos=not args.keep_bos)
    n_inputs = len(sae.cfg.hooks) if multi else 1
    for i, name in enumerate(hooks):
        width = setup.width(name)
        expected = sae.cfg.d_in if i < n_inputs else sae.cfg.d_out
        if width != expected:
            raise ValueError(
                f"the dictionary's width at {name} is {expected} but model {model} has {width}"
            )
    tokenizer = setup.tokenizer
    # the held-out choice and the training-documents warning of `saekit eval` (issue 28)
    text, indices, origin = eval_documents(args, sae, tokenizer)
    n_batches = math.ceil(args.max_tokens / (args.batch_size * args.context_length))
    read: set[int] = set()
    contexts = document_contexts(
        args, tokenizer, text, indices, setup.token_filter, read, n_batches=n_batches
    )
    collected = _collect(args, sae, lm_batches(setup, contexts, tuple(hooks[1:])), ids, cfg)
    ranges = to_ranges(read)
    seen = check_overlap(sae, tokenizer, text, len(read), ranges, verbs=("read", "report on"))
    shown = ", ".join(hooks[:n_inputs]) if multi else setup.hook
    meta = {"sae": str(args.sae), "model": model, "hook": shown}
    meta["text"] = args.dataset or args.text_file or f"documents {origin}"
    meta.update(documents_from=origin, documents=len(read), document_ranges=ranges)
    if seen is not None:
        meta["training_documents_read"] = seen
    return report_data(
        collected,
        sae,
        lambda i: tokenizer.decode([i]),
        meta,
        W_U=None if multi else unembedding(setup.model, sae.cfg.d_in),  # multi: not shown
    )


def _synthetic_report(args, sae, ids, cfg) -> dict[str, Any]:
    import torch
    import yaml

    from saekit.data.sources.interface import StreamSettings
    from saekit.data.sources.registry import source_config
    from saekit.report.build import report_data
    from saekit.report.features import truth_matches

    path = Path(args.run_config or Path(args.sae).parent / "config.yaml")
    if not path.is_file():
        raise ValueError(f"--synthetic: no run config at {path}; pass --run-config")
    data_cfg = source_config(
        (yaml.safe_load(path.read_text()) or {}).get("data", {}), validate=False
    )
    truth = data_cfg.ground_truth()
    if truth is None:
        raise ValueError(f"--synthetic: {path} trains on data.source = {data_cfg.kind!r}")
    if truth.cfg.d != sae.cfg.d_in:
        raise ValueError(f"SAE d_in = {sae.cfg.d_in} but {path} generates d = {truth.cfg.d}")
    held_out = data_cfg.build(StreamSettings(args.batch_size * args.context_length, 0, 0))
    matched, _ = truth_matches(truth.directions, sae.W_dec.detach().cpu(), ids)
    feature_M = torch.tensor([m["feature"] for m in matched])
    batch = args.batch_size * args.context_length

    def batches() -> Iterator[tuple[Any, ...]]:
        # T = 1: each synthetic vector is its own context; aux = its matched feature's coefficient
        for x_Nd, coeff_NF in held_out.eval_batches(args.max_tokens, batch):
            N = x_Nd.shape[0]
            keep = torch.ones(N, 1, dtype=torch.bool)
            ids_BT = torch.full((N, 1), -1, dtype=torch.long)
            yield x_Nd.view(N, 1, -1), keep, ids_BT, coeff_NF[:, feature_M].view(N, 1, -1)

    collected = _collect(args, sae, batches(), ids, cfg)
    kind = getattr(truth.cfg, "kind", data_cfg.kind)  # the generator's kind, else the source's
    meta = {"sae": str(args.sae), "text": f"synthetic ({kind}, held-out batches)"}
    return report_data(collected, sae, None, meta, truth=truth.directions)
