"""A cross-layer transcoder's training step against L per-layer transcoders' steps on the same
tokens; prints a markdown table.

    python benchmarks/bench_clt_step.py            # L=4, d=256, M=4096 per layer, k=16, 2048 tokens
    python benchmarks/bench_clt_step.py --small    # L=4, d=64, M=512, k=8, 512 tokens (quick)
    python benchmarks/bench_clt_step.py --compare /tmp/base   # this checkout's steps against
                                                              # those of the tree at /tmp/base

Both sides run the trainer's own step (saekit.train.member.Member.train_step: forward, loss,
backward, removal of the decoder-parallel gradient, Adam, decoder renormalisation, dead-latent
counters; TopK with its default AuxK, no latent dead) on one batch of the synthetic CLT world
(saekit.data.synthetic.multihook), [x^0 … x^{L−1} | y^0 … y^{L−1}]: the CLT steps on all of it,
per-layer transcoder l on [x^l | y^l] (the same tokens; the columns are cut before timing, as a
source yields them). Each CLT layer and each transcoder has M latents and TopK k.

- Ratio: one process alternates a CLT step with the L transcoder steps, each timed, so both
  sides see the same machine load; the ratio is the median CLT step over the median of the
  L steps' sum.
- Memory: each side in its own subprocess: "step peak" is the peak RSS over its steps minus the
  RSS after setup (so it holds the gradients and Adam's moments, as in bench_step.py), and
  "state" the exact bytes of parameters + gradients + Adam's two moments.

- Before/after (``--compare ROOT``): the same steps of two source trees side by side, each in
  its own process (PYTHONPATH=ROOT/src and this checkout's src), in lockstep: each round one
  process steps (CLT, then the L transcoders) while the other waits, then the other, the order
  alternating between rounds, so both see the same machine load; medians per tree.

One torch thread by default: on the shared 2-core machine, 2 threads spent most of their time
spinning (a --small run took 2.1 s per CLT step with 2 threads, 52 ms with 1).

Decoding is sparse on both sides: a CLT layer-l latent writes L − l targets, so a token's active
(latent, target) pairs are k·L(L+1)/2 against the transcoders' k·L; the CLT's decoder has
L(L+1)/2 · M·d_out weights against L · M·d_out.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _world(args):
    from saekit.data.synthetic.multihook import CLTWorldConfig, MultiHookData

    cfg = CLTWorldConfig(n_layers=args.layers, d=args.d, n_features=4 * args.d, mean_l0=8.0)
    return MultiHookData(cfg)


def _members(args, side: str, world, batch: torch.Tensor):
    """(members, the batch each steps on): one CLT on the whole batch, or L per-layer
    transcoders, each on its layer's [input | target] columns as the multihook source cuts
    them for ``data.hook`` + ``data.target_hook``."""
    from saekit.core.configs import from_dict
    from saekit.data.synthetic.multihook import HookSelection
    from saekit.train.member import Member
    from saekit.train.member_config import SAETrainConfig

    L, d = args.layers, args.d
    activation = {"kind": "topk", "k": args.k}
    if side == "clt":
        sae = {"kind": "clt", "d_in": d, "d_sae": args.M, "n_layers": L, "activation": activation}
        batches = [batch]
    else:
        sae = {"d_in": d, "d_out": d, "d_sae": args.M, "activation": activation}
        pairs = [[f"layers.{l}.mlp:input", f"layers.{l}.mlp"] for l in range(L)]
        batches = [batch[:, HookSelection(world, pair).columns].contiguous() for pair in pairs]
    members = []
    for i, b in enumerate(batches):
        cfg = from_dict(SAETrainConfig, {"sae": sae, "name": f"{side}{i}", "lr": 1e-4}, "bench")
        member = Member(cfg, total_steps=10**6, device="cpu")
        member.init_from_data(b)
        members.append(member)
    return members, batches


def _state_mb(members) -> float:
    """Parameters + gradients + Adam's two moments, exactly (4 copies of every parameter)."""
    n = sum(p.numel() * p.element_size() for m in members for p in m.sae.parameters())
    return 4 * n / 2**20


def _step(members, batches):
    counter = [0]

    def step():
        counter[0] += 1
        for member, b in zip(members, batches, strict=True):
            member.train_step(b, counter[0])

    return step


def worker(args) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    world = _world(args)
    batch = world.batch(0, args.batch).x
    if args.worker == "lockstep":
        lockstep(args, world, batch)
        return
    if args.worker == "ratio":
        clt, clt_batches = _members(args, "clt", world, batch)
        plt, plt_batches = _members(args, "plt", world, batch)
        clt_step, plt_step = _step(clt, clt_batches), _step(plt, plt_batches)
        for _ in range(args.warmup):
            clt_step()
            plt_step()
        clt_s, plt_s = [], []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            clt_step()
            t1 = time.perf_counter()
            plt_step()
            clt_s.append(t1 - t0)
            plt_s.append(time.perf_counter() - t1)
        result = {"clt_s": statistics.median(clt_s), "plt_s": statistics.median(plt_s)}
    else:
        members, batches = _members(args, args.worker, world, batch)
        rss_setup = _rss_mb()
        step = _step(members, batches)
        for _ in range(args.warmup + args.steps):
            step()
        result = {
            "step_peak_mb": _peak_rss_mb() - rss_setup,
            "state_mb": _state_mb(members),
            "params": sum(p.numel() for m in members for p in m.sae.parameters()),
        }
    print(json.dumps(result))


def lockstep(args, world, batch) -> None:
    """The --compare worker: set up both sides, print "ready", then one timed CLT step and one
    timed round of the L transcoder steps per "step" line read, as a JSON line."""
    clt, clt_batches = _members(args, "clt", world, batch)
    plt, plt_batches = _members(args, "plt", world, batch)
    clt_step, plt_step = _step(clt, clt_batches), _step(plt, plt_batches)
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "step":
            break
        t0 = time.perf_counter()
        clt_step()
        t1 = time.perf_counter()
        plt_step()
        print(json.dumps({"clt_s": t1 - t0, "plt_s": time.perf_counter() - t1}), flush=True)


def compare(args) -> None:
    """Before/after: lockstep workers on ``args.compare``'s src and this checkout's."""
    trees = {"before": Path(args.compare).resolve() / "src", "after": ROOT / "src"}
    for name, src in trees.items():
        if not (src / "saekit" / "__init__.py").is_file():
            raise SystemExit(f"--compare: no saekit package under {src} ({name})")
    procs = {}
    for name, src in trees.items():
        cmd = [sys.executable, __file__, "--worker", "lockstep", *_flags(args)]
        procs[name] = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=_env(args, src)
        )
    for name, proc in procs.items():
        if proc.stdout.readline().strip() != "ready":
            raise SystemExit(f"{name} worker failed during setup (exit {proc.wait()})")
    times: dict[str, list[dict]] = {name: [] for name in procs}
    for i in range(args.warmup + args.steps):
        order = list(procs) if i % 2 == 0 else list(procs)[::-1]
        for name in order:
            procs[name].stdin.write("step\n")
            procs[name].stdin.flush()
            line = procs[name].stdout.readline()
            if not line:
                raise SystemExit(f"{name} worker died (exit {procs[name].wait()})")
            if i >= args.warmup:
                times[name].append(json.loads(line))
    for proc in procs.values():
        proc.stdin.close()
        proc.wait()
    print(
        f"L={args.layers} layers, d_in=d_out={args.d}, M={args.M} latents per layer, TopK "
        f"k={args.k} per layer, {args.batch} tokens per step, {args.threads} threads, fp32, "
        f"median of {args.steps} lockstep rounds; before: {trees['before']}\n"
    )
    print("| code | CLT ms per step | 4 transcoders ms per step | CLT / transcoders |")
    print("|---|---:|---:|---:|")
    medians = {}
    for name in procs:
        clt_s = statistics.median(t["clt_s"] for t in times[name])
        plt_s = statistics.median(t["plt_s"] for t in times[name])
        medians[name] = clt_s
        print(f"| {name} | {1000 * clt_s:,.0f} | {1000 * plt_s:,.0f} | {clt_s / plt_s:.2f} |")
    print(f"\nCLT step after / before = {medians['after'] / medians['before']:.2f}")


def _flags(args) -> list[str]:
    return [f"--{k}={getattr(args, k)}" for k in ("layers", "d", "M", "k", "batch", "threads",
                                                   "steps", "warmup")]  # fmt: skip


def _env(args, src: Path) -> dict:
    return dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(src))


def _run_worker(args, name: str) -> dict:
    env = _env(args, ROOT / "src")
    cmd = [sys.executable, __file__, "--worker", name, *_flags(args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{name} worker failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d", type=int, default=256, help="width of every input and target")
    p.add_argument("--M", type=int, default=4096, help="latents per layer")
    p.add_argument("--k", type=int, default=16, help="TopK k per layer")
    p.add_argument("--batch", type=int, default=2048, help="tokens per step")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: see docstring)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--small", action="store_true", help="d=64 M=512 k=8 batch 512")
    p.add_argument("--compare", metavar="ROOT", help="time against the source tree at ROOT")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.small:
        args.d, args.M, args.k, args.batch = 64, 512, 8, 512
    if args.worker:
        worker(args)
        return
    if args.compare:
        compare(args)
        return
    L = args.layers
    ratio = _run_worker(args, "ratio")
    memory = {side: _run_worker(args, side) for side in ("clt", "plt")}
    print(
        f"L={L} layers, d_in=d_out={args.d}, M={args.M} latents per layer, TopK k={args.k} per "
        f"layer, {args.batch} tokens per step, {args.threads} threads, fp32, torch "
        f"{torch.__version__}, median of {args.steps} steps\n"
    )
    print("| dictionary | parameters | ms per step | tokens/s | × CLT time | state MiB | "
          "step peak MiB |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|")
    rows = (("clt", f"CLT over {L} layers", ratio["clt_s"]),
            ("plt", f"{L} per-layer transcoders", ratio["plt_s"]))  # fmt: skip
    for side, label, seconds in rows:
        mem = memory[side]
        print(
            f"| {label} | {mem['params']:,} | {1000 * seconds:,.0f} | {args.batch / seconds:,.0f}"
            f" | {seconds / ratio['clt_s']:.2f} | {mem['state_mb']:,.0f} | "
            f"{mem['step_peak_mb']:,.0f} |"
        )
    print(
        f"\nCLT step / {L} transcoder steps = {ratio['clt_s'] / ratio['plt_s']:.2f} (timed "
        "alternately in one process). State: parameters, gradients and Adam's moments; step "
        "peak: peak RSS minus the RSS after setup, each side in its own process."
    )


if __name__ == "__main__":
    main()
