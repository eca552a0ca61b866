"""Issue 27, item 5: the 2026 SynthSAEBench-16k improvements as saekit options, each one change
to the paper's Matryoshka recipe (saekit.train.presets.recipe_matryoshka), trained by
`saekit bench synth --option NAME` beside the published-recipe rows on the same stream and
scored the same way. A row is named "Matryoshka + NAME"; its difference to the Matryoshka row
is paired by seed (both trained on one seed's batches), which is what :func:`option_lines`
reports, with the best matched published-recipe row for reference.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

BASE = "Matryoshka"
"""The published recipe the options modify: the paper's best row."""
SEPARATOR = " + "


@dataclass(frozen=True)
class Option:
    what: str
    """The configuration change, as a run YAML writes it."""
    source: str
    """Where the idea comes from, and why it should help."""
    apply: Callable[[dict, int], dict]
    """(the recipe's ``saes`` entry, the trained k) → the entry with the option on."""


def decreasing_k(k: int, n_levels: int) -> list[int]:
    """k_j = ⌈k·j/P⌉ for levels j = 1..P (the last is k): a level of fewer latents reconstructs
    from fewer of them, in proportion to its position (the 2026 results give no schedule; this
    linear one is saekit's choice, stated in BENCHMARKS.md)."""
    return [max(1, -(-k * j // n_levels)) for j in range(1, n_levels + 1)]


def _with(section: str, **fields) -> Callable[[dict, int], dict]:
    def apply(entry: dict, k: int) -> dict:
        del k
        return {**entry, section: {**entry.get(section, {}), **fields}}

    return apply


def _decreasing_k(entry: dict, k: int) -> dict:
    levels = len(entry["matryoshka"]["groups"])
    return {**entry, "matryoshka": {**entry["matryoshka"], "level_k": decreasing_k(k, levels)}}


OPTIONS: dict[str, Option] = {
    "lista": Option(
        "sae.encoder_steps: 2",
        "LISTA (Gregor & LeCun 2010): one more ISTA step with the learned encoder, "
        "c ← act(c + (x − x̂(c)) W_encᵀ + b_enc), so a latent's code sees what the others "
        "already explain",
        _with("sae", encoder_steps=2),
    ),
    "decreasing-k": Option(
        "matryoshka.level_k: ⌈k·j/P⌉ per level (decreasing_k)",
        "level j reconstructs from its k_j largest activations, so an inner level cannot "
        "spend the outer levels' budget on the features it should leave to them",
        _decreasing_k,
    ),
    "detached": Option(
        "matryoshka.detach_inner: true",
        "outer levels' losses see the inner levels' reconstruction without a gradient "
        "into it, so they cannot pull inner latents toward absorbing outer features",
        _with("matryoshka", detach_inner=True),
    ),
    "tilted": Option(
        "reconstruction_tilt: 1.0",
        "tilted ERM (Li et al. 2021, arXiv 2007.01162): the worst-reconstructed tokens "
        "weigh more, which are those carrying rare features",
        lambda entry, k: {**entry, "reconstruction_tilt": 1.0},
    ),
    "freq-sorted": Option(
        "matryoshka.sort_every: 100",
        "every 100 steps the latents are reordered by firing frequency, so the most "
        "frequent (general) features sit in the innermost levels",
        _with("matryoshka", sort_every=100),
    ),
}


def label(name: str) -> str:
    """The row's architecture name: "Matryoshka + NAME"."""
    return f"{BASE}{SEPARATOR}{name}"


def option_of(arch: str) -> str | None:
    """NAME of a "Matryoshka + NAME" row, None for a published architecture."""
    base, sep, name = arch.partition(SEPARATOR)
    if not sep:
        return None
    if base != BASE or name not in OPTIONS:
        raise ValueError(f"unknown option row {arch!r}; options: {', '.join(OPTIONS)}")
    return name


def apply_option(name: str, entry: dict, k: int) -> dict:
    return OPTIONS[name].apply(entry, k)


def _paired(option: list[float], base: list[float]) -> str:
    diffs = [a - b for a, b in zip(option, base, strict=True)]
    if len(diffs) == 1:
        return f"{diffs[0]:+.3f}"
    return f"{statistics.mean(diffs):+.3f} ± {statistics.stdev(diffs):.3f}"


def option_lines(rows: list[dict]) -> list[str]:
    """Per option row: its F1 and MCC minus the Matryoshka row's, paired by seed (mean ± std of
    the differences), and its mean F1 against the best matched published-recipe row's."""
    lines = []
    for r in rows:
        name = option_of(r["arch"])
        if name is None:
            continue
        here = [b for b in rows if b["label"] == r["label"]]
        base = next((b for b in here if b["arch"] == BASE), None)
        published = [b for b in here if option_of(b["arch"]) is None and b["matched"]]
        best = max(published, key=lambda b: statistics.mean(s.f1 for s in b["scores"]),
                   default=None)  # fmt: skip
        parts = [f"- {r['arch']} (`{OPTIONS[name].what}`), L0 {r['label']}:"]
        if base is not None:
            for metric in ("f1", "mcc"):
                mine = [getattr(s, metric) for s in r["scores"]]
                theirs = [getattr(s, metric) for s in base["scores"]]
                parts.append(f"{metric.upper()} {_paired(mine, theirs)} vs {BASE},")
        if best is not None:
            f1 = statistics.mean(s.f1 for s in r["scores"])
            best_f1 = statistics.mean(s.f1 for s in best["scores"])
            parts.append(f"F1 {f1:.3f} vs the best published recipe ({best['arch']}) "
                         f"{best_f1:.3f}")  # fmt: skip
        if not r["matched"]:
            parts.append("(not at matched L0)")
        lines.append(" ".join(parts).rstrip(","))
    return lines
