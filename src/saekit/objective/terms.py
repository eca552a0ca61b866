"""One SAE's training objective: a list of terms built and checked once from the config.

    loss = reconstruction (plain, or Matryoshka over prefixes) + λ·penalty + revival

Each term reads a :class:`TermInputs` (the model, its forward output, the dead mask, λ and this
step's prefixes) and returns its contribution to the loss. Terms see the model through two
small protocols defined here, :class:`Dictionary` (its activation and its
:class:`~saekit.core.encoding.EncoderView`) and :class:`ObjectiveActivation` (the flags and
loss hooks of :class:`saekit.activations.base.Activation`), so the objective imports neither
the activations nor the model. Which terms exist, and whether they
fit the activation, is decided in :func:`build_objective`; an incompatible combination is
refused there with a message naming both fields. The term configs are :class:`KindConfig`
families, so a field that means nothing for a kind is refused instead of ignored.
Formulas: :mod:`saekit.objective.losses`, :mod:`saekit.objective.revival`,
:mod:`saekit.objective.matryoshka`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, NamedTuple, Protocol

from torch import Tensor

from saekit.objective import losses, matryoshka, revival
from saekit.objective.config import (
    AuxKRevival,
    FixedPrefixes,
    InputRevival,
    L0Penalty,
    MatryoshkaAuxKRevival,
    MatryoshkaConfig,
    NoRevival,
    PenaltyConfig,
    PreactRevival,
    QuadraticL0Penalty,
    RevivalConfig,
)

if TYPE_CHECKING:
    from saekit.core.encoding import EncoderView, Encoding, ForwardOutput, Preacts, SparseCode
    from saekit.core.shard import LatentShard


class ObjectiveActivation(Protocol):
    """What the objective asks of an activation, as a class (flags, in :func:`build_objective`)
    or an instance (loss hooks, in the terms): saekit.activations.base.Activation."""

    config_class: ClassVar[type]
    needs_penalty: ClassVar[bool]
    revival_signals: ClassVar[frozenset[str]]

    def overrides(self, hook: str) -> bool: ...

    def reconstruction_loss(self, view: EncoderView, out: ForwardOutput) -> Tensor: ...

    def penalty_latents(self, enc: Encoding) -> Tensor | SparseCode: ...

    def l0_step(self, preacts: Preacts) -> Tensor: ...

    def firing_threshold(self, enc: Encoding) -> Tensor: ...

    def firing_threshold_sharded(self, enc: Encoding, shard: LatentShard) -> Tensor: ...

    def level_code(self, latents: Tensor | SparseCode, end: int, k: int) -> Tensor | SparseCode: ...

    def auxiliary_loss(self, view: EncoderView, out: ForwardOutput) -> Tensor: ...


class Dictionary(Protocol):
    """What the terms read of the model being trained (saekit.model.sae.SAE): its activation and
    its encoder view (W_enc, b_enc, input centre, W_dec, b_dec, W_skip)."""

    activation: ObjectiveActivation

    def encoder_view(self) -> EncoderView: ...


# ----------------------------------------------------------------------------- terms


class TermInputs(NamedTuple):
    """What every term of one step reads."""

    sae: Dictionary
    """The model (an SAE or a transcoder)."""
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
    """mean_n ‖y_n − ŷ_n‖² (the activation's own where it has one), Matryoshka's mean over
    prefixes, or with ``tilt`` t ≠ 0 their tilted forms (losses.tilted_mean; logged as such);
    fixed levels may detach the inner levels and give each level its own K
    (FixedPrefixes.detach_inner, .level_k)."""

    name = "reconstruction"

    def __init__(
        self, tilt: float = 0.0, detach_inner: bool = False, level_k: list[int] | None = None
    ):
        self.tilt, self.detach_inner, self.level_k = tilt, detach_inner, level_k

    def __call__(self, inputs: TermInputs) -> Tensor:
        out, view = inputs.out, inputs.sae.encoder_view()
        if inputs.prefixes is None:
            if self.tilt:  # build_objective refused an activation with its own loss
                return losses.tilted_reconstruction_loss(out.target(), out.x_hat_n, self.tilt)
            return inputs.sae.activation.reconstruction_loss(view, out)
        # each prefix's prediction starts from b_dec (+ a transcoder's skip path x_n W_skipᵀ)
        offset = view.decoder_offset_n(out.x_n)
        if self.level_k is None:
            return matryoshka.matryoshka_reconstruction_loss(
                out.target(), out.latents, view.W_dec, offset, inputs.prefixes,
                tilt=self.tilt, detach_inner=self.detach_inner,
            )  # fmt: skip
        if len(self.level_k) != len(inputs.prefixes):
            raise ValueError(f"matryoshka.level_k has {len(self.level_k)} entries for "
                             f"{len(inputs.prefixes)} levels")  # fmt: skip
        # the last level (k_P = k, the whole dictionary) decodes the full code itself
        activation, inner = inputs.sae.activation, zip(inputs.prefixes, self.level_k, strict=True)
        codes = [activation.level_code(out.latents, end, k) for end, k in list(inner)[:-1]]
        return matryoshka.level_reconstruction_loss(
            out.target(), [*codes, out.latents], view.W_dec, offset, inputs.prefixes,
            self.detach_inner, tilt=self.tilt,
        )  # fmt: skip


def _latent_weights(inputs: TermInputs) -> Tensor | None:
    if inputs.prefixes is None:
        return None
    W_dec = inputs.sae.encoder_view().W_dec
    return matryoshka.prefix_weights(inputs.prefixes, W_dec.shape[0], W_dec)


class Penalty(Term):
    """λ·S, S the penalty over all latents (prefix-averaged under Matryoshka)."""

    name = "penalty"

    def __init__(self, cfg: PenaltyConfig):
        self.cfg = cfg

    def __call__(self, inputs: TermInputs) -> Tensor:
        cfg, activation = self.cfg, inputs.sae.activation
        weights = _latent_weights(inputs)
        if isinstance(cfg, L0Penalty):
            steps_NM = activation.l0_step(inputs.out.encoding.preacts)
            if isinstance(cfg, QuadraticL0Penalty):
                return inputs.lam * losses.quadratic_l0_penalty(steps_NM, cfg.target_l0)
            return inputs.lam * losses.l0_penalty(steps_NM, weights)
        value = losses.sparsity_penalty(
            activation.penalty_latents(inputs.out.encoding),
            inputs.sae.encoder_view().decoder_norms(),
            cfg,
            latent_weights_M=weights,
        )
        return inputs.lam * value


class AuxK(Term):
    name = "revival"

    def __init__(self, cfg: AuxKRevival):
        self.cfg = cfg

    def target(self, inputs: TermInputs) -> Tensor:  # residual = target − prediction
        return (inputs.out.target() - inputs.out.x_hat_n).detach()

    def __call__(self, inputs: TermInputs) -> Tensor:
        out, view = inputs.out, inputs.sae.encoder_view()
        return revival.auxk_loss(
            out.encoding.preacts,
            self.target(inputs),
            view.W_dec,
            inputs.dead_mask,
            k_aux=self.cfg.k_aux,
            alpha=self.cfg.coefficient,
            normalizer=self.cfg.normalizer,
            dead_cols=inputs.dead_cols,
            token_fraction=self.cfg.token_fraction,
            decode=view.decode_code,  # a cross-layer transcoder's own (ragged) decoders
        )


class InputAuxK(AuxK):  # the "input" revival
    def target(self, inputs: TermInputs) -> Tensor:
        # the target less what the latents' sum is added to (SAE: x_n − b_dec)
        out, view = inputs.out, inputs.sae.encoder_view()
        return revival.input_target(out.target(), view.decoder_offset_n(out.x_n))


class MatryoshkaAuxK(AuxK):
    """AuxK per prefix level, each against its own prefix's residual (revival.py): the full
    code's below p_j, whatever matryoshka.level_k and detach_inner (docs/design.md, "Matryoshka
    levels": dead latents fit what the prefix's latents cannot explain, not the live latents a
    level's k_j drops; the residual is detached, so detach_inner changes nothing here)."""

    def __call__(self, inputs: TermInputs) -> Tensor:
        if inputs.prefixes is None:
            raise ValueError("revival.kind 'matryoshka_auxk' needs matryoshka prefixes")
        out, view = inputs.out, inputs.sae.encoder_view()
        d = view.W_dec.shape[-1]
        # e_j = target − offset − Σ_{blocks ≤ j} δ (the prefix reconstructions, running sums)
        deltas = matryoshka.block_deltas(out.latents, view.W_dec, inputs.prefixes)
        start = out.target().reshape(-1, d) - view.decoder_offset_n(out.x_n).reshape(-1, d)
        residual_PND = (start - deltas.cumsum(0)).detach()
        return revival.matryoshka_auxk_loss(
            out.encoding.preacts, residual_PND, view.W_dec, inputs.dead_mask,
            list(inputs.prefixes), k_aux=self.cfg.k_aux, alpha=self.cfg.coefficient,
            normalizer=self.cfg.normalizer,
        )  # fmt: skip


class PreactTerm(Term):
    name = "revival"

    def __init__(self, cfg: PreactRevival):
        self.cfg = cfg

    def __call__(self, inputs: TermInputs) -> Tensor:
        enc = inputs.out.encoding
        theta = inputs.sae.activation.firing_threshold(enc)
        dec_norms = inputs.sae.encoder_view().decoder_norms()
        return self.cfg.coefficient * revival.dead_preact_loss(
            enc.preacts, inputs.dead_mask, theta, dec_norms
        )


class ActivationAux(Term):
    """The activation's own extra term (``Activation.auxiliary_loss``; Gated's)."""

    name = "aux"

    def __call__(self, inputs: TermInputs) -> Tensor:
        return inputs.sae.activation.auxiliary_loss(inputs.sae.encoder_view(), inputs.out)


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


def resolve_revival(
    cfg: RevivalConfig | None, activation: type[ObjectiveActivation]
) -> RevivalConfig:
    """``None`` means the activation's default: AuxK where it applies, else none."""
    if cfg is not None:
        return cfg
    return AuxKRevival() if "auxk" in activation.revival_signals else NoRevival()


def build_objective(
    activation: type[ObjectiveActivation],
    penalty: PenaltyConfig | None,
    revival_cfg: RevivalConfig | None,
    *,
    reconstruction_tilt: float = 0.0,
    matryoshka_cfg: MatryoshkaConfig | None = None,
) -> Objective:
    """The terms for one SAE, or a ValueError naming the fields that do not fit together.

    Field names are as in an ``saes`` entry of a run config (``sae.activation.kind``, ...).
    ``matryoshka_cfg``: read for the fixed levels' options (the prefixes come each step).
    """
    kind = activation.config_class.kind
    if reconstruction_tilt and activation.overrides("reconstruction_loss"):
        raise ValueError(
            f"reconstruction_tilt does not apply to sae.activation.kind {kind!r}: it has its own "
            "reconstruction loss"
        )
    detach_inner, level_k = False, None
    if isinstance(matryoshka_cfg, FixedPrefixes):
        detach_inner, level_k = matryoshka_cfg.detach_inner, matryoshka_cfg.level_k
    if level_k is not None and not activation.overrides("level_code"):
        raise ValueError(
            f"matryoshka.level_k needs an activation that keeps its k largest latents (topk, "
            f"abstopk, batchtopk); sae.activation.kind {kind!r} does not"
        )
    terms: list[Term] = [Reconstruction(reconstruction_tilt, detach_inner, level_k)]
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
    if isinstance(revival_cfg, MatryoshkaAuxKRevival):
        terms.append(MatryoshkaAuxK(revival_cfg))
    elif isinstance(revival_cfg, InputRevival):
        terms.append(InputAuxK(revival_cfg))
    elif isinstance(revival_cfg, AuxKRevival):
        terms.append(AuxK(revival_cfg))
    elif isinstance(revival_cfg, PreactRevival):
        terms.append(PreactTerm(revival_cfg))
    if activation.overrides("auxiliary_loss"):
        terms.append(ActivationAux())
    return Objective(terms)
