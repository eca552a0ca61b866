"""Training throughput with 1 and 2 processes (gloo on the CPU); prints markdown tables.

    .venv/bin/python benchmarks/bench_distributed.py            # the demo's SAE: d=64, M=1024, k=6
    .venv/bin/python benchmarks/bench_distributed.py --small    # a quick run

Rows: one process with 1 and with 2 threads; 2 processes × 1 thread, data parallel (each rank
half of every batch; gradients all-reduced) and sweep parallel (one SAE per rank, every rank the
whole batch). "SAE·tokens/s" counts every SAE's tokens (a sweep of 2 SAEs trains on each batch
twice). Timed: the training loop from the first log step to the last (initialisation, warm-up,
evaluation and saving excluded). A second table times moving one batch from rank 0 to rank 1 by
``broadcast`` (what sweep parallel does for model sources) against ``all_gather`` of halves (the
alternative where each rank harvests half the batch).

Every configuration runs in its own processes, one after the other. On a shared machine the
absolute numbers move with the load; compare rows of one run.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))


def run_config(args, out_dir: str, n_saes: int, parallel: str):
    from saekit.train.config import build_run_config

    sae = {"sae": {"d_sae": args.M, "activation": {"kind": "topk", "k": args.k}}, "lr": 2e-3}
    return build_run_config(
        {
            "data": {"source": "synthetic", "synthetic": {"d": args.d, "n_features": 8 * args.d}},
            "saes": [{**sae, "seed": i, "name": f"topk-{i}"} for i in range(n_saes)],
            "batch_size": args.batch,
            "steps": args.warmup + args.steps,
            "log_every": args.warmup,
            "checkpoint_every": 0,
            "out_dir": out_dir,
            "progress": False,
            "parallel": parallel,
        }
    )


def timed_fit(trainer, args) -> float:
    """Seconds from the first log step (after warm-up) to the end of training."""
    stamps: list[float] = []
    if trainer.writes_logs:
        trainer.log_callbacks.append(lambda member, record: stamps.append(time.perf_counter()))
    trainer.fit()
    return stamps[-1] - stamps[0] if stamps else float("nan")


def single_process(args, n_saes: int, threads: int) -> dict:
    from saekit.train.config import make_source
    from saekit.train.trainer import Trainer

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as out:
        cfg = run_config(args, out, n_saes, "data")
        seconds = timed_fit(Trainer(cfg, make_source(cfg)), args)
    return {"seconds": seconds}


def _worker(rank: int, port: int, args, n_saes: int, parallel: str, out: str) -> None:
    import torch.distributed as dist

    from saekit.train.launch import init_from_env
    from saekit.train.run_distributed import build_trainer

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2"
    )
    torch.set_num_threads(1)
    ctx = init_from_env("cpu", timeout_s=600)
    result: dict = {}
    if parallel == "comm":
        result = _time_transfers(args, ctx)
    else:
        cfg = run_config(args, str(Path(out) / "run"), n_saes, parallel)
        trainer, _ = build_trainer(ctx, cfg)
        result["seconds"] = timed_fit(trainer, args)
    if rank == 0:
        (Path(out) / "result.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def _time_transfers(args, ctx) -> dict:
    import torch.distributed as dist

    x = torch.randn(args.batch, args.d)
    halves = [torch.empty(args.batch // 2, args.d) for _ in range(2)]
    mine = x[ctx.rank * args.batch // 2 : (ctx.rank + 1) * args.batch // 2].contiguous()
    result = {}
    for name, op in (
        ("broadcast", lambda: dist.broadcast(x, 0)),
        ("all_gather", lambda: dist.all_gather(halves, mine)),
    ):
        for _ in range(5):
            op()
        dist.barrier()
        start = time.perf_counter()
        for _ in range(args.comm_reps):
            op()
        dist.barrier()
        result[name] = (time.perf_counter() - start) / args.comm_reps
    return result


def two_processes(args, n_saes: int, parallel: str) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(
            _worker, args=(port, args, n_saes, parallel, out), nprocs=2, start_method="spawn"
        )
        return json.loads((Path(out) / "result.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a quick run")
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--M", type=int, default=1024)
    parser.add_argument("--k", type=int, default=6)
    parser.add_argument("--batch", type=int, default=2048, help="global tokens per step")
    parser.add_argument("--steps", type=int, default=60, help="timed steps")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--comm-reps", type=int, default=50)
    args = parser.parse_args()
    if args.small:
        args.M, args.batch, args.steps, args.warmup, args.comm_reps = 256, 512, 20, 5, 20

    rows = [
        ("1 process", "1 × 1", 1, lambda: single_process(args, 1, 1)),
        ("1 process", "1 × 2", 1, lambda: single_process(args, 1, 2)),
        ("data parallel", "2 × 1", 1, lambda: two_processes(args, 1, "data")),
        ("1 process, 2 SAEs", "1 × 2", 2, lambda: single_process(args, 2, 2)),
        ("sweep parallel, 2 SAEs", "2 × 1", 2, lambda: two_processes(args, 2, "sweep")),
    ]
    print(
        f"d={args.d} M={args.M} k={args.k} TopK, {args.batch} tokens/step, {args.steps} timed "
        f"steps, torch {torch.__version__}, {os.cpu_count()} CPUs\n"
    )
    print("| setup | processes × threads | SAEs | tokens/s | SAE·tokens/s |")
    print("|---|---|---|---|---|")
    for name, layout, n_saes, fn in rows:
        seconds = fn()["seconds"]
        tokens_per_s = args.steps * args.batch / seconds
        print(
            f"| {name} | {layout} | {n_saes} | {tokens_per_s:,.0f} | {n_saes * tokens_per_s:,.0f} |"
        )
        sys.stdout.flush()

    comm = two_processes(args, 0, "comm")
    mb = args.batch * args.d * 4 / 2**20
    print(f"\nOne batch ({args.batch} × {args.d} float32, {mb:.2f} MiB) from rank 0 to rank 1:\n")
    print("| collective | ms per batch |")
    print("|---|---|")
    for name in ("broadcast", "all_gather"):
        print(f"| {name} | {1e3 * comm[name]:.3f} |")


if __name__ == "__main__":
    main()
