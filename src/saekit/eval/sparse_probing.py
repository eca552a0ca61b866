"""k-sparse probing: how well the k latents that differ most between two classes of text predict
the class, beside a dense probe on the raw activations (SAEBench, arXiv 2503.09532; the
sae-probes protocol of Kantamneni et al., arXiv 2502.16681).

Both protocols pick, on the training examples, the k latents with the largest |mean over the
positives − mean over the negatives| (SAEBench ``get_top_k_mean_diff_mask``, sae-probes
``get_xy_OOD_sae``) and fit a logistic probe on them. Where they differ this module follows
sae-probes, which an audit of the benchmark (arXiv 2605.18229) found the more reliable:

- each text is represented by its **last token's** activation (SAEBench: the mean over its
  tokens; ``pool="mean"`` gives that);
- the training set is **class-balanced** (equal numbers of each class; SAEBench: as sampled);
- the L2 strength is **chosen** by validation AUC over C ∈ logspace(5, −5, 10) on a held-out
  tail of the training set of min(20%, 100) examples (sae-probes ``find_best_reg``; SAEBench:
  C = 1); sae-probes uses k-fold validation below 128 examples, here always the tail;
- the test **AUC** is reported beside the accuracy (SAEBench: accuracy only).

Ties in the mean difference go to the lowest latent id (a stable sort). Labels: any two
distinct values; the larger (sorted as strings) is the positive class.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from saekit.eval.absorption import LETTERS, first_letter_words
from saekit.eval.logistic import LogisticProbe, fit_logistic, roc_auc
from saekit.eval.prompt_acts import Pool, prompt_activations
from saekit.model.sae import SAE

KS = (1, 2, 5, 20)
C_GRID = tuple(10.0**e for e in torch.linspace(5, -5, 10).tolist())
TEST_FRACTION = 0.2
VOWELS = "aeiou"
BUILTIN_TASKS = ("first_letter_vowel", "capitalised")


@dataclass(frozen=True)
class Example:
    text: str
    label: bool


def read_labelled(path: str | Path) -> list[Example]:
    """``text,label`` rows of a CSV (with that header) or JSONL objects with those fields."""
    path = Path(path)
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    else:
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    if not rows or any("text" not in r or "label" not in r for r in rows):
        raise ValueError(f"{path}: every row needs a 'text' and a 'label' field")
    labels = sorted({str(r["label"]) for r in rows})
    if len(labels) != 2:
        raise ValueError(f"{path}: probing needs exactly two labels, found {labels[:5]}")
    return [Example(str(r["text"]), str(r["label"]) == labels[1]) for r in rows]


def builtin_task(name: str, tokenizer) -> list[Example]:
    """A task from the tokenizer's own single-token words (no download): ``first_letter_vowel``
    (the word starts with a vowel) or ``capitalised`` (it starts with a capital)."""
    words = first_letter_words(tokenizer)
    if name == "first_letter_vowel":
        return [Example(w.text, LETTERS[w.letter] in VOWELS) for w in words]
    if name == "capitalised":
        return [Example(w.text, w.text.strip()[0].isupper()) for w in words]
    raise ValueError(f"unknown built-in probing task {name!r}: one of {BUILTIN_TASKS}")


def mean_diff_latents(z_NM: Tensor, y_N: Tensor, k: int) -> list[int]:
    """The k latents with the largest |mean over positives − mean over negatives|, ties to the
    lowest id."""
    z = z_NM.double()
    diff = (z[y_N].mean(0) - z[~y_N].mean(0)).abs()
    return torch.sort(diff, descending=True, stable=True).indices[:k].tolist()


def fit_validated(x_ND: Tensor, y_N: Tensor) -> tuple[LogisticProbe, float]:
    """(probe, C): C picked by the validation AUC of a probe fitted on the rest, then the probe
    refitted on all of ``x_ND`` with it (first best C on ties)."""
    n_val = min(max(1, int(TEST_FRACTION * len(y_N))), 100)
    fit_x, fit_y, val_x, val_y = x_ND[:-n_val], y_N[:-n_val], x_ND[-n_val:], y_N[-n_val:]
    best_c, best_auc = 1.0, -1.0
    if fit_y.any() and not fit_y.all() and val_y.any() and not val_y.all():
        for c in C_GRID:
            auc = roc_auc(fit_logistic(fit_x, fit_y, C=c).score(val_x), val_y)
            if auc > best_auc:
                best_c, best_auc = c, auc
    return fit_logistic(x_ND, y_N, C=best_c), best_c


@dataclass(frozen=True)
class ProbeScore:
    k: int | None
    """Latents probed; None: the dense probe on the raw activations."""
    latents: list[int]
    accuracy: float
    auc: float
    C: float
    correct: list[bool]
    """Per test example: the probe's prediction was right (the bootstrap resamples these)."""


@dataclass(frozen=True)
class SparseProbingResult:
    task: str
    n_train: int
    n_test: int
    pool: str
    dense: ProbeScore
    sparse: list[ProbeScore]


def _score(probe: LogisticProbe, x: Tensor, y: Tensor, k, latents, c) -> ProbeScore:
    correct = probe.predict(x) == y
    return ProbeScore(
        k, latents, float(correct.double().mean()), roc_auc(probe.score(x), y), c, correct.tolist()
    )


def split_balanced(examples: list[Example], seed: int) -> tuple[list[Example], list[Example]]:
    """(train, test): a shuffled 20% test split, and a training set with as many examples of
    each class (the larger class subsampled)."""
    rng = random.Random(seed)
    shuffled = rng.sample(examples, len(examples))
    n_test = max(1, int(TEST_FRACTION * len(shuffled)))
    test, rest = shuffled[:n_test], shuffled[n_test:]
    pos = [e for e in rest if e.label]
    neg = [e for e in rest if not e.label]
    n = min(len(pos), len(neg))
    if n < 2 or not any(e.label for e in test) or all(e.label for e in test):
        raise ValueError("too few examples of one class to train and test a probe")
    train = pos[:n] + neg[:n]
    return rng.sample(train, len(train)), test


def probe_scores(
    x_tr: Tensor, y_tr: Tensor, x_te: Tensor, y_te: Tensor, z_tr: Tensor, z_te: Tensor, ks
) -> tuple[ProbeScore, list[ProbeScore]]:
    """The dense probe on activations ``x`` and a k-sparse probe on latents ``z`` per k."""
    dense, c = fit_validated(x_tr, y_tr)
    sparse = []
    for k in ks:
        latents = mean_diff_latents(z_tr, y_tr, min(k, z_tr.shape[1]))
        probe, c_k = fit_validated(z_tr[:, latents], y_tr)
        sparse.append(_score(probe, z_te[:, latents], y_te, k, latents, c_k))
    return _score(dense, x_te, y_te, None, [], c), sparse


def sparse_probing_eval(
    model,
    tokenizer,
    hook: str,
    sae: SAE,
    examples: list[Example],
    *,
    task: str = "labelled",
    ks: tuple[int, ...] = KS,
    pool: Pool = "last",
    seed: int = 42,
    batch_size: int = 32,
) -> SparseProbingResult:
    """k-sparse and dense probes of ``examples`` at ``hook`` (module docstring)."""
    if sae.cfg.transcoder:
        raise ValueError("sparse probing reads an SAE's latents of its input: not a transcoder")
    train, test = split_balanced(examples, seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def encode(split: list[Example]) -> tuple[Tensor, Tensor, Tensor]:
        prompts = [tokenizer.encode(e.text, add_special_tokens=False) for e in split]
        if any(len(p) == 0 for p in prompts):
            raise ValueError("an example's text has no tokens")
        x = prompt_activations(model, hook, prompts, pool=pool, batch_size=batch_size, pad_id=pad)
        with torch.no_grad():
            z = sae.encode(x.to(device=sae.W_dec.device, dtype=sae.W_dec.dtype))
        return x.double(), z.double().cpu(), torch.tensor([e.label for e in split])

    x_tr, z_tr, y_tr = encode(train)
    x_te, z_te, y_te = encode(test)
    dense, sparse = probe_scores(x_tr, y_tr, x_te, y_te, z_tr, z_te, ks)
    return SparseProbingResult(task, len(train), len(test), pool, dense, sparse)
