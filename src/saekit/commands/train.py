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

from saekit.train.config_files import apply_overrides, load_config_file


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
    for name in ("local_files_only", "keep_bos"):
        if getattr(args, name):
            flags[name] = True
    if args.no_streaming:
        flags["streaming"] = False
    if args.model:
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
        if flags.get("source") in ("hf", "cache"):
            data_section.pop("synthetic", None)
        data_section.update(flags)
    return apply_overrides(data, overrides + args.overrides)


def train_command(args: argparse.Namespace, default: dict[str, Any]) -> int:
    """``saekit train`` and ``saekit sweep``: build (or resume) the run config, guard the run
    directory, train, print the table. ``default``: the config used without --config."""
    from saekit.train.config import build_run_config
    from saekit.train.launch import DistributedFailure, is_main_process, launch, launched
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
