"""Benchmark one SAE training step; prints a markdown table.

    .venv/bin/python benchmarks/bench_step.py            # d=512 M=8192 k=32 batch 4096, 2 threads
    .venv/bin/python benchmarks/bench_step.py --small    # a quick run

A step is: forward, reconstruction loss (+ AuxK with half the latents dead), backward, removal of
the decoder-parallel gradient, Adam, decoder renormalisation. Rows:

- roofline: the forward encoder matmul plus the top-k selection, nothing else;
- saekit reference: the activation's ``kernel: reference`` path (dense autograd through the
  encoder, dense [N, M] latents), with the library's objective terms;
- saekit fast: the default ``kernel: torch`` path (one encoder matmul without autograd, sparse
  decode and sparse encoder backward), with the library's objective terms;
- saekit fast-cand / fast-dense / fast-dense-cols: the variants in benchmarks/kernel_variants.py
  (BatchTopK candidate selection; AuxK as GEMMs over all / the dead columns);
- sparsify / SAELens: their training steps, run by ``.benchenv/bin/python`` when that venv exists
  (see benchmarks/README.md for how to create it).

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
BENCHENV_PY = ROOT / ".benchenv" / "bin" / "python"


def _rss_mb() -> float:
    """Current resident set size (Linux /proc), MiB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _make_data(args, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, args.d, generator=g, dtype=dtype) + 0.5  # nonzero mean
    dead = torch.zeros(args.M, dtype=torch.bool)
    dead[torch.randperm(args.M, generator=g)[: args.M // 2]] = True  # half the latents dead
    return x, dead


def _roofline_step(args, activation: str):
    """The forward encoder matmul plus the top-k selection: what no training step can beat."""
    x, _ = _make_data(args)
    g = torch.Generator().manual_seed(1)
    W_enc = torch.randn(args.M, args.d, generator=g) / args.d**0.5
    b_enc, b_dec = torch.zeros(args.M), x.mean(0)

    @torch.no_grad()
    def step():
        pre_NM = torch.addmm(b_enc, x - b_dec, W_enc.T)
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


def _saekit_step(args, variant: str, activation: str, auxk: bool):
    import kernel_variants

    from saekit.activations.batchtopk import batch_min_positive
    from saekit.encoding import SparseCode
    from saekit.kernels import CodeLayout, SparsePreacts
    from saekit.objective import AuxK, AuxKRevival, Reconstruction, TermInputs
    from saekit.sae import SAE, SAEConfig

    if variant == "roofline":
        return _roofline_step(args, activation)
    x, dead = _make_data(args)
    kernel = "reference" if variant == "reference" else "torch"
    act_cfg = {"kind": activation, "k": args.k, "kernel": kernel}
    sae = SAE(SAEConfig(d_in=args.d, d_sae=args.M, activation=act_cfg))
    sae.init_from_data(x)
    sae.train()
    # fused Adam: one kernel, and it reads its step count without .item() (no host sync).
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)
    terms = [Reconstruction()] + ([AuxK(AuxKRevival())] if auxk else [])
    lam = torch.zeros(())
    aux_cols = args.M // 2 if variant.endswith("cols") else None

    def candidate_forward():
        """BatchTopK through the candidate selection (4k per token + N/16 full rows)."""
        x_n = sae.normalise(x)
        pre = SparsePreacts(x_n, sae.W_enc, sae.b_enc, sae.b_dec)
        n, m = pre.detached.shape
        values, flat, _ = kernel_variants.batchtopk_select_candidates(
            pre.detached, args.k, 4 * args.k
        )
        token = torch.div(flat, m, rounding_mode="floor")
        layout = CodeLayout(token, flat - token * m, n, m)
        code = SparseCode(
            torch.relu(pre.attach(values, layout)), layout.latent, token, n, m, layout
        )
        return x_n, code, sae.decode_n(code)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            latents, loss = forward_loss()
        loss.backward()
        sae.remove_parallel_grad_()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sae.normalize_decoder_()
        if activation == "batchtopk":
            sae.activation.update_threshold(batch_min_positive(latents))

    def forward_loss():
        if variant == "fast-cand":
            x_n, latents, x_hat_n = candidate_forward()
            loss = ((x_n - x_hat_n) ** 2).sum(-1).mean()
        else:
            out = sae(x)
            latents = out.latents
            if variant.startswith("fast-dense"):
                loss = Reconstruction()(TermInputs(sae, out, dead, lam, None))
                loss = loss + kernel_variants.auxk_loss_dense_columns(
                    out.encoding.preacts,
                    out.x_n - out.x_hat_n,
                    sae.W_dec,
                    dead,
                    n_cols=aux_cols,
                )
            else:
                inputs = TermInputs(sae, out, dead, lam, None)
                loss = sum(term(inputs) for term in terms)
        return latents, loss

    return step


# ------------------------------------------------------------ other libraries (in .benchenv)


def _sparsify_step(args, activation: str, auxk: bool):
    from sparsify import SparseCoder, SparseCoderConfig

    x, dead = _make_data(args)
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


def _saelens_step(args, activation: str, auxk: bool):
    import sae_lens

    x, dead = _make_data(args)
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
    auxk = auxk == "auxk"
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
    # (library, variant, activation, auxk)
    ("saekit", "roofline", "topk", "noaux"),
    ("saekit", "reference", "topk", "noaux"),
    ("saekit", "fast", "topk", "noaux"),
    ("sparsify", "-", "topk", "noaux"),
    ("saelens", "-", "topk", "noaux"),
    ("saekit", "reference", "topk", "auxk"),
    ("saekit", "fast", "topk", "auxk"),
    ("saekit", "fast-dense", "topk", "auxk"),
    ("saekit", "fast-dense-cols", "topk", "auxk"),
    ("sparsify", "-", "topk", "auxk"),
    ("saelens", "-", "topk", "auxk"),
    ("saekit", "roofline", "batchtopk", "noaux"),
    ("saekit", "reference", "batchtopk", "noaux"),
    ("saekit", "fast", "batchtopk", "noaux"),
    ("saekit", "fast-cand", "batchtopk", "noaux"),
    ("saelens", "-", "batchtopk", "noaux"),
]


def _run_worker(args, config: tuple[str, ...]) -> dict | str:
    library = config[0]
    if library == "saekit":
        python = sys.executable
    elif BENCHENV_PY.exists():
        python = str(BENCHENV_PY)
    else:
        return "not installed (.benchenv missing)"
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
        "| library | path | activation | AuxK | tokens/s | × roofline (roofline tok/s) "
        "| peak RSS MiB | step peak MiB |"
    )
    print("|---|---|---|---|---:|---:|---:|---:|")
    for config in CONFIGS:
        library, variant, activation, auxk = config
        if only and library not in only:
            continue
        result = _run_worker(args, config)
        label = f"| {library} | {variant} | {activation} | {'on' if auxk == 'auxk' else 'off'} |"
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
