"""``saekit finetune SAE --model M``: the short end-to-end KL + MSE fine-tune of a saved SAE or
transcoder spliced into its frozen model (:mod:`saekit.train.finetune`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from saekit.commands.flags import add_model_args, add_text_args


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "finetune",
        help="fine-tune a saved SAE end to end: KL(clean ‖ spliced) + reconstruction",
        description="Continue training a saved SAE (or transcoder) spliced into the frozen "
        "model on α·KL(clean ‖ spliced next-token distributions) + (1 − α)·β·MSE (arXiv "
        "2503.17272), on its training documents; scores CE/KL with it spliced in on its "
        "held-out documents before and after.",
    )
    p.add_argument("sae", metavar="SAE_DIR", help="the SAE directory (cfg.json)")
    p.add_argument("--model", required=True, metavar="ID|PATH", help="model hub id or directory")
    p.add_argument("--out", required=True, metavar="DIR", help="the fine-tuned SAE's directory")
    add_text_args(p, dataset_config_flags=("--dataset-config",))
    p.add_argument("--steps", type=int, default=200, help="fine-tuning steps")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (decays to 0)")
    p.add_argument("--kl-weight", type=float, default=0.5, help="α; 0: reconstruction only")
    p.add_argument("--context-length", type=int, default=128, help="tokens per context")
    p.add_argument("--batch-size", type=int, default=8, help="contexts per step")
    p.add_argument("--eval-batches", type=int, default=8, help="held-out batches scored")
    p.add_argument(
        "--held-out-docs",
        type=int,
        default=16,
        help="without a training record in cfg.json: hold out this many leading documents",
    )
    p.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints")
    p.add_argument("--resume", action="store_true", help="continue an interrupted --out")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="quiet")
    add_model_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from saekit.train.finetune import FinetuneConfig, finetune
    from saekit.train.finetune_data import document_batches

    if args.steps < 1 or not 0 <= args.kl_weight <= 1:
        raise ValueError("--steps must be ≥ 1 and --kl-weight in [0, 1]")
    out = Path(args.out)
    if out.exists() and not args.resume and any(out.iterdir()):
        raise ValueError(f"--out {out} exists; pass --resume to continue it")
    sae, setup, train_batches, eval_batches = document_batches(args)

    def progress(step: int, record: dict[str, float]) -> None:
        if args.progress and (step % 10 == 0 or step == args.steps):
            print(
                f"step {step}/{args.steps}  loss {record['loss']:.4f}  KL {record['kl']:.4f}"
                f"  MSE {record['mse']:.4f}",
                file=sys.stderr,
            )

    config = FinetuneConfig(args.steps, args.lr, args.kl_weight, args.checkpoint_every)
    result = finetune(
        setup.model,
        sae,
        train_batches,
        eval_batches,
        config,
        out=out,
        token_filter=setup.token_filter,
        resume=args.resume,
        progress=progress,
    )
    report = result.to_dict()
    (out / "finetune.json").write_text(json.dumps(report, indent=2))
    b, a = result.before, result.after
    print(f"held-out CE clean {b.ce_clean:.4f}")
    print(f"CE spliced   before {b.ce_sae:.4f}   after {a.ce_sae:.4f}")
    print(f"KL spliced   before {b.kl_sae:.4f}   after {a.kl_sae:.4f}")
    print(f"CE gap closed {result.ce_gap_closed:.1%}; wrote {out}")
    return 0
