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
from saekit.synthbench.options import apply_option, option_lines, option_of
from saekit.train.config import build_run_config
from saekit.train.presets import SYNTHSAEBENCH_RECIPES, recipe_matryoshka
from saekit.train.trainer import Trainer

ARCHITECTURES = tuple(SYNTHSAEBENCH_RECIPES)
EVAL_BATCH = 4096
"""Held-out tokens per evaluation batch."""
MATCH_TOLERANCE = 0.05
"""A row is at matched L0 when every seed's L0 is within 5% of its target (issue 27)."""

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
    matryoshka_widths: tuple[int, ...] = (128, 512, 2048)
    """The fixed inner Matryoshka levels (the paper's at width 4,096)."""
    tuner_gain: float = 3e-4
    """K_i of the L1 and JumpReLU autotuner (the paper's 3e-4 over 195k steps)."""


def full_protocol() -> Protocol:
    """The paper's: the 16k world, width 4,096, 200M samples, batch 1,024, lr 3e-4."""
    return Protocol("full", synthsaebench_16k(), 4096, 200_000_000, 1024, 3e-4,
                    {20: 20, 25: 25}, 500_000)  # fmt: skip


def scaled_protocol() -> Protocol:
    """Everything but the shape's ratios shrunk so 10 SAEs train in minutes on 2 cores.

    Features 16,384 → 2,048 and d 768 → 96 (F/d and width/F kept: 21.3 and 1/4), 32 trees of
    branching 4 and depth 2 (10,880 → 672 tree features), width 512; 1M samples at batch 1,024
    with lr 3e-3 (0.5% of the samples, so a 10× larger step). The true L0 falls from 34.5 to 14.8,
    so the trained L0s are scaled with it: published L0 20 → 9, 25 → 11 (the SAE : true L0
    ratio 0.58 / 0.72 becomes 0.61 / 0.74). Orthogonalisation, magnitudes, Zipf and copula
    settings unchanged. The recipes' fixed Matryoshka levels shrink with the width (128, 512,
    2048 of 4,096 → 16, 64, 256 of 512), and the autotuner's gain K_i grows with the step ratio
    (3e-4 · 195k / 977 ≈ 6e-2): the paper's gain moves λ by at most 0.03% a step (0.0003% while
    L0 moves toward the target), which over 977 steps cannot reach a target L0 from the
    starting λ. Even so its L1 and JumpReLU SAEs end off their target (BENCHMARKS.md): rows
    marked "not matched".
    """
    world = replace(synthsaebench_16k(), n_features=2048, d=96, n_roots=32, depth=2)
    return Protocol("scaled", world, 512, 1_000_000, 1024, 3e-3, {20: 9, 25: 11}, 32_768,
                    matryoshka_widths=(16, 64, 256), tuner_gain=6e-2)  # fmt: skip


def mid_protocol() -> Protocol:
    """Between the two, sized so one seed of the five architectures trains in about an hour on
    one CPU core, with the full world's hierarchy: 4,096 features in d = 256 (F/d 16 against the
    full world's 21.3), 32 trees of branching 4 and depth 3 as in the full world (2,720 tree
    features, 66% as there; the scaled world has 33% at depth 2), width 1,024 (F/4, as 4,096 of
    16,384), 2M samples (1% of the paper's) at batch 1,024 and lr 3e-3. Interference (mean max
    |cos| between feature directions) 0.227 against the full world's 0.145 and the scaled one's
    0.354; the true L0 falls from 34.5 to 16.0, so the trained L0s scale with it: published 20 →
    9, 25 → 12. Matryoshka levels 32, 128, 512 of 1,024 (the paper's 128, 512, 2048 of 4,096);
    the autotuner's gain grows with the step ratio (3e-4 · 195k / 1,954 ≈ 3e-2)."""
    world = replace(synthsaebench_16k(), n_features=4096, d=256, n_roots=32, depth=3)
    return Protocol("mid", world, 1024, 2_000_000, 1024, 3e-3, {20: 9, 25: 12}, 32_768,
                    matryoshka_widths=(32, 128, 512), tuner_gain=3e-2)  # fmt: skip


PROTOCOLS = {"full": full_protocol, "mid": mid_protocol, "scaled": scaled_protocol}


def default_threads() -> tuple[int, str]:
    """(torch threads for a bench process, why): 1 on CPU, where one thread per SAE process ran
    faster than torch's default on the 2-core machine (BENCHMARKS.md, "bench synth threads");
    0 (torch's default) with a GPU, where the CPU only samples the world."""
    if torch.cuda.is_available():
        return 0, f"torch's default ({torch.get_num_threads()}): the SAEs train on the GPU"
    return 1, "1 per SAE process (faster on CPU than torch's default: BENCHMARKS.md)"


def member_entry(arch: str, k: int, protocol: Protocol, seed: int) -> dict[str, Any]:
    """One ``saes`` entry of a run config: the paper's recipe for ``arch`` at L0 ``k``
    (saekit.train.presets.SYNTHSAEBENCH_RECIPES) at the protocol's width, length and lr; for
    "Matryoshka + NAME", the Matryoshka recipe with option NAME on (saekit.synthbench.options)."""
    option = option_of(arch)
    if option is not None:
        base = member_entry("Matryoshka", k, protocol, seed)
        return {**apply_option(option, base, k), "name": f"{arch.replace(' ', '_')}-L0_{k}"}
    if arch not in SYNTHSAEBENCH_RECIPES:
        raise ValueError(f"unknown architecture {arch!r}; one of {ARCHITECTURES}")
    steps = math.ceil(protocol.samples / protocol.batch_size)
    args = (protocol.d_sae, k, steps, protocol.batch_size, protocol.lr)
    if arch == "Matryoshka":
        entry = recipe_matryoshka(*args, widths=protocol.matryoshka_widths)
    else:
        entry = SYNTHSAEBENCH_RECIPES[arch](*args)
    if "penalty" in entry and entry["penalty"].get("controller") == "autotune":
        entry["penalty"]["controller_rate"] = protocol.tuner_gain
    return {**entry, "seed": seed, "name": f"{arch.replace(' ', '_')}-L0_{k}"}


def matched(l0s: list[float], target: float) -> bool:
    """Every seed's measured L0 within MATCH_TOLERANCE (5%) of the target: else the row is
    "not matched" and left out of the rankings."""
    return all(abs(l0 - target) <= MATCH_TOLERANCE * target for l0 in l0s)


def ranking(values: dict[str, float]) -> list[str]:
    """Architectures best first."""
    return sorted(values, key=lambda a: -values[a])


def spearman(ours: dict[str, float], theirs: dict[str, float]) -> float:
    """Rank correlation over the architectures both have (ties: average ranks)."""
    names = [a for a in ours if a in theirs]
    if len(names) < 2:
        return math.nan

    def ranks(v: dict[str, float]) -> list[float]:
        values = [v[a] for a in names]
        return [sum(1 for w in values if w > x) + (sum(1 for w in values if w == x) + 1) / 2
                for x in values]  # fmt: skip

    a, b = ranks(ours), ranks(theirs)
    ma, mb = statistics.mean(a), statistics.mean(b)
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b, strict=True))
    sa = math.sqrt(sum((x - ma) ** 2 for x in a))
    sb = math.sqrt(sum((y - mb) ** 2 for y in b))
    return cov / (sa * sb) if sa and sb else math.nan


def peer_job(protocol: Protocol, data: SynthBenchData, archs: list[str], seed: int) -> dict:
    """What another trainer needs to train on this seed's samples: the generator seed of every
    training batch and of every held-out batch with its size (saekit's indices:
    SyntheticSource), the width, length, lr and the recipes' protocol settings."""
    steps = math.ceil(protocol.samples / protocol.batch_size)
    sizes = [min(EVAL_BATCH, protocol.eval_tokens - i) for i in
             range(0, protocol.eval_tokens, EVAL_BATCH)]  # fmt: skip
    return {
        "train_seeds": [data.generator_seed(i) for i in range(steps)],
        "eval": [[data.generator_seed(SynthBenchSource.EVAL_INDEX + i), n]
                 for i, n in enumerate(sizes)],
        "archs": [[a, k] for a in archs for k in protocol.l0.values()],
        "batch_size": protocol.batch_size, "lr": protocol.lr, "d_sae": protocol.d_sae,
        "matryoshka_widths": list(protocol.matryoshka_widths),
        "tuner_gain": protocol.tuner_gain, "init_seed": seed,
    }  # fmt: skip


def eval_set(data: SynthBenchData, n_tokens: int, batch_size: int = EVAL_BATCH) -> list:
    """Held-out (x, coefficients) batches, drawn once and shared by every SAE scored on them."""
    return list(SynthBenchSource(data, batch_size).eval_batches(n_tokens, batch_size))


@torch.no_grad()
def calibrated(sae, held_out: list):
    """A context in which ``sae`` encodes as it is scored: BatchTopK at the threshold that gives
    L0 = k on the held-out tokens (its training threshold is an EMA and may give another L0);
    every other activation as it is."""
    sae = sae.eval()
    threshold = None
    if sae.activation.calibrated_threshold:
        n_tokens = sum(x.shape[0] for x, _ in held_out)

        def xs():  # fresh each call: an SAE with encoder steps calibrates in rounds
            return (x.to(sae.W_dec.device) for x, _ in held_out)

        threshold = calibrate_batchtopk(sae, xs, n_tokens, apply=False).threshold
    return threshold_set(sae, threshold)


@torch.no_grad()
def score(sae, data: SynthBenchData, held_out: list) -> SynthScores:
    """The SynthSAEBench metrics on held-out batches (BatchTopK at its calibrated threshold)."""
    sae = sae.eval()
    device = sae.W_dec.device
    acc = SynthMetricAccumulator(sae.W_dec, data.directions)
    with calibrated(sae, held_out):
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


def rows_of(protocol: Protocol, runs: list[dict[tuple[str, int], SynthScores]]) -> list[dict]:
    """Per (architecture, published L0) asked for: the seeds' scores and whether L0 matched."""
    rows = []
    options = sorted({a for a, _ in runs[0] if option_of(a) is not None})
    for arch in [*ARCHITECTURES, *options]:
        for label in sorted(protocol.l0, reverse=True):
            if (arch, label) not in runs[0]:  # not asked for (--arch)
                continue
            got = [r[arch, label] for r in runs]
            rows.append({"arch": arch, "label": label, "k": protocol.l0[label], "scores": got,
                         "matched": matched([s.l0 for s in got], protocol.l0[label])})  # fmt: skip
    return rows


def format_rankings(rows: list[dict], who: str) -> list[str]:
    """Per published L0: the matched architectures ordered by mean F1 and MCC, and their rank
    correlation with the published column (rows not at matched L0 are left out)."""
    lines = []
    for label in sorted({r["label"] for r in rows}, reverse=True):
        published = [r for r in rows if r["label"] == label and option_of(r["arch"]) is None]
        here = [r for r in published if r["matched"]]
        left_out = [r["arch"] for r in published if not r["matched"]]
        for metric, attr in (("f1", "f1"), ("mcc", "mcc")):
            ours = {r["arch"]: statistics.mean(getattr(s, attr) for s in r["scores"])
                    for r in here}  # fmt: skip
            pub = {a: PUBLISHED[a][label][metric] for a in ours}
            rho = spearman(ours, pub)
            lines.append(
                f"- {who}, L0 {label}, {metric.upper()}: {' > '.join(ranking(ours)) or '–'} "
                f"(published: {' > '.join(ranking(pub)) or '–'}; rank correlation "
                f"{rho:+.2f})" + (f"; not matched, left out: {', '.join(left_out)}"
                                  if left_out else "")
            )  # fmt: skip
    return lines


def format_table(
    protocol: Protocol,
    runs: list[dict[tuple[str, int], SynthScores]],
    peer: list[dict[tuple[str, int], SynthScores]] | None = None,
    peer_name: str = "SAELens",
) -> str:
    """Markdown: mean ± std over seeds beside the published value, per metric; with ``peer``
    (another trainer's scores on the same world and samples) both rows per architecture. A row
    whose L0 is not within 5% of its target is marked and left out of the rankings."""
    seeds = f"{len(runs)} seed(s)"
    if peer is not None and len(peer) != len(runs):  # --from-json: a file without the peer
        seeds += f" ({peer_name}: {len(peer)})"
    lines = [
        f"protocol {protocol.name}: {seeds}; published = arXiv 2602.14687 "
        "(SynthSAEBench-16k, width 4096, 200M samples)",
        "",
        "| SAE | trainer | L0 (trained k) | F1 | MCC | uniqueness | EV | shrinkage | L0 measured "
        "| dead |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    trainers = [("saekit", rows_of(protocol, runs))]
    if peer is not None:
        trainers.append((peer_name, rows_of(protocol, peer)))
    for first in trainers[0][1]:  # each row, then its peer's on the same (arch, L0)
        for who, rows in trainers:
            r = next(
                (r for r in rows if (r["arch"], r["label"]) == (first["arch"], first["label"])),
                None,
            )
            if r is None:  # an option row: saekit's only
                continue
            pub, got = PUBLISHED.get(r["arch"], {}).get(r["label"], {}), r["scores"]

            def cell(key, attr, got=got, pub=pub):
                ours = mean_spread([getattr(s, attr) for s in got])
                return f"{ours} ({pub[key]:.3f})" if key in pub else ours

            l0 = mean_spread([s.l0 for s in got]) + ("" if r["matched"] else " not matched")
            lines.append(
                f"| {r['arch']} | {who} | {r['label']} ({r['k']}) | {cell('f1', 'f1')} | "
                f"{cell('mcc', 'mcc')} | {cell('uniqueness', 'uniqueness')} | "
                f"{cell('ev', 'explained_variance')} | {mean_spread([s.shrinkage for s in got])} "
                f"| {l0} | {mean_spread([float(s.dead) for s in got])} |"
            )
    lines += ["", "Cells: mean ± std over seeds (published value in brackets). Matched L0: every "
              "seed within 5% of the trained k; rows not matched are left out of the rankings:",
              ""]  # fmt: skip
    for who, rows in trainers:
        lines += format_rankings(rows, who)
    options = option_lines(trainers[0][1])
    if options:
        lines += ["", "Options (item 5; differences paired by seed, mean ± std):", "", *options]
    return "\n".join(lines)
