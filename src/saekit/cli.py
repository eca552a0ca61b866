"""`saekit train | sweep | cache | eval | report | export | bench`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from saekit.train import presets
from saekit.train.config import apply_overrides, build_run_config, load_config_file


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML or TOML run config (default: the built-in benchmark)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field by dotted path, e.g. saes.0.sae.k=16",
    )
    p.add_argument("--out", help="run directory (out_dir)")
    p.add_argument("--steps", type=int, help="training steps")
    p.add_argument("--batch-size", type=int, help="tokens per step")
    p.add_argument("--device", help="torch device, e.g. cpu or cuda")
    p.add_argument("--threads", type=int, help="torch.set_num_threads")
    p.add_argument(
        "--data",
        choices=["independent", "hierarchical", "correlated"],
        help="kind of the built-in synthetic data",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument(
        "--resume", metavar="RUN_DIR", help="resume the run in RUN_DIR from its checkpoint"
    )


def _run_config_dict(args: argparse.Namespace, default: dict[str, Any]) -> dict[str, Any]:
    data = load_config_file(args.config) if args.config else default
    flat = {
        "out_dir": args.out,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "device": args.device,
        "threads": args.threads,
    }
    overrides = [f"{k}={v}" for k, v in flat.items() if v is not None]
    if args.data:
        overrides.append(f"data.synthetic.kind={args.data}")
    if args.no_progress:
        overrides.append("progress=false")
    return apply_overrides(data, overrides + args.overrides)


def _train(args: argparse.Namespace, default: dict[str, Any]) -> int:
    from saekit.train.run import format_table, resume_config, run_training
    from saekit.train.trainer import TrainingInterrupted

    if args.resume:
        extra = apply_overrides({}, [f"steps={args.steps}"] if args.steps else [])
        cfg = resume_config(args.resume, extra)
    else:
        cfg = build_run_config(_run_config_dict(args, default))
    print(
        f"saekit: training {len(cfg.saes)} SAE(s) for {cfg.steps} steps of {cfg.batch_size} "
        f"tokens -> {cfg.out_dir}",
        file=sys.stderr,
    )
    try:
        _, reports = run_training(cfg, resume=bool(args.resume))
    except TrainingInterrupted as exc:
        print(f"saekit: {exc}", file=sys.stderr)
        return 130
    print(format_table(reports))
    print(f"\nSAEs, metrics and eval.json in {cfg.out_dir}/<name>/", file=sys.stderr)
    if getattr(args, "plots", True) and len(reports) > 1:
        from saekit.report.plots import sweep_plots

        paths = sweep_plots(Path(cfg.out_dir))
        print("plots: " + ", ".join(str(p) for p in paths), file=sys.stderr)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    return _train(args, presets.train_config())


def cmd_sweep(args: argparse.Namespace) -> int:
    default = presets.sweep_config()
    if args.data == "hierarchical":
        default["out_dir"] = "runs/sweep-hierarchical"
    return _train(args, default)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="saekit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train SAEs (default: one TopK SAE on the built-in benchmark)")
    _add_run_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sweep", help="compare architectures at matched L0 on one stream")
    _add_run_args(p)
    p.set_defaults(func=cmd_sweep)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:  # configuration and input errors: one clear line, no traceback
        print(f"saekit: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
