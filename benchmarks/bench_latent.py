"""Latent parallelism: peak memory per rank and the bytes each collective moves per step.

    .venv/bin/python benchmarks/bench_latent.py                 # d=512, M=65,536, T = 1, 2, 4
    .venv/bin/python benchmarks/bench_latent.py --small         # a quick run
    .venv/bin/python benchmarks/bench_latent.py --paper         # the on-paper table only

T gloo processes on the CPU (D = 1) train one TopK SAE (k = 32, AuxK, float32) on synthetic
data for a few steps (the first steps, then steps with dead latents, so AuxK's collective runs
too). Each rank reports its peak resident memory (ru_maxrss: the Python and torch baseline
included, measured before the SAE is built and printed beside it) and the payload of every
collective it called, by name, per step, against the formula:

- TopK candidates, all-gather: N·k values per rank (each receives (T−1)·N·k);
- decoder partial sums, all-reduce (SUM): N·d values (a ring moves 2·(T−1)/T of it per rank);
- AuxK candidates, all-gather: N·k_aux values (k_aux = d/2), only while a latent is dead;
- shared gradients (b_dec), all-reduce: d values; the norm, the L0/penalty/dead shares and the
  stop flag: a few scalars.

``--paper`` prints the same figures computed for d = 4096, M = 2^20 on 8 GPUs with NVLink
(no measurement: arithmetic from the formulas above and stated hardware rates).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _rank(rank: int, port: int, T: int, args: dict, out: str, device: str = "cpu") -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(T),
    )  # fmt: skip
    torch.set_num_threads(1)
    from saekit.train.comm import ProcessGroupComm
    from saekit.train.config import build_run_config, stream_settings
    from saekit.train.latent_parallel import LatentTrainer
    from saekit.train.launch import init_from_env
    from saekit.train.mesh import build_mesh

    tally: dict[str, list[int]] = defaultdict(list)

    class Counting(ProcessGroupComm):
        """The world comm, counting each collective's payload (bytes this rank contributes)."""

        def all_reduce(self, x, op="sum", what="tensor"):
            tally[f"all_reduce {what}"].append(x.numel() * x.element_size())
            return super().all_reduce(x, op, what)

        def all_gather(self, x, what="tensor"):
            tally[f"all_gather {what}"].append(x.numel() * x.element_size())
            return super().all_gather(x, what)

    ctx = init_from_env(device)  # cuda: NCCL, one GPU per rank
    cuda = ctx.device.type == "cuda"

    def peak() -> float:
        return torch.cuda.max_memory_allocated(ctx.device) / 2**20 if cuda else peak_mib()

    baseline = peak()
    d, M, k, N = args["d"], args["M"], args["k"], args["batch"]
    cfg = build_run_config(
        {
            "data": {"source": "synthetic", "synthetic": {"d": d, "n_features": 4 * d}},
            "saes": [
                {
                    "sae": {"d_sae": M, "activation": {"kind": "topk", "k": k}},
                    "dead_tokens": N,  # dead after one batch without firing: AuxK runs
                    "name": "wide",
                }
            ],
            "batch_size": N,
            "steps": args["steps"],
            "log_every": args["steps"],
            "checkpoint_every": 0,
            "out_dir": out,
            "progress": False,
            "parallel": {"latent": T},
            "device": str(ctx.device),
        }
    )
    world = Counting(ctx)
    mesh = build_mesh(ctx, world, cfg.parallel)
    source, _ = cfg.data.latent_parallel_sources(stream_settings(cfg), 0, 1, mesh.latent)
    trainer = LatentTrainer(cfg, source, mesh)
    trainer.save_checkpoint = lambda: None  # measured: the training steps only
    built = peak()
    tally.clear()
    start = time.perf_counter()
    trainer.fit(progress=False)
    seconds = (time.perf_counter() - start) / args["steps"]
    record = {
        "rank": rank,
        "baseline_mib": baseline,
        "built_mib": built,
        "peak_mib": peak(),
        "seconds_per_step": seconds,
        "collectives": {what: sizes for what, sizes in tally.items()},
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(record))
    torch.distributed.destroy_process_group()


def measure(T: int, args: dict, device: str = "cpu") -> list[dict]:
    """Each rank's record (peak memory: RSS on the CPU, allocated bytes on a GPU)."""
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(
            _rank, args=(free_port(), T, args, out, device), nprocs=T, join=True,
            start_method="spawn",
        )  # fmt: skip
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(T)]


def formula_bytes(what: str, T: int, d: int, N: int, k: int) -> tuple[str, str]:
    """The payload per rank each collective should have (float32 = 4 bytes), and what a ring
    sends per rank for it: all-reduce 2·(T−1)/T of the payload, all-gather (T−1)× it."""
    table = {
        "all_gather TopK candidates": (N * k * 4, "N·k·4", "gather"),
        # AuxK's ê and dead count ride in the same all-reduce while a latent is dead
        "all_reduce decoder partial sums": ((2 * N * d + 1) * 4, "(N·d + N·d + 1)·4", "reduce"),
        "all_gather AuxK candidates": (N * (d // 2) * 4, "N·(d/2)·4", "gather"),
        "all_reduce shared gradients of wide": (d * 4, "d·4 (b_dec)", "reduce"),
    }
    if what not in table:
        return "a few scalars", ""
    value, text, kind = table[what]
    sent = (T - 1) * value if kind == "gather" else 2 * (T - 1) / T * value
    return f"{text} = {value:,}", f"{sent:,.0f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="d=64, M=4096: a quick run")
    parser.add_argument("--paper", action="store_true", help="only the on-paper table")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1024)
    opts = parser.parse_args(argv)
    if opts.paper:
        print(paper_table())
        return 0
    d, M = (64, 4096) if opts.small else (512, 65536)
    args = {"d": d, "M": M, "k": 32, "batch": opts.batch, "steps": opts.steps}
    print(f"TopK k=32 + AuxK, d={d}, M={M:,}, N={opts.batch} tokens/step, float32, gloo, D=1\n")
    print("| T | peak RSS per rank (MiB) | before the SAE (MiB) | peak − before | ms/step |")
    print("|---|---|---|---|---|")
    per_t = {}
    for T in (1, 2, 4):
        ranks = measure(T, args)
        per_t[T] = ranks
        peak = max(r["peak_mib"] for r in ranks)
        base = max(r["baseline_mib"] for r in ranks)
        step_ms = 1e3 * max(r["seconds_per_step"] for r in ranks)
        print(f"| {T} | {peak:,.0f} | {base:,.0f} | {peak - base:,.0f} | {step_ms:,.0f} |")
    print("\nBytes each collective sends per rank per step (measured payload, T = 4, rank 0):\n")
    print("| collective | calls/step | bytes per call | formula | ring: sent per rank |")
    print("|---|---|---|---|---|")
    rank0 = per_t[4][0]["collectives"]
    for what, sizes in sorted(rank0.items()):
        calls = len(sizes) / args["steps"]
        formula, sent = formula_bytes(what, 4, d, opts.batch, 32)
        print(f"| {what} | {calls:g} | {max(sizes):,} | {formula} | {sent} |")
    return 0


def paper_table() -> str:
    """d = 4096, M = 2^20, 8 GPUs (T = 8, D = 1), N = 4096 tokens/step, float32 weights."""
    d, M, T, N, k = 4096, 2**20, 8, 4096, 32
    gib = 2**30
    weights = 2 * M * d * 4  # W_enc + W_dec
    rows = [
        ("weights (W_enc + W_dec)", weights),
        ("gradients", weights),
        ("Adam moments", 2 * weights),
        ("pre-activations [N, M] fp32", N * M * 4),
    ]
    lines = ["| per rank | T = 1 | T = 8 |", "|---|---|---|"]
    for name, size in rows:
        lines.append(f"| {name} | {size / gib:,.1f} GiB | {size / T / gib:,.1f} GiB |")
    flops = 2 * N * d * M / T  # the encoder GEMM per rank
    tf32 = 400e12  # H100 SXM dense TF32, about half its 989 TFLOP/s peak in practice
    nvlink = 400e9  # NCCL all-reduce bus bandwidth within one 8-GPU NVLink node, bytes/s
    ring = 2 * (T - 1) / T * N * d * 4
    lines += [
        "",
        f"encoder GEMM per rank: {flops / 1e12:.1f} TFLOP -> {flops / tf32 * 1e3:.1f} ms at "
        f"{tf32 / 1e12:.0f} TFLOP/s",
        f"partial-sum all-reduce: N·d·4 = {N * d * 4 / 2**20:.0f} MiB, ring {ring / 2**20:.0f} MiB "
        f"per rank -> {ring / nvlink * 1e3:.2f} ms at {nvlink / 1e9:.0f} GB/s",
        f"TopK all-gather: N·k·4 = {N * k * 4 / 2**20:.1f} MiB per rank, (T−1)× received",
        f"compute-bound while M/T > 4·F/B = {4 * tf32 / nvlink:,.0f} latents per GPU "
        "(the forward GEMM's 2·N·d·(M/T) FLOP against the ring's ~2·N·d·4 bytes)",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
