"""Gated SAE (Rajamanoharan et al. 2024, arXiv 2404.16014, eqs. 6–9), weight-tied gate:

    π_gate = (x_n − b_dec) W_gateᵀ + b_gate        W_gate = W_enc, b_gate = b_enc
    π_mag  = (x_n − b_dec) W_magᵀ + b_mag          W_mag = exp(r_mag) ⊙ W_gate (row-wise)
    z      = 1[π_gate > 0] ⊙ ReLU(π_mag)

The Heaviside gate has no gradient: the reconstruction trains the magnitude path (W_gate
through W_mag, r_mag, b_mag) and the decoder; the gate path learns only from

    L_sparsity = λ · mean_n Σ_i ReLU(π_gate)_ni · ‖W_dec,i‖     (the ``penalty``, e.g. l1)
    L_aux      = mean_n ‖x_n − (ReLU(π_gate) sg(W_dec) + sg(b_dec))‖²   (sg: stop-gradient)

The paper fixes ‖W_dec,i‖ = 1; saekit leaves the decoder free and weights the penalty by the
decoder norms instead (as for ReLU, docs/design.md), which is the paper's penalty whenever the
norms are 1. Saved as ``activation.r_mag`` and ``activation.b_mag`` beside the shared weights;
SAELens' "gated" architecture has the same parameters (b_gate = saekit's b_enc).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from saekit.activations.base import Activation, ActivationConfig, ExportForm, check_imported
from saekit.core.configs import check_finite
from saekit.core.encoding import EncoderView, Encoding, Preacts, encoder_preacts
from saekit.objective import losses

if TYPE_CHECKING:
    from saekit.core.encoding import ForwardOutput


@dataclass
class GatedConfig(ActivationConfig):
    kind = "gated"
    aux_coefficient: float = 1.0
    """Weight of L_aux (the paper's is 1)."""

    def __post_init__(self) -> None:
        check_finite("aux_coefficient", self.aux_coefficient, 0.0)


class Gated(Activation):
    config_class = GatedConfig
    needs_penalty = True

    def __init__(self, cfg: GatedConfig, d_sae: int, groups: int = 1):
        super().__init__(cfg, d_sae, groups)
        self.r_mag = nn.Parameter(torch.zeros(d_sae))
        self.b_mag = nn.Parameter(torch.zeros(d_sae))

    def encode(self, view: EncoderView, x_n_ND: Tensor) -> Encoding:
        m_NM = encoder_preacts(x_n_ND, view.W_enc, None, view.input_center)  # (x_n − b_dec) W_gateᵀ
        pi_gate_NM = m_NM + view.b_enc
        pi_mag_NM = m_NM * self.r_mag.exp() + self.b_mag
        gate_NM = (pi_gate_NM > 0).to(pi_mag_NM.dtype)
        return Encoding(gate_NM * torch.relu(pi_mag_NM), Preacts(pi_gate_NM))

    def export_form(self) -> ExportForm:
        """b_gate = b_enc; r_mag and b_mag act on pre-activations the scale fold leaves
        unchanged."""
        extra = {n: getattr(self, n).detach().cpu() for n in ("r_mag", "b_mag")}
        return ExportForm("gated", extra=extra)

    @torch.no_grad()
    def load_export(self, form: ExportForm) -> None:
        for name in ("r_mag", "b_mag"):
            value = (form.extra or {}).get(name)
            getattr(self, name).copy_(check_imported(f"gated {name}", value, (self.d_sae,)))

    def penalty_latents(self, enc: Encoding) -> Tensor:
        """ReLU(π_gate): the penalty trains the gate, not the magnitudes."""
        return torch.relu(enc.preacts.dense())

    def auxiliary_loss(self, view: EncoderView, out: ForwardOutput) -> Tensor:
        """α · L_aux: the gate alone reconstructs through the frozen decoder."""
        gate_NM = torch.relu(out.encoding.preacts.dense())
        offset = view.decoder_offset_n(out.x_n).detach()  # b_dec (+ a transcoder's skip path)
        x_hat_gate_ND = torch.addmm(offset, gate_NM, view.W_dec.detach())
        return self.cfg.aux_coefficient * losses.reconstruction_loss(out.target(), x_hat_gate_ND)
