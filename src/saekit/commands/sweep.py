"""``saekit sweep``: the architectures compared at matched L0 on one stream (``saekit train``'s
flags, with the sweep preset as the default config)."""

from __future__ import annotations

import argparse
from typing import Any

from saekit.commands.train import add_run_args, train_command


def add_parser(sub: Any) -> None:
    p = sub.add_parser("sweep", help="compare architectures at matched L0 on one stream")
    add_run_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from saekit.train import presets

    default = presets.sweep_config()
    if args.data == "hierarchical":
        default["out_dir"] = "runs/sweep-hierarchical"
    return train_command(args, default)
