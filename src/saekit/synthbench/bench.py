"""`saekit bench synth`: the SynthSAEBench-16k table, trained and scored by saekit.

The published numbers (arXiv 2602.14687; SAELens docs "synth_sae_bench") are means over seeds
at SAE width 4,096, 200M samples, batch 1,024, lr 3e-4. ``full`` is that protocol (a GPU's
work); ``scaled`` is sized for 2 CPU cores (:func:`scaled_protocol` states the reduction).
"""

from __future__ import annotations

import math
import statistics
import tempfile
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from saekit.data.sources.synthbench import SynthBenchSource
from saekit.data.synthetic.synthbench_sampler import SynthBenchData
from saekit.data.synthetic.synthbench_world import SynthBenchConfig, synthsaebench_16k
from saekit.eval.calibrate import calibrate_batchtopk, threshold_set
from saekit.synthbench.metrics import SynthMetricAccumulator, SynthScores
from saekit.train.config import build_run_config
from saekit.train.trainer import Trainer

ARCHITECTURES = ("BatchTopK", "Matryoshka", "Matching Pursuit", "Standard L1", "JumpReLU")
MATCHING_PURSUIT_KIND = "matching_pursuit"

PUBLISHED: dict[str, dict[int, dict[str, float]]] = {
    # arXiv 2602.14687, SynthSAEBench-16k: F1, MCC, uniqueness (L0 = 25 only), EV
    "BatchTopK": {25: dict(f1=0.732, mcc=0.757, uniqueness=0.984, ev=0.792),
                  20: dict(f1=0.818, mcc=0.753, ev=0.789)},
    "Matryoshka": {25: dict(f1=0.879, mcc=0.793, uniqueness=0.999, ev=0.779),
                   20: dict(f1=0.860, mcc=0.746, ev=0.770)},
    "Matching Pursuit": {25: dict(f1=0.446, mcc=0.693, uniqueness=0.828, ev=0.835),
                         20: dict(f1=0.444, mcc=0.675, ev=0.827)},
    "Standard L1": {25: dict(f1=0.556, mcc=0.604, uniqueness=0.898, ev=0.765),
                    20: dict(f1=0.578, mcc=0.583, ev=0.750)},
    "JumpReLU": {25: dict(f1=0.732, mcc=0.753, uniqueness=0.989, ev=0.795),
                 20: dict(f1=0.824, mcc=0.743, ev=0.791)},
}  # fmt: skip


@dataclass
class Protocol:
    name: str
    world: SynthBenchConfig
    d_sae: int
    samples: int
    batch_size: int
    lr: float
    l0: dict[int, int]
    """Published L0 → the k (or target L0) trained here."""
    eval_tokens: int
    dead_tokens: int


def full_protocol() -> Protocol:
    """The paper's: the 16k world, width 4,096, 200M samples, batch 1,024, lr 3e-4."""
    return Protocol("full", synthsaebench_16k(), 4096, 200_000_000, 1024, 3e-4,
                    {20: 20, 25: 25}, 500_000, 10_000_000)  # fmt: skip


def scaled_protocol() -> Protocol:
    """Everything but the shape's ratios shrunk so 10 SAEs train in minutes on 2 cores.

    Features 16,384 → 2,048 and d 768 → 96 (F/d and width/F kept: 21.3 and 1/4), 32 trees of
    branching 4 and depth 2 (10,880 → 672 tree features), width 512; 1M samples at batch 1,024
    with lr 3e-3 (0.5% of the samples, so a 10× larger step). The true L0 falls from 34.5 to 14.8,
    so the trained L0s are scaled with it: published L0 20 → 9, 25 → 11 (the SAE : true L0
    ratio 0.58 / 0.72 becomes 0.61 / 0.74). Orthogonalisation, magnitudes, Zipf and copula
    settings unchanged.
    """
    world = replace(synthsaebench_16k(), n_features=2048, d=96, n_roots=32, depth=2)
    return Protocol("scaled", world, 512, 1_000_000, 1024, 3e-3, {20: 9, 25: 11}, 32_768, 200_000)


def default_threads() -> tuple[int, str]:
    """(torch threads for a bench process, why): 1 on CPU, where one thread per SAE process ran
    faster than torch's default on the 2-core machine (BENCHMARKS.md, "bench synth threads");
    0 (torch's default) with a GPU, where the CPU only samples the world."""
    if torch.cuda.is_available():
        return 0, f"torch's default ({torch.get_num_threads()}): the SAEs train on the GPU"
    return 1, "1 per SAE process (faster on CPU than torch's default: BENCHMARKS.md)"


def member_entry(arch: str, k: int, protocol: Protocol, seed: int) -> dict[str, Any]:
    """One ``saes`` entry of a run config for an architecture at L0 ``k``."""
    base = {"lr": protocol.lr, "seed": seed, "dead_tokens": protocol.dead_tokens,
            "name": f"{arch.replace(' ', '_')}-L0_{k}"}  # fmt: skip
    batchtopk = {"d_sae": protocol.d_sae, "activation": {"kind": "batchtopk", "k": k}}
    if arch == "BatchTopK":
        return {**base, "sae": batchtopk}
    if arch == "Matryoshka":
        return {**base, "sae": batchtopk, "matryoshka": {"kind": "random", "n_prefixes": 10}}
    if arch == "Matching Pursuit":
        return {**base, "sae": {"d_sae": protocol.d_sae,
                                "activation": {"kind": MATCHING_PURSUIT_KIND, "k": k}}}  # fmt: skip
    if arch == "Standard L1":
        penalty = {"kind": "l1", "coefficient": 0.05, "target_l0": float(k),
                   "controller_rate": 0.05}  # fmt: skip
        return {**base, "sae": {"d_sae": protocol.d_sae, "activation": "relu"},
                "penalty": penalty}  # fmt: skip
    if arch == "JumpReLU":
        penalty = {"kind": "l0", "coefficient": 0.3, "target_l0": float(k),
                   "controller_rate": 0.02}  # fmt: skip
        act = {"kind": "jumprelu", "init_threshold": 0.5, "bandwidth": 0.1}
        return {**base, "sae": {"d_sae": protocol.d_sae, "activation": act},
                "penalty": penalty, "revival": "none"}  # fmt: skip
    raise ValueError(f"unknown architecture {arch!r}; one of {ARCHITECTURES}")


def eval_set(data: SynthBenchData, n_tokens: int, batch_size: int = 4096) -> list:
    """Held-out (x, coefficients) batches, drawn once and shared by every SAE scored on them."""
    return list(SynthBenchSource(data, batch_size).eval_batches(n_tokens, batch_size))


@torch.no_grad()
def score(sae, data: SynthBenchData, held_out: list) -> SynthScores:
    """The SynthSAEBench metrics on held-out batches (BatchTopK at its calibrated threshold)."""
    sae = sae.eval()
    device = sae.W_dec.device
    threshold = None
    if sae.activation.calibrated_threshold:
        n_tokens = sum(x.shape[0] for x, _ in held_out)
        xs = (x.to(device) for x, _ in held_out)
        threshold = calibrate_batchtopk(sae, xs, n_tokens, apply=False).threshold
    acc = SynthMetricAccumulator(sae.W_dec, data.directions)
    with threshold_set(sae, threshold):
        for x, coefficients in held_out:
            x = x.to(device)
            z = sae.encode(x)
            acc.add(x, sae.decode(z), z, coefficients)
    return acc.result()


def train_seed(
    protocol: Protocol, archs: list[str], seed: int, threads: int = 0, world=None
) -> dict[tuple[str, int], SynthScores]:
    """Train every (architecture, L0) on one stream; score each."""
    data = SynthBenchData(protocol.world, stream_seed=seed, world=world)
    entries = [member_entry(a, k, protocol, seed) for a in archs
               for k in protocol.l0.values()]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="saekit-synth-") as out:
        cfg = build_run_config({
            "data": {"source": "synthbench", "synthbench": asdict(protocol.world)},
            "saes": entries, "batch_size": protocol.batch_size,
            "steps": math.ceil(protocol.samples / protocol.batch_size),
            "out_dir": out, "progress": False, "threads": threads,
            "checkpoint_every": 0, "seed": seed,
            "device": "cuda" if torch.cuda.is_available() else "cpu",
        })  # fmt: skip
        if threads:
            torch.set_num_threads(threads)
        trainer = Trainer(cfg, SynthBenchSource(data, protocol.batch_size))
        trainer.fit()
    by_k = {k: label for label, k in protocol.l0.items()}
    held_out = eval_set(data, protocol.eval_tokens)
    results = {}
    for member, entry in zip(trainer.members, entries, strict=True):
        arch = entry["name"].rsplit("-L0_", 1)[0].replace("_", " ")
        k = int(entry["name"].rsplit("-L0_", 1)[1])
        results[arch, by_k[k]] = score(member.sae, data, held_out)
    return results


def mean_spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def format_table(protocol: Protocol, runs: list[dict[tuple[str, int], SynthScores]]) -> str:
    """Markdown: saekit's mean ± std over seeds beside the published value, per metric."""
    lines = [
        f"protocol {protocol.name}: {len(runs)} seed(s); published = arXiv 2602.14687 "
        "(SynthSAEBench-16k, width 4096, 200M samples)",
        "",
        "| SAE | L0 (trained k) | F1 | MCC | uniqueness | EV | shrinkage | L0 measured |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arch in ARCHITECTURES:
        for label in sorted(protocol.l0, reverse=True):
            pub = PUBLISHED[arch][label]
            if (arch, label) not in runs[0]:  # not asked for (--arch)
                continue
            got = [r[arch, label] for r in runs]

            def cell(key, attr, got=got, pub=pub):
                ours = mean_spread([getattr(s, attr) for s in got])
                return f"{ours} ({pub[key]:.3f})" if key in pub else ours

            lines.append(
                f"| {arch} | {label} ({protocol.l0[label]}) | {cell('f1', 'f1')} | "
                f"{cell('mcc', 'mcc')} | {cell('uniqueness', 'uniqueness')} | "
                f"{cell('ev', 'explained_variance')} | {mean_spread([s.shrinkage for s in got])} "
                f"| {mean_spread([s.l0 for s in got])} |"
            )
    lines.append("")
    lines.append("Cells: saekit mean ± std over seeds (published value in brackets).")
    return "\n".join(lines)
