"""``saekit eval --suite``'s flags and command (:mod:`saekit.eval.suite` does the work). No
torch at import: ``saekit --help`` builds this parser."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


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

    def core(path: Any) -> dict[str, Any]:
        one = copy.copy(args)
        one.sae = path
        from saekit.commands.eval import evaluate_saved

        return evaluate_saved(one)

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
