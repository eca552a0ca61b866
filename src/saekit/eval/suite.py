"""``saekit eval --suite core,absorption,sparse_probing``: every SAE of a run or sweep judged as
papers judge, one JSON per SAE and the SAEs side by side (a markdown table and a plot of each
metric against L0).

Confidence intervals: 95% percentile bootstrap (1000 resamples, seed 0) of the mean over the
units the metric averages: letters for absorption (SAEBench's overall scores are means over
letters), test examples for a probe's accuracy. Core metrics are token means over all evaluated
documents and carry no interval here.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from saekit.eval.absorption import LetterAbsorption, absorption_eval
from saekit.eval.dictionaries import is_multi_hook
from saekit.eval.saved_report import DocumentData, SavedReport
from saekit.eval.sparse_probing import (
    BUILTIN_TASKS,
    KS,
    Example,
    builtin_task,
    read_labelled,
    sparse_probing_eval,
)
from saekit.model.dictionary import load_dictionary

SUITES = ("core", "absorption", "sparse_probing")
N_BOOTSTRAP = 1000
MIN_PER_CLASS = 10


def parse_suites(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in SUITES]
    if unknown or not names:
        raise ValueError(f"--suite: unknown {unknown or text!r}; choose from {','.join(SUITES)}")
    return names


@dataclass(frozen=True)
class Interval:
    value: float
    low: float
    high: float


def bootstrap_mean(values: list[float], seed: int = 0) -> Interval:
    """The mean and its 95% percentile-bootstrap interval (NaN values dropped)."""
    values = [v for v in values if v == v]
    if not values:
        nan = float("nan")
        return Interval(nan, nan, nan)
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(rng.choices(values, k=n)) / n for _ in range(N_BOOTSTRAP))
    return Interval(
        sum(values) / n, means[int(0.025 * N_BOOTSTRAP)], means[int(0.975 * N_BOOTSTRAP) - 1]
    )


@dataclass(frozen=True)
class CoreScores:
    """``saekit eval``'s numbers (token means over the evaluated documents)."""

    l0: float
    fvu: float
    explained_variance: float
    dead_fraction: float
    n_tokens: int
    ce_score: float | None = None
    kl_score: float | None = None
    ce_sae: float | None = None
    kl_sae: float | None = None


@dataclass(frozen=True)
class AbsorptionScores:
    mean_absorption_fraction: Interval
    mean_full_absorption_rate: Interval
    mean_split_latents: float
    n_letters_evaluated: int
    enough_letters: bool
    n_words: int
    letters: list[LetterAbsorption]


@dataclass(frozen=True)
class KScore:
    k: int | None
    """None: the dense probe on the raw activations."""
    accuracy: Interval
    auc: float
    latents: list[int]


@dataclass(frozen=True)
class ProbingScores:
    task: str
    pool: str
    n_train: int
    n_test: int
    scores: list[KScore]


@dataclass(frozen=True)
class SuiteResult:
    sae: str
    hook: str
    core: CoreScores | None = None
    absorption: AbsorptionScores | None = None
    sparse_probing: list[ProbingScores] = field(default_factory=list)


@dataclass(frozen=True)
class SuiteOptions:
    suites: list[str]
    model: str | None
    probe_data: list[str]
    """``text,label`` CSV / JSONL files; with none, the built-in tasks."""
    ks: tuple[int, ...] = KS
    seed: int = 42
    device: str = "cpu"
    local_files_only: bool = False
    batch_size: int = 32
    max_words: int | None = None


def sae_dirs(path: str | Path) -> list[Path]:
    """The SAE directory itself, or each directory under it (a sweep or run) with a cfg.json."""
    path = Path(path)
    if (path / "cfg.json").exists():
        return [path]
    found = sorted(
        p.parent for p in path.rglob("cfg.json") if (p.parent / "sae.safetensors").exists()
    )
    if not found:
        raise ValueError(f"{path}: no SAE (a directory with cfg.json and sae.safetensors)")
    return found


def _absorption(result) -> AbsorptionScores:
    scored = [r for r in result.letters if r.evaluated and r.n_true_positives > 0]
    return AbsorptionScores(
        bootstrap_mean([r.mean_absorption_fraction for r in scored]),
        bootstrap_mean([r.full_absorption_rate for r in scored]),
        result.mean_split_latents,
        result.n_letters_evaluated,
        result.enough_letters,
        result.n_words,
        result.letters,
    )


def _probing(result) -> ProbingScores:
    scores = [
        KScore(s.k, bootstrap_mean([float(c) for c in s.correct]), s.auc, s.latents)
        for s in [result.dense, *result.sparse]
    ]
    return ProbingScores(result.task, result.pool, result.n_train, result.n_test, scores)


def run_suite(
    paths: list[Path], options: SuiteOptions, core: Callable[[Path], SavedReport] | None
) -> list[SuiteResult]:
    """Each suite on each SAE; ``core(path)`` is ``saekit eval``'s report of one SAE."""
    from saekit.data.lm.models import load_for_harvest

    results, setups = [], {}
    for path in paths:
        sae = load_dictionary(path, device=options.device)  # a CLT's or crosscoder's core too
        judged = [s for s in options.suites if s != "core"]
        if is_multi_hook(sae):
            if judged:  # they read one hook's latents and one decoder
                raise ValueError(
                    f"{', '.join(judged)}: an SAE's or transcoder's suites; {path} holds a"
                    f" {sae.cfg.kind} (use --suite core)"
                )
            hook = ", ".join(sae.cfg.hooks or [])
        else:
            hook = sae.cfg.hook or ""
        out = SuiteResult(str(path), hook)
        if "core" in options.suites:
            if core is None:
                raise ValueError("the core suite needs saekit eval's report")
            r = core(path)
            m = r.metrics
            splice = r.data.splice if isinstance(r.data, DocumentData) else None
            out = SuiteResult(str(path), hook, core=CoreScores(
                l0=m.l0, fvu=m.fvu, explained_variance=m.explained_variance,
                dead_fraction=m.dead_fraction, n_tokens=m.n_tokens,
                ce_score=None if splice is None else splice.ce_score,
                kl_score=None if splice is None else splice.kl_score,
                ce_sae=None if splice is None else splice.ce_sae,
                kl_sae=None if splice is None else splice.kl_sae,
            ))  # fmt: skip
        if judged:
            if not options.model or not hook:
                raise ValueError(f"{', '.join(judged)}: give --model (and an SAE with a hook)")
            if hook not in setups:
                setups[hook] = load_for_harvest(
                    options.model, hook, device=options.device,
                    local_files_only=options.local_files_only,
                )  # fmt: skip
            setup = setups[hook]
            if "absorption" in judged:
                result = absorption_eval(
                    setup.model, setup.tokenizer, setup.hook, sae,
                    seed=options.seed, batch_size=options.batch_size, max_words=options.max_words,
                )  # fmt: skip
                out = SuiteResult(out.sae, hook, out.core, _absorption(result))
            if "sparse_probing" in judged:
                probing = [
                    _probing(
                        sparse_probing_eval(
                            setup.model,
                            setup.tokenizer,
                            setup.hook,
                            sae,
                            examples,
                            task=name,
                            ks=options.ks,
                            seed=options.seed,
                            batch_size=options.batch_size,
                        )  # fmt: skip
                    )
                    for name, examples in _tasks(options, setup.tokenizer)
                ]
                out = SuiteResult(out.sae, hook, out.core, out.absorption, probing)
        results.append(out)
    return results


def _tasks(options: SuiteOptions, tokenizer) -> list[tuple[str, list[Example]]]:
    """The user's files, or the built-in tasks this tokenizer has ≥ MIN_PER_CLASS words of
    each class for (a vocabulary without capitals has no ``capitalised`` task)."""
    if options.probe_data:
        return [(Path(p).stem, read_labelled(p)) for p in options.probe_data]
    tasks = []
    for name in BUILTIN_TASKS:
        examples = builtin_task(name, tokenizer)
        n_pos = sum(e.label for e in examples)
        if min(n_pos, len(examples) - n_pos) >= MIN_PER_CLASS:
            tasks.append((name, examples))
    if not tasks:
        raise ValueError(
            f"the tokenizer's words give no built-in probing task with {MIN_PER_CLASS} of each"
            " class: give --probe-data FILE"
        )
    return tasks


def metric_rows(result: SuiteResult) -> dict[str, float]:
    """The headline numbers of one SAE, by column name (the table's and the plot's)."""
    row: dict[str, float] = {}
    if result.core is not None:
        row.update(l0=result.core.l0, fvu=result.core.fvu)
        if result.core.ce_score is not None:
            row["ce_score"] = result.core.ce_score
    if result.absorption is not None:
        row["absorption"] = result.absorption.mean_absorption_fraction.value
        row["full_absorption"] = result.absorption.mean_full_absorption_rate.value
    for task in result.sparse_probing:
        for score in task.scores:
            key = "dense" if score.k is None else f"k{score.k}"
            row[f"{task.task}_{key}_acc"] = score.accuracy.value
    return row


def write_suite(results: list[SuiteResult], out_dir: str | Path) -> list[Path]:
    """One JSON per SAE, ``suite.md`` (the SAEs side by side) and ``suite.png`` (each metric
    against L0, when the core suite gave L0); returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i, result in enumerate(results):
        name = Path(result.sae).name or f"sae{i}"
        path = out / f"{i:02d}_{name}.json"
        path.write_text(json.dumps(asdict(result), indent=2))
        written.append(path)
    rows = [metric_rows(r) for r in results]
    columns = sorted({c for row in rows for c in row}, key=lambda c: (c != "l0", c))
    lines = ["| SAE | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for result, row in zip(results, rows, strict=True):
        cells = [f"{row[c]:.4f}" if c in row else "" for c in columns]
        lines.append(f"| {result.sae} | " + " | ".join(cells) + " |")
    (out / "suite.md").write_text("\n".join(lines) + "\n")
    written.append(out / "suite.md")
    if any("l0" in row for row in rows):
        written.append(_plot(rows, [c for c in columns if c != "l0"], out / "suite.png"))
    return written


def _plot(rows: list[dict[str, float]], metrics: list[str], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(metrics))
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=False):
        points = sorted((r["l0"], r[metric]) for r in rows if "l0" in r and metric in r)
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-")
        ax.set_xlabel("L0")
        ax.set_title(metric, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
