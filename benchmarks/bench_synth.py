"""`saekit bench synth [--protocol full|scaled] [--seeds N]`: the SynthSAEBench-16k table.

Trains BatchTopK, Matryoshka, Matching Pursuit (when saekit has it), Standard L1 and JumpReLU at
L0 = 20 and 25 (scaled: see saekit.synthbench.bench.scaled_protocol) and prints saekit's
numbers beside the published ones.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from saekit.synthbench.bench import (
    ARCHITECTURES,
    format_table,
    full_protocol,
    scaled_protocol,
    train_seed,
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="saekit bench synth", description=__doc__)
    p.add_argument("--protocol", choices=("full", "scaled"), default="scaled")
    p.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 (mean ± std)")
    p.add_argument("--arch", action="append", choices=ARCHITECTURES, help="default: all")
    p.add_argument("--samples", type=int, help="override the protocol's training samples")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", help="also write the raw scores here")
    args = p.parse_args(argv)
    if args.seeds < 1:
        p.error("--seeds must be >= 1")
    protocol = full_protocol() if args.protocol == "full" else scaled_protocol()
    if args.samples:
        protocol.samples = args.samples
    archs = args.arch or list(ARCHITECTURES)
    runs, start = [], time.time()
    for seed in range(args.seeds):
        runs.append(train_seed(protocol, archs, seed, threads=args.threads))
        print(f"seed {seed} done after {time.time() - start:.0f} s", file=sys.stderr, flush=True)
    print(format_table(protocol, runs))
    print(f"\nwall time {time.time() - start:.0f} s")
    if args.json:
        raw = [{f"{a}|{l0}": s.as_dict() for (a, l0), s in r.items()} for r in runs]
        with open(args.json, "w") as f:
            json.dump({"protocol": protocol.name, "seeds": raw}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
