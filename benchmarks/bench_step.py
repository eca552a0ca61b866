"""Benchmark one SAE training step; prints a markdown table.

    .venv/bin/python benchmarks/bench_step.py            # d=512 M=8192 k=32 batch 4096, 2 threads
    .venv/bin/python benchmarks/bench_step.py --small    # a quick run

A step is: forward, reconstruction loss (+ AuxK), backward, removal of the decoder-parallel
gradient, Adam, decoder renormalisation (+ BatchTopK's θ). AuxK runs with no latent dead, 1% or
half of them dead (the dead set handed to AuxK as ``revival.DeadSet`` would). Rows:

- roofline: the forward encoder matmul (into a reused [N, M] buffer, as saekit's CPU fast path
  does: a fresh one costs page faults, benchmarks/README.md "Host memory") plus the top-k
  selection, nothing else;
- saekit reference: the activation's ``kernel: reference`` path (dense autograd through the
  encoder, dense [N, M] latents; checked at setup), with the library's objective terms;
- saekit fast: the default ``kernel: torch`` path (one encoder matmul without autograd, sparse
  decode and sparse encoder backward), with the library's objective terms;
- saekit fast-sub8: fast, AuxK estimated on 1/8 of the tokens (``token_fraction: 0.125``);
- sparsify / SAELens: their training steps, run by the python of a venv that has them
  (``--benchenv``, else $SAEKIT_BENCHENV, else ``.benchenv``; benchmarks/README.md).

Every configuration runs in its own subprocess, so the peak RSS (``ru_maxrss``) is its own.
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
DEAD_SHARES = {"off": None, "none-dead": 0.0, "few-dead": 0.01, "half-dead": 0.5}


def _rss_mb() -> float:
    """Current resident set size (Linux /proc), MiB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _make_data(args, dead_share: float | None = 0.5, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, args.d, generator=g, dtype=dtype) + 0.5  # nonzero mean
    dead = torch.zeros(args.M, dtype=torch.bool)
    n_dead = round((dead_share or 0.0) * args.M)
    dead[torch.randperm(args.M, generator=g)[:n_dead]] = True
    return x, dead


def _roofline_step(args, activation: str):
    """The forward encoder matmul plus the top-k selection: what no training step can beat."""
    x, _ = _make_data(args)
    g = torch.Generator().manual_seed(1)
    W_enc = torch.randn(args.M, args.d, generator=g) / args.d**0.5
    b_enc, b_dec = torch.zeros(args.M), x.mean(0)
    pre_NM = torch.empty(args.batch, args.M)  # reused, as saekit's fast path reuses its own

    @torch.no_grad()
    def step():
        torch.addmm(b_enc, x - b_dec, W_enc.T, out=pre_NM)
        if activation == "topk":
            pre_NM.topk(args.k, dim=-1, sorted=False)
        else:
            pre_NM.reshape(-1).topk(args.k * args.batch, sorted=False)

    return step


def _time_steps(step, roofline, args) -> tuple[list[float], list[float]]:
    """Alternate the step and the roofline, so that both see the same machine load."""
    for _ in range(args.warmup):
        step()
        roofline()
    times, roof = [], []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        t1 = time.perf_counter()
        roofline()
        times.append(t1 - t0)
        roof.append(time.perf_counter() - t1)
    return times, roof


# -------------------------------------------------------------------- saekit workers


def _saekit_step(args, variant: str, activation: str, auxk: str):
    from saekit.activations.batchtopk import batch_min_positive
    from saekit.core.encoding import SparseCode
    from saekit.model.config import SAEConfig
    from saekit.model.sae import SAE
    from saekit.objective.config import AuxKRevival
    from saekit.objective.terms import AuxK, Reconstruction, TermInputs

    if variant == "roofline":
        return _roofline_step(args, activation)
    x, dead = _make_data(args, DEAD_SHARES[auxk])
    kernel = "reference" if variant == "reference" else "torch"
    sae = SAE(SAEConfig(d_in=args.d, d_sae=args.M, activation={"kind": activation, "k": args.k,
                                                                "kernel": kernel}))  # fmt: skip
    sae.init_from_data(x)
    sae.train()
    with torch.no_grad():  # the row runs the path it names
        assert isinstance(sae(x[:8]).latents, SparseCode) == (kernel != "reference"), variant
    # fused Adam: one kernel, and it reads its step count without .item() (no host sync).
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)
    fraction = 0.125 if variant == "fast-sub8" else 1.0
    terms = [Reconstruction()]
    if auxk != "off":
        terms.append(AuxK(AuxKRevival(token_fraction=fraction)))
    lam = torch.zeros(())
    dead_cols = torch.nonzero(dead).reshape(-1)  # what revival.DeadSet hands AuxK

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            out = sae(x)
            inputs = TermInputs(sae, out, dead, lam, None, dead_cols)
            loss = sum(term(inputs) for term in terms)
        loss.backward()
        sae.remove_parallel_grad_()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sae.normalize_decoder_()
        if activation == "batchtopk":
            sae.activation.update_threshold(batch_min_positive(out.latents))

    return step


# ------------------------------------------------------------ other libraries (in .benchenv)


def _sparsify_step(args, activation: str, auxk: str):
    from sparsify import SparseCoder, SparseCoderConfig

    x, dead = _make_data(args, DEAD_SHARES[auxk])
    auxk = auxk != "off"
    cfg = SparseCoderConfig(num_latents=args.M, k=args.k)
    sae = SparseCoder(args.d, cfg, device="cpu", dtype=torch.float32)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
    auxk_alpha = 1 / 32

    def step():
        out = sae(x, dead_mask=dead if auxk else None)
        loss = out.fvu + (auxk_alpha * out.auxk_loss if auxk else 0.0)
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sae.set_decoder_norm_to_unit_norm()

    return step


def _saelens_step(args, activation: str, auxk: str):
    import sae_lens

    x, dead = _make_data(args, DEAD_SHARES[auxk])
    auxk = auxk != "off"
    if activation == "topk":
        sae_cls, cfg_cls = sae_lens.TopKTrainingSAE, sae_lens.TopKTrainingSAEConfig
    else:
        sae_cls, cfg_cls = sae_lens.BatchTopKTrainingSAE, sae_lens.BatchTopKTrainingSAEConfig
    cfg = cfg_cls(d_in=args.d, d_sae=args.M, k=args.k, dtype="float32", device="cpu")
    if hasattr(cfg, "aux_loss_coefficient"):
        cfg.aux_loss_coefficient = (1 / 32) if auxk else 0.0
    sae = sae_cls(cfg)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
    from sae_lens.saes.sae import TrainStepInput

    def step():
        step_input = TrainStepInput(
            sae_in=x,
            coefficients={},
            dead_neuron_mask=dead if auxk else None,
            n_training_steps=0,
            is_logging_step=False,
        )
        out = sae.training_forward_pass(step_input)
        out.loss.backward()
        if hasattr(sae, "remove_gradient_parallel_to_decoder_directions"):
            sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def worker(args) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    library, variant, activation, auxk = args.worker.split(":")
    if library == "saekit":
        step = _saekit_step(args, variant, activation, auxk)
    elif library == "sparsify":
        step = _sparsify_step(args, activation, auxk)
    else:
        step = _saelens_step(args, activation, auxk)
    rss_setup = _rss_mb()
    for _ in range(args.warmup):
        step()
    peak = _peak_rss_mb()  # before the roofline's own [N, M] buffers join in
    times, roof = _time_steps(step, _roofline_step(args, "topk"), args)
    print(
        json.dumps(
            {
                "step_s": statistics.median(times),
                "roofline_s": statistics.median(roof),
                "peak_rss_mb": peak,
                "step_peak_mb": peak - rss_setup,
            }
        )
    )


# -------------------------------------------------------------------- driver


CONFIGS = [
    # (library, variant, activation, AuxK: off / none-dead / few-dead / half-dead)
    ("saekit", "roofline", "topk", "off"),
    ("saekit", "reference", "topk", "off"),
    ("saekit", "fast", "topk", "off"),
    ("sparsify", "-", "topk", "off"),
    ("saelens", "-", "topk", "off"),
    ("saekit", "fast", "topk", "none-dead"),
    ("sparsify", "-", "topk", "none-dead"),
    ("saelens", "-", "topk", "none-dead"),
    ("saekit", "fast", "topk", "few-dead"),
    ("sparsify", "-", "topk", "few-dead"),
    ("saekit", "reference", "topk", "half-dead"),
    ("saekit", "fast", "topk", "half-dead"),
    ("saekit", "fast-sub8", "topk", "half-dead"),
    ("sparsify", "-", "topk", "half-dead"),
    ("saelens", "-", "topk", "half-dead"),
    ("saekit", "roofline", "batchtopk", "off"),
    ("saekit", "reference", "batchtopk", "off"),
    ("saekit", "fast", "batchtopk", "off"),
    ("saekit", "fast", "batchtopk", "none-dead"),
    ("saelens", "-", "batchtopk", "off"),
]


def _benchenv(args) -> Path | None:
    """The python of the venv holding sparsify and SAELens, if there is one."""
    for candidate in (args.benchenv, os.environ.get("SAEKIT_BENCHENV"), ROOT / ".benchenv"):
        if candidate and (Path(candidate) / "bin" / "python").exists():
            return Path(candidate) / "bin" / "python"
    return None


def _run_worker(args, config: tuple[str, ...]) -> dict | str:
    library = config[0]
    if library == "saekit":
        python = sys.executable
    elif _benchenv(args) is not None:
        python = str(_benchenv(args))
    else:
        return "not installed (no --benchenv, $SAEKIT_BENCHENV or .benchenv)"
    flags = [
        f"--d={args.d}",
        f"--M={args.M}",
        f"--k={args.k}",
        f"--batch={args.batch}",
        f"--threads={args.threads}",
        f"--steps={args.steps}",
        f"--warmup={args.warmup}",
    ]
    if args.bf16:
        flags.append("--bf16")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = f"{ROOT / 'src'}:{ROOT / 'benchmarks'}" if library == "saekit" else ""
    cmd = [python, __file__, "--worker", ":".join(config), *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return f"failed: {last[:120]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--M", type=int, default=8192)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096, help="tokens per step")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--bf16", action="store_true", help="saekit: bf16 autocast forward")
    parser.add_argument("--small", action="store_true", help="d=128 M=2048 k=16 batch 1024")
    parser.add_argument("--only", default="", help="comma-separated libraries to run")
    parser.add_argument("--benchenv", default=None, help="venv with sparsify and sae-lens")
    parser.add_argument("--rows", default="", help="comma-separated row numbers (1-based)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.small:
        args.d, args.M, args.k, args.batch, args.steps, args.warmup = 128, 2048, 16, 1024, 3, 1
    if args.worker:
        worker(args)
        return

    only = set(filter(None, args.only.split(",")))
    print(
        f"d={args.d} M={args.M} k={args.k} batch={args.batch} tokens, {args.threads} threads, "
        f"fp32{' (saekit: bf16 autocast forward)' if args.bf16 else ''}, torch "
        f"{torch.__version__}, median of {args.steps} steps\n"
    )
    print(
        "| library | path | activation | AuxK (dead) | tokens/s | × roofline (roofline tok/s) "
        "| peak RSS MiB | step peak MiB |"
    )
    print("|---|---|---|---|---:|---:|---:|---:|")
    rows = {int(r) for r in filter(None, args.rows.split(","))}
    for number, config in enumerate(CONFIGS, start=1):
        library, variant, activation, auxk = config
        if (only and library not in only) or (rows and number not in rows):
            continue
        result = _run_worker(args, config)
        label = f"| {library} | {variant} | {activation} | {auxk} |"
        if isinstance(result, str):
            print(f"{label} {result} | | | |", flush=True)
            continue
        tps = args.batch / result["step_s"]
        ratio = result["roofline_s"] / result["step_s"]
        roof_tps = args.batch / result["roofline_s"]
        print(
            f"{label} {tps:,.0f} | {ratio:.2f} ({roof_tps:,.0f}) | {result['peak_rss_mb']:,.0f} | "
            f"{result['step_peak_mb']:,.0f} |",
            flush=True,
        )
    print(
        "\n× roofline: the step's time against the TopK roofline (encoder matmul + per-token "
        "top-k), both timed alternately in the same process (the roofline's own tokens/s in "
        "brackets), so a loaded machine slows both. Peak RSS: the process's high-water mark "
        "after the warm-up steps; step peak: that minus the RSS after setup (data, SAE), so it "
        "includes Adam's state."
    )


if __name__ == "__main__":
    main()
