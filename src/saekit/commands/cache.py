"""``saekit cache``: harvest a model's activations into an activation cache directory."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from typing import Any

from saekit.commands.flags import add_model_args, add_models_arg, add_outlier_arg, add_text_args
from saekit.core.paths import document_inputs, refuse_output_over_inputs


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "cache",
        help="harvest a model's activations into a cache directory (or: cache verify DIR)",
        description="Harvest activations at one hook point (or several, --hooks: one forward "
        "pass, each token's row holds every hook's activation) into sharded safetensors with a "
        "manifest, then verify every shard. `saekit cache verify DIR` only verifies. An "
        "interrupted run resumes when repeated with the same arguments. Model diffing: --models "
        "base=ID chat=ID runs every model on the same tokens, hooks named LABEL/HOOK "
        "(--hooks base/model.layers.13 chat/model.layers.13).",
    )
    p.add_argument("action", nargs="*", metavar="verify DIR", help="verify an existing cache")
    p.add_argument("--verify", metavar="DIR", help="only verify the cache in DIR")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--model", metavar="ID|PATH", help="model hub id or local directory")
    add_models_arg(which, "name hooks LABEL/HOOK")
    add_text_args(p, dataset_config_flags=("--config", "--dataset-config"))
    p.add_argument("--context-length", type=int, default=128, help="tokens per context")
    p.add_argument("--batch-size", type=int, default=32, help="contexts per model forward")
    p.add_argument("--max-tokens", type=int, help="stop after this many tokens")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="dtype the activations are stored in",
    )
    p.add_argument("--shard-tokens", type=int, default=262_144, help="tokens per shard file")
    p.add_argument("--seed", type=int, help="shuffle the documents with this seed")
    p.add_argument("--keep-padding", action="store_true", help="keep padding positions")
    p.add_argument("--exclude-special", action="store_true", help="drop every special token")
    add_outlier_arg(p)
    add_model_args(p)
    p.add_argument("--out", metavar="DIR", help="cache directory")
    p.add_argument("--target-hook", help="transcoders: also this hook, same pass; rows [hook|it]")
    p.add_argument(
        "--hooks",
        nargs="+",
        metavar="HOOK",
        help="several hooks, one forward pass; rows [H1|H2|...] (instead of --hook)",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Harvest activations into a cache directory, then verify it; or only verify one."""
    from saekit.data.cache.reading import ActivationCache

    verify_dir = args.verify
    if args.action:
        if args.action[0] != "verify" or len(args.action) != 2:
            raise ValueError(f"unexpected arguments {args.action}; did you mean: cache verify DIR")
        verify_dir = args.action[1]
    if not verify_dir:
        cache_command(args)
        verify_dir = args.out
    cache = ActivationCache(verify_dir)
    cache.verify()
    hooks = ", ".join(f"{name} ({width})" for name, width in cache.hooks)
    print(
        f"{cache.directory}: {cache.n_tokens:,} tokens in {len(cache.shards)} shard(s), "
        f"d = {cache.d}, {cache.dtype_name}, model {cache.model}, hook(s) {hooks}; verified"
    )
    return 0


def cache_command(args: argparse.Namespace) -> None:
    """``saekit cache``: harvest ``args.hooks`` (or ``args.hook`` and ``args.target_hook``) of
    ``args.model`` on the documents into a cache at ``args.out``, recording each shard's
    documents (saekit.data.cache)."""
    from saekit.data.cache.reading import held_out_problem
    from saekit.data.cache.writing import write_cache
    from saekit.data.documents.reading import text_source
    from saekit.data.lm.harvest import HarvestStats, harvest
    from saekit.data.lm.harvester import HookPoint
    from saekit.data.lm.model_set import describe_models, parse_model_specs, split_hook
    from saekit.data.lm.models import check_hook
    from saekit.data.lm.text import token_batches
    from saekit.eval.saved import harvest_setup, text_documents

    if args.hooks and (args.hook or args.target_hook):
        raise ValueError("saekit cache takes --hooks or --hook (and --target-hook), not both")
    hooks = args.hooks or [h for h in (args.hook, args.target_hook) if h is not None]
    model = args.model or args.models
    for flag, value in (("--model (or --models)", model), ("--hook", hooks), ("--out", args.out)):
        if not value:
            raise ValueError(f"saekit cache needs {flag}")
    models = parse_model_specs(args.models) if args.models else None
    inputs = [*document_inputs(args), *((f"--models {k}", v) for k, v in (models or {}).items())]
    refuse_output_over_inputs(args.out, inputs)
    if args.max_tokens is not None and args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be positive, got {args.max_tokens}")
    # The hook names first (meta device, no weights), then the text, then the weights: each
    # mistake is reported before the slow step after it.
    hooks = [str(HookPoint.parse(point)) for point in hooks]
    for point in hooks:
        label, hook = split_hook(point, models, "--hooks")
        name = args.model if models is None else models[label]  # type: ignore[index]
        check_hook(name, hook, args.model_class, args.local_files_only)
    if len(set(hooks)) != len(hooks):
        raise ValueError(f"saekit cache: a hook is named twice in {hooks}")
    docs = text_documents(args)
    filters = {
        "exclude_padding": not args.keep_padding,
        "exclude_bos": not args.keep_bos,
        "exclude_special": args.exclude_special,
    }
    # several models (--models): each run on the same tokens (saekit.data.lm.model_set)
    setup = harvest_setup(args, hooks[0], hooks, **filters)
    parts = setup.setups if models else {args.model: setup}
    for label, one in parts.items():
        _check_positions(one.model, models[label] if models else label, args.context_length)
    tokenizer, kind = setup.tokenizer, setup.kind
    model_name = args.model if models is None else describe_models(models)
    harvester = setup.harvester(*hooks[1:], device="cpu")  # one pass, stopped after the last
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
    acts = _counted(outputs, hooks[0], args.max_tokens, args.progress)
    try:
        manifest = write_cache(
            args.out,
            acts,
            hooks,
            model_name,
            args.dtype,
            shard_tokens=args.shard_tokens,
            max_tokens=args.max_tokens,
            metadata=metadata,
            models=models,
        )
    finally:
        acts.close()  # closes the bar now, not at garbage collection (after "verified")
    problem = held_out_problem(manifest, args.out)
    if problem:  # training can still use the cache; held-out evaluation cannot
        print(f"saekit: warning: {problem}", file=sys.stderr)
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


def _check_positions(model: Any, name: str, context_length: int) -> None:
    """Refuse contexts longer than the model's position table (not "got no activations")."""
    config = getattr(model, "config", None)
    limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and context_length > limit:
        raise ValueError(
            f"--context-length {context_length} exceeds the {limit} positions model {name} "
            f"accepts: give --context-length {limit} or less"
        )
