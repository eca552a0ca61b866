"""FVU of a trained HierarchicalTopK SAE at every k' ≤ K, against a TopK SAE of the same run
trained at K (its latents cut to their k' largest): the "usable at any k'" claim, measured.

    python benchmarks/htopk_prefixes.py RUN_DIR [--tokens 65536]

RUN_DIR: a `saekit sweep` run directory (holds htopk-*/ and topk-*/ and config.yaml). Prints a
markdown table; the held-out batches are the run's own evaluation batches.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from saekit.eval.metrics import MetricAccumulator
from saekit.model.sae import SAE
from saekit.train.config import build_run_config, make_source
from saekit.train.config_files import load_config_file


def fvu_at(sae: SAE, batches: list[torch.Tensor], k_prime: int, cut: bool) -> float:
    """FVU with k' latents per token: the SAE's own inference_k, or (cut) TopK's k' largest."""
    acc = MetricAccumulator(sae.cfg.d_in, sae.cfg.d_sae)
    with torch.no_grad():
        for x in batches:
            z = sae.encode(x)
            if cut:
                top = z.topk(k_prime, dim=-1)
                z = torch.zeros_like(z).scatter(-1, top.indices, top.values)
            acc.add(x, sae.decode(z), z)
    return float(acc.fvu())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run_dir", type=Path)
    p.add_argument("--tokens", type=int, default=65536)
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = build_run_config(load_config_file(args.run_dir / "config.yaml"))
    batches = [x for x, _ in make_source(cfg).eval_batches(args.tokens, cfg.batch_size)]
    htopk = SAE.load(next(args.run_dir.glob("htopk-*")))
    topk = SAE.load(next(args.run_dir.glob("topk-*")))
    print("| k' | HierarchicalTopK FVU | TopK (trained at K) cut to k' FVU |")
    print("| ---: | ---: | ---: |")
    for k_prime in range(1, htopk.cfg.activation.k + 1):
        htopk.activation.set_inference_k(k_prime)
        print(
            f"| {k_prime} | {fvu_at(htopk, batches, k_prime, cut=False):.4f} "
            f"| {fvu_at(topk, batches, k_prime, cut=True):.4f} |"
        )


if __name__ == "__main__":
    main()
