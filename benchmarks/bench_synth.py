"""`saekit bench synth [--protocol full|scaled] [--seeds N] [--world PATH]`: the SynthSAEBench
table.

Trains BatchTopK, Matryoshka, Matching Pursuit, Standard L1 and JumpReLU at L0 = 20 and 25
(scaled: see saekit.synthbench.bench.scaled_protocol) and prints saekit's numbers beside the
published ones. ``--world PATH`` trains and scores on a world SAELens saved
(``SyntheticModel.save``) instead of the protocol's generated one; the protocol's widths,
samples and L0s stay. Threads: one per process on CPU unless ``--threads`` says otherwise
(the choice is printed).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace

import torch

from saekit.data.synthetic.saelens_world import load_saelens_world
from saekit.data.synthetic.synthbench_world import SynthBenchConfig
from saekit.synthbench.bench import (
    ARCHITECTURES,
    default_threads,
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
    p.add_argument(
        "--threads", type=int, help="torch threads (default: 1 on CPU, torch's own on a GPU)"
    )
    p.add_argument("--world", metavar="PATH", help="a world SAELens saved (SyntheticModel.save)")
    p.add_argument("--json", help="also write the raw scores here")
    args = p.parse_args(argv)
    if args.seeds < 1:
        p.error("--seeds must be >= 1")
    protocol = full_protocol() if args.protocol == "full" else scaled_protocol()
    if args.samples:
        protocol.samples = args.samples
    world = None
    if args.world:
        world = load_saelens_world(SynthBenchConfig(world_path=args.world))
        protocol = replace(protocol, name=f"{protocol.name} on {args.world}", world=world.cfg)
    if args.threads is not None and args.threads < 0:
        p.error("--threads must be >= 0 (0: torch's default)")
    threads, why = (args.threads, "--threads") if args.threads is not None else default_threads()
    print(f"threads: {threads or torch.get_num_threads()} ({why})", file=sys.stderr, flush=True)
    archs = args.arch or list(ARCHITECTURES)
    runs, start = [], time.time()
    for seed in range(args.seeds):
        runs.append(train_seed(protocol, archs, seed, threads=threads, world=world))
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
