"""Transcoders on the synthetic ground truth: how well the true sparse map is recovered.

    python benchmarks/bench_transcoder.py [--steps N] [--threads T]

Data (saekit.data.synthetic.generator with ``d_out``): x = Σ c_i f_i + μ + noise (F features in d
dims), target y = Σ c_i g_i + ν + noise (+ x Aᵀ with ``skip_strength``), g_i known unit output
directions. Each row trains one dictionary through the run driver (``saekit train``'s path) and
reports the held-out FVU of the target, L0, dead share, and the recovery of the true map: MCC
(Hungarian mean |cos| between decoder rows and the g_i), the share of g_i with a decoder row at
|cos| > 0.9, and the MCC of the random decoder it started from (the chance level). Rows:
an SAE on x alone (its truth: the f_i) for comparison; a TopK transcoder; a TopK
skip-transcoder on the same data; both again on data with a dense linear part (skip 1.0).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from saekit.data.synthetic.generator import SyntheticData
from saekit.eval.ground_truth import recovery
from saekit.train.config import build_run_config
from saekit.train.member import Member
from saekit.train.run import run_training

SYNTH = {"d": 32, "n_features": 64, "mean_l0": 3.0, "seed": 0}


def one_row(name: str, synthetic: dict, sae: dict, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        raw = {
            "data": {"source": "synthetic", "synthetic": synthetic},
            "saes": [{"name": "dict", "sae": sae, "lr": 3e-3, "dead_tokens": 50_000}],
            "batch_size": 256,
            "steps": steps,
            "eval_tokens": 16_384,
            "checkpoint_every": 0,
            "progress": False,
            "out_dir": out,
        }
        cfg = build_run_config(raw)
        data = SyntheticData(cfg.data.synthetic, cfg.seed)
        chance = recovery(data.directions, Member(cfg.saes[0], 1, "cpu").sae.W_dec).mcc
        start = time.perf_counter()
        trainer, (report,) = run_training(cfg)
        seconds = time.perf_counter() - start
    return {**report.to_json(), "name": name, "chance": chance, "seconds": seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    topk = {"d_sae": 128, "activation": {"kind": "topk", "k": 3}}
    paired = {**SYNTH, "d_out": 24}
    rows = [
        one_row("SAE on x (truth f)", SYNTH, topk, args.steps),
        one_row("transcoder", paired, topk, args.steps),
        one_row("skip-transcoder", paired, {**topk, "skip": True}, args.steps),
        one_row("transcoder, skip 1.0", {**paired, "skip_strength": 1.0}, topk, args.steps),
        one_row(
            "skip-transcoder, skip 1.0",
            {**paired, "skip_strength": 1.0},
            {**topk, "skip": True},
            args.steps,
        ),
    ]
    print(f"d = {SYNTH['d']}, F = {SYNTH['n_features']}, true L0 = {SYNTH['mean_l0']}, d_out = 24,")
    print(f"M = 128, TopK k = 3, {args.steps} steps of 256 tokens, lr 3e-3\n")
    print("| dictionary | FVU (target) | L0 | dead | MCC | share > 0.9 | chance MCC | s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['name']} | {r['fvu']:.3f} | {r['l0']:.2f} | {r['dead_fraction']:.1%} | "
            f"{r['mcc']:.3f} | {r['recovered_share']:.1%} | {r['chance']:.3f} | "
            f"{r['seconds']:.0f} |"
        )


if __name__ == "__main__":
    main()
