"""One SAE's training objective: a list of terms built and checked once from the config.

    loss = reconstruction (plain, or Matryoshka over prefixes) + λ·penalty + revival

Each term reads a :class:`TermInputs` (the SAE, its forward output, the dead mask, λ and this
step's prefixes) and returns its contribution to the loss. Which terms exist, and whether they
fit the activation, is decided in :func:`build_objective`; an incompatible combination is
refused there with a message naming both fields. The term configs are :class:`KindConfig`
families, so a field that means nothing for a kind is refused instead of ignored.
Formulas: :mod:`saekit.losses`, :mod:`saekit.revival`, :mod:`saekit.matryoshka`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, NamedTuple

from torch import Tensor

from saekit import losses, matryoshka, revival
from saekit.configs import KindConfig, check_finite

if TYPE_CHECKING:
    from saekit.activations import Activation
    from saekit.sae import SAE, ForwardOutput

# ----------------------------------------------------------------------------- configs


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
    """Controller step: λ changes by at most a factor exp(rate) per step."""

    def shape_params(self) -> dict[str, float]:
        """The fields of losses.penalty_terms this kind sets (eps, c); none by default."""
        return {}

    @property
    def controller_target(self) -> float | None:
        """The L0 the λ controller aims at, or None for a fixed λ."""
        return self.target_l0

    def __post_init__(self) -> None:
        check_finite("coefficient", self.coefficient, 0.0, strict=True)
        if self.target_l0 is not None:
            check_finite("target_l0", self.target_l0, 0.0, strict=True)
        check_finite("controller_rate", self.controller_rate, 0.0, strict=True)


@dataclass
class L1Penalty(PenaltyConfig):
    kind = "l1"


@dataclass
class LogPenalty(PenaltyConfig):
    """Σ log(a + ε) (the Matryoshka note's)."""

    kind = "log"
    eps: float = 0.1

    def shape_params(self) -> dict[str, float]:
        return {"eps": self.eps}

    def __post_init__(self) -> None:
        super().__post_init__()
        check_finite("eps", self.eps, 0.0, strict=True)


@dataclass
class SqrtPenalty(LogPenalty):
    """Σ sqrt(a + ε)."""

    kind = "sqrt"


@dataclass
class TanhPenalty(PenaltyConfig):
    """Σ tanh(c·a) (Anthropic, Feb 2024 update)."""

    kind = "tanh"
    c: float = 1.0

    def shape_params(self) -> dict[str, float]:
        return {"c": self.c}

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
        if self.controller_rate != PenaltyConfig.controller_rate:
            raise ValueError(
                "penalty.controller_rate means nothing for kind 'quadratic_l0' (λ is fixed; the "
                "formula holds L0 at target_l0)"
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


@dataclass
class RandomPrefixes(MatryoshkaConfig):
    """P − 1 prefix lengths drawn each step from a truncated Pareto, plus M (matryoshka.py)."""

    kind = "random"
    n_prefixes: int = 10
    """P, including the full width."""
    min_prefix: int = 1
    """Smallest prefix length m."""

    def __post_init__(self) -> None:
        if self.n_prefixes < 1 or self.min_prefix < 1:
            raise ValueError("n_prefixes and min_prefix must be >= 1")


@dataclass
class FixedPrefixes(MatryoshkaConfig):
    """Consecutive latent groups; prefix j ends after group j."""

    kind = "fixed"
    groups: list[int] = field(default_factory=list)
    """Group sizes, summing to d_sae."""

    def __post_init__(self) -> None:
        if not self.groups or any(g <= 0 for g in self.groups):
            raise ValueError(f"groups must be positive sizes, got {self.groups}")


# ----------------------------------------------------------------------------- terms


class TermInputs(NamedTuple):
    """What every term of one step reads."""

    sae: SAE
    out: ForwardOutput
    dead_mask: Tensor
    """[M] bool, taken before this batch is counted."""
    lam: Tensor
    """λ of the penalty (the controller's current value)."""
    prefixes: list[int] | None
    """This step's Matryoshka prefix ends, or None."""
    dead_cols: Tensor | None = None
    """A superset of the dead latents (revival.DeadSet), or None: AuxK searches all M."""


class Term:
    """One additive part of the loss; ``name`` is the metric it is logged as."""

    name = ""

    def __call__(self, inputs: TermInputs) -> Tensor:
        raise NotImplementedError


class Reconstruction(Term):
    name = "reconstruction"

    def __call__(self, inputs: TermInputs) -> Tensor:
        out, sae = inputs.out, inputs.sae
        if inputs.prefixes is None:
            return sae.activation.reconstruction_loss(sae, out)
        # each prefix's prediction starts from b_dec (+ a transcoder's skip path x_n W_skipᵀ)
        offset = sae.decoder_offset_n(out.x_n)
        return matryoshka.matryoshka_reconstruction_loss(
            out.target(), out.latents, sae.W_dec, offset, inputs.prefixes
        )


def _latent_weights(inputs: TermInputs) -> Tensor | None:
    if inputs.prefixes is None:
        return None
    return matryoshka.prefix_weights(inputs.prefixes, inputs.sae.cfg.d_sae, inputs.sae.W_dec)


class Penalty(Term):
    """λ·S, S the penalty over all latents (prefix-averaged under Matryoshka)."""

    name = "penalty"

    def __init__(self, cfg: PenaltyConfig):
        self.cfg = cfg

    def __call__(self, inputs: TermInputs) -> Tensor:
        cfg, sae = self.cfg, inputs.sae
        weights = _latent_weights(inputs)
        if isinstance(cfg, L0Penalty):
            steps_NM = sae.activation.l0_step(inputs.out.encoding.preacts)
            if isinstance(cfg, QuadraticL0Penalty):
                return inputs.lam * losses.quadratic_l0_penalty(steps_NM, cfg.target_l0)
            return inputs.lam * losses.l0_penalty(steps_NM, weights)
        value = losses.sparsity_penalty(
            sae.activation.penalty_latents(inputs.out.encoding),
            sae.W_dec.norm(dim=-1),
            cfg.kind,
            latent_weights_M=weights,
            **cfg.shape_params(),
        )
        return inputs.lam * value


class AuxK(Term):
    name = "revival"

    def __init__(self, cfg: AuxKRevival):
        self.cfg = cfg

    def __call__(self, inputs: TermInputs) -> Tensor:
        out = inputs.out
        return revival.auxk_loss(
            out.encoding.preacts,
            (out.target() - out.x_hat_n).detach(),  # residual = target − prediction
            inputs.sae.W_dec,
            inputs.dead_mask,
            k_aux=self.cfg.k_aux,
            alpha=self.cfg.coefficient,
            normalizer=self.cfg.normalizer,
            dead_cols=inputs.dead_cols,
            token_fraction=self.cfg.token_fraction,
        )


class PreactTerm(Term):
    name = "revival"

    def __init__(self, cfg: PreactRevival):
        self.cfg = cfg

    def __call__(self, inputs: TermInputs) -> Tensor:
        sae, enc = inputs.sae, inputs.out.encoding
        theta = sae.activation.firing_threshold(enc)
        dec_norms = sae.W_dec.norm(dim=-1)
        return self.cfg.coefficient * revival.dead_preact_loss(
            enc.preacts, inputs.dead_mask, theta, dec_norms
        )


class ActivationAux(Term):
    """The activation's own extra term (``Activation.auxiliary_loss``; Gated's)."""

    name = "aux"

    def __call__(self, inputs: TermInputs) -> Tensor:
        return inputs.sae.activation.auxiliary_loss(inputs.sae, inputs.out)


class Objective:
    """The terms of one SAE's loss; calling it returns (total, contribution of each term)."""

    def __init__(self, terms: list[Term]):
        names = [t.name for t in terms]
        if len(set(names)) != len(names):
            raise ValueError(f"objective: duplicate terms {names}")
        self.terms = terms

    def __call__(self, inputs: TermInputs) -> tuple[Tensor, dict[str, Tensor]]:
        parts = {term.name: term(inputs) for term in self.terms}
        total = sum(parts.values())
        return total, parts

    def __repr__(self) -> str:
        return " + ".join(type(t).__name__ for t in self.terms)


def resolve_revival(cfg: RevivalConfig | None, activation: type[Activation]) -> RevivalConfig:
    """``None`` means the activation's default: AuxK where it applies, else none."""
    if cfg is not None:
        return cfg
    return AuxKRevival() if "auxk" in activation.revival_signals else NoRevival()


def build_objective(
    activation: type[Activation],
    penalty: PenaltyConfig | None,
    revival_cfg: RevivalConfig | None,
) -> Objective:
    """The terms for one SAE, or a ValueError naming the fields that do not fit together.

    Field names are as in an ``saes`` entry of a run config (``sae.activation.kind``, ...).
    """
    kind = activation.config_class.kind
    terms: list[Term] = [Reconstruction()]
    if penalty is None and activation.needs_penalty:
        raise ValueError(
            f"sae.activation.kind {kind!r} is sparse only through a penalty: set penalty "
            f"(one of {PenaltyConfig.kinds()})"
        )
    if penalty is not None:
        if isinstance(penalty, L0Penalty) and not activation.overrides("l0_step"):
            raise ValueError(
                f"penalty.kind {penalty.kind!r} needs thresholds; sae.activation.kind {kind!r} has "
                "none (use jumprelu)"
            )
        terms.append(Penalty(penalty))
    revival_cfg = resolve_revival(revival_cfg, activation)
    if revival_cfg.signal and revival_cfg.signal not in activation.revival_signals:
        applies = sorted(activation.revival_signals) or ["none"]
        raise ValueError(
            f"revival.kind {revival_cfg.kind!r} does not apply to sae.activation.kind {kind!r} "
            f"(it takes revival: {applies})"
        )
    if isinstance(revival_cfg, AuxKRevival):
        terms.append(AuxK(revival_cfg))
    elif isinstance(revival_cfg, PreactRevival):
        terms.append(PreactTerm(revival_cfg))
    if activation.overrides("auxiliary_loss"):
        terms.append(ActivationAux())
    return Objective(terms)
