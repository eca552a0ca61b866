"""ProLU (Glen Taggart 2024, docs/references/prolu-comments-and-metrics.txt):
m = (x_n − b_dec) W_encᵀ with NO encoder bias, per-latent bias b, z = m·H(m + b)·H(m).

With gate = H(m + b)·H(m), two backward variants: "relu": ∂m = g·gate, ∂b = g·gate;
"ste": ∂m = g·gate·(1 + m), ∂b = g·gate·m.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from saekit.activations.base import Activation, ActivationConfig, ExportForm
from saekit.core.encoding import EncoderView, Encoding

VARIANTS = ("ste", "relu")


class _ProLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, m: Tensor, bias: Tensor, variant: str) -> Tensor:
        gate = ((m + bias) > 0) & (m > 0)
        ctx.save_for_backward(m, gate)
        ctx.variant = variant
        return m * gate.to(m.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        m, gate = ctx.saved_tensors
        g_gate = grad * gate.to(grad.dtype)
        if ctx.variant == "ste":
            grad_m, grad_b_NM = g_gate * (1 + m), g_gate * m
        else:
            grad_m, grad_b_NM = g_gate, g_gate
        return grad_m, grad_b_NM.reshape(-1, m.shape[-1]).sum(0), None


def prolu(m: Tensor, bias: Tensor, variant: str) -> Tensor:
    return _ProLUFn.apply(m, bias, variant)


@dataclass
class ProLUConfig(ActivationConfig):
    kind = "prolu"
    variant: str = "ste"
    """Backward variant: ste or relu."""

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")

    def name_parts(self) -> list[str]:
        return [self.kind] if self.variant == "ste" else [self.kind, self.variant]


class ProLU(Activation):
    config_class = ProLUConfig
    needs_penalty = True
    uses_encoder_bias = False

    def __init__(self, cfg: ProLUConfig, d_sae: int, groups: int = 1):
        super().__init__(cfg, d_sae, groups)
        self.bias = nn.Parameter(torch.zeros(d_sae))

    def encode(self, view: EncoderView, x_n_ND: Tensor) -> Encoding:
        m = self.preacts(view, x_n_ND)
        return Encoding(prolu(m.dense(), self.bias, self.cfg.variant), m)

    def export_form(self) -> ExportForm:
        """z = m·H(m + b)·H(m) is m·H(m − max(−b, 0)): JumpReLU with b_enc = 0 (ProLU's b_enc
        stays 0) and θ_i = max(−b_i, 0)."""
        theta = (-self.bias.detach().cpu()).clamp_min(0.0)
        return ExportForm("jumprelu", threshold=theta)

    def plot_bias(self, view: EncoderView) -> Tensor:
        """b, the bias ProLU owns (b_enc stays 0)."""
        return self.bias
