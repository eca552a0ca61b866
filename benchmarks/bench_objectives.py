"""Full training-step cost of the objectives on CPU; prints a markdown table.

    python benchmarks/bench_objectives.py [--small] [--steps N]

One step = forward, loss, backward, Adam step (TopK decoder rows kept at unit norm). Variants:
plain TopK; TopK + AuxK with half the latents dead; Matryoshka-TopK with 10 sampled prefixes in
the sparse form. Each step is what the trainer runs: SAE.forward, the loss, backward, fused Adam.
Issue 3 targets: Matryoshka ≤ 1.3× and AuxK ≤ 1.25× the plain TopK step.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from saekit.model.config import SAEConfig
from saekit.model.sae import SAE
from saekit.objective.config import AuxKRevival
from saekit.objective.matryoshka import sample_prefixes
from saekit.objective.terms import AuxK, Reconstruction, TermInputs


def make_step(sae: SAE, variant: str, n_prefixes: int) -> Callable[[torch.Tensor], None]:
    """The trainer's step with the library's objective terms (saekit.objective.terms)."""
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)  # as the trainer
    d_sae = sae.cfg.d_sae
    dead_mask = torch.zeros(d_sae, dtype=torch.bool)
    dead_mask[::2] = True  # half the latents dead
    gen = torch.Generator().manual_seed(0)
    terms = [Reconstruction()] + ([AuxK(AuxKRevival())] if variant == "auxk" else [])
    lam = torch.zeros(())

    def step(x: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        out = sae(x)
        prefixes = None
        if variant == "matryoshka":
            prefixes = sample_prefixes(d_sae, n_prefixes, min_prefix=16, generator=gen)
        inputs = TermInputs(sae, out, dead_mask, lam, prefixes)
        loss = sum(term(inputs) for term in terms)
        loss.backward()
        sae.remove_parallel_grad_()
        opt.step()
        sae.normalize_decoder_()

    return step


def time_variant(variant: str, d: int, d_sae: int, k: int, n_tokens: int, steps: int) -> float:
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d, d_sae, {"kind": "topk", "k": k}))
    data = torch.randn(n_tokens, d) * 3 + 1
    sae.init_from_data(data)
    step = make_step(sae, variant, n_prefixes=10)
    step(data)  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step(data)
    return (time.perf_counter() - start) / steps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="d=256, M=4096, 2048 tokens")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    d, d_sae, n_tokens = (256, 4096, 2048) if args.small else (512, 8192, 4096)
    k = 32
    print(
        f"d={d}, M={d_sae}, k={k}, batch={n_tokens} tokens, {args.threads} threads, "
        f"{args.steps} steps, torch {torch.__version__}\n"
    )
    rows = [
        ("TopK", "topk"),
        ("TopK + AuxK (half dead, k_aux=d/2)", "auxk"),
        ("Matryoshka-TopK (10 prefixes, sparse)", "matryoshka"),
    ]
    times = {v: time_variant(v, d, d_sae, k, n_tokens, args.steps) for _, v in rows}
    print("| step | ms/step | tokens/s | × TopK |")
    print("|---|---:|---:|---:|")
    for label, v in rows:
        t = times[v]
        print(f"| {label} | {t * 1e3:.0f} | {n_tokens / t:,.0f} | {t / times['topk']:.2f} |")


if __name__ == "__main__":
    main()
