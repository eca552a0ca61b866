"""JumpReLU (Rajamanoharan et al. 2024, arXiv 2407.14435): z = pre · H(pre − θ), θ per latent,
trained through straight-through estimates with the rectangle kernel K(u) = 1[|u| < ½] and
bandwidth ε:

    ∂z/∂pre = H(pre − θ)·g            ∂z/∂θ = −(θ/ε)·K((pre − θ)/ε)·g
    ∂H/∂θ   = −(1/ε)·K((pre − θ)/ε)·g  (the L0 penalty's step)

With ``ste_to_input`` the estimate reaches the pre-activations too (Anthropic, "Circuits
Updates – January 2025"; SAELens PR #728): z and H depend on pre only through pre − θ, so each
adds the negation of its θ-term, ∂z/∂pre += (θ/ε)·K·g and ∂H/∂pre = (1/ε)·K·g. Without it,
the L0 penalty reaches θ only (the paper's choice).

θ is the parameter itself by default (``threshold_param: direct``). Adam moves a parameter by
about lr per step, so under ``log`` (the paper's App. J, θ = exp(log θ)) θ moves by only about
θ·lr: at θ = 0.001 and lr 1e-3 that is 1e-6 per step (SAELens PR #718). A direct θ is projected
back to θ ≥ 0 after each step (below 0 the gate would pass negative pre-activations). θ is kept
in float32 whatever the weight dtype: bf16 has ~0.4% resolution, which rounds Adam's ~lr steps
on an O(1) θ away (SAELens PR #728).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from saekit.activations.base import (
    Activation,
    ActivationConfig,
    ExportForm,
    check_imported,
)
from saekit.core.configs import check_finite
from saekit.core.encoding import EncoderView, Encoding, Preacts

if TYPE_CHECKING:
    from saekit.core.comm import Comm
    from saekit.core.shard import LatentShard

THRESHOLD_PARAMS = ("direct", "log")


def _rectangle(u: Tensor) -> Tensor:
    """K(u) = 1[|u| < 1/2]."""
    return (u.abs() < 0.5).to(u.dtype)


def _theta_grad(grad_NM: Tensor, d_sae: int) -> Tensor:
    """Sum a per-entry θ-gradient over every leading dimension: [..., M] -> [M]."""
    return grad_NM.reshape(-1, d_sae).sum(0)


class _JumpReLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float, to_input: bool) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth, ctx.to_input = bandwidth, to_input
        return pre * (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        ste_NM = (threshold / eps) * _rectangle((pre - threshold) / eps) * grad
        grad_pre = grad * (pre > threshold).to(pre.dtype)
        if ctx.to_input:
            grad_pre = grad_pre + ste_NM.to(pre.dtype)
        return grad_pre, _theta_grad(-ste_NM, pre.shape[-1]).to(threshold.dtype), None, None


class _StepFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float, to_input: bool) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth, ctx.to_input = bandwidth, to_input
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        ste_NM = (1.0 / eps) * _rectangle((pre - threshold) / eps) * grad
        grad_pre = ste_NM.to(pre.dtype) if ctx.to_input else None
        return grad_pre, _theta_grad(-ste_NM, pre.shape[-1]).to(threshold.dtype), None, None


def jumprelu(pre: Tensor, threshold: Tensor, bandwidth: float, to_input: bool = False) -> Tensor:
    """pre · H(pre − θ) with the straight-through θ-gradient (and pre-gradient with
    ``to_input``)."""
    return _JumpReLUFn.apply(pre, threshold, bandwidth, to_input)


def step(pre: Tensor, threshold: Tensor, bandwidth: float, to_input: bool = False) -> Tensor:
    """H(pre − θ) with the straight-through θ-gradient (the L0 penalty's)."""
    return _StepFn.apply(pre, threshold, bandwidth, to_input)


def jumprelu_export(theta: Tensor) -> ExportForm:
    """θ [M] as SAELens' JumpReLU serves it, ReLU(pre)·H(pre − θ_i): the same latents when every
    θ_i ≥ 0, else ValueError."""
    if (theta < 0).any():  # pre in (θ, 0] would give a negative latent; SAELens' would be 0
        raise ValueError(
            f"{int((theta < 0).sum())} JumpReLU thresholds are negative; SAELens' JumpReLU "
            "applies a ReLU first, so it cannot compute this SAE"
        )
    return ExportForm("jumprelu", threshold=theta)


def imported_threshold(where: str, value: Tensor | None, shape: tuple[int, ...]) -> Tensor:
    """An imported θ of ``shape``, finite and ≥ 0, as float32; else ValueError."""
    theta = check_imported(f"{where} threshold", value, shape)
    if not torch.isfinite(theta).all() or (theta < 0).any():
        raise ValueError(f"{where} threshold must be finite and ≥ 0")
    return theta.float()


@dataclass
class JumpReLUConfig(ActivationConfig):
    kind = "jumprelu"
    init_threshold: float = 0.001
    """Initial per-latent θ (normalised space)."""
    bandwidth: float = 0.001
    """ε of the straight-through rectangle kernel."""
    threshold_param: str = "direct"
    """What Adam trains: ``direct`` (θ itself, projected to θ ≥ 0) or ``log`` (log θ, the
    paper's App. J; θ then moves by only ~θ·lr per step, SAELens PR #718)."""
    ste_to_input: bool = False
    """Pass the straight-through estimate to the pre-activations (and so the encoder) as well as
    to θ (Anthropic, January 2025 update); False: θ only (the paper)."""

    def __post_init__(self) -> None:
        check_finite("init_threshold", self.init_threshold, 0.0, strict=True)
        check_finite("bandwidth", self.bandwidth, 0.0, strict=True)
        if self.threshold_param not in THRESHOLD_PARAMS:
            raise ValueError(
                f"threshold_param must be one of {THRESHOLD_PARAMS}, got {self.threshold_param!r}"
            )
        if not isinstance(self.ste_to_input, bool):
            raise ValueError(f"ste_to_input must be true or false, got {self.ste_to_input!r}")


class JumpReLU(Activation):
    config_class = JumpReLUConfig
    revival_signals = frozenset({"preact"})

    def __init__(self, cfg: JumpReLUConfig, d_sae: int, groups: int = 1):
        super().__init__(cfg, d_sae, groups)
        init = torch.full((d_sae,), cfg.init_threshold, dtype=torch.float32)
        if cfg.threshold_param == "log":
            self.log_threshold = nn.Parameter(init.log())
        else:
            self.threshold = nn.Parameter(init)

    def export_form(self) -> ExportForm:
        return jumprelu_export(self.theta().detach().cpu())

    @torch.no_grad()
    def load_export(self, form: ExportForm) -> None:
        theta = imported_threshold("jumprelu", form.threshold, (self.d_sae,))
        self.threshold.copy_(theta)  # threshold_param: direct (from_export's default)

    @classmethod
    def upgrade_tensors(cls, fields: dict[str, Any], found: dict[str, Tensor]) -> dict[str, Tensor]:
        """A JumpReLU saved before ``threshold_param`` existed trained log θ and holds
        ``activation.log_threshold``; its config (no ``threshold_param``) now means a direct θ,
        which is exp(log θ) computed as that code did (same op, same float32), so the loaded SAE
        encodes bit for bit as the saved one did."""
        legacy = "activation.log_threshold"
        if "threshold_param" not in fields and legacy in found:
            found = dict(found)
            found["activation.threshold"] = found.pop(legacy).exp()
        return found

    def theta(self) -> Tensor:
        """θ [M], differentiable: the parameter itself, or exp(log θ) (autograd then multiplies
        the θ-gradient by θ on its way to log θ, the chain rule one implementation forgot)."""
        if self.cfg.threshold_param == "log":
            return self.log_threshold.exp()
        return self.threshold

    def _apply(self, fn, recurse: bool = True):
        # Module.to(dtype) casts every float parameter; θ stays at least float32 (module doc).
        out = super()._apply(fn, recurse)
        for param in self._parameters.values():
            if param is not None and param.dtype in (torch.bfloat16, torch.float16):
                param.data = param.data.float()  # in place: an optimizer keeps its reference
        return out

    def encode(self, view: EncoderView, x_n_ND: Tensor) -> Encoding:
        return self.encode_preacts(self.preacts(view, x_n_ND))

    def encode_preacts(self, pre: Preacts) -> Encoding:
        z = jumprelu(pre.dense(), self.theta(), self.cfg.bandwidth, self.cfg.ste_to_input)
        return Encoding(z, pre)

    def encode_sharded(self, view: EncoderView, x_n_ND: Tensor, shard: LatentShard) -> Encoding:
        return self.encode(view, x_n_ND)  # per latent: each part encodes its own

    def encode_preacts_sharded(self, pre: Preacts, shard: LatentShard) -> Encoding:
        return self.encode_preacts(pre)  # per latent: each part encodes its own

    def encode_group(self, pre: Preacts, group: int) -> Encoding:
        """Per latent, with the group's own thresholds."""
        width = self.d_sae // self.groups
        theta = self.theta()[group * width : (group + 1) * width]
        z = jumprelu(pre.dense(), theta, self.cfg.bandwidth, self.cfg.ste_to_input)
        return Encoding(z, pre)

    def l0_step(self, preacts: Preacts) -> Tensor:
        # The penalty reaches the encoder only when the estimate goes to the input as well.
        to_input = self.cfg.ste_to_input
        pre_NM = preacts.dense() if to_input else preacts.detached
        return step(pre_NM, self.theta(), self.cfg.bandwidth, to_input)

    def firing_threshold(self, enc: Encoding) -> Tensor:
        return self.theta().detach()

    def firing_threshold_sharded(self, enc: Encoding, shard: LatentShard) -> Tensor:
        return self.firing_threshold(enc)  # per latent: this part's [M/T]

    @torch.no_grad()
    def after_step(self, enc: Encoding, comm: Comm) -> None:
        if self.cfg.threshold_param == "direct":
            self.threshold.clamp_(min=0.0)
