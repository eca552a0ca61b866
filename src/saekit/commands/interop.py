"""``saekit export`` and ``saekit import``: SAEs and transcoders to and from SAELens, sparsify,
dictionary_learning, circuit-tracer and Gemma Scope 2, cross-layer transcoders to and from
circuit-tracer and from Gemma Scope 2 (saekit.interop). An imported SAE or CLT is a saekit
directory: ``saekit eval --sae DIR`` reads it like one it trained."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from saekit.core.paths import refuse_output_over_inputs

TO = ("saelens", "sparsify", "circuit-tracer")
FROM = ("saelens", "sparsify", "dictionary_learning", "gemma_scope_2", "circuit-tracer")


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "export",
        help="write a saved SAE (or every SAE of a run) in SAELens, sparsify or circuit-tracer "
        "format",
        description="A run directory writes one SAE per subdirectory of --out, named as in the "
        "run. sparsify's layout adds a directory named after the hook point. circuit-tracer: "
        "every per-layer transcoder given (several runs or SAEs) makes one transcoder set "
        "(layer_N.safetensors, config.yaml); a cross-layer transcoder its CLT directory "
        "(W_enc_i, W_dec_i, config.yaml).",
    )
    p.add_argument(
        "source",
        metavar="RUN_OR_SAE",
        nargs="+",
        help="a saved SAE or a run directory (several: --to circuit-tracer, one set)",
    )
    p.add_argument("--to", required=True, choices=TO, help="target format")
    p.add_argument("--out", required=True, help="directory to write")
    p.set_defaults(func=run, interop="export")

    p = sub.add_parser(
        "import",
        help="read an SAE saved by SAELens, sparsify or dictionary_learning, or a transcoder or "
        "cross-layer transcoder of circuit-tracer or Gemma Scope 2, into a saekit directory",
    )
    p.add_argument(
        "source", metavar="DIR", nargs="?", help="the SAE's directory (or circuit-tracer file)"
    )
    p.add_argument("--from", dest="from_", choices=FROM, default="saelens", help="its format")
    p.add_argument("--out", required=True, help="saekit SAE directory to write")
    p.add_argument(
        "--release",
        help="download from the Hugging Face Hub: a SAELens release name (needs sae-lens "
        "installed for its directory) or a hub repo id",
    )
    p.add_argument("--sae-id", help="with --release: the SAE's id (its folder in the repo)")
    p.set_defaults(func=run, interop="import")


def run(args: argparse.Namespace) -> int:
    return cmd_export(args) if args.interop == "export" else cmd_import(args)


def cmd_export(args: argparse.Namespace) -> int:
    from saekit.interop import saved_saes

    refuse_output_over_inputs(args.out, [("RUN_OR_SAE", source) for source in args.source])
    if args.to == "circuit-tracer":
        return export_circuit_tracer(args.source, Path(args.out))
    if len(args.source) > 1:
        raise ValueError(
            f"several sources make one circuit-tracer transcoder set; export to {args.to} one "
            "run or SAE at a time"
        )
    source = args.source[0]
    saes = saved_saes(source)
    single = len(saes) == 1 and (Path(source) / "cfg.json").is_file()
    for name, directory in saes.items():
        out = Path(args.out) if single else Path(args.out) / name
        written = _export(directory, args.to, out)
        print(f"{directory} → {written} ({args.to})")
    return 0


def _export(directory: Path, to: str, out: Path) -> Path:
    from saekit.interop import export_dictionary
    from saekit.model.dictionary import load_dictionary

    return export_dictionary(load_dictionary(directory), to, out, sae_dir=directory)


def export_circuit_tracer(sources: list[str], out: Path) -> int:
    """A cross-layer transcoder as circuit-tracer's CLT; every per-layer transcoder in
    ``sources`` as one circuit-tracer set (its layers from the hooks)."""
    import sys

    from saekit.interop import export_dictionary, export_transcoder_set, saved_saes
    from saekit.model.dictionary import load_dictionary
    from saekit.model.sae import SAE

    directories = [d for source in sources for d in saved_saes(source).values()]
    models = [(load_dictionary(d), d) for d in directories]
    others = [str(d) for model, d in models if not isinstance(model, SAE)]
    if others and len(models) == 1:  # a cross-layer transcoder (others refused there)
        written = export_dictionary(models[0][0], "circuit-tracer", out)
        print(f"{directories[0]} → {written} (circuit-tracer CLT)")
        return 0
    if others:
        raise ValueError(f"a cross-layer transcoder exports alone (not in a set): {others}")
    written, missing = export_transcoder_set(models, out)
    print(f"{', '.join(map(str, directories))} → {written} (circuit-tracer transcoder set)")
    if missing:
        print(
            f"saekit: warning: circuit-tracer loads a set with every layer from 0; layers "
            f"{missing} are missing, so no config.yaml was written",
            file=sys.stderr,
        )
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from saekit.interop import import_dictionary
    from saekit.model.sae import SAE

    if (args.source is None) == (args.release is None):
        raise ValueError("give the SAE's directory or --release NAME --sae-id ID (one of them)")
    refuse_output_over_inputs(args.out, [("DIR", args.source)])
    source = Path(args.source) if args.source else download_release(args.release, args.sae_id)
    model = import_dictionary(source, args.from_)
    model.save(args.out)
    cfg = model.cfg
    if not isinstance(model, SAE):  # a cross-layer transcoder
        print(
            f"{source} ({args.from_}) → {args.out}: CLT, {cfg.activation.kind}, {cfg.n_layers} "
            f"layers of {cfg.d_sae} latents, d_in = {cfg.d_in}, d_out = {cfg.d_out}"
        )
        return 0
    target = (
        f"; transcoder: d_out = {cfg.d_out}, target hook {cfg.target_hook}, skip {cfg.skip}"
        if cfg.transcoder
        else ""
    )
    print(
        f"{source} ({args.from_}) → {args.out}: {cfg.activation.kind}, d_in = {cfg.d_in}, "
        f"d_sae = {cfg.d_sae}, hook {cfg.hook}{target}"
    )
    return 0


def download_release(release: str, sae_id: str | None) -> Path:
    """The local folder of a SAELens release's SAE, downloaded with huggingface_hub."""
    from huggingface_hub import snapshot_download

    from saekit.interop.releases import resolve_release

    if not sae_id:
        raise ValueError("--release needs --sae-id")
    repo_id, folder = resolve_release(release, sae_id)
    pattern = f"{folder}/*" if folder else None
    root = Path(snapshot_download(repo_id, allow_patterns=pattern))
    return root / folder if folder else root
