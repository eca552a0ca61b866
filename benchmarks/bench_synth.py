"""`saekit bench synth [--protocol full|scaled] [--seeds N] [--world PATH]`: the SynthSAEBench
table.

Trains BatchTopK, Matryoshka, Matching Pursuit, Standard L1 and JumpReLU at L0 = 20 and 25
(scaled: see saekit.synthbench.bench.scaled_protocol) and prints saekit's numbers beside the
published ones. ``--world PATH`` trains and scores on a world SAELens saved
(``SyntheticModel.save``) instead of the protocol's generated one; the protocol's widths,
samples and L0s stay. Threads: one per process on CPU unless ``--threads`` says otherwise
(the choice is printed).

``--peer saelens`` trains the same architectures with SAELens's own trainer (the interop venv:
``--peer-python``, else $SAEKIT_INTEROP_PYTHON, else .benchenv; benchmarks/saelens_peer.py) on
the same world and the same samples, and prints both rows. The world is then one SAELens
builds from the protocol's settings (or ``--world``), and saekit samples it with SAELens's own
draws (``sampler: saelens``), batch i from the generator seed SAELens is seeded with; the first
training and held-out batches of both are compared by SHA-256 and the run stops if they
differ.

``--json PATH`` writes the scores with the protocol and the seed numbers; ``--from-json A
--from-json B`` prints one table of runs made side by side (``--first-seed``), with the files'
protocol, and refuses files of other protocols or rows, a seed in two files, and training flags.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from saekit.data.sources.synthbench import SynthBenchSource
from saekit.data.synthetic.saelens_world import load_saelens_world
from saekit.data.synthetic.synthbench_sampler import SynthBenchData
from saekit.data.synthetic.synthbench_world import SynthBenchConfig
from saekit.synthbench.bench import (
    ARCHITECTURES,
    EVAL_BATCH,
    PROTOCOLS,
    default_threads,
    format_table,
    peer_job,
    train_seed,
)
from saekit.synthbench.metrics import SynthScores
from saekit.synthbench.options import OPTIONS
from saekit.synthbench.options import label as option_label

ROOT = Path(__file__).resolve().parent.parent
PEER = Path(__file__).with_name("saelens_peer.py")


def peer_python(named: str | None) -> str:
    path = named or os.environ.get("SAEKIT_INTEROP_PYTHON") or str(ROOT / ".benchenv/bin/python")
    if not Path(path).is_file():
        raise SystemExit(f"--peer saelens: no interop python at {path} (make interop-env)")
    return path


def run_peer(python: str, what: str, job: dict, work: Path) -> None:
    path = work / f"{what}.json"
    path.write_text(json.dumps(job))
    env = {**os.environ, "TQDM_DISABLE": "1"}
    result = subprocess.run([python, str(PEER), what, str(path)], text=True, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    if result.returncode != 0:
        raise SystemExit(f"saelens peer ({what}) failed:\n{result.stdout[-4000:]}")


def sha256(x) -> str:
    return hashlib.sha256(x.detach().float().contiguous().numpy().tobytes()).hexdigest()


def scores_of(dump: list[dict]) -> list[dict]:
    """--json's seeds back to {(arch, L0): SynthScores}."""
    return [{(key.rsplit("|", 1)[0], int(key.rsplit("|", 1)[1])): SynthScores(**s)
             for key, s in seed.items()} for seed in dump]  # fmt: skip


def from_json(paths: list[str]) -> tuple[str, list[dict], list[dict], dict, list[int]]:
    """The protocol, the seeds (and the peer's) of several --json files, in order, their summed
    wall and the seed numbers (none when a file does not record them). Refused in one line:
    files of different protocols, a seed whose rows (architectures, options, L0s) differ from
    the first's (the table and the paired option differences need every row in every seed),
    and a seed number in two files."""
    runs, peers, walls = [], [], {"saekit": 0.0, "SAELens": 0.0}
    protocols, seen, unnumbered = {}, {}, False
    for path in paths:
        dump = json.loads(Path(path).read_text())
        protocols.setdefault(dump["protocol"], path)
        unnumbered |= "seed_ids" not in dump
        for seed in dump.get("seed_ids", []):  # files written before seed_ids: unchecked
            if seed in seen:
                raise SystemExit(f"--from-json: seed {seed} is in both {seen[seed]} and {path}")
            seen[seed] = path
        for i, seed in enumerate(scores_of(dump["seeds"])):
            if runs and set(seed) != set(runs[0]):
                rows = sorted(f"{a} L0 {l0}" for a, l0 in set(seed) ^ set(runs[0]))
                raise SystemExit(f"--from-json: {path} seed #{i + 1} and {paths[0]} seed #1 do "
                                 f"not have the same rows ({', '.join(rows)})")  # fmt: skip
            runs.append(seed)
        peers += scores_of(dump.get("peer", []))
        for who, wall in dump["wall_s"].items():
            walls[who] += wall
    if len(protocols) > 1:
        raise SystemExit(f"--from-json: the files ran different protocols: {protocols}")
    return next(iter(protocols)), runs, peers, walls, [] if unnumbered else list(seen)


def protocol_of_json(name: str, asked: str | None):
    """The Protocol a --json file's ``protocol`` names ("mid", or "scaled on WORLD"), which
    gives the table its trained k per L0 and the matched-L0 test; --protocol must agree."""
    base = name.split(" on ", 1)[0]
    if base not in PROTOCOLS:
        raise SystemExit(f"--from-json: unknown protocol {name!r} in the files")
    if asked is not None and asked != base:
        raise SystemExit(f"--from-json: the files ran protocol {name!r}, not --protocol {asked}")
    return replace(PROTOCOLS[base](), name=name)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="saekit bench synth", description=__doc__)
    p.add_argument("--protocol", choices=sorted(PROTOCOLS), help="default: scaled")
    p.add_argument("--seeds", type=int, default=1, help="N seeds (mean ± std)")
    p.add_argument("--first-seed", type=int, default=0, help="seeds FIRST..FIRST+N-1")
    p.add_argument(
        "--from-json",
        action="append",
        metavar="PATH",
        help="print one table from the --json files of earlier runs (seeds run side by side)",
    )
    p.add_argument("--arch", action="append", choices=ARCHITECTURES, help="default: all")
    p.add_argument(
        "--option",
        action="append",
        choices=sorted(OPTIONS),
        help="also train the Matryoshka recipe with this option on (issue 27 item 5; repeat)",
    )
    p.add_argument("--samples", type=int, help="override the protocol's training samples")
    p.add_argument("--eval-tokens", type=int, help="override the protocol's held-out tokens")
    p.add_argument(
        "--l0",
        type=int,
        action="append",
        choices=(20, 25),
        help="published L0 column(s) to train (default: both)",
    )
    p.add_argument(
        "--threads", type=int, help="torch threads (default: 1 on CPU, torch's own on a GPU)"
    )
    p.add_argument("--world", metavar="PATH", help="a world SAELens saved (SyntheticModel.save)")
    p.add_argument("--json", help="also write the raw scores here")
    p.add_argument("--peer", choices=("saelens",), help="also train with SAELens's own trainer")
    p.add_argument("--peer-python", help="the interop venv's python (default: .benchenv)")
    args = p.parse_args(argv)
    if args.seeds < 1:
        p.error("--seeds must be >= 1")
    if args.from_json:  # a table of earlier runs: nothing to train, so no training option
        given = [flag for flag, value in (
            ("--seeds", args.seeds != 1), ("--first-seed", args.first_seed), ("--arch", args.arch),
            ("--option", args.option), ("--samples", args.samples),
            ("--eval-tokens", args.eval_tokens), ("--world", args.world), ("--peer", args.peer),
        ) if value]  # fmt: skip
        if given:
            p.error(f"--from-json prints earlier runs; it trains nothing: drop {', '.join(given)}")
        name, runs, peers, walls, seed_ids = from_json(args.from_json)
        protocol = protocol_of_json(name, args.protocol)
    else:
        protocol = PROTOCOLS[args.protocol or "scaled"]()
    if args.samples:
        protocol.samples = args.samples
    if args.eval_tokens:
        protocol.eval_tokens = args.eval_tokens
    if args.l0:
        protocol.l0 = {label: k for label, k in protocol.l0.items() if label in args.l0}
    if args.threads is not None and args.threads < 0:
        p.error("--threads must be >= 0 (0: torch's default)")
    threads, why = (args.threads, "--threads") if args.threads is not None else default_threads()
    print(f"threads: {threads or torch.get_num_threads()} ({why})", file=sys.stderr, flush=True)
    archs = args.arch or list(ARCHITECTURES)
    if args.option and "Matryoshka" not in archs:  # an option row is read against that row
        p.error("--option trains the Matryoshka recipe with one change and reports its paired "
                "difference to the Matryoshka row: add --arch Matryoshka")  # fmt: skip
    options = [option_label(name) for name in args.option or []]
    with tempfile.TemporaryDirectory(prefix="saekit-peer-") as tmp:
        work = Path(tmp)
        world_path, python = args.world, None
        if args.peer:
            python = peer_python(args.peer_python)
            if world_path is None:  # SAELens builds the protocol's world; both read it
                world_path = str(work / "world")
                run_peer(python, "world", {"world_config": asdict(protocol.world),
                                           "world": world_path}, work)  # fmt: skip
        world = None
        if world_path:
            sampler = "saelens" if args.peer else "sparse"
            world = load_saelens_world(SynthBenchConfig(world_path=world_path, sampler=sampler))
            label = args.world or f"a SAELens build of its world, sampler {sampler}"
            protocol = replace(protocol, name=f"{protocol.name} on {label}", world=world.cfg)
        start = time.time()
        if not args.from_json:
            runs, peers, walls = [], [], {"saekit": 0.0, "SAELens": 0.0}
        for seed in [] if args.from_json else range(args.first_seed,
                                                    args.first_seed + args.seeds):  # fmt: skip
            t0 = time.time()
            runs.append(train_seed(protocol, archs + options, seed, threads=threads, world=world))
            walls["saekit"] += time.time() - t0
            print(f"seed {seed}: saekit done after {time.time() - start:.0f} s", file=sys.stderr,
                  flush=True)  # fmt: skip
            if args.peer:
                data = SynthBenchData(protocol.world, stream_seed=seed, world=world)
                out = work / f"peer_{seed}.json"
                job = {
                    **peer_job(protocol, data, archs, seed),
                    "world": world_path,
                    "out": str(out),
                    "threads": threads or torch.get_num_threads(),
                }
                t0 = time.time()
                run_peer(python, "train", job, work)
                walls["SAELens"] += time.time() - t0
                theirs = json.loads(out.read_text())
                first_eval = min(EVAL_BATCH, protocol.eval_tokens)
                ours = (
                    sha256(data.batch(0, protocol.batch_size).x),
                    sha256(data.batch(SynthBenchSource.EVAL_INDEX, first_eval).x),
                )
                if ours != (theirs["first_train_sha256"], theirs["first_eval_sha256"]):
                    raise SystemExit(f"seed {seed}: SAELens trained on other samples than saekit")
                print(f"seed {seed}: SAELens done after {time.time() - start:.0f} s; same first "
                      f"training and held-out batch (SHA-256 {ours[0][:12]}, {ours[1][:12]})",
                      file=sys.stderr, flush=True)  # fmt: skip
                by_k = {k: label for label, k in protocol.l0.items()}
                peers.append({(arch, by_k[k]): SynthScores(**{key: v for key, v in s.items()
                                                              if key != "wall_s"})
                              for (arch, k), s in ((tuple(key.rsplit("|", 1)), s)
                                                   for key, s in theirs["saes"].items())
                              for k in [int(k)]})  # fmt: skip
    print(format_table(protocol, runs, peers or None))
    spent = ", ".join(f"{who} {w:.0f} s" for who, w in walls.items() if w)
    if args.from_json:  # the runs' own training time, summed over the files
        print(f"\ntraining time of the runs read: {spent}")
    else:
        print(f"\nwall time {time.time() - start:.0f} s ({spent})")
    if args.json:
        raw = [{f"{a}|{l0}": s.as_dict() for (a, l0), s in r.items()} for r in runs]
        if not args.from_json:
            seed_ids = list(range(args.first_seed, args.first_seed + args.seeds))
        dump = {"protocol": protocol.name, "seeds": raw, "seed_ids": seed_ids, "wall_s": walls}
        if peers:  # trained now, or read back by --from-json
            dump["peer"] = [{f"{a}|{l0}": s.as_dict() for (a, l0), s in r.items()} for r in peers]
        with open(args.json, "w") as f:
            json.dump(dump, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
