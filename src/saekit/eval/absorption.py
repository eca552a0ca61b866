"""Feature absorption on the first-letter task (Chanin et al., "A is for Absorption", arXiv
2409.14507), as SAEBench runs it (sae_bench/evals/absorption/: main.py, k_sparse_probing.py,
feature_absorption.py, feature_absorption_calculator.py; SAEBench 0.6.0).

Steps, each as SAEBench takes it:

1. Words: the tokens of the model's own vocabulary that are letters only, a leading space
   allowed (``vocab.get_alpha_tokens``); shuffled and split 80/20 into train and test words.
2. Prompts: 10 in-context examples "{w} has the first letter: W" from the same split, joined by
   "\\n" (and one in front), then "{word} has the first letter:"; the activation is read at the
   word's own token (SAEBench's ``prompt_token_pos`` = −6 for GPT-2's tokens; here the position
   is known exactly because the prompt is built from token ids).
3. A linear probe per first letter on the dense activations (one-vs-rest, class-balanced; L2 as
   SAEBench's weight decay 1e-4 on the mean loss, i.e. C = 1 / (1e-4 · N)); letters whose probe
   F1 on the test words is ≤ 0.6 are not evaluated (``min_GT_probe_f1``).
4. The letter's main latents: an L1 probe on the SAE's latents, its k largest weights (not
   |weights|) for k = 1..10, a balanced logistic probe on those k (scikit-learn's default C = 1),
   and the feature split: grow k while the test F1 rises by more than 0.03 (``f1_jump_threshold``)
   over the best so far (``add_feature_splits_to_metrics_df``).
5. Each test word of the letter that the probe detects (score > 0): the absorption fraction and
   full absorption of :func:`classify_words`, with SAEBench's thresholds (below).
6. Per letter: mean absorption fraction and full-absorption rate over those words; overall: the
   mean over the evaluated letters (SAEBench also wants ≥ 20 of them: ``enough_letters``).

Difference from SAEBench: the probes are fitted to their optimum in float64
(:mod:`saekit.eval.logistic`) instead of by 50 epochs of Adam.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import Tensor

from saekit.eval.logistic import f1_score, fit_l1_logistic, fit_logistic
from saekit.eval.prompt_acts import prompt_activations
from saekit.model.sae import SAE

LETTERS = "abcdefghijklmnopqrstuvwxyz"
# feature_absorption.py's constants
FULL_ABSORPTION_PROBE_COS = 0.025
"""Full absorption: the top-projecting latent's cosine with the probe is at least this."""
ABSORPTION_FRACTION_PROBE_COS = 0.1
"""Absorption fraction: a candidate absorbing latent's cosine with the probe is at least this."""
PROBE_PROJECTION_PROPORTION = 0.4
"""Both: the absorbing latents carry at least this share of the activation's probe projection."""
MAX_ABSORBING_LATENTS = 3
"""Absorption fraction: at most this many latents together compensate the main latents."""
ACTIVE_EPS = 1e-8
"""feature_absorption_calculator.EPS: a main latent with |activation| below this is off."""
# eval_config.py's defaults
F1_JUMP = 0.03
MAX_K = 10
MIN_PROBE_F1 = 0.6
MIN_LETTERS = 20
PROBE_WEIGHT_DECAY = 1e-4
L1_DECAY = 0.01
TEMPLATE = "{word} has the first letter:"
ICL_EXAMPLES = 10
TRAIN_FRACTION = 0.8


@dataclass(frozen=True)
class Word:
    text: str
    token_id: int
    letter: int
    """Index into LETTERS of its first letter."""


def first_letter_words(tokenizer) -> list[Word]:
    """The single-token words of the vocabulary (letters only, a leading space allowed), in id
    order; special tokens excluded."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    words = []
    for token, token_id in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
        if token_id in special:
            continue
        text = tokenizer.convert_tokens_to_string([token])
        bare = text[1:] if text.startswith(" ") else text
        if bare and bare.isascii() and bare.isalpha():
            words.append(Word(text, token_id, LETTERS.index(bare[0].lower())))
    return words


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def build_prompt(tokenizer, word: Word, examples: list[Word]) -> tuple[list[int], int]:
    """(token ids, position of the word's token) of SAEBench's in-context prompt."""
    head = _encode(tokenizer, "\n")
    for ex in examples:
        answer = " " + LETTERS[ex.letter].upper()
        head += [ex.token_id] + _encode(tokenizer, TEMPLATE.format(word="") + answer)
        head += _encode(tokenizer, "\n")
    tail = _encode(tokenizer, TEMPLATE.format(word=""))
    return [*head, word.token_id, *tail], len(head)


def prompts_for(tokenizer, words: list[Word], rng: random.Random) -> list[tuple[list[int], int]]:
    """One prompt per word, its examples drawn from the other words of the same list."""
    out = []
    for i, word in enumerate(words):
        pool = words[:i] + words[i + 1 :]
        out.append(build_prompt(tokenizer, word, rng.sample(pool, min(ICL_EXAMPLES, len(pool)))))
    return out


def probe_cosines(sae: SAE, direction_D: Tensor) -> Tensor:
    """[M] cosine of each latent's decoder direction (in the activation's space, scale and
    whitening undone) with ``direction_D``."""
    with torch.no_grad():
        offset = sae.decode(torch.zeros(1, sae.cfg.d_sae, device=sae.W_dec.device))
        cos = []
        for start in range(0, sae.cfg.d_sae, 1024):
            rows = torch.eye(sae.cfg.d_sae, device=sae.W_dec.device)[start : start + 1024]
            dirs = (sae.decode(rows) - offset).double().cpu()
            cos.append(torch.nn.functional.cosine_similarity(dirs, direction_D.double()[None], -1))
    return torch.cat(cos)


def classify_words(
    latents_NM: Tensor, cos_M: Tensor, projection_N: Tensor, main_ids: list[int]
) -> tuple[Tensor, Tensor, Tensor]:
    """(absorption fraction [N], full absorption [N] bool, top-projecting latent [N]) for words
    with latents ``latents_NM``, probe cosines ``cos_M`` and probe projections ``projection_N``
    (activation · unit probe), given the letter's main latents (``calculate_absorption``).

    A latent's probe projection is its activation × its cosine. Fraction: 0 when the main
    latents' projection reaches the activation's or the ≤ 3 largest positive projections of the
    other latents with cosine ≥ 0.1 carry < 40% of it; else 1 when the main latents' projection
    is ≤ 0; else min(absorbers, unaccounted) / (that + main), clipped to [0, 1]. Full: no main
    latent active, the top-projecting latent's cosine ≥ 0.025, the activation's projection
    ≥ 0 and the top latent's projection ≥ 40% of it. SAEBench divides by the projection; at a
    projection of exactly 0 (where it raises) both are 0 here. Ties: the lowest latent id."""
    z = latents_NM.double()
    cos = cos_M.double()
    proj = projection_N.double()
    latent_proj_NM = z * cos
    main = torch.zeros(z.shape[1], dtype=torch.bool)
    main[main_ids] = True
    main_proj_N = latent_proj_NM[:, main].sum(1)
    candidate_NM = (cos >= ABSORPTION_FRACTION_PROBE_COS) & ~main & (latent_proj_NM > 0)
    candidate_proj = latent_proj_NM.where(candidate_NM, torch.zeros((), dtype=torch.float64))
    n_top = min(MAX_ABSORBING_LATENTS, z.shape[1])
    absorbers_N = candidate_proj.topk(n_top, dim=1).values.sum(1)
    safe = torch.where(proj == 0, torch.ones_like(proj), proj)
    proportion_N = torch.where(proj == 0, torch.zeros_like(proj), absorbers_N / safe)
    unaccounted = torch.minimum(absorbers_N, proj - main_proj_N)
    partial = (unaccounted / (unaccounted + main_proj_N)).clamp(0, 1)
    fraction = torch.where(main_proj_N <= 0, torch.ones_like(proj), partial)
    none = (main_proj_N >= proj) | (proportion_N < PROBE_PROJECTION_PROPORTION)
    fraction = torch.where(none, torch.zeros_like(proj), fraction)

    top_N = latent_proj_NM.argmax(1)  # the first maximal index
    top_proj = latent_proj_NM.gather(1, top_N[:, None])[:, 0]
    mains_off = (z[:, main].abs() < ACTIVE_EPS).all(1)
    full = (
        mains_off
        & (cos[top_N] >= FULL_ABSORPTION_PROBE_COS)
        & (proj > 0)
        & (top_proj >= PROBE_PROJECTION_PROPORTION * proj)
    )
    return fraction, full, top_N


def split_latents(f1_by_k: list[float], latents_by_k: list[list[int]]) -> list[int]:
    """The main latents: the k-sparse probe's latents at the last k whose F1 beat the best so
    far by more than F1_JUMP, growing k from 1 and stopping at the first that does not."""
    best, chosen = -100.0, []
    for f1, latents in zip(f1_by_k, latents_by_k, strict=True):
        if f1 > best + F1_JUMP:
            best, chosen = f1, latents
        else:
            break
    return chosen


def top_k_latents(weight_M: Tensor, k: int) -> list[int]:
    """The k largest weights (signed: latents that predict the letter), ties to the lowest id."""
    order = torch.sort(weight_M, descending=True, stable=True).indices
    return order[:k].tolist()


@dataclass(frozen=True)
class LetterAbsorption:
    letter: str
    n_words: int
    """Single-token words with this first letter (train and test)."""
    evaluated: bool
    reason: str = ""
    """Why not evaluated: no words, one class missing from a split, or the probe's F1."""
    probe_f1: float = float("nan")
    split_latents: list[int] = field(default_factory=list)
    k_sparse_f1: list[float] = field(default_factory=list)
    n_true_positives: int = 0
    """Test words of the letter the probe detects: the words scored."""
    mean_absorption_fraction: float = float("nan")
    full_absorption_rate: float = float("nan")
    n_full_absorption: int = 0
    absorbing_latents: dict[int, int] = field(default_factory=dict)
    """Top-projecting latent id -> number of this letter's fully absorbed words it took."""
    absorbed_words: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class AbsorptionResult:
    letters: list[LetterAbsorption]
    mean_absorption_fraction: float
    mean_full_absorption_rate: float
    mean_split_latents: float
    n_letters_evaluated: int
    enough_letters: bool
    """SAEBench refuses with fewer than MIN_LETTERS letters whose probe F1 > MIN_PROBE_F1."""
    n_words: int


def letter_absorption(
    letter: int,
    n_words: int,
    acts: tuple[Tensor, Tensor],
    latents: tuple[Tensor, Tensor],
    labels: tuple[Tensor, Tensor],
    test_words: list[Word],
    sae: SAE,
) -> LetterAbsorption:
    """Steps 3-6 of the module docstring for one letter (train/test pairs of acts [N, D],
    latents [N, M] and letter labels [N])."""
    name = LETTERS[letter]
    (x_tr, x_te), (z_tr, z_te) = acts, latents
    y_tr, y_te = labels[0] == letter, labels[1] == letter
    if n_words == 0:
        return LetterAbsorption(name, 0, False, "no single-token words")
    if not (y_tr.any() and y_te.any()) or y_tr.all():
        return LetterAbsorption(name, n_words, False, "no words in the train or the test split")
    probe = fit_logistic(x_tr, y_tr, C=1 / (PROBE_WEIGHT_DECAY * len(y_tr)), balanced=True)
    probe_f1 = f1_score(probe.predict(x_te), y_te)
    if probe_f1 <= MIN_PROBE_F1:
        return LetterAbsorption(name, n_words, False, "probe F1 ≤ 0.6", probe_f1)
    l1 = fit_l1_logistic(z_tr, y_tr, l1=L1_DECAY)
    f1s, chosen = [], []
    for k in range(1, min(MAX_K, z_tr.shape[1]) + 1):
        ids = top_k_latents(l1.weight, k)
        k_probe = fit_logistic(z_tr[:, ids], y_tr, C=1.0, balanced=True)
        f1s.append(f1_score(k_probe.predict(z_te[:, ids]), y_te))
        chosen.append(ids)
    main = split_latents(f1s, chosen)
    positive = y_te & probe.predict(x_te)
    unit = probe.weight / probe.weight.norm()
    fraction, full, top = classify_words(
        z_te[positive], probe_cosines(sae, unit), x_te[positive].double() @ unit, main
    )
    n = int(positive.sum())
    absorbed = [w.text for w, p in zip(test_words, positive.tolist(), strict=True) if p]
    return LetterAbsorption(
        name,
        n_words,
        True,
        probe_f1=probe_f1,
        split_latents=main,
        k_sparse_f1=f1s,
        n_true_positives=n,
        mean_absorption_fraction=float(fraction.sum()) / n if n else float("nan"),
        full_absorption_rate=float(full.sum()) / n if n else float("nan"),
        n_full_absorption=int(full.sum()),
        absorbing_latents=dict(Counter(top[full].tolist())),
        absorbed_words=[w for w, f in zip(absorbed, full.tolist(), strict=True) if f],
    )


def summarise(letters: list[LetterAbsorption], n_words: int) -> AbsorptionResult:
    """Means over the evaluated letters with at least one scored word (SAEBench's main.py)."""
    scored = [r for r in letters if r.evaluated and r.n_true_positives > 0]

    def mean(values: list[float]) -> float:
        return sum(values) / len(values) if values else float("nan")

    return AbsorptionResult(
        letters=letters,
        mean_absorption_fraction=mean([r.mean_absorption_fraction for r in scored]),
        mean_full_absorption_rate=mean([r.full_absorption_rate for r in scored]),
        mean_split_latents=mean([float(len(r.split_latents)) for r in scored]),
        n_letters_evaluated=len(scored),
        enough_letters=sum(r.probe_f1 > MIN_PROBE_F1 for r in letters) >= MIN_LETTERS,
        n_words=n_words,
    )


def absorption_eval(
    model,
    tokenizer,
    hook: str,
    sae: SAE,
    *,
    seed: int = 42,
    batch_size: int = 32,
    max_words: int | None = None,
) -> AbsorptionResult:
    """The first-letter absorption of ``sae`` at ``hook`` of ``model`` (module docstring);
    ``max_words`` caps the words (a random sample of them) for a quick run."""
    if sae.cfg.transcoder:
        raise ValueError("absorption reads an SAE's decoder in its input's space: not a transcoder")
    words = first_letter_words(tokenizer)
    if len(words) < 2 * ICL_EXAMPLES:
        raise ValueError(
            f"the tokenizer has {len(words)} single-token words, too few for the first-letter task"
        )
    rng = random.Random(seed)
    words = rng.sample(words, len(words) if max_words is None else min(max_words, len(words)))
    cut = int(len(words) * TRAIN_FRACTION)
    splits = (words[:cut], words[cut:])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    acts, latents, labels = [], [], []
    for split in splits:
        prompts = prompts_for(tokenizer, split, rng)
        x = prompt_activations(
            model,
            hook,
            [ids for ids, _ in prompts],
            pool="position",
            positions=[pos for _, pos in prompts],
            batch_size=batch_size,
            pad_id=pad,
        )
        with torch.no_grad():
            z = sae.encode(x.to(device=sae.W_dec.device, dtype=sae.W_dec.dtype))
        acts.append(x.double())
        latents.append(z.double().cpu())
        labels.append(torch.tensor([w.letter for w in split]))
    counts = Counter(w.letter for w in words)
    letters = [
        letter_absorption(
            i,
            counts[i],
            (acts[0], acts[1]),
            (latents[0], latents[1]),
            (labels[0], labels[1]),
            splits[1],
            sae,
        )
        for i in range(len(LETTERS))
    ]
    return summarise(letters, len(words))
