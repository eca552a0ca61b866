"""`saekit train | sweep | cache | eval | bench`."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Any

from saekit.train import presets
from saekit.train.config_files import apply_overrides, load_config_file

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
        help="replace the run already in --out (its config, checkpoint, SAEs and metrics)",
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
    _add_model_args(g, device=False)


def _add_text_args(g: Any, dataset_config_flags: tuple[str, ...]) -> None:
    """Hook and documents, shared by train, cache and eval."""
    g.add_argument("--hook", help="hook point, e.g. transformer.h.8:input (resid_pre of block 8)")
    text = g.add_mutually_exclusive_group()
    text.add_argument("--dataset", metavar="ID|PATH", help="Hugging Face dataset (hub id or path)")
    text.add_argument(
        "--text-file", metavar="PATH", help="local .txt (blank-line separated) or .jsonl"
    )
    g.add_argument("--split", "--dataset-split", dest="split", help="dataset split (train)")
    g.add_argument(*dataset_config_flags, dest="dataset_config", help="dataset configuration name")
    g.add_argument("--text-field", help="field holding the text (text)")
    g.add_argument("--no-streaming", action="store_true", help="download the dataset whole")


def _add_model_args(g: Any, device: bool = True) -> None:
    if device:
        g.add_argument("--device", default="cpu", help="torch device of the model and SAE")
    g.add_argument(
        "--model-dtype", choices=["float32", "bfloat16", "float16"], help="model weights dtype"
    )
    g.add_argument("--local-files-only", action="store_true", help="never download")
    g.add_argument(
        "--keep-bos", action="store_true", help="keep BOS positions (dropped by default)"
    )


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
        "cache_dir": args.cache,
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


def _train(args: argparse.Namespace, default: dict[str, Any]) -> int:
    from saekit.train.config import build_run_config
    from saekit.train.launch import DistributedFailure, is_main_process, launch, launched
    from saekit.train.outputs import format_table
    from saekit.train.run import prepare_out_dir, resume_config, run_training
    from saekit.train.trainer import TrainingInterrupted

    if args.resume:
        _warn_resume_ignores(args)
        cfg = resume_config(args.resume, args.steps)
    else:
        cfg = build_run_config(_run_config_dict(args, default))
        if not launched():  # torchrun workers: the launching process checked and cleared it
            prepare_out_dir(cfg, force=args.force)
    if args.nproc > 1 and not launched():  # validated here, run by torchrun workers
        return launch(args.nproc, args.argv)
    print(
        f"saekit: training {len(cfg.saes)} SAE(s) for {cfg.steps} steps of {cfg.batch_size} "
        f"tokens -> {cfg.out_dir}",
        file=sys.stderr,
    )
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
    if args.force:
        ignored.append("--force")
    if ignored:
        print(
            f"saekit: --resume keeps the config saved in {args.resume}; ignoring "
            + ", ".join(ignored),
            file=sys.stderr,
        )


def cmd_train(args: argparse.Namespace) -> int:
    return _train(args, presets.train_config())


def cmd_sweep(args: argparse.Namespace) -> int:
    default = presets.sweep_config()
    if args.data == "hierarchical":
        default["out_dir"] = "runs/sweep-hierarchical"
    return _train(args, default)


def _documents(args: argparse.Namespace):
    from saekit.data.lm_source import documents

    if not (args.dataset or args.text_file):
        raise ValueError("give the documents: --dataset ID|PATH or --text-file PATH")
    return documents(
        dataset=args.dataset,
        text_file=args.text_file,
        split=args.split or "train",
        config_name=args.dataset_config,
        field=args.text_field or "text",
        streaming=not args.no_streaming,
    )


def _print_cache(cache: Any) -> None:
    print(
        f"{cache.directory}: {cache.n_tokens:,} tokens in {len(cache.shards)} shard(s), "
        f"d = {cache.d}, {cache.dtype_name}, model {cache.model}, hook {cache.hook}; verified"
    )


def cmd_cache(args: argparse.Namespace) -> int:
    """Harvest activations into a cache directory, then verify it; or only verify one."""
    from saekit.data.cache import ActivationCache, write_cache

    verify_dir = args.verify
    if args.action:
        if args.action[0] != "verify" or len(args.action) != 2:
            raise ValueError(f"unexpected arguments {args.action}; did you mean: cache verify DIR")
        verify_dir = args.action[1]
    if verify_dir:
        cache = ActivationCache(verify_dir)
        cache.verify()
        _print_cache(cache)
        return 0

    from saekit.data.hf import Harvester, HookPoint, TokenFilter
    from saekit.data.lm_source import load_lm
    from saekit.data.text import token_batches

    for flag, value in (("--model", args.model), ("--hook", args.hook), ("--out", args.out)):
        if not value:
            raise ValueError(f"saekit cache needs {flag}")
    docs = _documents(args)
    hook = str(HookPoint.parse(args.hook))
    model, tokenizer = load_lm(
        args.model, args.model_dtype or "float32", args.device, args.local_files_only
    )
    token_filter = TokenFilter.from_tokenizer(
        tokenizer,
        exclude_padding=not args.keep_padding,
        exclude_bos=not args.keep_bos,
        exclude_special=args.exclude_special,
    )
    harvester = Harvester(model, hook, token_filter=token_filter, device="cpu")
    contexts = token_batches(
        docs,
        tokenizer,
        context_length=args.context_length,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    settings = ("dataset", "text_file", "split", "dataset_config", "text_field", "seed")
    settings += ("context_length", "batch_size", "keep_bos", "keep_padding", "exclude_special")
    metadata = {k: getattr(args, k) for k in settings}
    metadata["model_dtype"] = args.model_dtype or "float32"
    acts = _counted(harvester.stream(contexts, prefetch=2), hook, args.max_tokens, args.progress)
    write_cache(
        args.out,
        acts,
        hook,
        args.model,
        args.dtype,
        shard_tokens=args.shard_tokens,
        max_tokens=args.max_tokens,
        metadata=metadata,
    )
    cache = ActivationCache(args.out)
    cache.verify()
    _print_cache(cache)
    return 0


def _counted(outputs: Any, hook: str, total: int | None, show: bool) -> Any:
    """Pass harvester outputs through, counting tokens on a progress bar."""
    from tqdm.auto import tqdm

    with tqdm(total=total, disable=not show, unit="tok", unit_scale=True) as bar:
        for out in outputs:
            bar.update(len(out[hook]))
            yield out


def cmd_eval(args: argparse.Namespace) -> int:
    """Reconstruction metrics of a saved SAE, and CE/KL with it spliced into the model."""
    import json

    import torch

    from saekit.data.cache import ActivationCache
    from saekit.eval.metrics import MetricAccumulator
    from saekit.sae import SAE

    sae = SAE.load(args.sae, device=args.device)
    d_in, d_sae = sae.cfg.d_in, sae.cfg.d_sae
    hook = args.hook or sae.cfg.hook
    if not hook:
        raise ValueError(f"{args.sae}/cfg.json records no hook point: pass --hook")
    if bool(args.model) == bool(args.cache):
        raise ValueError(
            "give --model with --dataset or --text-file (CE/KL and reconstruction) or --cache"
            " (reconstruction only)"
        )
    acc = MetricAccumulator(d_in, d_sae, device=args.device)
    report: dict[str, Any] = {"sae": str(args.sae), "hook": hook}

    @torch.no_grad()
    def reconstruct(x: torch.Tensor) -> torch.Tensor:
        out = sae(x.to(sae.W_dec.dtype))
        acc.add(x, out.x_hat, out.latents)
        return out.x_hat

    if args.cache:
        from saekit.data.lm_source import held_out_batches

        cache = ActivationCache(args.cache)
        if cache.d != d_in:
            raise ValueError(f"SAE d_in = {d_in} but the cache {args.cache} has width {cache.d}")
        if cache.hook != hook:
            print(
                f"saekit: warning: the cache holds hook {cache.hook}, not {hook}", file=sys.stderr
            )
        n_tokens = args.n_batches * args.batch_size * args.context_length
        for x in held_out_batches(cache, n_tokens, args.batch_size * args.context_length):
            reconstruct(x.to(args.device))
        report.update(cache=str(args.cache), model=cache.model)
    else:
        from saekit.data.hf import HookPoint, TokenFilter
        from saekit.data.lm_source import activation_width, load_lm
        from saekit.data.text import token_batches
        from saekit.eval.splice import splice_eval

        hook = str(HookPoint.parse(hook))
        docs = _documents(args)
        model, tokenizer = load_lm(
            args.model, args.model_dtype or "float32", args.device, args.local_files_only
        )
        width = activation_width(model, hook)
        if width != d_in:
            raise ValueError(
                f"SAE d_in = {d_in} but model {args.model} has width {width} at hook {hook}"
            )
        contexts = token_batches(
            docs,
            tokenizer,
            context_length=args.context_length,
            batch_size=args.batch_size,
        )
        token_filter = TokenFilter.from_tokenizer(tokenizer, exclude_bos=not args.keep_bos)
        splice = splice_eval(
            model,
            hook,
            reconstruct,
            contexts,
            token_filter=token_filter,
            max_batches=args.n_batches,
        )
        report.update(model=args.model, hook=hook, dataset=args.dataset or args.text_file)
        report.update({k: v for k, v in splice.to_dict().items() if k not in ("fvu", "n_tokens")})
        report["n_predicted_tokens"] = splice.n_tokens
    if int(acc.n) == 0:
        raise ValueError("no tokens were evaluated")
    result = acc.result()
    report.update(result.summary())
    report.update(d_in=d_in, d_sae=d_sae, l0_histogram=result.l0_histogram)
    print(_format_eval(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"saekit: wrote {args.json}", file=sys.stderr)
    return 0


def _format_eval(r: dict[str, Any]) -> str:
    lines = [
        f"SAE          {r['sae']}  ({r['d_sae']} latents, d_in {r['d_in']}, hook {r['hook']})",
        f"tokens       {r['n_tokens']:,}",
        f"FVU          {r['fvu']:.4f}   explained variance {r['explained_variance']:.4f}",
        f"L0           {r['l0']:.2f}",
        f"dead         {r['dead_fraction']:.1%} of latents never fired on these tokens",
        f"dense        {r['dense_fraction']:.1%} of latents fired on > 10% of tokens",
    ]
    if "ce_clean" in r:
        lines += [
            f"CE clean     {r['ce_clean']:.4f}   with SAE {r['ce_sae']:.4f}   "
            f"zero-ablated {r['ce_zero']:.4f}   CE score {r['ce_score']:.4f}",
            f"KL with SAE  {r['kl_sae']:.4f}   zero-ablated {r['kl_zero']:.4f}   "
            f"KL score {r['kl_score']:.4f}",
        ]
    return "\n".join(lines)


BENCHMARKS = {
    "step": "bench_step.py",
    "objectives": "bench_objectives.py",
    "harvest": "bench_harvest.py",
    "distributed": "bench_distributed.py",
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
    _add_model_args(p)
    p.add_argument("--out", metavar="DIR", help="cache directory")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=cmd_cache)

    p = sub.add_parser(
        "eval",
        help="evaluate a saved SAE: FVU, L0, dead latents; CE/KL spliced into the model",
        description="With --model and documents: reconstruction metrics at the hook and the "
        "model's CE and KL with the SAE spliced in (and zero-ablated). With --cache: "
        "reconstruction metrics on the cache's held-out last shard.",
    )
    p.add_argument("--sae", required=True, metavar="DIR", help="SAE directory (cfg.json)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", metavar="ID|PATH", help="model hub id or local directory")
    src.add_argument("--cache", metavar="DIR", help="activation cache (reconstruction only)")
    _add_text_args(p, dataset_config_flags=("--config", "--dataset-config"))
    p.add_argument("--context-length", type=int, default=128, help="tokens per context")
    p.add_argument("--batch-size", type=int, default=8, help="contexts per batch")
    p.add_argument("--n-batches", type=int, default=16, help="batches to evaluate")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    _add_model_args(p)
    p.set_defaults(func=cmd_eval)

    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)  # for --nproc
    try:
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


if __name__ == "__main__":
    sys.exit(main())
