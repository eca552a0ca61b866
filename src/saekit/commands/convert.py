"""``saekit convert SAE_DIR --to jumprelu --out DIR [--data CACHE_DIR]``: a saved BatchTopK SAE
as the JumpReLU SAE that computes its inference (saekit.eval.calibrate.to_jumprelu).

With ``--data`` the threshold is first calibrated on the held-out shard of an activation cache so
that the mean L0 there is k (calibrate_batchtopk); without it the θ the SAE was saved with (a
trained run calibrates it at the end) is used. Torch is imported inside the handler, so
``saekit --help`` stays torch-free.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from saekit.core.paths import refuse_output_over_inputs

TARGETS = ("jumprelu",)


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a saved BatchTopK SAE to a JumpReLU SAE (θ calibrated on data)",
        description="Write the JumpReLU SAE that computes a BatchTopK SAE's inference "
        "(z = pre·1[pre > θ]): the same weights and every latent's threshold θ, calibrated on "
        "--data so that the mean L0 there is k, or the θ the SAE was saved with.",
    )
    p.add_argument("sae", metavar="SAE_DIR", help="the BatchTopK SAE directory (cfg.json)")
    p.add_argument("--to", required=True, choices=TARGETS, help="the architecture to convert to")
    p.add_argument("--out", required=True, metavar="DIR", help="directory of the converted SAE")
    p.add_argument(
        "--data",
        metavar="CACHE_DIR",
        help="activation cache whose held-out shard calibrates θ (default: the saved θ)",
    )
    p.add_argument("--max-tokens", type=int, default=65_536, help="calibration tokens")
    p.add_argument("--batch-size", type=int, default=4096, help="tokens per calibration batch")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--force", action="store_true", help="replace an existing --out directory")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from saekit.eval.calibrate import calibrate_batchtopk, to_jumprelu
    from saekit.model.sae import SAE

    out = Path(args.out)
    if out.exists() and not args.force:
        raise ValueError(f"--out {out} exists; pass --force to replace it")
    refuse_output_over_inputs(out, [("SAE_DIR", args.sae), ("--data", args.data)])
    if args.max_tokens < 1 or args.batch_size < 1:
        raise ValueError("--max-tokens and --batch-size must be positive")
    sae = SAE.load(args.sae, device=args.device)
    if sae.activation.as_jumprelu() is None:  # no JumpReLU computes its inference
        raise ValueError(
            f"{args.sae} is a {sae.cfg.activation.kind!r} SAE; only batchtopk converts to {args.to}"
        )
    saved_theta = float(sae.activation.threshold)
    if args.data:
        from saekit.data.cache.reading import ActivationCache
        from saekit.data.sources.cache import held_out_batches

        cache = ActivationCache(args.data)
        if cache.d != sae.cfg.d_in:
            raise ValueError(
                f"SAE d_in = {sae.cfg.d_in} but the cache {args.data} has width {cache.d}"
            )

        def batches():  # fresh each call: an SAE with encoder steps calibrates in rounds
            return held_out_batches(cache, args.max_tokens, args.batch_size)

        cal = calibrate_batchtopk(sae, batches, args.max_tokens)
        note = f"calibrated on {cal.n_tokens} tokens of {args.data}: L0 {cal.l0:.2f}"
    else:
        note = "the saved θ (no --data)"
    converted = to_jumprelu(sae)
    converted.save(out)
    theta = float(sae.activation.threshold)
    print(
        f"saekit: {args.sae} (batchtopk, k = {sae.cfg.activation.k}) -> {out} (jumprelu): "
        f"θ = {theta:.6g} for every latent, {note}; saved θ was {saved_theta:.6g}",
        file=sys.stderr,
    )
    return 0
