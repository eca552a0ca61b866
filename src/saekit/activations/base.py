"""The interface every activation implements: its config, its encode, its flags and hooks.

An activation *is* the architecture: it owns a config (a :class:`ActivationConfig` kind, saved
inside the SAE's cfg.json), turns normalised inputs into an :class:`~saekit.core.encoding.Encoding`
from an :class:`~saekit.core.encoding.EncoderView` (the SAE's weights, never the SAE), says
which training machinery applies to it (unit-norm decoder rows, revival signals, an L0 penalty
on its thresholds), and updates its own state after an optimizer step. What the rest of saekit
would otherwise switch on its name for is a hook here, with a default: its loss terms, its
export and import form (:class:`ExportForm`, saekit.interop), the JumpReLU that computes its
inference (:meth:`Activation.as_jumprelu`, ``saekit convert``), whether evaluation calibrates
its threshold, its inference-L0 target, the per-latent bias a report plots, and the upgrade of
its tensors from an older checkpoint. Nothing else in saekit compares an activation's kind name
or type-checks an activation (tests/activations/test_architecture_ownership.py scans for it). Adding
one = one file here plus one line in ``saekit/activations/__init__.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from saekit.core.configs import KindConfig
from saekit.core.encoding import EncoderView, Encoding, Preacts, SparseCode, encoder_preacts
from saekit.objective import losses

if TYPE_CHECKING:
    from saekit.core.comm import Comm
    from saekit.core.encoding import ForwardOutput
    from saekit.core.shard import LatentShard


class ActivationConfig(KindConfig):
    """Base of the activation configs (one dataclass per kind, in that kind's module)."""

    family = "activation"

    def name_parts(self) -> list[str]:
        """What distinguishes this configuration in a default SAE name (e.g. ["topk", "k32"])."""
        return [self.kind]

    def check_d_sae(self, d_sae: int) -> None:
        """Raise ValueError naming the field when this config cannot work with d_sae latents."""

    def inference_l0_target(self, penalty_target: float | None) -> float | None:
        """The L0 this SAE's inference should reach (saekit.eval.calibrate.l0_target warns when
        it is more than 10% off): by default the λ controller's ``penalty_target`` (None: no
        target). The TopK family: None (exactly k by construction); BatchTopK: k."""
        return penalty_target

    @classmethod
    def from_export(cls, form: ExportForm) -> ActivationConfig:
        """The config of an imported SAE of this kind (saekit.interop): defaults, plus the
        fields the portable form carries (k)."""
        return cls()


class ExportForm(NamedTuple):
    """An activation as the other libraries serve it: the portable architecture (one of
    saekit.interop.portable.SERVED, e.g. "jumprelu") and what it needs besides the affine
    weights W_enc, b_enc, W_dec, b_dec (which saekit.interop folds and carries itself)."""

    architecture: str
    k: int | None = None
    """Active latents per token (topk, abstopk, batchtopk)."""
    threshold: Tensor | None = None
    """θ: [M] for jumprelu, 0-d for batchtopk (on the CPU)."""
    extra: dict[str, Tensor] | None = None
    """Further per-latent tensors by name (gated: r_mag, b_mag)."""


class JumpReLUForm(NamedTuple):
    """The JumpReLU SAE that computes an activation's inference exactly: the same weights, this
    config and these thresholds (:meth:`Activation.as_jumprelu`)."""

    config: ActivationConfig
    """A JumpReLUConfig."""
    threshold: Tensor
    """[M] θ_i, in the activation's threshold dtype."""
    metadata: dict[str, Any]
    """What the converted SAE's metadata records (converted_from, target_l0)."""


def check_imported(where: str, value: Tensor | None, shape: tuple[int, ...]) -> Tensor:
    """An imported tensor of the expected shape, or ValueError naming it (saekit.interop turns
    it into an InteropError)."""
    if value is None or tuple(value.shape) != shape:
        found = None if value is None else tuple(value.shape)
        raise ValueError(f"{where} has shape {found}, expected {shape}")
    return value


class Activation(nn.Module):
    """Base: ``encode(view, x_n) -> Encoding`` and the flags the objective and trainer read."""

    config_class: ClassVar[type[ActivationConfig]]
    unit_norm_decoder: ClassVar[bool] = False
    """Decoder rows kept at unit norm (gradient parallel to each row removed before the step,
    rows renormalised after). Penalty-trained activations leave the decoder free and weight
    their penalty by ‖W_dec,i‖ instead (docs/design.md)."""
    revival_signals: ClassVar[frozenset[str]] = frozenset()
    """Revival terms that act on this activation's dead latents ("auxk", "preact")."""
    calibrated_threshold: ClassVar[bool] = False
    """Its inference compares pre with a threshold that evaluation first calibrates on held-out
    data (saekit.eval.calibrate.calibrate_batchtopk; BatchTopK)."""
    needs_penalty: ClassVar[bool] = False
    """Nothing but a sparsity penalty makes this activation sparse (ReLU, ProLU)."""
    uses_encoder_bias: ClassVar[bool] = True
    """False where the activation owns its bias (ProLU): b_enc stays 0 and gets no gradient."""
    uses_encoder_weights: ClassVar[bool] = True
    """False where the decoder encodes (tied, Matching Pursuit): W_enc gets no gradient."""

    def __init__(self, cfg: ActivationConfig, d_sae: int, groups: int = 1):
        super().__init__()
        if not isinstance(groups, int) or groups <= 0 or d_sae % groups:
            raise ValueError(f"{groups!r} latent groups do not divide d_sae = {d_sae}")
        self.cfg = cfg
        self.d_sae = d_sae
        self.groups = groups
        """G: the latents form G equal consecutive groups (a cross-layer transcoder's layers,
        saekit.model.clt); a per-token selection (TopK) keeps k per token and group."""

    def preacts(self, view: EncoderView, x_n_ND: Tensor) -> Preacts:
        """The affine encoder with dense autograd (the reference path)."""
        b_enc = view.b_enc if self.uses_encoder_bias else None
        return Preacts(encoder_preacts(x_n_ND, view.W_enc, b_enc, view.input_center))

    def encode(self, view: EncoderView, x_n_ND: Tensor) -> Encoding:
        raise NotImplementedError

    def encode_sharded(self, view: EncoderView, x_n_ND: Tensor, shard: LatentShard) -> Encoding:
        """``encode`` on one part of a latent-sharded dictionary (saekit.train.latent_parallel):
        ``view`` and this activation hold the part's M/T latents, and the latents returned are
        the part's (local indices) of exactly what ``encode`` selects over all M (a selection
        with a global view asks ``shard``'s collectives). An activation that is per-latent
        (ReLU, JumpReLU) returns ``encode``; one without a sharded form leaves this default, and
        a latent-parallel run refuses it."""
        raise NotImplementedError(f"{type(self).__name__} has no latent-sharded form")

    def encode_preacts_sharded(self, pre: Preacts, shard: LatentShard) -> Encoding:
        """``encode_preacts`` on one part of a latent-sharded dictionary that computes its own
        pre-activations (a cross-layer transcoder's part: M/T latents of each of its ``groups``
        layers, [N, G·M/T]): exactly what ``encode_preacts`` selects over the whole one, in
        this part's local indices. Unimplemented: a latent-parallel CLT refuses it."""
        raise NotImplementedError(f"{type(self).__name__} has no latent-sharded form")

    def encode_preacts(self, pre: Preacts) -> Encoding:
        """Latents from pre-activations the dictionary computed itself (a cross-layer
        transcoder's L encoders, each reading its own layer: saekit.kernels.layered), over the
        ``groups`` of latents. The activations whose encode is a function of the affine encoder's
        pre alone implement it (``encode`` then calls it); the others (tied, gated, their own
        bias) do not, and a dictionary that needs it refuses them (``overrides``)."""
        raise NotImplementedError(f"{type(self).__name__} encodes from x_n, not from given pre")

    def encode_group(self, pre: Preacts, group: int) -> Encoding:
        """Group ``group``'s latents alone from their pre-activations [N, d_sae/G]: the
        latents :meth:`encode_preacts` over all groups gives them (a cross-layer transcoder's
        one layer, encoded as a model reaches it: saekit.model.clt_layers). Only where the
        groups are separable: TopK per group, any per-latent rule; not a selection across
        groups (BatchTopK in training)."""
        raise NotImplementedError(f"{type(self).__name__} does not encode one latent group alone")

    def l0_step(self, preacts: Preacts) -> Tensor:
        """H(pre − θ) [N, M] with a straight-through gradient to the thresholds (and, where the
        activation says so, to the pre-activations), for the L0 penalties. Only activations
        with learned thresholds (JumpReLU) implement it."""
        raise NotImplementedError(f"{type(self).__name__} has no thresholds for an L0 penalty")

    def firing_threshold(self, enc: Encoding) -> Tensor:
        """θ the pre-activation revival pushes dead latents toward: [N, 1], 0-d or [M]."""
        raise NotImplementedError(f"{type(self).__name__} has no firing threshold")

    def firing_threshold_sharded(self, enc: Encoding, shard: LatentShard) -> Tensor:
        """``firing_threshold`` on one part of a latent-sharded dictionary: the WHOLE
        dictionary's θ (per token or per batch: every part's value; per latent: this part's
        [M/T]), for the sharded "preact" revival (saekit.objective.sharded). Unimplemented: a
        latent-parallel run refuses that revival."""
        raise NotImplementedError(f"{type(self).__name__} has no latent-sharded firing threshold")

    @torch.no_grad()
    def after_step(self, enc: Encoding, comm: Comm) -> None:
        """Update state that follows the training batches (BatchTopK's θ EMA); default none.
        ``comm``: the collectives of the ranks that share the batch (one process: identity)."""

    # Loss hooks (saekit.objective.terms): an activation with a loss of its own overrides one of
    # these instead of adding a branch to the objective.

    def reconstruction_loss(self, view: EncoderView, out: ForwardOutput) -> Tensor:
        """The objective's reconstruction term: mean_n ‖y_n − ŷ_n‖² (y = x for an SAE) unless
        overridden (HierarchicalTopK: the mean over every prefix k' ≤ K)."""
        return losses.reconstruction_loss(out.target(), out.x_hat_n)

    def reconstruction_blocks(
        self, view: EncoderView, latents: Tensor | SparseCode, shard: LatentShard
    ) -> Tensor:
        """Where ``reconstruction_loss`` is the mean of the prefix errors of blocks δ_j (each
        prefix's prediction is b_dec + Σ_{j' ≤ j} δ_j'), this part's share of the blocks
        [B, N, d_out] of a latent-sharded dictionary (HierarchicalTopK: each token's rank
        positions); saekit.objective.sharded sums them over the parts. Only an activation that
        overrides ``reconstruction_loss`` that way implements it."""
        raise NotImplementedError(f"{type(self).__name__} has no sharded reconstruction blocks")

    def level_code(self, latents: Tensor | SparseCode, end: int, k: int) -> Tensor | SparseCode:
        """The code a Matryoshka level with its own K reconstructs from (``matryoshka.level_k``):
        the latents restricted to their ``k`` largest below ``end``, by this activation's own
        selection — per token (TopK) or the k·N largest of the batch (BatchTopK), the formula
        in saekit.objective.matryoshka.level_code. Only activations whose config has a field
        ``k`` implement it; the others refuse ``level_k``."""
        raise NotImplementedError(f"{type(self).__name__} keeps no k largest latents")

    def penalty_latents(self, enc: Encoding) -> Tensor | SparseCode:
        """What the sparsity penalty is applied to: the latents unless overridden (Gated: the
        gate's ReLU pre-activations)."""
        return enc.latents

    def auxiliary_loss(self, view: EncoderView, out: ForwardOutput) -> Tensor:
        """The activation's own extra loss term, logged as "aux" (Gated's auxiliary
        reconstruction). The objective has the term only where an activation overrides this."""
        raise NotImplementedError(f"{type(self).__name__} has no auxiliary loss")

    # Hooks for saekit.interop, saekit convert, the report and old checkpoints.

    def export_form(self) -> ExportForm | None:
        """How the other libraries serve this activation, or None where none computes it
        exactly (the default; saekit.interop refuses the export)."""
        return None

    def load_export(self, form: ExportForm) -> None:
        """Set this activation's own state (thresholds, extra parameters) from an imported
        portable form; ValueError names a tensor of the wrong shape or value. Default: none."""

    def as_jumprelu(self) -> JumpReLUForm | None:
        """The JumpReLU that computes this activation's inference (``saekit convert``; the
        export of BatchTopK), or None where there is none (the default)."""
        return None

    def plot_bias(self, view: EncoderView) -> Tensor:
        """The per-latent bias [M] a report histograms: b_enc unless the activation owns its
        bias (ProLU)."""
        return view.b_enc

    @classmethod
    def upgrade_tensors(cls, fields: dict[str, Any], found: dict[str, Tensor]) -> dict[str, Tensor]:
        """An older checkpoint's tensors under today's names, given the activation's saved
        config ``fields`` (saekit.model.format.upgrade_tensors). Default: unchanged."""
        return found

    @classmethod
    def overrides(cls, hook: str) -> bool:
        """Whether this activation implements ``hook`` (l0_step, auxiliary_loss, ...)."""
        return getattr(cls, hook) is not getattr(Activation, hook)

    def extra_repr(self) -> str:
        return repr(self.cfg)
