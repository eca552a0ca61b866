"""``saekit pipeline CONFIG``: the real-model workflow from one config file.

Stages, each with its own progress bar: cache the model's activations (``saekit cache``), train
the ``train`` section's SAEs on the cache (``saekit train``: one SAE or a sweep), evaluate each
with it spliced into the model on the cache's held-out documents (``saekit eval``), write each
one's feature dashboard (``saekit report``) and export each to SAELens' format
(:func:`export_to_saelens`). Every stage runs the subcommand's own parser and handler with the
arguments the config gives, so the pipeline checks and does exactly what those commands do.

Layout of ``out``: ``cache/``, ``train.yaml`` (the run config written for the train stage),
``train/`` (the run: one directory per SAE), ``eval/NAME.json``, ``report/NAME/index.html``,
``saelens/NAME/``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from saekit.core.paths import refuse_output_over_inputs

STAGES = ("cache", "train", "eval", "report", "export")


@dataclass
class TextSection:
    """The documents (one of dataset / text_file)."""

    dataset: str | None = None
    """A Hugging Face dataset: hub id or local path."""
    text_file: str | None = None
    """A local .txt (blank-line separated documents) or .jsonl file."""
    split: str = "train"
    dataset_config: str | None = None
    text_field: str = "text"


@dataclass
class CacheSection:
    max_tokens: int = 1_000_000
    """Tokens cached; the last shard is held out for evaluation (so at least two shards)."""
    context_length: int = 128
    batch_size: int = 32
    """Contexts per model forward."""
    shard_tokens: int = 262_144
    dtype: str = "float32"


@dataclass
class EvalSection:
    n_batches: int = 16
    batch_size: int = 8
    """Contexts per batch (of cache.context_length tokens)."""


@dataclass
class ReportSection:
    latents: int = 64
    top_k: int = 20
    samples: int = 64
    max_tokens: int = 100_000


@dataclass
class ExportSection:
    saelens: bool = True
    """Write each SAE in SAELens' format under out/saelens/ (saekit.interop)."""


@dataclass
class PipelineConfig:
    out: str
    """The pipeline's directory (layout: module docstring)."""
    model: str
    """Model hub id or local directory."""
    hook: str
    """Hook point, e.g. transformer.h.8:input."""
    text: TextSection
    train: dict[str, Any]
    """A run config (as for saekit train --config) without data or out_dir: the pipeline sets
    data to the cache and out_dir to out/train; several saes make a sweep."""
    device: str = "cpu"
    local_files_only: bool = False
    keep_bos: bool = False
    cache: CacheSection = field(default_factory=CacheSection)
    eval: EvalSection = field(default_factory=EvalSection)
    report: ReportSection = field(default_factory=ReportSection)
    export: ExportSection = field(default_factory=ExportSection)


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "pipeline",
        help="cache, train, evaluate, report and export from one config file",
        description=__doc__.split("\n\n")[1],
    )
    p.add_argument("config", metavar="CONFIG", help="pipeline config (YAML or TOML)")
    p.add_argument("--force", action="store_true", help="replace a finished training run in out")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(func=run, command_parsers=sub.choices)


def run(args: argparse.Namespace) -> int:
    return pipeline_command(args, args.command_parsers)


def load_pipeline_config(path: str | Path) -> PipelineConfig:
    """The validated config: unknown fields refused by dotted path, the train section checked
    as a run config before anything runs."""
    from saekit.core.configs import from_dict
    from saekit.train.config_files import load_config_file

    cfg = from_dict(PipelineConfig, load_config_file(path))
    if (cfg.text.dataset is None) == (cfg.text.text_file is None):
        raise ValueError("text: give exactly one of dataset and text_file")
    for key in ("data", "out_dir"):
        if key in cfg.train:
            raise ValueError(f"train.{key}: set by the pipeline (the cache, out/train)")
    if cfg.cache.max_tokens < 2 * cfg.cache.shard_tokens:
        raise ValueError(
            f"cache.max_tokens = {cfg.cache.max_tokens} gives one shard of"
            f" {cfg.cache.shard_tokens}: evaluation needs the held-out last shard, so at least"
            " two (raise max_tokens or lower shard_tokens)"
        )
    from saekit.data.lm.models import check_hook
    from saekit.train.config import build_run_config

    check_hook(cfg.model, cfg.hook, local_files_only=cfg.local_files_only)
    inputs = [("model", cfg.model), ("text.dataset", cfg.text.dataset)]
    refuse_output_over_inputs(cfg.out, [*inputs, ("text.text_file", cfg.text.text_file)], "out")

    try:  # the same SAE settings, checked against the model before the cache is written
        build_run_config({**cfg.train, "data": _hf_data(cfg), "out_dir": str(Path(cfg.out))})
    except ValueError as exc:
        raise ValueError(f"train: {exc}") from exc
    return cfg


def _hf_data(cfg: PipelineConfig) -> dict[str, Any]:
    text = {k: v for k, v in vars(cfg.text).items() if v is not None}
    text["dataset_split"] = text.pop("split")
    return {
        "source": "hf",
        "model": cfg.model,
        "hook": cfg.hook,
        "local_files_only": cfg.local_files_only,
        **text,
    }


def export_to_saelens(sae_dir: Path, out_dir: Path) -> None:
    """The export stage for one SAE: SAELens' files for ``sae_dir`` in ``out_dir``
    (``saekit export --to saelens``, saekit.interop)."""
    from saekit.interop import export_sae
    from saekit.model.sae import SAE

    export_sae(SAE.load(sae_dir), "saelens", out_dir, sae_dir=sae_dir)


def pipeline_command(args: argparse.Namespace, commands: dict[str, argparse.ArgumentParser]) -> int:
    """Run the stages in order; the first failure stops the pipeline with its message."""
    import yaml

    cfg = load_pipeline_config(args.config)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    n_stages = len(STAGES) - (not cfg.export.saelens)
    quiet = ["--no-progress"] * args.no_progress

    def stage(number: int, name: str) -> None:
        print(f"saekit pipeline: stage {number}/{n_stages}: {name}", file=sys.stderr)

    def run(argv: list[str]) -> None:
        stage_args = commands[argv[0]].parse_args(argv[1:])
        stage_args.argv = argv
        code = stage_args.func(stage_args)
        if code:
            raise ValueError(f"pipeline stage {argv[0]} failed (exit status {code})")

    model = ["--model", cfg.model, "--device", cfg.device]
    model += ["--local-files-only"] * cfg.local_files_only + ["--keep-bos"] * cfg.keep_bos
    text, c, r = _text_flags(cfg.text), cfg.cache, cfg.report
    context = ["--context-length", str(c.context_length)]
    stage(1, "cache activations")
    run(
        ["cache", *model, "--hook", cfg.hook, *text, "--out", str(out / "cache"), *context]
        + ["--batch-size", str(c.batch_size), "--max-tokens", str(c.max_tokens)]
        + ["--shard-tokens", str(c.shard_tokens), "--dtype", c.dtype, *quiet]
    )
    from saekit.data.cache.reading import ActivationCache, held_out_problem

    problem = held_out_problem(ActivationCache(out / "cache").manifest, out / "cache")
    if problem:  # stage 3 would fail after training: stop before it
        raise ValueError(problem)
    stage(2, "train")
    run_config = {**cfg.train, "data": {"source": "cache", "cache_dir": str(out / "cache")}}
    run_config["out_dir"] = str(out / "train")
    (out / "train.yaml").write_text(yaml.safe_dump(run_config, sort_keys=False))
    force = ["--force"] * args.force
    run(["train", "--config", str(out / "train.yaml"), "--device", cfg.device, *quiet, *force])
    saes = sorted(p.parent for p in (out / "train").glob("*/cfg.json"))
    stage(3, "evaluate with the SAE spliced in (the cache's held-out documents)")
    (out / "eval").mkdir(exist_ok=True)
    for sae in _bar(saes, "eval", args):
        run(
            ["eval", "--sae", str(sae), *model, "--cache", str(out / "cache"), *context]
            + ["--n-batches", str(cfg.eval.n_batches), "--batch-size", str(cfg.eval.batch_size)]
            + ["--json", str(out / "eval" / f"{sae.name}.json")]
        )
    stage(4, "feature reports (the documents the training held out)")
    for sae in saes:
        run(
            [
                "report",
                str(sae),
                *model,
                "--split",
                "heldout",
                "--out",
                str(out / "report" / sae.name),
            ]
            + ["--latents", str(r.latents), "--top-k", str(r.top_k), "--samples", str(r.samples)]
            + ["--max-tokens", str(r.max_tokens), *context, *quiet]
        )
    if cfg.export.saelens:
        stage(5, "export to SAELens")
        for sae in _bar(saes, "export", args):
            export_to_saelens(sae, out / "saelens" / sae.name)
    print(f"saekit pipeline: done: {len(saes)} SAE(s) in {out}; reports in {out / 'report'}")
    return 0


def _bar(items: list[Path], name: str, args: argparse.Namespace) -> Any:
    """A progress bar over the SAEs of a stage whose command has none of its own."""
    from tqdm.auto import tqdm

    return tqdm(items, desc=name, unit="SAE", disable=args.no_progress, file=sys.stderr)


def _text_flags(text: TextSection) -> list[str]:
    flags = ["--dataset", text.dataset] if text.dataset else ["--text-file", str(text.text_file)]
    flags += ["--split", text.split, "--text-field", text.text_field]
    return flags + (["--dataset-config", text.dataset_config] if text.dataset_config else [])
