"""The objective's term configs: penalty, revival and Matryoshka, each a :class:`KindConfig`
family (a field that means nothing for a kind is refused instead of ignored). The terms they
configure, and the checks of which combinations fit, are in :mod:`saekit.objective.terms`.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from saekit.core.configs import KindConfig, check_finite
from saekit.objective import revival


@dataclass
class PenaltyConfig(KindConfig):
    """A sparsity penalty on a_i = |z_i|·‖W_dec,i‖ (l0: on the activation's thresholds)."""

    family = "penalty"
    coefficient: float = 0.0
    """λ (the controller's starting value when target_l0 is set); must be > 0."""
    target_l0: float | None = None
    """If set, a controller moves λ toward this L0 (losses.LambdaController); quadratic_l0:
    the T of its formula (λ then stays fixed)."""
    controller_rate: float = 0.01
    """Controller step: λ changes by at most a factor exp(rate) per step (controller "log"), or
    the integral gain K_i (controller "autotune")."""
    controller: str = "log"
    """log: losses.LambdaController; autotune: the SynthSAEBench experiments' EMA integral
    controller (losses.Autotuner)."""
    controller_start: int = 0
    """Steps before the controller first moves λ (autotune only; it still tracks L0)."""
    warmup_steps: int = 0
    """λ is multiplied by min(1, (step + 1) / warmup_steps) (SAELens's coefficient warm-up)."""

    def terms(self, a: Tensor) -> Tensor:
        """f(a) elementwise on a_i = |z_i|·‖W_dec,i‖ ≥ 0 (losses.sparsity_penalty sums it): each
        kind's formula, here and nowhere else. The L0 kinds act on thresholds instead."""
        raise NotImplementedError(f"penalty {self.kind!r} has no f(a) (it acts on thresholds)")

    def at_zero(self) -> float:
        """f(0): what an inactive latent contributes (0 unless the kind says otherwise)."""
        return 0.0

    @property
    def controller_target(self) -> float | None:
        """The L0 the λ controller aims at, or None for a fixed λ."""
        return self.target_l0

    def __post_init__(self) -> None:
        check_finite("coefficient", self.coefficient, 0.0, strict=True)
        if self.target_l0 is not None:
            check_finite("target_l0", self.target_l0, 0.0, strict=True)
        check_finite("controller_rate", self.controller_rate, 0.0, strict=True)
        if self.controller not in ("log", "autotune"):
            raise ValueError(f"penalty.controller must be log or autotune, got {self.controller!r}")
        if self.controller_start < 0 or self.warmup_steps < 0:
            raise ValueError("penalty.controller_start and penalty.warmup_steps must be >= 0")
        if self.controller_start and self.controller != "autotune":
            raise ValueError("penalty.controller_start applies to controller 'autotune' only")


@dataclass
class L1Penalty(PenaltyConfig):
    """Σ a."""

    kind = "l1"

    def terms(self, a: Tensor) -> Tensor:
        return a


@dataclass
class LogPenalty(PenaltyConfig):
    """Σ log(a + ε) (the Matryoshka note's)."""

    kind = "log"
    eps: float = 0.1
    """ε = 0.1 as in the Matryoshka note."""

    def terms(self, a: Tensor) -> Tensor:
        return torch.log(a + self.eps)

    def at_zero(self) -> float:
        return math.log(self.eps)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_finite("eps", self.eps, 0.0, strict=True)


@dataclass
class SqrtPenalty(LogPenalty):
    """Σ sqrt(a + ε)."""

    kind = "sqrt"

    def terms(self, a: Tensor) -> Tensor:
        return torch.sqrt(a + self.eps)

    def at_zero(self) -> float:
        return math.sqrt(self.eps)


@dataclass
class TanhPenalty(PenaltyConfig):
    """Σ tanh(c·a) (Anthropic, Feb 2024 update)."""

    kind = "tanh"
    c: float = 1.0

    def terms(self, a: Tensor) -> Tensor:
        return torch.tanh(self.c * a)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_finite("c", self.c, 0.0, strict=True)


@dataclass
class L0Penalty(PenaltyConfig):
    """Σ H(pre_i − θ_i) with the straight-through θ-gradient (JumpReLU)."""

    kind = "l0"


@dataclass
class QuadraticL0Penalty(L0Penalty):
    """mean_n (2/T)·(L0_n − T)² with T = target_l0 (Gemma Scope 2; losses.quadratic_l0_penalty).
    The formula holds L0 at T itself, so λ is fixed: no controller."""

    kind = "quadratic_l0"

    @property
    def controller_target(self) -> float | None:
        return None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.target_l0 is None:
            raise ValueError("penalty.target_l0 must be set for kind 'quadratic_l0' (its T)")
        if (self.controller_rate, self.controller) != (PenaltyConfig.controller_rate, "log"):
            raise ValueError(
                "penalty.controller_rate means nothing for kind 'quadratic_l0', nor does "
                "penalty.controller (λ is fixed; the formula holds L0 at target_l0)"
            )


class RevivalConfig(KindConfig):
    """A dead-latent revival signal."""

    family = "revival"
    signal: ClassVar[str] = ""
    """The activation flag (``Activation.revival_signals``) this revival needs, if any."""


@dataclass
class AuxKRevival(RevivalConfig):
    """AuxK: dead latents fit the residual (revival.auxk_loss)."""

    kind = "auxk"
    signal = "auxk"
    coefficient: float = 1 / 32
    """α (Gao et al. 2024)."""
    k_aux: int | None = None
    """Latents per token in the aux reconstruction (default min(d // 2, d_sae), d the target's
    width: d_in for an SAE, d_out for a transcoder)."""
    normalizer: str = "residual"
    """V: residual (variance of the residual) or none."""
    token_fraction: float = 1.0
    """< 1: the unbiased token-subsampled estimate of AuxK over this share of each batch's
    tokens (revival.auxk_loss states its variance); 1: exact."""

    def __post_init__(self) -> None:
        check_finite("coefficient", self.coefficient, 0.0, strict=True)
        if not 0.0 < self.token_fraction <= 1.0:  # also refuses nan
            raise ValueError(f"token_fraction must be in (0, 1], got {self.token_fraction!r}")
        if self.k_aux is not None and self.k_aux <= 0:
            raise ValueError(f"k_aux must be a positive integer, got {self.k_aux}")
        if self.normalizer not in revival.AUXK_NORMALIZERS:
            raise ValueError(
                f"normalizer must be one of {revival.AUXK_NORMALIZERS}, got {self.normalizer!r}"
            )


@dataclass
class InputRevival(AuxKRevival):
    """AuxK with the centred input as its target, not the residual (revival.input_target)."""

    kind = "input"


@dataclass
class MatryoshkaAuxKRevival(AuxKRevival):
    """AuxK per Matryoshka level (revival.matryoshka_auxk_loss; SAELens's
    ``use_matryoshka_aux_loss``): needs fixed prefixes."""

    kind = "matryoshka_auxk"
    normalizer: str = "none"
    """SAELens's: no variance normalisation."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.token_fraction != 1.0:
            raise ValueError("revival.token_fraction is not supported by kind 'matryoshka_auxk'")


@dataclass
class PreactRevival(RevivalConfig):
    """Dead latents' pre-activations pushed toward the firing threshold
    (revival.dead_preact_loss)."""

    kind = "preact"
    signal = "preact"
    coefficient: float = 1.0
    """Its own weight (not AuxK's α): the loss is normalised per dead latent
    (revival.dead_preact_loss), so 1 keeps it at the scale of a threshold gap."""

    def __post_init__(self) -> None:
        check_finite("coefficient", self.coefficient, 0.0, strict=True)


@dataclass
class NoRevival(RevivalConfig):
    kind = "none"


class MatryoshkaConfig(KindConfig):
    """Nested prefixes of the latents, each trained to reconstruct on its own."""

    family = "matryoshka"

    def check_sort_every(self) -> None:
        """``sort_every`` (every kind has it): every this many steps the latents are reordered
        by how often they fired since the last reorder, most frequent first, so the frequent
        features sit in the inner levels (saekit.train.member.Member.sort_latents_); 0: never."""
        if self.sort_every < 0:
            raise ValueError(f"matryoshka.sort_every must be >= 0, got {self.sort_every}")


@dataclass
class RandomPrefixes(MatryoshkaConfig):
    """P − 1 prefix lengths drawn each step from a truncated Pareto, plus M (matryoshka.py)."""

    kind = "random"
    n_prefixes: int = 10
    """P, including the full width."""
    min_prefix: int = 1
    """Smallest prefix length m."""
    sort_every: int = 0
    """Frequency-sorted levels every this many steps (MatryoshkaConfig.sort_every); 0: off."""

    def __post_init__(self) -> None:
        if self.n_prefixes < 1 or self.min_prefix < 1:
            raise ValueError("n_prefixes and min_prefix must be >= 1")
        self.check_sort_every()


@dataclass
class FixedPrefixes(MatryoshkaConfig):
    """Consecutive latent groups; prefix j ends after group j."""

    kind = "fixed"
    groups: list[int] = field(default_factory=list)
    """Group sizes, summing to d_sae."""
    detach_inner: bool = False
    """Detached inner levels: level j predicts b_dec + sg(inner blocks' sum) + its own block's,
    so each block is trained for reconstruction by the first level that contains it only
    (saekit.objective.matryoshka). The loss values are unchanged; only gradients differ."""
    level_k: list[int] | None = None
    """Decreasing K across levels: level j reconstructs from the k_j largest latents of its
    prefix (per token for TopK, the k_j·N largest of the batch for BatchTopK), one per group,
    k_1 ≤ … ≤ k_P = the activation's k. The full code (inference, L0, last level) is
    unchanged; None: every level uses the full code."""
    sort_every: int = 0
    """Frequency-sorted levels every this many steps (MatryoshkaConfig.sort_every); 0: off."""

    def __post_init__(self) -> None:
        if not self.groups or any(g <= 0 for g in self.groups):
            raise ValueError(f"groups must be positive sizes, got {self.groups}")
        level_k = self.level_k
        if level_k is not None and (
            len(level_k) != len(self.groups)
            or any(not isinstance(k, int) or isinstance(k, bool) or k <= 0 for k in level_k)
            or any(b < a for a, b in itertools.pairwise(level_k))
        ):
            raise ValueError(
                f"matryoshka.level_k must be {len(self.groups)} positive integers (one per group), "
                f"non-decreasing, got {level_k}"
            )
        self.check_sort_every()


# ----------------------------------------------------------------------------- terms
