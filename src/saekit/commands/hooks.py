"""``saekit hooks``: a model's hook points and their shapes, built from its config (no weights)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from saekit.commands.flags import add_model_class_arg


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "hooks",
        help="list a model's hook points and their shapes (from its config, no weights)",
        description="Build the model from its config on the meta device (nothing but config.json"
        " is read) and list every module with the shapes of what enters it (NAME:input) and what"
        " it returns (NAME).",
    )
    p.add_argument("model", metavar="MODEL", help="model hub id or local directory")
    p.add_argument("--grep", metavar="PATTERN", help="only names matching this regular expression")
    add_model_class_arg(p)
    p.add_argument("--local-files-only", action="store_true", help="never download")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """List a model's hook points and their shapes, built from its config (no weights)."""
    from saekit.data.lm.hook_probe import format_hook_table, probe_hook_shapes
    from saekit.data.lm.models import meta_model

    model, kind = meta_model(args.model, args.model_class, args.local_files_only)
    rows, error = probe_hook_shapes(model)
    print(
        f"{args.model}: {type(model).__name__} ({kind}), built from its config on the meta"
        " device, no weights loaded. Hook NAME reads what the module returns, NAME:input what"
        f" enters it; B = batch, T = tokens."
    )
    print(format_hook_table(rows, args.grep))
    if error:
        print(
            f"saekit: the probe's forward pass stopped ({error}): '-' = not seen", file=sys.stderr
        )
    return 0
