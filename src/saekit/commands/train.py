"""``saekit train`` / ``saekit sweep``: from command-line flags to a run, with its guards.

The run directory is checked before anything is written (``--out`` holding another run is
refused unless ``--resume`` or ``--force``); ``--resume`` says which options it does not apply;
a stop outside the training loop (start-up, final evaluation) ends with one line saying what
was saved.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Any

from saekit.commands.flags import add_model_args, add_models_arg, add_outlier_arg, add_text_args
from saekit.train.config_files import apply_overrides, load_config_file


def add_parser(sub: Any) -> None:
    p = sub.add_parser("train", help="train SAEs (default: one TopK SAE on the built-in benchmark)")
    add_run_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from saekit.train import presets

    return train_command(args, presets.train_config())


def add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML or TOML run config (default: the built-in benchmark)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field by dotted path, e.g. saes.0.sae.activation.k=16",
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
        "--resume",
        metavar="RUN_DIR",
        help="resume the run in RUN_DIR from its checkpoint (keeps its config; --steps may "
        "extend it)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace the run already in --out (its config, checkpoint, SAEs and metrics); with "
        "--resume: continue from the checkpoint's config although config.yaml differs",
    )
    p.add_argument(
        "--nproc", type=int, default=1, help="processes on this machine (torchrun; see parallel)"
    )
    g = p.add_argument_group(
        "real models", "train on a transformers model run online (--model) or on a cache (--cache)"
    )
    where = g.add_mutually_exclusive_group()
    where.add_argument("--model", metavar="ID|PATH", help="model hub id or local directory")
    where.add_argument("--cache", metavar="DIR", help="activation cache written by `saekit cache`")
    add_models_arg(where, "data.models; hooks are then named LABEL/HOOK")
    add_text_args(g, dataset_config_flags=("--dataset-config",))
    g.add_argument("--context-length", type=int, help="tokens per context (default 128)")
    g.add_argument("--model-batch-size", type=int, help="contexts per model forward (default 32)")
    add_outlier_arg(g)
    add_model_args(g, train=True)


def _data_flags(args: argparse.Namespace) -> dict[str, Any]:
    """``data.`` fields set by train flags (typed values, no YAML parsing of paths)."""
    fields = {
        "model": args.model,
        "hook": args.hook,
        "dataset": args.dataset,
        "text_file": args.text_file,
        "dataset_split": args.split,
        "dataset_config": args.dataset_config,
        "text_field": args.text_field,
        "context_length": args.context_length,
        "model_batch_size": args.model_batch_size,
        "model_dtype": args.model_dtype,
        "model_class": args.model_class,
        "bos_token": args.bos_token,
        "eos_token": args.eos_token,
        "cache_dir": args.cache,
        "outlier_norm": args.outlier_norm,
    }
    flags = {k: v for k, v in fields.items() if v is not None}
    if getattr(args, "models", None):
        from saekit.data.lm.model_set import parse_model_specs

        flags["models"] = parse_model_specs(args.models)
    for name in ("local_files_only", "keep_bos"):
        if getattr(args, name):
            flags[name] = True
    if args.no_streaming:
        flags["streaming"] = False
    if args.model or "models" in flags:
        flags["source"] = "hf"
    elif args.cache:
        flags["source"] = "cache"
    return flags


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
    flags = _data_flags(args)
    if flags:
        data_section = data.setdefault("data", {})
        if "source" in flags:  # --model or --cache: the config's other source goes
            from saekit.data.sources.registry import switch_source

            switch_source(data_section, flags["source"])
        for given, other in (("model", "models"), ("models", "model")):
            if given in flags:  # --model replaces the config's data.models, and vice versa
                data_section.pop(other, None)
        data_section.update(flags)
    return apply_overrides(data, overrides + args.overrides)


def train_command(args: argparse.Namespace, default: dict[str, Any]) -> int:
    """``saekit train`` and ``saekit sweep``: build (or resume) the run config, guard the run
    directory, train, print the table. ``default``: the config used without --config."""
    from saekit.train.config import build_run_config
    from saekit.train.launch import DistributedFailure, is_main_process, launch, launched
    from saekit.train.mesh import check_processes
    from saekit.train.outputs import format_table
    from saekit.train.preflight import check_fits
    from saekit.train.run import (
        discard_failed_start,
        prepare_out_dir,
        resume_config,
        run_training,
    )
    from saekit.train.trainer import TrainingInterrupted

    if args.resume:
        _warn_resume_ignores(args)
        cfg = resume_config(args.resume, args.steps, force=args.force)
    else:
        cfg = build_run_config(_run_config_dict(args, default))
        check_fits(cfg)
        if not launched():  # torchrun workers: the launching process checked and cleared it
            prepare_out_dir(cfg, force=args.force)
    if args.nproc > 1 and not launched():  # validated here, run by torchrun workers
        check_processes(cfg.parallel, args.nproc)
        return launch(args.nproc, args.argv)
    print(
        f"saekit: training {len(cfg.saes)} SAE(s) for {cfg.steps} steps of {cfg.batch_size} "
        f"tokens -> {cfg.out_dir}",
        file=sys.stderr,
    )
    created = not Path(cfg.out_dir).exists()
    try:
        with _signals_interrupt():
            _, reports = run_training(cfg, resume=bool(args.resume))
    except TrainingInterrupted as exc:
        print(f"saekit: {exc}", file=sys.stderr)
        return 130
    except (KeyboardInterrupt, _Interrupted) as exc:  # outside the loop: start-up or final eval
        saved = [s.name for s in cfg.saes if (Path(cfg.out_dir) / s.name / "cfg.json").exists()]
        print(
            f"saekit: stopped by {exc or 'signal 2'} outside the training loop (start-up or "
            f"final evaluation); "
            + (
                f"SAEs saved in {cfg.out_dir}: {', '.join(saved)}"
                if saved
                else f"resume with: saekit train --resume {cfg.out_dir}"
            ),
            file=sys.stderr,
        )
        return 130
    except DistributedFailure as exc:
        print(f"saekit: error: {exc}", file=sys.stderr)
        return 1
    except (ValueError, FloatingPointError, RuntimeError, MemoryError, OSError):
        if not args.resume and is_main_process():  # nothing blocks the corrected rerun
            discard_failed_start(cfg, created)
        raise
    if not is_main_process():
        return 0
    print(format_table(reports))
    print(f"\nSAEs, metrics and eval.json in {cfg.out_dir}/<name>/", file=sys.stderr)
    if getattr(args, "plots", True) and len(reports) > 1:
        from saekit.report.plots import sweep_plots

        paths = sweep_plots(Path(cfg.out_dir))
        print("plots: " + ", ".join(str(p) for p in paths), file=sys.stderr)
    return 0


class _Interrupted(Exception):
    """SIGTERM outside the training loop (the trainer handles it inside)."""


@contextlib.contextmanager
def _signals_interrupt():
    """SIGTERM raises :class:`_Interrupted` (SIGINT raises KeyboardInterrupt already), so a
    stop during start-up or the final evaluation ends with a message, not silently."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise _Interrupted(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _warn_resume_ignores(args: argparse.Namespace) -> None:
    """--resume keeps the run's saved config: say which given options it does not apply."""
    ignored = [f"--config {args.config}"] if args.config else []
    ignored += [f"--set {o}" for o in args.overrides]
    if args.out and Path(args.out).resolve() != Path(args.resume).resolve():
        ignored.append(f"--out {args.out}")
    flags = {k: v for k, v in _data_flags(args).items() if k != "source"}
    for name in ("batch_size", "device", "threads", "data"):
        if getattr(args, name) is not None:
            flags[name] = getattr(args, name)
    ignored += [f"--{k.replace('_', '-')} {v}" for k, v in flags.items()]
    if ignored:
        print(
            f"saekit: --resume keeps the config saved in {args.resume}; ignoring "
            + ", ".join(ignored),
            file=sys.stderr,
        )
