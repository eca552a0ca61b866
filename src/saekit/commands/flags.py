"""Command-line flags that several subcommands share (the documents, the model, outliers)."""

from __future__ import annotations

from typing import Any


def add_text_args(g: Any, dataset_config_flags: tuple[str, ...]) -> None:
    """Hook and documents, shared by train, cache and eval."""
    g.add_argument("--hook", help="hook point, e.g. transformer.h.8:input (resid_pre of block 8)")
    text = g.add_mutually_exclusive_group()
    text.add_argument("--dataset", metavar="ID|PATH", help="Hugging Face dataset (hub id or path)")
    text.add_argument(
        "--text-file", metavar="PATH", help="local .txt (blank-line separated) or .jsonl"
    )
    g.add_argument(
        "--split",
        "--dataset-split",
        dest="split",
        help="dataset split (train); eval: heldout = the documents the SAE's training held out",
    )
    g.add_argument(*dataset_config_flags, dest="dataset_config", help="dataset configuration name")
    g.add_argument("--text-field", help="field holding the text (text)")
    g.add_argument("--no-streaming", action="store_true", help="download the dataset whole")


def add_models_arg(g: Any, what: str) -> None:
    """``--models LABEL=ID ...``: several models on the same tokens (model diffing; hooks named
    LABEL/HOOK: saekit.data.lm.model_set), instead of --model; ``what``: the command's use."""
    g.add_argument(
        "--models",
        nargs="+",
        metavar="LABEL=ID",
        help=f"model diffing: several models on the same tokens (one vocabulary), e.g. base=ID "
        f"chat=ID, instead of --model; {what}",
    )


def add_outlier_arg(g: Any) -> None:
    g.add_argument(
        "--outlier-norm",
        type=float,
        metavar="FACTOR",
        help="drop tokens whose activation norm exceeds FACTOR x the median (default: keep all)",
    )


def add_model_class_arg(g: Any, default: str | None = "auto") -> None:
    g.add_argument(
        "--model-class",
        default=default,
        choices=["auto", "causal-lm", "masked-lm", "encoder"],
        help="load the model as a causal LM, a masked LM or the bare encoder (AutoModel);"
        " default auto: from its config",
    )


def add_model_args(g: Any, train: bool = False) -> None:
    """Model options; for train they default to None (unset: the config decides)."""
    auto = None if train else "auto"
    if not train:
        g.add_argument("--device", default="cpu", help="torch device of the model and SAE")
    g.add_argument(
        "--model-dtype", choices=["float32", "bfloat16", "float16"], help="model weights dtype"
    )
    add_model_class_arg(g, auto)
    g.add_argument("--local-files-only", action="store_true", help="never download")
    g.add_argument(
        "--keep-bos", action="store_true", help="keep BOS positions (dropped by default)"
    )
    g.add_argument(
        "--bos-token",
        default=auto,
        metavar="TOKEN|none",
        help="token starting each context (default: the tokenizer's BOS, else EOS, else CLS)",
    )
    g.add_argument(
        "--eos-token",
        default=auto,
        metavar="TOKEN|none",
        help="token after each document (default: the tokenizer's EOS, else BOS, else SEP)",
    )
