"""Reconstruction and sparsity penalties as pure functions of tensors.

Everything lives in the normalised space (x_n = x / s) and is a mean over tokens; leading
dimensions are flattened to N tokens. Formulas: docs/design.md, section "Losses". Revival
losses: :mod:`saekit.objective.revival`; Matryoshka: :mod:`saekit.objective.matryoshka`; how
they are combined: :mod:`saekit.objective.terms`.

None of these functions syncs with the host: no ``.item()``, no boolean indexing, no Python
branch on a tensor's value. Latents come dense ``z [N, M]`` or as a
:class:`~saekit.core.encoding.SparseCode`; every function gives the same number for both forms.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from saekit.core.encoding import SparseCode


class PenaltyShape(Protocol):
    """A sparsity penalty's f (saekit.objective.config's penalty kinds implement it)."""

    def terms(self, a: Tensor) -> Tensor:
        """f(a) elementwise (a ≥ 0)."""
        ...

    def at_zero(self) -> float:
        """f(0)."""
        ...


def reconstruction_loss(x_n: Tensor, x_hat_n: Tensor) -> Tensor:
    """L_rec = mean_n ‖x_n − x̂_n‖²: squared error summed over d, mean over tokens.

    Computed as Σ (x_n − x̂_n)² / N by one fused kernel (``F.mse_loss``, reduction "sum"), whose
    backward is one pass over [N, d]; ``(x_n − x̂_n).pow(2)`` took 8× as long forward and
    backward on the project's CPU (benchmarks/README.md, "Losses").
    """
    shape = torch.broadcast_shapes(x_n.shape, x_hat_n.shape)  # as x_n − x̂_n would broadcast
    dtype = torch.promote_types(x_n.dtype, x_hat_n.dtype)
    x_ND = x_n.to(dtype).expand(shape).reshape(-1, shape[-1])
    x_hat_ND = x_hat_n.to(dtype).expand(shape).reshape(-1, shape[-1])
    return F.mse_loss(x_hat_ND, x_ND, reduction="sum") / x_ND.shape[0]


def token_squared_errors(y_n: Tensor, y_hat_n: Tensor) -> Tensor:
    """ℓ_n = ‖y_n − ŷ_n‖² per token, [N] (leading dimensions flattened, as
    :func:`reconstruction_loss`), at least float32 (a bf16-autocast prediction is promoted)."""
    shape = torch.broadcast_shapes(y_n.shape, y_hat_n.shape)
    dtype = torch.promote_types(torch.promote_types(y_n.dtype, y_hat_n.dtype), torch.float32)
    err_ND = (y_n.to(dtype) - y_hat_n.to(dtype)).expand(shape).reshape(-1, shape[-1])
    return err_ND.pow(2).sum(-1)


def tilted_mean(loss_N: Tensor, tilt: float) -> Tensor:
    """Tilted empirical risk of per-token losses ℓ_n ≥ 0 [N], unit-free:
    R(t) = m·(1/t)·log mean_n exp(t·ℓ_n/m), m = stop_grad(mean_n ℓ_n); t = 0: mean_n ℓ_n.

    TERM (Li, Beirami, Sanjabi, Smith, "Tilted Empirical Risk Minimization", ICLR 2021, arXiv
    2007.01162) is (1/t) log mean_n exp(t·ℓ_n); saekit tilts ℓ_n/m so that t does not depend on
    the data's scale (m is detached: the gradient is Σ_n softmax(t·ℓ/m)_n ∇ℓ_n, the paper's
    tilted weights). t > 0 weights the worst-reconstructed tokens up (t → ∞: the max), t < 0
    down (t → −∞: the min); R(t) → mean_n ℓ_n as t → 0. logsumexp keeps exp(t·ℓ/m) finite;
    m is clamped to the dtype's smallest normal so an exact reconstruction (every ℓ_n = 0)
    gives 0, not nan, and ℓ/m (≤ N) is formed before t multiplies it: t/m first overflows to
    inf at m = tiny for |t| > 4 and gave 0·inf = nan. No host sync (t is a Python float).
    """
    if tilt == 0:
        return loss_N.mean()
    m = loss_N.detach().mean().clamp_min(torch.finfo(loss_N.dtype).tiny)
    log_mean = torch.logsumexp(loss_N / m * tilt, 0) - math.log(loss_N.numel())
    return m / tilt * log_mean


def tilted_reconstruction_loss(y_n: Tensor, y_hat_n: Tensor, tilt: float) -> Tensor:
    """:func:`tilted_mean` of the per-token squared errors ‖y_n − ŷ_n‖² (the plain
    reconstruction term with ``reconstruction_tilt: t``); t = 0 is :func:`reconstruction_loss`
    itself, so the default trains exactly as before."""
    if tilt == 0:
        return reconstruction_loss(y_n, y_hat_n)
    return tilted_mean(token_squared_errors(y_n, y_hat_n), tilt)


# --------------------------------------------------------------------------------------------
# Sparsity penalties


def sparsity_penalty(
    latents: Tensor | SparseCode,
    dec_norms_M: Tensor,
    penalty: PenaltyShape,
    latent_weights_M: Tensor | None = None,
) -> Tensor:
    """S = mean_n Σ_i w_i f(|z_ni|·‖W_dec,i‖), summed over ALL M latents, f the ``penalty``
    kind's (:meth:`saekit.objective.config.PenaltyConfig.terms`; w_i = 1 by default; Matryoshka
    passes its prefix weights, :func:`saekit.objective.matryoshka.prefix_weights`).

    For log and sqrt an inactive latent still contributes the constant f(0) (log ε, sqrt ε), as
    in the Matryoshka note; it has no gradient but shifts the value. The sparse form adds that
    constant for the entries it does not store (a code holds each (token, latent) at most once),
    so both forms give the same number and the same gradient.
    """
    if isinstance(latents, SparseCode):
        n_tokens, d_sae = latents.n_tokens, latents.d_sae
        a_E = latents.values.abs() * dec_norms_M[latents.latent]  # [nnz]
        terms_E = penalty.terms(a_E)
        f0 = penalty.at_zero()
        if latent_weights_M is None:
            absent = n_tokens * d_sae - latents.values.numel()
            return terms_E.sum() / n_tokens + absent * f0 / n_tokens
        w_E = latent_weights_M[latents.latent]
        value = (w_E * terms_E).sum() / n_tokens
        if f0 != 0.0:  # Σ_i w_i·(N − stored_i)·f(0) / N
            stored_M = torch.zeros_like(latent_weights_M).index_add(
                0, latents.latent, torch.ones_like(w_E)
            )
            value = value + f0 * (latent_weights_M * (n_tokens - stored_M)).sum() / n_tokens
        return value
    z_NM = latents.reshape(-1, latents.shape[-1])
    terms_NM = penalty.terms(z_NM.abs() * dec_norms_M)
    if latent_weights_M is not None:
        terms_NM = terms_NM * latent_weights_M
    return terms_NM.sum(-1).mean()


def _l0_per_token(step_NM: Tensor, latent_weights_M: Tensor | None) -> Tensor:
    """L0_n = Σ_i w_i H(pre_ni − θ_i) [N] (w_i = 1 by default)."""
    step_NM = step_NM.reshape(-1, step_NM.shape[-1])
    if latent_weights_M is not None:
        step_NM = step_NM * latent_weights_M
    return step_NM.sum(-1)


def l0_penalty(step_NM: Tensor, latent_weights_M: Tensor | None = None) -> Tensor:
    """L0 = mean_n Σ_i w_i H(pre_ni − θ_i) from the activation's straight-through step
    (:meth:`saekit.activations.base.Activation.l0_step`), whose gradient reaches θ (and the
    pre-activations where the activation passes it on)."""
    return _l0_per_token(step_NM, latent_weights_M).mean()


def quadratic_l0_penalty(step_NM: Tensor, target_l0: float) -> Tensor:
    """mean_n (2/T)·(L0_n − T)², L0_n = Σ_i H(pre_ni − θ_i) as in :func:`l0_penalty`, T the
    target L0 (not defined under Matryoshka: SAETrainConfig refuses the pair).

    The quadratic target-L0 penalty of Gemma Scope 2 (Google DeepMind, "Gemma Scope 2"
    technical paper, 2025), in the form SAELens PR #732 reproduces it. It pushes each token's L0
    toward T from both sides, where λ·L0 only ever lowers it; its slope in L0_n,
    (4/T)·(L0_n − T), stays within ±4 while 0 ≤ L0_n ≤ 2T, so λ keeps the plain penalty's scale.
    """
    return quadratic_l0_of(_l0_per_token(step_NM, None), target_l0)


def quadratic_l0_of(l0_N: Tensor, target_l0: float) -> Tensor:
    """mean_n (2/T)·(L0_n − T)² from each token's L0_n [N] (:func:`quadratic_l0_penalty`; a
    latent-sharded dictionary sums L0_n over its parts first)."""
    return (2.0 / target_l0 * (l0_N - target_l0).pow(2)).mean()


class LambdaController:
    """Nudges a sparsity coefficient λ multiplicatively toward a target L0.

    ``λ ← λ · exp(rate · clamp(log(L0 / target), −1, 1))``: λ grows while L0 is above the target
    and shrinks while it is below, proportionally in log space and by at most a factor e^rate per
    step. λ is a tensor on L0's device, so :meth:`step` never syncs with the host.
    """

    def __init__(
        self,
        lam: float,
        target_l0: float,
        rate: float = 0.01,
        min_lam: float = 1e-8,
        max_lam: float = 1e4,
        dtype: torch.dtype = torch.float32,
    ):
        if lam <= 0 or target_l0 <= 0 or rate <= 0:
            raise ValueError("LambdaController: lam, target_l0 and rate must be positive")
        self.lam = torch.tensor(float(lam), dtype=dtype)
        self.target_l0 = float(target_l0)
        self.rate = float(rate)
        self.min_lam = float(min_lam)
        self.max_lam = float(max_lam)

    @torch.no_grad()
    def step(self, l0: Tensor) -> Tensor:
        """One update from this batch's L0 (a 0-d tensor); returns the new λ."""
        l0 = l0.detach().to(self.lam.dtype)
        log_ratio = torch.log(l0 / self.target_l0).clamp(-1.0, 1.0)  # log 0 = −inf → −1
        lam = self.lam.to(l0.device) * torch.exp(self.rate * log_ratio)
        self.lam = lam.clamp(self.min_lam, self.max_lam)
        return self.lam

    def state_dict(self) -> dict[str, Tensor | float]:
        return {
            "lam": self.lam.detach().clone(),
            "target_l0": self.target_l0,
            "rate": self.rate,
            "min_lam": self.min_lam,
            "max_lam": self.max_lam,
        }

    def load_state_dict(self, state: dict[str, Tensor | float]) -> None:
        self.lam = torch.as_tensor(state["lam"], dtype=self.lam.dtype).clone()
        self.target_l0 = float(state["target_l0"])
        self.rate = float(state["rate"])
        self.min_lam = float(state["min_lam"])
        self.max_lam = float(state["max_lam"])


class Autotuner:
    """λ = coefficient · m, the multiplier m moved toward a target L0 by the SynthSAEBench
    experiments' controller (decoderesearch/synth-sae-bench-experiments,
    saes/components/coefficient_autotuner.py, used by the paper's L1 and JumpReLU SAEs).

    Per step, from the batch L0 ℓ: the first call sets s = ℓ; later ones s ← β·s + (1 − β)·ℓ
    (β = 0.99) and the rate r ← β_r·r + (1 − β_r)·(s − s_prev) (β_r = 0.95). From step
    ``start`` on, with e = s − T: g = ``convergence`` (0.01) if e·r < 0 (moving toward T) else
    1, a = K_i · g · tanh(10·|e| / T), m ← m·(1 + a) if e > 0 else m·(1 − a), clamped to
    [0.01, 100] (e = 0 moves nothing: the source's "e ≤ deadband 0" return). Host floats
    (the source calls ``.item()`` each step too): the state is a few Python numbers.
    """

    SMOOTHING, RATE_SMOOTHING, GAIN_SCALE, CONVERGENCE = 0.99, 0.95, 10.0, 0.01
    MIN_MULTIPLIER, MAX_MULTIPLIER = 1e-2, 100.0

    def __init__(self, coefficient: float, target_l0: float, integral_gain: float = 3e-4,
                 start: int = 0, dtype: torch.dtype = torch.float32):  # fmt: skip
        if coefficient <= 0 or target_l0 <= 0 or integral_gain <= 0 or start < 0:
            raise ValueError("Autotuner: coefficient, target_l0, integral_gain must be > 0")
        self.coefficient, self.target_l0 = float(coefficient), float(target_l0)
        self.integral_gain, self.start, self.dtype = float(integral_gain), int(start), dtype
        self.multiplier, self.smoothed, self.rate, self.steps = 1.0, 0.0, 0.0, 0

    @property
    def lam(self) -> Tensor:
        return torch.tensor(self.coefficient * self.multiplier, dtype=self.dtype)

    @torch.no_grad()
    def step(self, l0: Tensor) -> Tensor:
        value = float(l0)
        if self.steps == 0:
            self.smoothed, self.rate = value, 0.0
        else:
            previous = self.smoothed
            self.smoothed = self.SMOOTHING * self.smoothed + (1 - self.SMOOTHING) * value
            change = self.smoothed - previous
            self.rate = self.RATE_SMOOTHING * self.rate + (1 - self.RATE_SMOOTHING) * change
        self.steps += 1
        error = self.smoothed - self.target_l0
        if self.steps - 1 >= self.start and error != 0:
            gain = self.CONVERGENCE if error * self.rate < 0 else 1.0
            adjust = self.integral_gain * gain * math.tanh(abs(error / self.target_l0)
                                                           * self.GAIN_SCALE)  # fmt: skip
            m = self.multiplier * (1 + adjust if error > 0 else 1 - adjust)
            self.multiplier = min(self.MAX_MULTIPLIER, max(self.MIN_MULTIPLIER, m))
        return self.lam

    def state_dict(self) -> dict[str, Tensor | float]:
        keys = ("coefficient", "target_l0", "integral_gain", "start", "multiplier", "smoothed",
                "rate", "steps")  # fmt: skip
        return {key: torch.tensor(float(getattr(self, key)), dtype=torch.float64) for key in keys}

    def load_state_dict(self, state: dict[str, Tensor | float]) -> None:
        for key, value in state.items():
            setattr(self, key, int(value) if key in ("start", "steps") else float(value))


def warmup_factor(step: int, warmup_steps: int) -> float:
    """min(1, (step + 1) / warmup_steps), 1 without warm-up (SAELens's coefficient warm-up,
    training/optim.py CoefficientScheduler)."""
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
