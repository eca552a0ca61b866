"""Training objectives as pure functions of tensors; the trainer composes them.

Everything lives in the normalised space (x_n = x / s) and is a mean over tokens; leading
dimensions are flattened to N tokens. Formulas: ../shared/DESIGN.md, section "Losses".

None of these functions syncs with the host: no ``.item()``, no boolean indexing, no Python
branch on a tensor's value. Shapes are fixed by the inputs (k_aux, the number of prefixes), so a
step can be captured in a CUDA graph.

Latents come in two forms: dense ``z [N, M]`` or a :class:`~saekit.activations.SparseCode`
(TopK, BatchTopK). Every function that takes latents gives the same number for both forms.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from saekit.activations import BatchTopK, SparseCode, step, weighted_row_sum
from saekit.kernels.sparse import auxk_select

PENALTIES = ("l1", "log", "tanh", "sqrt")
"""Sparsity penalty kinds f(a) on a_i = |z_i|·‖W_dec,i‖ (the L0 penalty is :func:`l0_penalty`)."""


# --------------------------------------------------------------------------------------------
# Reconstruction


def reconstruction_loss(x_n: Tensor, x_hat_n: Tensor) -> Tensor:
    """L_rec = mean_n ‖x_n − x̂_n‖²: squared error summed over d, mean over tokens."""
    d = x_n.shape[-1]
    err_ND = (x_n - x_hat_n).reshape(-1, d)
    return err_ND.pow(2).sum(-1).mean()


# --------------------------------------------------------------------------------------------
# Sparsity penalties


def penalty_terms(a: Tensor, kind: str, eps: float = 0.1, c: float = 1.0) -> Tensor:
    """f(a) elementwise for a penalty ``kind`` in :data:`PENALTIES` (a ≥ 0).

    log: log(a + ε) and sqrt: sqrt(a + ε), ε = 0.1 as in the Matryoshka note; tanh: tanh(c·a)
    (Anthropic, Feb 2024 update); l1: a.
    """
    if kind == "l1":
        return a
    if kind == "log":
        return torch.log(a + eps)
    if kind == "tanh":
        return torch.tanh(c * a)
    if kind == "sqrt":
        return torch.sqrt(a + eps)
    raise ValueError(f"unknown sparsity penalty {kind!r}; choose one of {PENALTIES}")


def penalty_at_zero(kind: str, eps: float = 0.1, c: float = 1.0) -> float:
    """f(0): what an inactive latent contributes (log ε for log, sqrt ε for sqrt, else 0)."""
    if kind not in PENALTIES:
        raise ValueError(f"unknown sparsity penalty {kind!r}; choose one of {PENALTIES}")
    return {"log": math.log(eps), "sqrt": math.sqrt(eps)}.get(kind, 0.0)


def sparsity_penalty(
    latents: Tensor | SparseCode,
    dec_norms_M: Tensor,
    kind: str = "l1",
    eps: float = 0.1,
    c: float = 1.0,
) -> Tensor:
    """S = mean_n Σ_i f(|z_ni|·‖W_dec,i‖), summed over ALL M latents.

    For log and sqrt an inactive latent still contributes the constant f(0) (log ε, sqrt ε), as
    in the Matryoshka note; it has no gradient but shifts the value. The sparse form adds that
    constant for the (N·M − nnz) entries it does not store (a code holds each (token, latent)
    at most once), so both forms give the same number and the same gradient.
    """
    if isinstance(latents, SparseCode):
        n_tokens, d_sae = latents.n_tokens, latents.d_sae
        a_E = latents.values.abs() * dec_norms_M[latents.latent]  # [nnz]
        absent = n_tokens * d_sae - latents.values.numel()
        return (
            penalty_terms(a_E, kind, eps, c).sum() / n_tokens
            + absent * penalty_at_zero(kind, eps, c) / n_tokens
        )
    z_NM = latents.reshape(-1, latents.shape[-1])
    a_NM = z_NM.abs() * dec_norms_M
    return penalty_terms(a_NM, kind, eps, c).sum(-1).mean()


def l0_penalty(pre_NM: Tensor, threshold_M: Tensor, bandwidth: float) -> Tensor:
    """L0 = mean_n Σ_i H(pre_ni − θ_i), with the straight-through gradient to θ only.

    Pass JumpReLU's ``threshold`` (= exp(log_threshold)); autograd multiplies by θ on the way to
    log_threshold.
    """
    return step(pre_NM, threshold_M, bandwidth).sum(-1).mean()


def l0_target_penalty(l0: Tensor, target: float) -> Tensor:
    """(L0 / target − 1)²: pulls a differentiable L0 (from :func:`l0_penalty`) to a target."""
    return (l0 / target - 1.0).pow(2)


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
    ):
        if lam <= 0 or target_l0 <= 0 or rate <= 0:
            raise ValueError("LambdaController: lam, target_l0 and rate must be positive")
        self.lam = torch.tensor(float(lam), dtype=torch.float32)
        self.target_l0 = float(target_l0)
        self.rate = float(rate)
        self.min_lam = float(min_lam)
        self.max_lam = float(max_lam)

    @torch.no_grad()
    def step(self, l0: Tensor) -> Tensor:
        """One update from this batch's L0 (a 0-d tensor); returns the new λ."""
        l0 = l0.detach().float()
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
        self.lam = torch.as_tensor(state["lam"], dtype=torch.float32).clone()
        self.target_l0 = float(state["target_l0"])
        self.rate = float(state["rate"])
        self.min_lam = float(state["min_lam"])
        self.max_lam = float(state["max_lam"])


# --------------------------------------------------------------------------------------------
# Dead-latent revival


def auxk_loss(
    pre_NM: Tensor,
    residual_ND: Tensor,
    W_dec_MD: Tensor,
    dead_mask_M: Tensor,
    *,
    k_aux: int | None = None,
    alpha: float = 1 / 32,
    normalizer: str = "residual",
    preacts_at: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> Tensor:
    """AuxK (Gao et al. 2024, appendix A.2/B.1): dead latents learn to explain the residual.

    e = stopgrad(residual) (pass x_n − x̂_n); candidates = ReLU(pre) on dead latents, −∞
    elsewhere; z_aux = top-k_aux of the candidates, k_aux = min(d // 2, M) by default, a FIXED
    shape: an entry that is not dead or not positive contributes 0, so nothing syncs.
    ê = z_aux W_dec with NO b_dec (e already accounts for it; adding it double-counts, see
    sparsify PR #134). L_aux = α · min(n_dead / k_aux, 1) · mean_n ‖ê − e‖² / V with
    V = mean_n ‖e − ē‖² ("residual", OpenAI) or 1 ("none"). Gradients reach W_dec and, through
    pre, W_enc and b_enc (and b_dec through pre, legitimately).

    ``preacts_at(token_Nk, latent_Nk)`` optionally returns differentiable pre-activations at
    those coordinates (a fast path passes a detached ``pre_NM`` for the selection and computes
    only the selected entries); by default they are gathered from ``pre_NM`` with autograd.
    Returns a 0-d tensor, exactly 0 when no latent is dead.
    """
    if normalizer not in ("residual", "none"):
        raise ValueError(f"auxk normalizer must be 'residual' or 'none', got {normalizer!r}")
    d = residual_ND.shape[-1]
    pre_NM = pre_NM.reshape(-1, pre_NM.shape[-1])
    e_ND = residual_ND.detach().reshape(-1, d)
    n_tokens, d_sae = pre_NM.shape
    k_aux = min(d // 2, d_sae) if k_aux is None else min(k_aux, d_sae)

    dead_M = dead_mask_M.to(device=pre_NM.device, dtype=torch.bool)
    # Ranking ReLU(pre) and pre agree on the positive entries, the only ones that count;
    # keep_Nk marks the entries that are dead and positive.
    latent_Nk, keep_Nk = auxk_select(pre_NM, dead_M, k_aux)
    if preacts_at is None:
        pre_Nk = pre_NM.gather(1, latent_Nk)
    else:
        token_Nk = torch.arange(n_tokens, device=pre_NM.device).unsqueeze(1).expand_as(latent_Nk)
        pre_Nk = preacts_at(token_Nk, latent_Nk)
    z_Nk = torch.where(keep_Nk, pre_Nk, torch.zeros_like(pre_Nk))

    offsets_N = torch.arange(0, n_tokens * k_aux, k_aux, device=pre_NM.device)
    e_hat_ND = weighted_row_sum(z_Nk.reshape(-1), latent_Nk.reshape(-1), offsets_N, W_dec_MD)
    mse = (e_hat_ND - e_ND).pow(2).sum(-1).mean()
    if normalizer == "residual":
        variance = (e_ND - e_ND.mean(0)).pow(2).sum(-1).mean()
        mse = mse / variance.clamp_min(torch.finfo(variance.dtype).tiny)
    n_dead = dead_M.sum().to(mse.dtype)
    scale = (n_dead / k_aux).clamp(max=1.0)
    return alpha * scale * mse


def kept_threshold(code: SparseCode, per_token: bool = True) -> Tensor:
    """θ, the firing threshold a TopK-family code implies (detached, no host sync).

    ``per_token=True`` (TopK): each token's smallest kept value, shape [N, 1].
    ``per_token=False`` (BatchTopK): the batch's smallest positive kept value, 0-d.
    A token or batch with nothing kept gets θ = 0.
    """
    values = code.values.detach()
    if per_token:
        inf = torch.full((code.n_tokens,), math.inf, dtype=values.dtype, device=values.device)
        theta_N = inf.scatter_reduce(0, code.token, values, reduce="amin")
        theta_N = torch.where(torch.isfinite(theta_N), theta_N, torch.zeros_like(theta_N))
        return theta_N.unsqueeze(1)
    theta = BatchTopK.batch_min_positive(code)
    return torch.where(torch.isfinite(theta), theta, torch.zeros_like(theta))


def dead_preact_loss(
    pre_NM: Tensor, dead_mask_M: Tensor, theta: Tensor, dec_norms_M: Tensor
) -> Tensor:
    """L = mean_n Σ_{i dead} ReLU(θ − pre_ni) · ‖W_dec,i‖: revival without a residual target.

    AuxK asks dead latents to fit the live latents' residual, so a revived latent may become an
    error-correction term for an undertrained live one (SAELens question #666). This loss only
    pushes a dead latent's pre-activation up toward the firing threshold θ, through the encoder
    (θ and the decoder norms are detached), much as JumpReLU's threshold gradient does; what the
    latent then encodes is decided by the reconstruction loss once it fires.

    θ: [N, 1] per token (TopK, :func:`kept_threshold`), 0-d per batch (BatchTopK), or [M] per
    latent (JumpReLU's ``threshold``).
    """
    pre_NM = pre_NM.reshape(-1, pre_NM.shape[-1])
    weight_M = dead_mask_M.to(pre_NM.dtype) * dec_norms_M.detach()
    gap_NM = torch.relu(theta.detach() - pre_NM)
    return (gap_NM * weight_M).sum(-1).mean()


# --------------------------------------------------------------------------------------------
# Matryoshka (Nabeshima, "Efficient Matryoshka loss calculation")


def prefix_length_probs(d_sae: int, min_prefix: int = 1, alpha: float = 0.5) -> Tensor:
    """P(l) ∝ ((l−m+1)/(M−m+1))^a − ((l−m)/(M−m+1))^a for m ≤ l < M (float64, [M − m])."""
    return _prefix_length_probs(d_sae, min_prefix, alpha).clone()


@functools.lru_cache(maxsize=64)
def _prefix_length_probs(d_sae: int, min_prefix: int, alpha: float) -> Tensor:
    if not 1 <= min_prefix < d_sae:
        raise ValueError(f"min_prefix must be in [1, d_sae), got {min_prefix} for d_sae={d_sae}")
    span = d_sae - min_prefix + 1
    steps = torch.arange(d_sae - min_prefix + 1, dtype=torch.float64) / span  # (l−m)/(M−m+1)
    cdf = steps.pow(alpha)
    probs = cdf[1:] - cdf[:-1]  # l = m … M−1
    return probs / probs.sum()


def sample_prefixes(
    d_sae: int,
    n_prefixes: int,
    min_prefix: int = 1,
    alpha: float = 0.5,
    generator: torch.Generator | None = None,
) -> list[int]:
    """P − 1 distinct lengths from :func:`prefix_length_probs` (without replacement), plus M.

    Sorted, ending with M. Drawn on the host (prefixes are Python ints: they slice tensors).
    """
    if n_prefixes < 1:
        raise ValueError(f"n_prefixes must be at least 1, got {n_prefixes}")
    if n_prefixes == 1:
        return [d_sae]
    probs = _prefix_length_probs(d_sae, min_prefix, alpha)  # cached; sampling does not write
    if n_prefixes - 1 > probs.numel():
        raise ValueError(f"cannot draw {n_prefixes - 1} distinct prefixes from {probs.numel()}")
    draws = torch.multinomial(probs, n_prefixes - 1, replacement=False, generator=generator)
    return sorted((draws + min_prefix).tolist()) + [d_sae]


def fixed_prefixes(group_sizes: Sequence[int]) -> list[int]:
    """Prefix ends of consecutive latent groups: sizes [a, b, c] → [a, a+b, a+b+c]."""
    if not group_sizes or any(int(g) <= 0 for g in group_sizes):
        raise ValueError(f"group sizes must be positive, got {list(group_sizes)}")
    ends, total = [], 0
    for size in group_sizes:
        total += int(size)
        ends.append(total)
    return ends


def _check_prefixes(prefixes: Sequence[int] | Tensor, d_sae: int) -> list[int]:
    ends = [int(p) for p in (prefixes.tolist() if isinstance(prefixes, Tensor) else prefixes)]
    if not ends or ends[-1] != d_sae or any(b <= a for a, b in itertools.pairwise([0, *ends])):
        raise ValueError(f"prefixes must increase strictly and end at d_sae={d_sae}, got {ends}")
    return ends


def matryoshka_block_deltas(
    latents: Tensor | SparseCode, W_dec_MD: Tensor, prefixes: Sequence[int]
) -> Tensor:
    """δ_j = Σ_{p_{j−1} ≤ i < p_j} z_i W_dec,i for every block: [P, N, d].

    Dense latents: one matmul per block slice. SparseCode: bucket entries by block, one sort by
    (block, token), one bagged row sum into [P·N, d]; never a [P, N, M] or dense [N, M] tensor.
    """
    d_sae = W_dec_MD.shape[0]
    ends = _check_prefixes(prefixes, d_sae)
    n_prefixes = len(ends)
    if isinstance(latents, SparseCode):
        n_tokens = latents.n_tokens
        device = latents.values.device
        boundaries = torch.tensor(ends[:-1], dtype=latents.latent.dtype, device=device)
        block_E = torch.bucketize(latents.latent, boundaries, right=True)  # p_{j−1} ≤ i < p_j
        bag_E = block_E * n_tokens + latents.token
        bag_E, order = bag_E.sort()
        n_bags = n_prefixes * n_tokens
        offsets_B = torch.searchsorted(bag_E, torch.arange(n_bags, device=device))
        return weighted_row_sum(
            latents.values[order], latents.latent[order], offsets_B, W_dec_MD
        ).view(n_prefixes, n_tokens, -1)
    z_NM = latents.reshape(-1, latents.shape[-1])
    starts = [0] + ends[:-1]
    return torch.stack([z_NM[:, a:b] @ W_dec_MD[a:b] for a, b in zip(starts, ends, strict=True)])


def matryoshka_reconstructions(
    latents: Tensor | SparseCode, W_dec_MD: Tensor, b_dec_D: Tensor, prefixes: Sequence[int]
) -> Tensor:
    """x̂_{p_j} = b_dec + cumsum(δ)_j for every prefix from one pass: [P, N, d]; the last is the
    ordinary x̂_n."""
    return matryoshka_block_deltas(latents, W_dec_MD, prefixes).cumsum(0) + b_dec_D


class _PrefixMSE(torch.autograd.Function):
    """mse_j = mean_n ‖r_n − Σ_{j' ≤ j} δ_{j',n}‖² for every j, r = x_n − b_dec: [P].

    The same numbers as cumsum + squared error, but with running sums over [N, d] buffers in
    both directions instead of a cumsum over [P, N, d] (whose backward flips it twice).
    Backward, with e_j = r − Σ_{j' ≤ j} δ_j' and G_j = Σ_{j' ≥ j} g_j' e_j':
    ∂/∂δ_j = −(2/N)·G_j and ∂/∂r = (2/N)·G_0; e_j = e_{j+1} + δ_{j+1} walks back from e_{P−1}.
    """

    @staticmethod
    def forward(ctx, delta_PND: Tensor, r_ND: Tensor) -> Tensor:
        n_tokens = r_ND.shape[0]
        err_ND = r_ND.clone()
        mse = []
        for delta_ND in delta_PND:
            err_ND -= delta_ND
            mse.append(err_ND.pow(2).sum() / n_tokens)
        ctx.save_for_backward(delta_PND, err_ND)  # err_ND is e_{P−1}
        return torch.stack(mse)

    @staticmethod
    def backward(ctx, grad_P: Tensor):
        delta_PND, last_err_ND = ctx.saved_tensors
        n_prefixes, n_tokens = delta_PND.shape[:2]
        err_ND = last_err_ND.clone()
        acc_ND = torch.zeros_like(err_ND)
        grad_delta_PND = torch.empty_like(delta_PND)
        for j in range(n_prefixes - 1, -1, -1):
            if j < n_prefixes - 1:
                err_ND += delta_PND[j + 1]
            acc_ND.add_(err_ND, alpha=grad_P[j])  # G_j; grad_P stays a tensor: no host sync
            torch.mul(acc_ND, -2.0 / n_tokens, out=grad_delta_PND[j])
        return grad_delta_PND, acc_ND * (2.0 / n_tokens)


def _block_penalties(
    latents: Tensor | SparseCode,
    dec_norms_M: Tensor,
    ends: list[int],
    kind: str,
    eps: float,
    c: float,
) -> Tensor:
    """Δ_j = mean_n Σ_{p_{j−1} ≤ i < p_j} f(a_ni): the penalty per block, [P]."""
    starts = [0] + ends[:-1]
    if isinstance(latents, SparseCode):
        n_tokens = latents.n_tokens
        device = latents.values.device
        boundaries = torch.tensor(ends[:-1], dtype=latents.latent.dtype, device=device)
        block_E = torch.bucketize(latents.latent, boundaries, right=True)
        a_E = latents.values.abs() * dec_norms_M[latents.latent]
        terms_E = penalty_terms(a_E, kind, eps, c)
        block_P = terms_E.new_zeros(len(ends)).index_add(0, block_E, terms_E)
        f0 = penalty_at_zero(kind, eps, c)
        if f0 != 0.0:  # inactive latents that the code does not store each add f(0)
            stored_P = terms_E.new_zeros(len(ends)).index_add(0, block_E, torch.ones_like(a_E))
            width_P = torch.tensor(
                [b - a for a, b in zip(starts, ends, strict=True)], dtype=a_E.dtype, device=device
            )
            block_P = block_P + f0 * (width_P * n_tokens - stored_P)
        return block_P / n_tokens
    z_NM = latents.reshape(-1, latents.shape[-1])
    per_latent_M = penalty_terms(z_NM.abs() * dec_norms_M, kind, eps, c).mean(0)
    return torch.stack([per_latent_M[a:b].sum() for a, b in zip(starts, ends, strict=True)])


def matryoshka_loss(
    x_n: Tensor,
    latents: Tensor | SparseCode,
    W_dec_MD: Tensor,
    b_dec_D: Tensor,
    prefixes: Sequence[int],
    penalty: str | None = None,
    lam: float | Tensor = 0.0,
    eps: float = 0.1,
    c: float = 1.0,
) -> Tensor:
    """L = (1/P) Σ_j [mean_n ‖x_n − x̂_{p_j}‖² + λ·S_{p_j}], S_p the penalty over latents i < p.

    All prefix errors come from one pass: block deltas (:func:`matryoshka_block_deltas`) and
    running sums (:class:`_PrefixMSE`); the penalty sums are block sums and a cumsum too.
    ``penalty`` is a kind in :data:`PENALTIES` (or None); the penalty weights a_i = |z_i|·‖W_dec,i‖.
    """
    d = W_dec_MD.shape[-1]
    ends = _check_prefixes(prefixes, W_dec_MD.shape[0])
    delta_PND = matryoshka_block_deltas(latents, W_dec_MD, ends)
    mse_P = _PrefixMSE.apply(delta_PND, x_n.reshape(-1, d) - b_dec_D)
    loss = mse_P.mean()
    if penalty is not None:
        dec_norms_M = W_dec_MD.norm(dim=-1)
        S_P = _block_penalties(latents, dec_norms_M, ends, penalty, eps, c).cumsum(0)
        loss = loss + lam * S_P.mean()
    return loss
