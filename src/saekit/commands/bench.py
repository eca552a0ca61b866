"""``saekit bench``: run a benchmark script of the checkout's benchmarks/ (they print markdown
tables)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

BENCHMARKS = {
    "step": "bench_step.py",
    "objectives": "bench_objectives.py",
    "harvest": "bench_harvest.py",
    "distributed": "bench_distributed.py",
    "synth": "bench_synth.py",
    "research": "research.py",
    "report": "bench_report.py",
}


def add_parser(sub: Any) -> None:
    p = sub.add_parser("bench", help="run a benchmark (prints a markdown table)")
    p.add_argument("which", nargs="?", default="step", choices=sorted(BENCHMARKS))
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="passed to the script")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import subprocess

    root = Path(__file__).resolve().parents[3] / "benchmarks"  # src/saekit/commands/ → checkout
    script = root / BENCHMARKS[args.which]
    if not script.is_file():
        raise ValueError(f"benchmark {script} not found: run saekit bench from a source checkout")
    return subprocess.call([sys.executable, str(script), *args.bench_args])
