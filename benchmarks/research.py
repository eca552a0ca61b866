"""`saekit bench research [--seeds N] [--from-json FILE]`: writes docs/research.md and its plots.

Trains the experiments of research_runs.py (or reloads their raw results with --from-json) and
writes the report: the three open questions of the references, each with its experiment, a
table of mean ± std over seeds and a PNG under docs/research/.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import research_runs as runs  # noqa: E402

from saekit.data.synthetic.synthbench_world import SynthBenchWorld  # noqa: E402
from saekit.eval.revived import CLASSES  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def ms(values: list[float], fmt: str = "{:.3f}") -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return fmt.format(values[0])
    spread = fmt.replace("+", "").format(statistics.stdev(values))
    return f"{fmt.format(statistics.mean(values))} ± {spread}"


def seeds_of(results: dict, part: str) -> str:
    """ "N (a, b, ...)": the seeds an experiment's rows hold."""
    seeds = sorted({r["seed"] for r in results[part]})
    return f"{len(seeds)} ({', '.join(map(str, seeds))})"


def pick(rows, **where):
    return [r for r in rows if all(r[k] == v for k, v in where.items())]


def q1_section(rows: list[dict], plots: Path) -> list[str]:
    lines = ["| BOS share | k | TopK FVU | BatchTopK FVU | BatchTopK − TopK (per seed) |",
             "|---|---|---|---|---|"]  # fmt: skip
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for sae in ("topk", "batchtopk"):
        means = [statistics.mean(r["fvu"] for r in pick(rows, bos_share=s, sae=sae))
                 for s in runs.BOS_SHARES]  # fmt: skip
        ax.plot(runs.BOS_SHARES, means, marker="o", label=sae)
    for share in runs.BOS_SHARES:
        top, bat = (
            pick(rows, bos_share=share, sae="topk"),
            pick(rows, bos_share=share, sae="batchtopk"),
        )
        diffs = [b["fvu"] - t["fvu"] for t, b in zip(top, bat, strict=True)]
        lines.append(f"| {share} | {top[0]['k']} | {ms([r['fvu'] for r in top])} | "
                     f"{ms([r['fvu'] for r in bat])} | {ms(diffs, '{:+.3f}')} |")  # fmt: skip
    ax.set_xlabel("share of BOS-like (empty) tokens")
    ax.set_ylabel("held-out FVU (mean over seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(plots / "q1_batchtopk_vs_topk.png", dpi=110)
    plt.close(fig)
    lines.append("")
    lines.append("![FVU against BOS share](research/q1_batchtopk_vs_topk.png)")
    return lines


def q2_section(rows: list[dict], plots: Path) -> list[str]:
    lines = ["| SAE | L0 | absorption | F1 | MCC | FVU |", "|---|---|---|---|---|---|"]
    names = ("topk", "batchtopk", "matryoshka")
    for sae in names:
        r = pick(rows, bos_share=0.0, sae=sae)
        lines.append(f"| {sae} | {ms([x['l0'] for x in r], '{:.2f}')} | "
                     f"{ms([x['absorption'] for x in r], '{:.1%}')} | "
                     f"{ms([x['f1'] for x in r])} | {ms([x['mcc'] for x in r])} | "
                     f"{ms([x['fvu'] for x in r])} |")  # fmt: skip
    for a, b in (("matryoshka", "batchtopk"), ("batchtopk", "topk")):
        pairs = zip(pick(rows, bos_share=0.0, sae=a), pick(rows, bos_share=0.0, sae=b),
                    strict=True)  # fmt: skip
        diffs = [x["absorption"] - y["absorption"] for x, y in pairs]
        lines.append(f"| {a} − {b} (per seed) | | {ms(diffs, '{:+.1%}')} | | | |")
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for i, sae in enumerate(names):
        vals = [x["absorption"] for x in pick(rows, bos_share=0.0, sae=sae)]
        ax.bar(i, statistics.mean(vals), yerr=statistics.stdev(vals) if len(vals) > 1 else 0)
        ax.scatter([i] * len(vals), vals, color="k", s=10, zorder=3)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("absorption rate")
    fig.tight_layout()
    fig.savefig(plots / "q2_absorption.png", dpi=110)
    plt.close(fig)
    return [*lines, "", "![absorption per SAE](research/q2_absorption.png)"]


def q3_section(rows: list[dict], plots: Path, name: str = "q3_revived") -> list[str]:
    head = "| revival | dead at 40% | revived | dead at end | " + " | ".join(CLASSES)
    lines = [head + " | F1 | MCC | uniqueness | FVU |", "|---" * (8 + len(CLASSES)) + "|"]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    labels = list(runs.REVIVALS)
    bottom = [0.0] * len(labels)
    for c in CLASSES:
        heights = [statistics.mean(r["n_classes"].get(c, 0) for r in pick(rows, revival=lab))
                   for lab in labels]  # fmt: skip
        ax.bar(range(len(labels)), heights, bottom=bottom, label=c)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    for lab in labels:
        r = pick(rows, revival=lab)
        cells = [ms([x["classes"][c] for x in r], "{:.0%}") for c in CLASSES]
        counts = [ms([x[key] for x in r], "{:.0f}")
                  for key in ("dead_at_snapshot", "revived", "dead_at_end")]  # fmt: skip
        scores = [ms([x[key] for x in r]) for key in ("f1", "mcc", "uniqueness", "fvu")]
        lines.append("| " + " | ".join([lab, *counts, *cells, *scores]) + " |")
    ax.set_xticks(range(len(labels)), labels, rotation=20, fontsize=8)
    ax.set_ylabel("revived latents (mean over seeds)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(plots / f"{name}.png", dpi=110)
    plt.close(fig)
    return [*lines, "", f"![what revived latents became](research/{name}.png)"]


def write_report(results: dict, out: Path, commentary: Path | None) -> None:
    plots = out.parent / "research"
    plots.mkdir(parents=True, exist_ok=True)
    w = runs.WORLD
    text = [
        "# Three open questions, answered with numbers",
        "",
        "Generated by `saekit bench research` (benchmarks/research.py; raw results in "
        "docs/research.json). Data: a small SynthSAEBench world "
        "(saekit.data.synthetic.synthbench_world: "
        f"{w.n_features} features in d = {w.d}, {w.n_roots} trees of branching {w.branching} and "
        f"depth {w.depth}, mutual exclusion, v2 child scaling, low-rank correlation rank "
        f"{w.correlation_rank}); {runs.STEPS} steps of batch {runs.BATCH}, lr {runs.LR}; "
        f"seeds: {seeds_of(results, 'q1q2')} for questions 1 and 2, "
        f"{seeds_of(results, 'q3')} for question 3; cells are "
        "mean ± std (sample standard deviation) over seeds as measured, held-out metrics on "
        f"{runs.EVAL_TOKENS} tokens. k = the world's true L0 (rounded).",
        "",
        "## 1. Does BatchTopK beat TopK at equal L0, and why?",
        "",
        *q1_section(results["q1q2"], plots),
        "",
        "## 2. Does Matryoshka reduce absorption?",
        "",
        *q2_section(results["q1q2"], plots),
        "",
        "## 3. Residual peeking: what do revived latents become?",
        "",
        f"TopK (k = true L0) with {runs.Q3_D_SAE} latents, {runs.Q3_STEPS} steps, dead after "
        f"{runs.Q3_DEAD_TOKENS} tokens without firing. Latents rarely died on their own in runs "
        f"this short (0 of {runs.Q3_D_SAE} at 40% of training, every seed, even at 768 "
        f"latents), so at 40% a random {runs.Q3_KILLED:.0%} of the latents (the same for every "
        "signal) are killed: fresh random decoder rows, random encoder rows of the median "
        "norm, b_enc = 0, counters set to dead. Killed and alive at the end = revived; "
        "classes as in saekit.eval.revived (feature: |cos| ≥ 0.8 with a true feature no live "
        "latent had; duplicate: one a live latent had; error: |cos| ≥ 0.5 with a live latent's "
        "mean residual at the snapshot; composite: within 0.9 of the span of its 3 best "
        "features). Class cells: share of the revived latents.",
        "",
        "Soft kill (b_enc = 0):",
        "",
        *q3_section(results["q3"], plots),
        "",
        "Hard kill (b_enc = −3 × the RMS of the killed latents' pre-activations, so they fire "
        "only if a signal raises them):",
        "",
        *q3_section(results["q3hard"], plots, "q3_revived_hard"),
        "",
    ]
    if commentary is not None and commentary.is_file():
        text += [commentary.read_text()]
    out.write_text("\n".join(text))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="saekit bench research", description=__doc__)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "docs" / "research.md"))
    p.add_argument("--json", default=str(ROOT / "docs" / "research.json"))
    p.add_argument("--from-json", action="store_true", help="rebuild the report, no training")
    p.add_argument(
        "--commentary",
        default=str(ROOT / "docs" / "research_findings.md"),
        help="markdown appended to the report (the discussion of the numbers)",
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--parts",
        default="q1q2,q3",
        help="experiments to train; the others are reloaded from --json",
    )
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    path = Path(args.json)
    if args.from_json:
        results = json.loads(path.read_text())
    else:
        parts = args.parts.split(",")
        old = json.loads(path.read_text()) if path.is_file() else {}
        results = {"seeds": [], **{part: [] if part in parts else old.get(part, [])
                                   for part in ("q1q2", "q3", "q3hard")}}  # fmt: skip
        start = time.time()
        world = SynthBenchWorld(runs.world_cfg())  # the world; BOS share only changes draws
        for seed in range(args.seeds):
            if "q1q2" in parts:
                results["q1q2"] += runs.q1_q2_seed(seed, world)
            if "q3" in parts:
                results["q3"] += runs.q3_seed(seed, world)
            if "q3hard" in parts:
                results["q3hard"] += runs.q3_seed(seed, world, hard=True)
            results["seeds"].append(seed)
            path.write_text(json.dumps(results, indent=1))
            print(f"seed {seed} done after {time.time() - start:.0f} s", flush=True)
    write_report(results, Path(args.out), Path(args.commentary))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
