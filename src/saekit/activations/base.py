"""The interface every activation implements: its config, its encode, its flags and hooks.

An activation *is* the architecture: it owns a config (a :class:`ActivationConfig` kind, saved
inside the SAE's cfg.json), turns normalised inputs into an :class:`~saekit.core.encoding.Encoding`,
says which training machinery applies to it (unit-norm decoder rows, revival signals, an L0
penalty on its thresholds), and updates its own state after an optimizer step. Nothing else in
saekit switches on an activation's name. Adding one = one file here plus one import line in
``saekit/activations/__init__.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor, nn

from saekit.core.configs import KindConfig
from saekit.core.encoding import Encoding, Preacts, SparseCode, encoder_preacts
from saekit.objective import losses

if TYPE_CHECKING:
    from saekit.core.comm import Comm
    from saekit.core.encoding import ForwardOutput
    from saekit.model.sae import SAE


class ActivationConfig(KindConfig):
    """Base of the activation configs (one dataclass per kind, in that kind's module)."""

    family = "activation"

    def name_parts(self) -> list[str]:
        """What distinguishes this configuration in a default SAE name (e.g. ["topk", "k32"])."""
        return [self.kind]

    def check_d_sae(self, d_sae: int) -> None:
        """Raise ValueError naming the field when this config cannot work with d_sae latents."""


class Activation(nn.Module):
    """Base: ``encode(sae, x_n) -> Encoding`` and the flags the objective and trainer read."""

    config_class: ClassVar[type[ActivationConfig]]
    unit_norm_decoder: ClassVar[bool] = False
    """Decoder rows kept at unit norm (gradient parallel to each row removed before the step,
    rows renormalised after). Penalty-trained activations leave the decoder free and weight
    their penalty by ‖W_dec,i‖ instead (docs/design.md)."""
    revival_signals: ClassVar[frozenset[str]] = frozenset()
    """Revival terms that act on this activation's dead latents ("auxk", "preact")."""
    needs_penalty: ClassVar[bool] = False
    """Nothing but a sparsity penalty makes this activation sparse (ReLU, ProLU)."""
    uses_encoder_bias: ClassVar[bool] = True
    """False where the activation owns its bias (ProLU): b_enc stays 0 and gets no gradient."""
    uses_encoder_weights: ClassVar[bool] = True
    """False where the decoder encodes (tied, Matching Pursuit): W_enc gets no gradient."""

    def __init__(self, cfg: ActivationConfig, d_sae: int):
        super().__init__()
        self.cfg = cfg
        self.d_sae = d_sae

    def preacts(self, sae: SAE, x_n_ND: Tensor) -> Preacts:
        """The affine encoder with dense autograd (the reference path)."""
        b_enc = sae.b_enc if self.uses_encoder_bias else None
        return Preacts(encoder_preacts(x_n_ND, sae.W_enc, b_enc, sae.input_center))

    def encode(self, sae: SAE, x_n_ND: Tensor) -> Encoding:
        raise NotImplementedError

    def l0_step(self, preacts: Preacts) -> Tensor:
        """H(pre − θ) [N, M] with a straight-through gradient to the thresholds (and, where the
        activation says so, to the pre-activations), for the L0 penalties. Only activations
        with learned thresholds (JumpReLU) implement it."""
        raise NotImplementedError(f"{type(self).__name__} has no thresholds for an L0 penalty")

    def firing_threshold(self, enc: Encoding) -> Tensor:
        """θ the pre-activation revival pushes dead latents toward: [N, 1], 0-d or [M]."""
        raise NotImplementedError(f"{type(self).__name__} has no firing threshold")

    @torch.no_grad()
    def after_step(self, enc: Encoding, comm: Comm) -> None:
        """Update state that follows the training batches (BatchTopK's θ EMA); default none.
        ``comm``: the collectives of the ranks that share the batch (one process: identity)."""

    # Loss hooks (saekit.objective.terms): an activation with a loss of its own overrides one of
    # these instead of adding a branch to the objective.

    def reconstruction_loss(self, sae: SAE, out: ForwardOutput) -> Tensor:
        """The objective's reconstruction term: mean_n ‖y_n − ŷ_n‖² (y = x for an SAE) unless
        overridden (HierarchicalTopK: the mean over every prefix k' ≤ K)."""
        return losses.reconstruction_loss(out.target(), out.x_hat_n)

    def penalty_latents(self, enc: Encoding) -> Tensor | SparseCode:
        """What the sparsity penalty is applied to: the latents unless overridden (Gated: the
        gate's ReLU pre-activations)."""
        return enc.latents

    def auxiliary_loss(self, sae: SAE, out: ForwardOutput) -> Tensor:
        """The activation's own extra loss term, logged as "aux" (Gated's auxiliary
        reconstruction). The objective has the term only where an activation overrides this."""
        raise NotImplementedError(f"{type(self).__name__} has no auxiliary loss")

    @classmethod
    def overrides(cls, hook: str) -> bool:
        """Whether this activation implements ``hook`` (l0_step, auxiliary_loss, ...)."""
        return getattr(cls, hook) is not getattr(Activation, hook)

    def extra_repr(self) -> str:
        return repr(self.cfg)
