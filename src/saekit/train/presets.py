"""The built-in benchmark: default configs of `saekit train` and `saekit sweep`.

Synthetic data with 512 known features in 64 dimensions (8× superposition), a true L0 of 6,
Zipf-like frequencies, a nonzero mean and noise. SAEs have 1024 latents (2× the true features).
Sized to run on 2 CPU cores: `saekit train` in about a minute, `saekit sweep` in a few minutes.
"""

from __future__ import annotations

from typing import Any

D = 64
N_FEATURES = 512
TRUE_L0 = 6
D_SAE = 1024
BATCH = 2048
LR = 8e-3
"""Tuned on this data: TopK recovers 98% of the features by step 400 (2e-3 needs ~900 steps)."""
QUADRATIC_L0_LAMBDA = 1.0
"""λ of the quadratic-L0 JumpReLU (fixed: the formula holds L0 at its target). On this data,
after 300 steps: L0 6.5, FVU 0.32 at λ = 1; L0 10.3 at λ = 0.1; passing the estimate to the
pre-activations as well gave L0 7.1 and 38% dead latents at λ = 1 (issue 14)."""


def synthetic_data(kind: str = "independent") -> dict[str, Any]:
    return {"d": D, "n_features": N_FEATURES, "mean_l0": float(TRUE_L0), "kind": kind}


def train_config() -> dict[str, Any]:
    """One TopK SAE with k = the true L0."""
    return {
        "data": {"source": "synthetic", "synthetic": synthetic_data()},
        "saes": [{"sae": {"d_sae": D_SAE, "activation": {"kind": "topk", "k": TRUE_L0}}, "lr": LR}],
        "batch_size": BATCH,
        "steps": 700,
        "out_dir": "runs/train",
    }


def sweep_config(k: int = TRUE_L0) -> dict[str, Any]:
    """TopK, BatchTopK, JumpReLU (L0 and quadratic L0), ReLU+L1, Matryoshka-BatchTopK, AbsTopK,
    Gated, Matching Pursuit and HierarchicalTopK at matched L0 on one stream.

    Penalty-trained SAEs (ReLU, Gated, JumpReLU) reach the matched L0 through the λ controller
    (target_l0 = k), the quadratic-L0 JumpReLU through its own target (T = k, λ fixed); the
    others have k (Matching Pursuit: at most k steps).
    BatchTopK gets a stronger AuxK (α = 1, dead after 50k tokens) than TopK's 1/32: on this
    data its rare-feature latents lose the batch-wide competition early and die, which the
    paper's α = 1/32 does not undo in 1500 steps (BENCHMARKS.md).
    """
    batchtopk = {
        # θ's EMA must forget the early, larger thresholds within a 1500-step run.
        "sae": {
            "d_sae": D_SAE,
            "activation": {"kind": "batchtopk", "k": k, "threshold_beta": 0.99},
        },
        "lr": LR,
        "revival": {"kind": "auxk", "coefficient": 1.0},
        "dead_tokens": 50_000,
    }
    l1_to_target = {
        "kind": "l1",
        "coefficient": 0.1,
        "target_l0": float(k),
        "controller_rate": 0.05,
    }
    saes = [
        {"sae": {"d_sae": D_SAE, "activation": {"kind": "topk", "k": k}}, "lr": LR},
        batchtopk,
        {
            "sae": {
                "d_sae": D_SAE,
                "activation": {"kind": "jumprelu", "init_threshold": 0.5, "bandwidth": 0.1},
            },
            "lr": LR,
            "penalty": {
                "kind": "l0",
                "coefficient": 0.3,
                "target_l0": float(k),
                "controller_rate": 0.02,
            },
            "revival": "none",
        },
        {
            "sae": {
                "d_sae": D_SAE,
                "activation": {"kind": "jumprelu", "init_threshold": 0.5, "bandwidth": 0.1},
            },
            "lr": LR,
            "penalty": {
                "kind": "quadratic_l0",
                "coefficient": QUADRATIC_L0_LAMBDA,
                "target_l0": float(k),
            },
            "revival": "none",
        },
        {"sae": {"d_sae": D_SAE, "activation": "relu"}, "lr": LR, "penalty": dict(l1_to_target)},
        {**batchtopk, "matryoshka": {"kind": "random", "n_prefixes": 10, "min_prefix": 16}},
        {"sae": {"d_sae": D_SAE, "activation": {"kind": "abstopk", "k": k}}, "lr": LR},
        {"sae": {"d_sae": D_SAE, "activation": "gated"}, "lr": LR, "penalty": dict(l1_to_target)},
        {"sae": {"d_sae": D_SAE, "activation": {"kind": "matching_pursuit", "k": k}}, "lr": LR},
        {"sae": {"d_sae": D_SAE, "activation": {"kind": "hierarchical_topk", "k": k}}, "lr": LR},
    ]
    return {
        "data": {"source": "synthetic", "synthetic": synthetic_data()},
        "saes": saes,
        "batch_size": BATCH,
        "steps": 1500,
        "out_dir": "runs/sweep",
    }


# --------------------------------------------------------------------------------------------
# SynthSAEBench recipes: each architecture as the SynthSAEBench paper (arXiv 2602.14687) trains
# it. Source of every number: decoderesearch/synth-sae-bench-experiments,
# experiments/sweeps/common.py (get_*_config, create_runner_config) and saes/ (its L1 and
# JumpReLU SAEs and their autotuner); training defaults from SAELens's SyntheticSAERunner
# (constant lr, no warm-up or decay, grad norm clipped at 1, Adam (0.9, 0.999), a latent dead
# after dead_feature_window = 1000 steps without firing). What saekit cannot express is said in
# the recipe's docstring.

MATRYOSHKA_WIDTHS = (128, 512, 2048)
"""common.get_matryoshka_config: inner widths fixed at 128, 512, 2048 (outer: d_sae)."""
DEAD_WINDOW_STEPS = 1000
"""SyntheticSAERunnerConfig.dead_feature_window."""


def _paper_base(k: int, batch_size: int, lr: float) -> dict[str, Any]:
    return {"lr": lr, "warmup_steps": 0, "decay_start": 1.0, "grad_clip": 1.0,
            "dead_tokens": DEAD_WINDOW_STEPS * batch_size,
            "name": f"L0_{k}"}  # fmt: skip


def matryoshka_groups(d_sae: int, widths: tuple[int, ...] = MATRYOSHKA_WIDTHS) -> list[int]:
    """Group sizes of the fixed levels: the widths below d_sae, then d_sae (common.py)."""
    ends = [w for w in widths if w < d_sae] + [d_sae]
    return [b - a for a, b in zip([0, *ends[:-1]], ends, strict=True)]


def _tilted(entry: dict[str, Any], tilt: float) -> dict[str, Any]:
    """``reconstruction_tilt: tilt`` added where nonzero (saekit's option, not the paper's: 0
    leaves the recipe's entry as it was)."""
    return {**entry, "reconstruction_tilt": float(tilt)} if tilt else entry


def encoder_steps_entry(encoder_steps: int) -> dict[str, int]:
    """The ``sae:`` fields of ``encoder_steps`` LISTA steps (saekit.model.lista): none for 1,
    so a recipe's default entry is the paper's unchanged."""
    return {} if encoder_steps == 1 else {"encoder_steps": encoder_steps}


def recipe_batchtopk(d_sae: int, k: int, total_steps: int, batch_size: int, lr: float,
                     tilt: float = 0.0, encoder_steps: int = 1) -> dict:  # fmt: skip
    """BatchTopK (common.get_btk_config): SAELens's BatchTopK, its AuxK α = 1 (TopK's
    aux_loss_coefficient default) without variance normalisation. Not the paper's (0 and 1
    leave its entry unchanged): ``tilt``, saekit's reconstruction_tilt (TERM,
    losses.tilted_mean); ``encoder_steps`` > 1, a LISTA encoder (saekit.model.lista)."""
    del total_steps
    act = {"kind": "batchtopk", "k": k}
    return _tilted({**_paper_base(k, batch_size, lr),
                    "sae": {"d_sae": d_sae, "activation": act,
                            **encoder_steps_entry(encoder_steps)},
                    "revival": {"kind": "auxk", "coefficient": 1.0, "normalizer": "none"}},
                   tilt)  # fmt: skip


def recipe_matryoshka(
    d_sae: int, k: int, total_steps: int, batch_size: int, lr: float,
    widths: tuple[int, ...] = MATRYOSHKA_WIDTHS,
    tilt: float = 0.0,
    detach_inner: bool = False,
    level_k: list[int] | None = None,
    sort_every: int = 0,
    encoder_steps: int = 1,
) -> dict:  # fmt: skip
    """Matryoshka-BatchTopK (common.get_matryoshka_config): fixed levels at ``widths`` (the
    paper's 128, 512, 2048 at width 4096) and its Matryoshka aux loss (AuxK per level,
    use_matryoshka_aux_loss=True, α = 1). SAELens sums the levels' losses; saekit averages
    them (1/P): the same direction under Adam, a P× smaller reconstruction against the aux.

    Options beyond the paper (off by default, the entry then unchanged): ``tilt`` (saekit's
    reconstruction_tilt, every level tilted), ``detach_inner`` (detached inner levels) and
    ``level_k`` (decreasing K across levels: one k per level, non-decreasing, ending with
    ``k``), saekit.objective.config.FixedPrefixes; ``sort_every`` > 0: frequency-sorted
    levels (matryoshka.sort_every); ``encoder_steps`` > 1: a LISTA encoder (saekit.model.lista)."""
    entry = recipe_batchtopk(d_sae, k, total_steps, batch_size, lr, tilt=tilt,
                             encoder_steps=encoder_steps)  # fmt: skip
    levels: dict[str, Any] = {"kind": "fixed", "groups": matryoshka_groups(d_sae, widths)}
    if detach_inner:
        levels["detach_inner"] = True
    if level_k is not None:
        levels["level_k"] = list(level_k)
    if sort_every:
        levels["sort_every"] = sort_every
    return {**entry, "matryoshka": levels,
            "revival": {"kind": "matryoshka_auxk", "coefficient": 1.0}}  # fmt: skip


def recipe_matching_pursuit(d_sae: int, k: int, total_steps: int, batch_size: int,
                            lr: float) -> dict:  # fmt: skip
    """Matching Pursuit (common.get_mp_config): k iterations, residual threshold 0."""
    del total_steps
    act = {"kind": "matching_pursuit", "k": k, "residual_threshold": 0.0}
    return {**_paper_base(k, batch_size, lr), "sae": {"d_sae": d_sae, "activation": act}}


def recipe_l1(d_sae: int, k: int, total_steps: int, batch_size: int, lr: float,
              encoder_steps: int = 1) -> dict:  # fmt: skip
    """Standard L1 (common.get_standard_config, saes/standard_sae.py): ReLU, λ·Σ|z_i|‖W_dec,i‖
    with λ = 2.0 warmed up linearly over the first third of training, then the autotuner
    (K_i = 3e-4, from a third of training on) moves it toward target L0 = k.
    ``encoder_steps`` > 1: a LISTA encoder (not the paper's; saekit.model.lista)."""
    third = total_steps // 3
    penalty = {
        "kind": "l1",
        "coefficient": 2.0,
        "target_l0": float(k),
        "warmup_steps": third,
        "controller": "autotune",
        "controller_rate": 3e-4,
        "controller_start": third,
    }
    sae = {"d_sae": d_sae, "activation": "relu", **encoder_steps_entry(encoder_steps)}
    return {**_paper_base(k, batch_size, lr), "sae": sae,
            "penalty": penalty, "revival": "none"}  # fmt: skip


def recipe_jumprelu(d_sae: int, k: int, total_steps: int, batch_size: int, lr: float,
                    encoder_steps: int = 1) -> dict:  # fmt: skip
    """JumpReLU (common.get_jumprelu_config, saes/jumprelu_sae.py): threshold 0.5, bandwidth 2,
    Anthropic's tanh sparsity loss λ·Σ tanh(4·|z_i|‖W_dec,i‖) with λ = 0.2 autotuned from step
    0 toward L0 = k. Not expressed: its input normalisation ``expected_average_only_in``
    (saekit scales every SAE's input by its own dataset scale instead) and its TopK aux loss
    on dead latents (saekit's JumpReLU takes no AuxK; with SAELens's 1000-step dead window no
    latent counts as dead in a run of at most 1000 steps, so the term is 0 there).
    ``encoder_steps`` > 1: a LISTA encoder (not the paper's; saekit.model.lista)."""
    del total_steps
    act = {"kind": "jumprelu", "init_threshold": 0.5, "bandwidth": 2.0}
    penalty = {
        "kind": "tanh",
        "c": 4.0,
        "coefficient": 0.2,
        "target_l0": float(k),
        "controller": "autotune",
        "controller_rate": 3e-4,
    }
    sae = {"d_sae": d_sae, "activation": act, **encoder_steps_entry(encoder_steps)}
    return {**_paper_base(k, batch_size, lr), "sae": sae,
            "penalty": penalty, "revival": "none"}  # fmt: skip


SYNTHSAEBENCH_RECIPES = {
    "BatchTopK": recipe_batchtopk,
    "Matryoshka": recipe_matryoshka,
    "Matching Pursuit": recipe_matching_pursuit,
    "Standard L1": recipe_l1,
    "JumpReLU": recipe_jumprelu,
}
"""The paper's five architectures, by the names of its table."""
