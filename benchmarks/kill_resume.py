"""kill -9 at random moments, then resume: every run resumable, its final weights and
metrics.jsonl identical to an uninterrupted run's, no temporary file left. Prints a table.

    python benchmarks/kill_resume.py [--runs 20] [--seed 0] [--keep DIR]

Half of the kills fall at a random time after the start; the other half wait for a checkpoint
write to begin (a ``.checkpoint.tmp-PID`` directory appears) and kill inside it. A run killed
before it wrote its config is started again with the same command; otherwise it is resumed with
``saekit train --resume DIR`` (which may itself be killed again, at random, once).
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

TEMPORARY = re.compile(r"^\..+\.(tmp|old)-\d+$")
ARGS = [
    "--steps", "60", "--batch-size", "512", "--no-progress",
    "--set", "saes.0.sae.d_sae=256", "--set", "checkpoint_every=7", "--set", "log_every=5",
    "--set", "eval_tokens=1024", "--set", "threads=1",
]  # fmt: skip
SAE_NAME = "topk-k6-M256"


def saekit(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    src = Path(__file__).resolve().parents[1] / "src"
    env["PYTHONPATH"] = f"{src}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return subprocess.Popen(
        [sys.executable, "-m", "saekit", "train", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def kill_at_random(proc: subprocess.Popen, out: Path, rng: random.Random, span: float, mode: str):
    """Kill -9 at a random time, or as soon as a checkpoint write begins; returns what it hit."""
    start = time.perf_counter()
    deadline = start + (rng.uniform(0.2, span) if mode == "time" else span * 2)
    while proc.poll() is None and time.perf_counter() < deadline:
        if mode == "checkpoint-write" and any(
            p.name.startswith(".checkpoint.tmp-") for p in _entries(out)
        ):
            break
        time.sleep(0.0005 if mode == "checkpoint-write" else 0.01)
    if proc.poll() is not None:
        return "finished first", time.perf_counter() - start
    writing = any(p.name.startswith(".checkpoint.tmp-") for p in _entries(out))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return ("in checkpoint write" if writing else "between writes"), time.perf_counter() - start


def _entries(out: Path) -> list[Path]:
    try:
        return list(out.iterdir())
    except FileNotFoundError:
        return []


def leftovers(out: Path) -> list[str]:
    return [str(p.relative_to(out)) for p in out.rglob("*") if TEMPORARY.match(p.name)]


def checkpoint_step(out: Path) -> str:
    import json

    meta = out / "checkpoint" / "state.json"
    return str(json.loads(meta.read_text())["step"]) if meta.is_file() else "none"


def run(n_runs: int, seed: int, root: Path) -> list[dict]:
    rng = random.Random(seed)
    ref = root / "reference"
    t0 = time.perf_counter()
    proc = saekit("--out", str(ref), *ARGS)
    _, err = proc.communicate()
    assert proc.returncode == 0, err
    span = time.perf_counter() - t0
    ref_weights = load_file(str(ref / SAE_NAME / "sae.safetensors"))
    ref_metrics = (ref / SAE_NAME / "metrics.jsonl").read_text()
    rows = []
    for i in range(n_runs):
        out = root / f"run{i:02d}"
        mode = "time" if i % 2 == 0 else "checkpoint-write"
        hit, at = kill_at_random(saekit("--out", str(out), *ARGS), out, rng, span, mode)
        state = checkpoint_step(out)
        resumes, errors = 0, []
        while True:
            if not (out / "config.yaml").exists():
                proc = saekit("--out", str(out), *ARGS)  # nothing written yet: start again
            else:
                proc = saekit("--resume", str(out), "--no-progress")
            resumes += 1
            if resumes == 1 and rng.random() < 0.3:  # killed again during the resume
                kill_at_random(proc, out, rng, span, "time")
                if proc.returncode == 0:
                    break
                continue
            _, err = proc.communicate()
            if proc.returncode != 0:
                errors.append(err.strip().splitlines()[-1] if err.strip() else "?")
                if resumes > 3:
                    break
                continue
            break
        weights = load_file(str(out / SAE_NAME / "sae.safetensors"))
        same = all(torch.equal(ref_weights[k], weights[k]) for k in ref_weights)
        rows.append(
            {
                "run": i,
                "kill": f"{mode}: {hit} at {at:.2f}s",
                "checkpoint at kill": state,
                "starts after kill": resumes,
                "errors": "; ".join(errors) or "-",
                "weights bit-identical": same,
                "metrics.jsonl identical": (out / SAE_NAME / "metrics.jsonl").read_text()
                == ref_metrics,
                "temporaries left": len(leftovers(out)),
            }
        )
    return rows


def table(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", type=Path, help="keep the run directories here")
    args = p.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="saekit-kill-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        rows = run(args.runs, args.seed, root)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    print(table(rows))
    ok = all(
        r["weights bit-identical"] and r["metrics.jsonl identical"] and not r["temporaries left"]
        for r in rows
    )
    print(f"\n{sum(1 for r in rows if r['weights bit-identical'])}/{len(rows)} bit-identical")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
