"""`saekit train | sweep | cache | eval | hooks | bench | report | pipeline | convert | export |
import`."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from pathlib import Path

from saekit.commands import convert, pipeline, report
from saekit.commands import interop as interop_commands
from saekit.commands.flags import add_model_args as _add_model_args
from saekit.commands.flags import add_model_class_arg as _add_model_class_arg
from saekit.commands.flags import add_outlier_arg as _add_outlier_arg
from saekit.commands.flags import add_text_args as _add_text_args
from saekit.train import presets

# Nothing here imports torch at module level: `saekit --help` answers without it.


def _add_run_args(p: argparse.ArgumentParser) -> None:
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
    _add_text_args(g, dataset_config_flags=("--dataset-config",))
    g.add_argument("--context-length", type=int, help="tokens per context (default 128)")
    g.add_argument("--model-batch-size", type=int, help="contexts per model forward (default 32)")
    _add_outlier_arg(g)
    _add_model_args(g, train=True)


def cmd_train(args: argparse.Namespace) -> int:
    from saekit.commands.train import train_command

    return train_command(args, presets.train_config())


def cmd_sweep(args: argparse.Namespace) -> int:
    default = presets.sweep_config()
    if args.data == "hierarchical":
        default["out_dir"] = "runs/sweep-hierarchical"
    from saekit.commands.train import train_command

    return train_command(args, default)


def cmd_cache(args: argparse.Namespace) -> int:
    """Harvest activations into a cache directory, then verify it; or only verify one."""
    from saekit.data.cache import ActivationCache

    verify_dir = args.verify
    if args.action:
        if args.action[0] != "verify" or len(args.action) != 2:
            raise ValueError(f"unexpected arguments {args.action}; did you mean: cache verify DIR")
        verify_dir = args.action[1]
    if not verify_dir:
        from saekit.commands.cache import cache_command

        cache_command(args)
        verify_dir = args.out
    cache = ActivationCache(verify_dir)
    cache.verify()
    print(
        f"{cache.directory}: {cache.n_tokens:,} tokens in {len(cache.shards)} shard(s), "
        f"d = {cache.d}, {cache.dtype_name}, model {cache.model}, hook {cache.hook}"
        + (f", target hook {cache.target_hook}" if cache.target_hook else "")
        + "; verified"
    )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Reconstruction metrics of a saved SAE, and CE/KL with it spliced into the model."""
    import json

    from saekit.commands.eval import evaluate_saved, format_eval

    report = evaluate_saved(args)
    print(format_eval(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"saekit: wrote {args.json}", file=sys.stderr)
    return 0


def cmd_hooks(args: argparse.Namespace) -> int:
    """List a model's hook points and their shapes, built from its config (no weights)."""
    from saekit.data.hooks import format_hook_table, probe_hook_shapes
    from saekit.data.models import meta_model

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


BENCHMARKS = {
    "step": "bench_step.py",
    "objectives": "bench_objectives.py",
    "harvest": "bench_harvest.py",
    "distributed": "bench_distributed.py",
    "synth": "bench_synth.py",
    "research": "research.py",
    "report": "bench_report.py",
}


def cmd_bench(args: argparse.Namespace) -> int:
    """Run a benchmark script of the checkout's benchmarks/ (they print markdown tables)."""
    import subprocess

    root = Path(__file__).resolve().parents[2] / "benchmarks"
    script = root / BENCHMARKS[args.which]
    if not script.is_file():
        raise ValueError(f"benchmark {script} not found: run saekit bench from a source checkout")
    return subprocess.call([sys.executable, str(script), *args.bench_args])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="saekit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train SAEs (default: one TopK SAE on the built-in benchmark)")
    _add_run_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sweep", help="compare architectures at matched L0 on one stream")
    _add_run_args(p)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("bench", help="run a benchmark (prints a markdown table)")
    p.add_argument("which", nargs="?", default="step", choices=sorted(BENCHMARKS))
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="passed to the script")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "cache",
        help="harvest a model's activations into a cache directory (or: cache verify DIR)",
        description="Harvest activations at one hook point into sharded safetensors with a "
        "manifest, then verify every shard. `saekit cache verify DIR` only verifies. An "
        "interrupted run resumes when repeated with the same arguments.",
    )
    p.add_argument("action", nargs="*", metavar="verify DIR", help="verify an existing cache")
    p.add_argument("--verify", metavar="DIR", help="only verify the cache in DIR")
    p.add_argument("--model", metavar="ID|PATH", help="model hub id or local directory")
    _add_text_args(p, dataset_config_flags=("--config", "--dataset-config"))
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
    _add_outlier_arg(p)
    _add_model_args(p)
    p.add_argument("--out", metavar="DIR", help="cache directory")
    p.add_argument("--target-hook", help="transcoders: also this hook, same pass; rows [hook|it]")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=cmd_cache)

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
    p.add_argument("--model", metavar="ID|PATH", help="model hub id or local directory")
    p.add_argument(
        "--cache",
        metavar="DIR",
        help="activation cache: alone, reconstruction on its held-out shard; with --model, the"
        " documents it held out",
    )
    _add_text_args(p, dataset_config_flags=("--config", "--dataset-config"))
    p.add_argument("--context-length", type=int, help="tokens per context (128)")
    p.add_argument("--batch-size", type=int, default=8, help="contexts per batch")
    p.add_argument("--n-batches", type=int, default=16, help="batches to evaluate")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    _add_model_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "hooks",
        help="list a model's hook points and their shapes (from its config, no weights)",
        description="Build the model from its config on the meta device (nothing but config.json"
        " is read) and list every module with the shapes of what enters it (NAME:input) and what"
        " it returns (NAME).",
    )
    p.add_argument("model", metavar="MODEL", help="model hub id or local directory")
    p.add_argument("--grep", metavar="PATTERN", help="only names matching this regular expression")
    _add_model_class_arg(p)
    p.add_argument("--local-files-only", action="store_true", help="never download")
    p.set_defaults(func=cmd_hooks)
    convert.add_parser(sub)
    report.add_parser(sub)
    pipeline.add_parser(sub)
    interop_commands.add_parser(sub)

    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)  # for --nproc
    try:
        with _warnings_as_lines():
            return args.func(args)
    except ValueError as exc:  # configuration and input errors: one clear line, no traceback
        print(f"saekit: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except FloatingPointError as exc:  # a loss went NaN/inf mid-run (checkpoint kept)
        print(f"saekit: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except OSError as exc:  # read-only directory, full disk, missing file
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        print(f"saekit: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    except MemoryError:
        print("saekit: error: out of memory (try a smaller batch_size or d_sae)", file=sys.stderr)
        return 1


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


@contextlib.contextmanager
def _warnings_as_lines():
    """saekit's own warnings (warnings.warn in the library) as one line each, every time:
    ``saekit: warning: ...``, not a file name, line number and source line."""
    with warnings.catch_warnings():
        warnings.filterwarnings("always", module=r"saekit\.")
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if f"{os.sep}saekit{os.sep}" in filename:
                print(f"saekit: warning: {message}", file=sys.stderr)
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield


if __name__ == "__main__":
    sys.exit(main())
