"""Everything GPU-related in one run, one markdown report (``benchmarks/gpu.sh`` calls this).

Sections: environment; correctness on the device (the fast paths, torch and Triton kernels,
against the reference path, then pytest on the kernel tests when pytest is there); the training
step (TopK, BatchTopK, Matryoshka, AuxK on/off) at d=768/M=24576 and d=4096/M=131072 in bf16
autocast and fp32, as tokens/s, as a ratio of the bf16 GEMM rate measured in the same run, and
peak GPU memory; harvesting from a GPT-2-small-sized random model with and without the
overlap; a 2-process NCCL all-reduce when there are 2 GPUs; the latent-sharded step on several;
SynthSAEBench-16k's world and recipes for what the budget leaves (``--synth-samples``). Without
CUDA every GPU part is reported as skipped. ``--smoke`` runs the same code at tiny sizes on
whatever device there is (the CPU test of this script). Runs under older torch (uses nothing
newer than torch 2.1) and installs nothing; a section that fails is reported as failed and the
rest still run.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SIZES = [(768, 24576), (4096, 131072)]  # (d, M)
SMOKE_SIZES = [(32, 256)]
OPTIONAL = ("safetensors", "triton", "pytest", "transformers")
"""saekit needs safetensors; the Triton kernels, the pytest run and harvesting are skipped
without the others."""


class Report:
    """Markdown written as it goes, so a run cut short still leaves what it measured."""

    def __init__(self, path: Path, deadline: float):
        self.path, self.deadline = path, deadline
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")
        self.failed = 0

    def write(self, text: str = "") -> None:
        print(text, flush=True)
        with self.path.open("a") as f:
            f.write(text + "\n")

    def section(self, title: str, fn, *args) -> None:
        self.write(f"\n## {title}\n")
        if time.monotonic() > self.deadline:
            self.write("skipped: the time budget is spent")
            return
        try:
            fn(self, *args)
        except Exception:  # a report row, not a crash: the other sections still run
            self.failed += 1
            self.write("FAILED:\n\n```\n" + traceback.format_exc()[-3000:] + "```")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, steps: int, warmup: int = 1) -> float:
    """Median seconds of ``steps`` calls after ``warmup``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


# ------------------------------------------------------------------------------ sections


def environment(report: Report, device: torch.device) -> None:
    report.write(f"- python {sys.version.split()[0]}, torch {torch.__version__}")
    report.write(f"- device: {device}, CUDA available: {torch.cuda.is_available()}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            report.write(f"- GPU {i}: {p.name}, {p.total_memory / 2**30:.0f} GiB")
    found = {p: importlib.util.find_spec(p) is not None for p in OPTIONAL}
    report.write(
        "- installed: " + ", ".join(f"{p} {'yes' if ok else 'NO'}" for p, ok in found.items())
    )


def has_pytest() -> bool:
    return importlib.util.find_spec("pytest") is not None


def correctness(report: Report, device: torch.device, smoke: bool) -> None:
    from gpu_checks import compare_paths

    kernels = ["torch"]
    if device.type == "cuda" and importlib.util.find_spec("triton") is not None:
        kernels.append("triton")
    report.write("| activation | kernel | AuxK | dtype | max rel. error vs reference |")
    report.write("|---|---|---|---|---:|")
    for kind in ("topk", "batchtopk"):
        for kernel in kernels:
            for auxk in (False, True):
                err = compare_paths(kind, kernel, auxk, device, torch.float32)
                ok = "ok" if err < 1e-3 else "TOO LARGE"
                report.write(f"| {kind} | {kernel} | {auxk} | fp32 | {err:.1e} ({ok}) |")
                if err >= 1e-3:
                    raise AssertionError(f"{kind}/{kernel}: fast path differs from reference")
    if device.type != "cuda":
        report.write("\nTriton kernels and the pytest kernel tests on CUDA: skipped (no CUDA)")
        return
    if not has_pytest():
        report.write("\npytest: skipped (not installed in this image)")
        return
    tests = ["tests/kernels/test_kernels.py", "tests/kernels/test_speed_paths.py"]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=240,
    )
    tail = "\n".join(proc.stdout.strip().splitlines()[-6:])
    report.write(f"\npytest {' '.join(tests)} (exit {proc.returncode}):\n\n```\n{tail}\n```")
    if proc.returncode != 0:
        raise AssertionError("kernel tests failed on the device")


def gemm_rate(device: torch.device, n: int, d: int, m: int, dtype: torch.dtype) -> float:
    """FLOP/s of the encoder GEMM [n, d]·[d, m] in ``dtype`` (the roofline of a step)."""
    x = torch.randn(n, d, device=device, dtype=dtype)
    w = torch.randn(m, d, device=device, dtype=dtype)
    seconds = timed(lambda: x @ w.T, device, steps=5, warmup=2)
    return 2 * n * d * m / seconds


def step_benchmark(report: Report, device: torch.device, smoke: bool) -> None:
    from gpu_checks import make_training_step

    if device.type != "cuda" and not smoke:
        report.write("skipped: no CUDA")
        return
    sizes = SMOKE_SIZES if smoke else SIZES
    n_tokens, k = (64, 4) if smoke else (4096, 32)
    steps = 1 if smoke else 5
    variants = [  # (activation, AuxK)
        ("topk", False),
        ("topk", True),
        ("batchtopk", False),
        ("batchtopk", True),
        ("matryoshka-batchtopk", False),
    ]
    report.write(
        f"{n_tokens} tokens per step, k={k}, AuxK with half the latents dead (k_aux = d/2), "
        f"Matryoshka with 10 random prefixes; median of {steps} steps. × bf16 GEMM: the time "
        "the encoder GEMM [N, d]·[d, M] takes at the bf16 rate measured here, over the step's "
        "time (1.0 = a step as fast as its one unavoidable GEMM in bf16).\n"
    )
    report.write("| d | M | activation | AuxK | precision | tokens/s | × bf16 GEMM | peak GiB |")
    report.write("|---:|---:|---|---|---|---:|---:|---:|")
    for d, m in sizes:
        bf16_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        rate = gemm_rate(device, n_tokens, d, m, bf16_dtype)
        report.write(f"| {d} | {m} | (bf16 GEMM: {rate / 1e12:.1f} TFLOP/s) | | | | | |")
        gemm_seconds = 2 * n_tokens * d * m / rate
        for kind, auxk in variants:
            for bf16 in (True, False) if not smoke or kind == "topk" else (False,):
                if time.monotonic() > report.deadline:
                    report.write("| ... | | skipped: the time budget is spent | | | | | |")
                    return
                label = f"| {d} | {m} | {kind} | {'on' if auxk else 'off'} |"
                precision = "bf16 autocast" if bf16 else "fp32"
                try:
                    seconds, peak = run_step(
                        make_training_step, device, d, m, k, n_tokens, kind, auxk, bf16, steps
                    )
                except torch.cuda.OutOfMemoryError:
                    report.write(f"{label} {precision} | out of memory | | |")
                    continue
                report.write(
                    f"{label} {precision} | {n_tokens / seconds:,.0f} | "
                    f"{gemm_seconds / seconds:.2f} | {peak} |"
                )


def run_step(make, device, d, m, k, n_tokens, kind, auxk, bf16, steps):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    step = make(device, d, m, k, n_tokens, kind, auxk, bf16)
    seconds = timed(step, device, steps=steps, warmup=1 if steps == 1 else 2)
    peak = "-"
    if device.type == "cuda":
        peak = f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f}"
    del step
    return seconds, peak


def harvest(report: Report, device: torch.device, smoke: bool) -> None:
    if device.type != "cuda" and not smoke:
        report.write("skipped: no CUDA")
        return
    if importlib.util.find_spec("transformers") is None:
        report.write("skipped: transformers is not installed in this image")
        return
    from bench_harvest import build_model, token_batches, train_rate

    from saekit.data.lm.harvester import Harvester, TokenFilter

    layers, d_model, context, batch, n = (2, 64, 16, 2, 2) if smoke else (12, 768, 256, 16, 8)
    model = build_model(layers, d_model, context, str(device))
    batches = token_batches(n, batch, context, str(device))
    hook = f"transformer.h.{layers // 2}"
    harvester = Harvester(model, hook, token_filter=TokenFilter(exclude_bos=False))
    harvester(batches[0])
    report.write(
        f"GPT-2-small-sized random model ({layers} layers, d={d_model}, context {context}, "
        f"batch {batch}, {n} batches), hook `{hook}`; toy TopK SAE steps (8×, k=32, 512 "
        "tokens) fed by the harvester. Best of 2.\n"
    )
    report.write("| harvest + SAE steps | tokens/s | speed-up |")
    report.write("|---|---:|---:|")
    serial = max(train_rate(harvester, batches, hook, d_model, 0, str(device)) for _ in range(2))
    over = max(train_rate(harvester, batches, hook, d_model, 2, str(device)) for _ in range(2))
    report.write(f"| serial | {serial:,.0f} | 1.00x |")
    report.write(f"| overlapped (prefetch=2 thread) | {over:,.0f} | {over / serial:.2f}x |")


def nccl(report: Report, device: torch.device, smoke: bool) -> None:
    from gpu_checks import two_process_allreduce

    if torch.cuda.device_count() >= 2:
        backend, numel = "nccl", 24576 * 768
    elif smoke:
        backend, numel = "gloo", 4096
        report.write("(smoke: gloo on the CPU, the code path NCCL takes on 2 GPUs)\n")
    else:
        report.write(f"skipped: {torch.cuda.device_count()} GPU(s), NCCL needs 2")
        return
    seconds = two_process_allreduce(backend, numel)
    gbytes = numel * 4 / 2**30
    report.write(
        f"2 processes, {backend}: all_reduce of {numel:,} fp32 ({gbytes:.2f} GiB, one W_enc of "
        f"d=768 M=24576): {seconds * 1e3:.2f} ms, {gbytes / seconds:.1f} GiB/s algorithm bandwidth"
    )


def latent_step(report: Report, device: torch.device, smoke: bool) -> None:
    """The latent-sharded step (issue 25) on every GPU against one: ms/step and peak memory."""
    from bench_latent import measure

    gpus = torch.cuda.device_count()
    if gpus < 2:
        report.write(f"skipped: one GPU ({gpus} found; the sharded step needs 2 or more)")
        return
    T = min(gpus, 8)
    d, m, n = (64, 4096, 256) if smoke else (2048, 2**18, 4096)
    args = {"d": d, "M": m, "k": 32, "batch": n, "steps": 10}
    report.write(f"TopK k=32 + AuxK, d={d}, M={m:,}, N={n}, float32, NCCL, D=1\n")
    report.write("| T | ms/step | peak allocated per rank (MiB) |")
    report.write("|---|---|---|")
    for parts in (1, T):
        ranks = measure(parts, args, device="cuda")
        ms = 1e3 * max(r["seconds_per_step"] for r in ranks)
        report.write(f"| {parts} | {ms:,.1f} | {max(r['peak_mib'] for r in ranks):,.0f} |")


def synthbench(report: Report, device: torch.device, smoke: bool, samples: int | None) -> None:
    """SynthSAEBench-16k on the device (issue 27 item 6): the paper's world and recipes
    (``bench synth --protocol full``: width 4,096, batch 1,024, lr 3e-4, L0 25), seed 0, for
    ``samples`` (--synth-samples) or as many as the time budget leaves, measured by a 10-step
    probe. The paper's 200M samples are far beyond one session: the world is sampled on the CPU
    (about 0.5 s per batch of 1,024 on one thread, BENCHMARKS.md), so a budget run says what
    the pipeline does on the device and how fast, not the published table."""
    from saekit.synthbench.bench import format_table, full_protocol, scaled_protocol, train_seed

    if device.type != "cuda" and not smoke:
        report.write("skipped: no CUDA")
        return
    protocol, archs = full_protocol(), ["BatchTopK", "Matryoshka", "Matching Pursuit"]
    protocol.l0 = {25: 25}
    if smoke:  # the same code on the scaled world, a few steps
        protocol, archs = scaled_protocol(), ["BatchTopK"]
        protocol.l0, protocol.eval_tokens, samples = {25: 11}, 4096, 4 * protocol.batch_size
    if samples is None:
        protocol.samples, protocol.eval_tokens = 10 * protocol.batch_size, 4096
        start = time.monotonic()
        train_seed(protocol, archs, 0)
        per_step = (time.monotonic() - start) / 10  # world, scoring and steps: an upper bound
        left = report.deadline - time.monotonic() - 60  # a minute for the scoring
        samples = max(10, int(left / per_step)) * protocol.batch_size
        report.write(f"probe: {per_step:.2f} s per step of {len(archs)} SAEs (10 steps)\n")
    protocol.samples, protocol.eval_tokens = samples, min(protocol.eval_tokens, 65_536)
    start = time.monotonic()
    runs = [train_seed(protocol, archs, 0)]
    report.write(f"{samples:,} samples ({samples / 200e6:.4%} of the paper's), "
                 f"{time.monotonic() - start:.0f} s:\n")  # fmt: skip
    report.write(format_table(protocol, runs))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", default="runs/gpu_report.md")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, any device (a test)")
    parser.add_argument("--budget", type=float, default=450.0, help="seconds for the sections")
    parser.add_argument(
        "--synth-samples",
        type=int,
        help="SynthSAEBench training samples (default: what the budget leaves)",
    )
    args = parser.parse_args(argv)
    start = time.monotonic()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report = Report(Path(args.report), start + args.budget)
    report.write(f"# saekit GPU report ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})")
    if args.smoke:
        report.write("\nSMOKE RUN: tiny sizes; figures mean nothing, only that the code runs.")
    report.section("Environment", environment, device)
    report.section("Correctness on the device", correctness, device, args.smoke)
    report.section("Training step", step_benchmark, device, args.smoke)
    report.section("Harvesting", harvest, device, args.smoke)
    report.section("Two processes (NCCL)", nccl, device, args.smoke)
    report.section("Latent-sharded step (several GPUs)", latent_step, device, args.smoke)
    report.section("SynthSAEBench-16k", synthbench, device, args.smoke, args.synth_samples)
    report.write(f"\n{report.failed} section(s) failed; {time.monotonic() - start:.0f} s in all.")
    return 1 if report.failed else 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
