"""The sparsifying nonlinearities, each a small module, and their straight-through functions.

Every activation maps pre-activations ``pre [N, M]`` (normalised space, encoder bias already
added) to latents. Dense activations return ``z [N, M]``; the TopK family returns a
:class:`SparseCode`. Formulas: ../shared/DESIGN.md, section "Activations".
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn


class SparseCode(NamedTuple):
    """Latents in coordinate form, sorted by token. Entries may hold an exact 0 (a kept ReLU 0).

    The shape is fixed by the activation (N·k entries for TopK and BatchTopK), so building it needs
    no host sync.
    """

    values: Tensor
    """[nnz] latent activations (differentiable)."""
    latent: Tensor
    """[nnz] int64 latent index in [0, d_sae)."""
    token: Tensor
    """[nnz] int64 token index in [0, n_tokens), non-decreasing."""
    n_tokens: int
    """N, the number of tokens the code describes."""
    d_sae: int
    """M, the number of latents."""

    def to_dense(self) -> Tensor:
        """The dense latents [N, M]; differentiable with respect to ``values``."""
        dense_NM = self.values.new_zeros(self.n_tokens, self.d_sae)
        return dense_NM.index_put((self.token, self.latent), self.values, accumulate=True)


def token_offsets(code: SparseCode) -> Tensor:
    """[N] index of each token's first entry (the code is sorted by token); no host sync."""
    tokens_N = torch.arange(code.n_tokens, device=code.token.device)
    return torch.searchsorted(code.token, tokens_N)


def weighted_row_sum(weights_E: Tensor, rows_E: Tensor, offsets_B: Tensor, W_MD: Tensor) -> Tensor:
    """out[b] = Σ_{e in bag b} w_e · W[row_e]; bag b is entries [offsets[b], offsets[b+1]).

    A sparse decode without bias (saekit.kernels.sparse_decode): no [nnz, d] rows in either
    direction, and W_MD's gradient as bags by latent instead of embedding_bag's own dense weight
    backward (several times slower on CPU); bf16 weights under autocast are fine.
    """
    # Imported here: saekit.kernels imports this module.
    from saekit.kernels.sparse import CodeLayout
    from saekit.kernels.sparse import sparse_decode as decode

    entries_E = torch.arange(rows_E.numel(), device=rows_E.device)
    token_E = torch.searchsorted(offsets_B, entries_E, right=True) - 1  # bag of each entry
    layout = CodeLayout(token_E, rows_E, offsets_B.numel(), W_MD.shape[0], offsets_B)
    return decode(weights_E, rows_E, token_E, W_MD, offsets_B.numel(), layout)


def sparse_decode(code: SparseCode, W_MD: Tensor) -> Tensor:
    """[N, d] = Σ_entries value · W[latent], summed per token, without bias."""
    from saekit.kernels.sparse import sparse_decode as decode  # kernels imports this module

    return decode(code.values, code.latent, code.token, W_MD, code.n_tokens)


def as_dense(latents: Tensor | SparseCode) -> Tensor:
    """Dense [N, M] latents from either form."""
    return latents.to_dense() if isinstance(latents, SparseCode) else latents


# --------------------------------------------------------------------------------------------
# Straight-through functions (JumpReLU, Heaviside step for the L0 penalty, ProLU)


def _rectangle(u: Tensor) -> Tensor:
    """Kernel K(u) = 1[|u| < 1/2] of the straight-through estimators."""
    return (u.abs() < 0.5).to(u.dtype)


class _JumpReLUFn(torch.autograd.Function):
    """z = pre · H(pre − θ). ∂z/∂pre = H(pre − θ)·g; ∂z/∂θ = −(θ/ε)·K((pre − θ)/ε)·g."""

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
    """H(pre − θ), for the L0 penalty. ∂/∂θ = −(1/ε)·K((pre − θ)/ε)·g; no gradient to pre."""

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
    """JumpReLU with a rectangle-kernel straight-through estimate for the threshold."""
    return _JumpReLUFn.apply(pre, threshold, bandwidth)


def step(pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """Heaviside H(pre − θ) with a straight-through gradient for θ (the L0 penalty's)."""
    return _StepFn.apply(pre, threshold, bandwidth)


class _ProLUFn(torch.autograd.Function):
    """z = m · H(m + b) · H(m), with the two backward variants of the ProLU note.

    gate = H(m + b)·H(m). "relu": ∂m = g·gate, ∂b = g·gate. "ste": ∂m = g·gate·(1 + m),
    ∂b = g·gate·m.
    """

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


# --------------------------------------------------------------------------------------------
# Activation modules


class Activation(nn.Module):
    """Base: ``forward(pre) -> z`` (dense) or a SparseCode.

    ``uses_encoder_bias`` is False where the activation owns its bias (ProLU); then the SAE hands
    it ``pre`` without ``b_enc``.
    """

    sparse: bool = False
    uses_encoder_bias: bool = True

    def __init__(self, d_sae: int):
        super().__init__()
        self.d_sae = d_sae


class ReLU(Activation):
    """z = ReLU(pre)."""

    def forward(self, pre: Tensor) -> Tensor:
        return torch.relu(pre)


def topk_code(pre_NM: Tensor, k: int) -> SparseCode:
    """The k largest of ReLU(pre) per token, as a code with N·k entries."""
    n_tokens, d_sae = pre_NM.shape
    top = pre_NM.topk(k, dim=-1, sorted=False)
    values_Nk = torch.relu(top.values)
    token_Nk = torch.arange(n_tokens, device=pre_NM.device).unsqueeze(1).expand(-1, k)
    return SparseCode(
        values_Nk.reshape(-1), top.indices.reshape(-1), token_Nk.reshape(-1), n_tokens, d_sae
    )


class TopK(Activation):
    """Keep the k largest of ReLU(pre) per token."""

    sparse = True

    def __init__(self, d_sae: int, k: int):
        super().__init__(d_sae)
        self.k = k

    def forward(self, pre: Tensor) -> SparseCode:
        return topk_code(pre, self.k)

    def extra_repr(self) -> str:
        return f"k={self.k}"


class BatchTopK(Activation):
    """Training: keep the k·N largest of ReLU(pre) over the whole batch. Eval: z = pre·1[pre > θ].

    θ is an EMA of the smallest positive kept activation of each training batch (first update
    θ = m, then θ ← βθ + (1−β)m). The trainer calls :meth:`update_threshold`; nothing here syncs.
    """

    sparse = True

    def __init__(self, d_sae: int, k: int, threshold_beta: float = 0.999):
        super().__init__(d_sae)
        self.k = k
        self.threshold_beta = threshold_beta
        self.register_buffer("threshold", torch.zeros(()))
        self.register_buffer("threshold_initialized", torch.zeros((), dtype=torch.bool))

    def forward(self, pre: Tensor) -> SparseCode | Tensor:
        if not self.training:
            return pre * (pre > self.threshold).to(pre.dtype)
        n_tokens, d_sae = pre.shape
        top = pre.reshape(-1).topk(self.k * n_tokens, sorted=False)
        flat_idx, order = top.indices.sort()  # sorted by token, so the code is CSR-ordered
        values = torch.relu(top.values[order])
        return SparseCode(
            values,
            flat_idx % d_sae,
            torch.div(flat_idx, d_sae, rounding_mode="floor"),
            n_tokens,
            d_sae,
        )

    @staticmethod
    def batch_min_positive(code: SparseCode) -> Tensor:
        """m: the smallest positive kept activation (inf if none is positive)."""
        values = code.values.detach()
        return torch.where(values > 0, values, torch.full_like(values, math.inf)).min()

    @torch.no_grad()
    def update_threshold(self, batch_min: Tensor) -> None:
        """One EMA step toward ``batch_min`` (a 0-d tensor); skipped when it is inf."""
        batch_min = batch_min.to(self.threshold.dtype)
        beta = self.threshold_beta
        ema = torch.where(
            self.threshold_initialized, beta * self.threshold + (1 - beta) * batch_min, batch_min
        )
        finite = torch.isfinite(batch_min)
        self.threshold.copy_(torch.where(finite, ema, self.threshold))
        self.threshold_initialized.copy_(self.threshold_initialized | finite)

    def extra_repr(self) -> str:
        return f"k={self.k}, threshold_beta={self.threshold_beta}"


class JumpReLU(Activation):
    """z = pre · H(pre − θ), θ = exp(log_threshold) per latent, rectangle-kernel STE."""

    def __init__(self, d_sae: int, init_threshold: float = 0.001, bandwidth: float = 0.001):
        super().__init__(d_sae)
        self.bandwidth = bandwidth
        self.log_threshold = nn.Parameter(torch.full((d_sae,), math.log(init_threshold)))

    @property
    def threshold(self) -> Tensor:
        return self.log_threshold.exp()

    def forward(self, pre: Tensor) -> Tensor:
        return jumprelu(pre, self.threshold, self.bandwidth)

    def extra_repr(self) -> str:
        return f"bandwidth={self.bandwidth}"


class ProLU(Activation):
    """m = (x_n − b_dec) W_encᵀ (no encoder bias), z = m·H(m + b)·H(m), b per latent."""

    uses_encoder_bias = False

    def __init__(self, d_sae: int, variant: str = "ste"):
        super().__init__(d_sae)
        self.variant = variant
        self.bias = nn.Parameter(torch.zeros(d_sae))

    def forward(self, pre: Tensor) -> Tensor:
        return _ProLUFn.apply(pre, self.bias, self.variant)

    def extra_repr(self) -> str:
        return f"variant={self.variant!r}"


ACTIVATIONS: dict[str, type[Activation]] = {
    "relu": ReLU,
    "topk": TopK,
    "batchtopk": BatchTopK,
    "jumprelu": JumpReLU,
    "prolu": ProLU,
}
