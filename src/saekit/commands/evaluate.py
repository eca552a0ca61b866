"""``saekit eval``: its flags and its printed report; the evaluation is
:func:`saekit.eval.saved_multi.evaluate` (which documents, which hook: saekit.eval.saved), and with
``--suite`` :mod:`saekit.eval.suite` (absorption, sparse probing). The module is not named
``eval``: that is a builtin. No torch at import: ``saekit --help`` builds this parser."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from saekit.commands.flags import add_model_args, add_models_arg, add_text_args

if TYPE_CHECKING:  # torch behind it: not at import
    from saekit.eval.parts import PartsReport
    from saekit.eval.saved_report import DocumentData, SavedReport, SpliceScores


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a saved SAE: FVU, L0, dead latents; CE/KL spliced into the model",
        description="With --model: reconstruction metrics at the hook and (causal LMs) the "
        "model's CE and KL with the SAE spliced in (and zero-ablated), on the documents the "
        "SAE's training held out (--split heldout), those a cache held out (--cache DIR) or "
        "--dataset/--text-file documents in order (a warning counts any the SAE trained on). "
        "With --cache alone: reconstruction metrics on the cache's held-out last shard.",
    )
    p.add_argument("--sae", required=True, metavar="DIR", help="SAE directory (cfg.json)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--model", metavar="ID|PATH", help="model hub id or local directory")
    add_models_arg(which, "a crosscoder over LABEL/HOOK hooks reads them from these models")
    p.add_argument(
        "--cache",
        metavar="DIR",
        help="activation cache: alone, reconstruction on its held-out shard; with --model, the"
        " documents it held out",
    )
    add_text_args(p, dataset_config_flags=("--config", "--dataset-config"))
    p.add_argument("--context-length", type=int, help="tokens per context (128)")
    p.add_argument("--batch-size", type=int, default=8, help="contexts per batch")
    p.add_argument("--n-batches", type=int, default=16, help="batches to evaluate")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    add_model_args(p)
    add_suite_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Reconstruction metrics of a saved SAE, and CE/KL with it spliced into the model."""
    import json

    from saekit.eval.saved_multi import evaluate

    if args.suite:
        if args.models:
            raise ValueError("--suite evaluates an SAE on one model: give --model, not --models")
        return run_suite_command(args)
    report = evaluate(args)
    print(format_eval(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_json(), indent=2))
        print(f"saekit: wrote {args.json}", file=sys.stderr)
    return 0


def format_eval(r: SavedReport) -> str:
    from saekit.eval.saved_report import DocumentData

    m = r.metrics
    data = r.data if isinstance(r.data, DocumentData) else None
    target = None if data is None else data.target_hook
    splice = None if data is None else data.splice
    lines = [
        f"SAE          {r.sae}  ({r.d_sae} latents, d_in {r.d_in}, hook {r.hook}"
        + (")" if target is None else f" -> target {target})"),
        *_documents_line(data),
        f"tokens       {m.n_tokens:,}" + _predicted(splice),
        f"FVU          {m.fvu:.4f}   explained variance {m.explained_variance:.4f}",
        f"L0           {m.l0:.2f}",
        f"dead         {m.dead_fraction:.1%} of latents never fired on these tokens",
        f"dense        {m.dense_fraction:.1%} of latents fired on > 10% of tokens",
    ]
    if splice is not None:
        lines += [
            f"CE clean     {splice.ce_clean:.4f}   with SAE {splice.ce_sae:.4f}   "
            f"zero-ablated {splice.ce_zero:.4f}   CE score {splice.ce_score:.4f}",
            f"KL with SAE  {splice.kl_sae:.4f}   zero-ablated {splice.kl_zero:.4f}   "
            f"KL score {splice.kl_score:.4f}",
        ]
    if r.parts is not None:
        lines += parts_lines(r.parts)
    return "\n".join(lines)


def parts_lines(parts: PartsReport) -> list[str]:
    """A CLT's scores per target layer or a crosscoder's per source, and its decoder norms."""
    from saekit.eval.decoder_norms import SourceNormSummary

    layered = parts.kind == "layer"
    spliced = any(p.spliced_fvu is not None for p in parts.parts)
    head = f"{'layer' if layered else 'source':<6} {'FVU':>8}"
    head += f" {'spliced':>8}" * spliced + f" {'L0':>8} {'dead':>6}" * layered + "  hook"
    lines = [head]
    for i, p in enumerate(parts.parts):
        row = f"{i:<6} {p.fvu:8.4f}"
        if spliced:
            row += f" {p.spliced_fvu:8.4f}"
        if layered:
            row += f" {p.l0:8.2f} {p.dead_fraction:6.1%}"
        lines.append(row + f"  {p.name}" + ("" if p.input_hook is None else f" <- {p.input_hook}"))
    n = parts.decoder_norms
    if isinstance(n, SourceNormSummary):
        only = ", ".join(f"only {s} {c}" for s, c in zip(n.sources, n.only, strict=True))
        lines.append(f"decoder norms: shared {n.shared}, {only}, other {n.other}")
    elif n is not None:
        means = " ".join(f"{m:.2f}" for m in n.mean_own_layer_share)
        lines.append(f"own-layer share of decoder norm, mean per layer: {means}")
    return lines


def _predicted(splice: SpliceScores | None) -> str:
    """CE/KL average over the spliced tokens that predict a real next token: fewer than the
    spliced ones (the last position of each context predicts nothing)."""
    if splice is None:
        return ""
    return f" spliced; CE/KL over the {splice.n_predicted_tokens:,} of them that predict a token"


def _documents_line(data: DocumentData | None) -> list[str]:
    if data is None:
        return []
    trained = data.training_documents_evaluated
    note = "" if trained is None else f", {trained} of them training documents of the SAE"
    return [f"documents    {data.documents:,} ({data.documents_from}){note}"]


def add_suite_args(p: argparse.ArgumentParser) -> None:
    """``--suite`` and its options (:mod:`saekit.eval.suite`)."""
    p.add_argument(
        "--suite",
        metavar="LIST",
        help="judge-free suites, comma-separated: core,absorption,sparse_probing; --sae may be a"
        " sweep or run directory (every SAE under it)",
    )
    p.add_argument(
        "--probe-data",
        nargs="+",
        default=[],
        metavar="FILE",
        help="sparse_probing: text,label CSV or JSONL files (default: built-in tasks)",
    )
    p.add_argument("--suite-out", metavar="DIR", help="suite: output directory (default: --sae)")
    p.add_argument("--max-words", type=int, help="absorption: at most this many words (sampled)")


def run_suite_command(args: argparse.Namespace) -> int:
    """``saekit eval --suite``: each suite on each SAE; JSON per SAE, table and plot."""
    import copy

    from saekit.eval.suite import SuiteOptions, parse_suites, run_suite, sae_dirs, write_suite

    suites = parse_suites(args.suite)
    paths = sae_dirs(args.sae)

    def core(path: Any) -> SavedReport:
        one = copy.copy(args)
        one.sae = path
        from saekit.eval.saved_multi import evaluate

        return evaluate(one)

    options = SuiteOptions(
        suites=suites,
        model=args.model,
        probe_data=args.probe_data,
        device=args.device,
        local_files_only=args.local_files_only,
        max_words=args.max_words,
    )
    results = run_suite(paths, options, core)
    for path in write_suite(results, args.suite_out or args.sae):
        print(f"saekit: wrote {path}", file=sys.stderr)
    print((Path(args.suite_out or args.sae) / "suite.md").read_text(), end="")
    return 0
