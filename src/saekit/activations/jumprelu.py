"""JumpReLU (Rajamanoharan et al. 2024): z = pre · H(pre − θ), θ per latent, trained through
straight-through estimates with the rectangle kernel K(u) = 1[|u| < ½] and bandwidth ε:

    ∂z/∂pre = H(pre − θ)·g            ∂z/∂θ = −(θ/ε)·K((pre − θ)/ε)·g
    ∂H/∂θ   = −(1/ε)·K((pre − θ)/ε)·g  (the L0 penalty's step; no gradient to pre)

θ = exp(log_threshold): autograd multiplies the θ-gradient by θ on its way to log_threshold
(the chain rule one public implementation forgot).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from saekit.activations.base import Activation, ActivationConfig
from saekit.configs import check_finite
from saekit.encoding import Encoding

if TYPE_CHECKING:
    from saekit.sae import SAE


def _rectangle(u: Tensor) -> Tensor:
    """K(u) = 1[|u| < 1/2]."""
    return (u.abs() < 0.5).to(u.dtype)


class _JumpReLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = grad * (pre > threshold).to(pre.dtype)
        grad_theta_NM = -(threshold / eps) * _rectangle((pre - threshold) / eps) * grad
        grad_theta = grad_theta_NM.reshape(-1, pre.shape[-1]).sum(0)
        return grad_pre, grad_theta, None


class _StepFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_theta_NM = -(1.0 / eps) * _rectangle((pre - threshold) / eps) * grad
        return None, grad_theta_NM.reshape(-1, pre.shape[-1]).sum(0), None


def jumprelu(pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """pre · H(pre − θ) with the straight-through θ-gradient."""
    return _JumpReLUFn.apply(pre, threshold, bandwidth)


def step(pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """H(pre − θ) with the straight-through θ-gradient (the L0 penalty's)."""
    return _StepFn.apply(pre, threshold, bandwidth)


@dataclass
class JumpReLUConfig(ActivationConfig):
    kind = "jumprelu"
    init_threshold: float = 0.001
    """Initial per-latent θ (normalised space)."""
    bandwidth: float = 0.001
    """ε of the straight-through rectangle kernel."""

    def __post_init__(self) -> None:
        check_finite("init_threshold", self.init_threshold, 0.0, strict=True)
        check_finite("bandwidth", self.bandwidth, 0.0, strict=True)


class JumpReLU(Activation):
    config_class = JumpReLUConfig
    revival_signals = frozenset({"preact"})

    def __init__(self, cfg: JumpReLUConfig, d_sae: int):
        super().__init__(cfg, d_sae)
        self.log_threshold = nn.Parameter(torch.full((d_sae,), math.log(cfg.init_threshold)))

    @property
    def threshold(self) -> Tensor:
        return self.log_threshold.exp()

    def encode(self, sae: SAE, x_n_ND: Tensor) -> Encoding:
        pre = self.preacts(sae, x_n_ND)
        return Encoding(jumprelu(pre.dense(), self.threshold, self.cfg.bandwidth), pre)

    def l0_step(self, pre_NM: Tensor) -> Tensor:
        return step(pre_NM, self.threshold, self.cfg.bandwidth)

    def firing_threshold(self, enc: Encoding) -> Tensor:
        return self.threshold.detach()
