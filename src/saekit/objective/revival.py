"""Dead-latent revival losses: AuxK and the pre-activation revival (docs/design.md, "AuxK").

Both read the encoding's pre-activations through :class:`~saekit.core.encoding.Preacts`, so the
fast path's sparse backward and the reference path's dense autograd give the same numbers.
Nothing here syncs with the host; shapes are fixed (k_aux), so a step can be captured in a
CUDA graph.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from saekit.core.encoding import Preacts
from saekit.kernels.columns import columns_decode
from saekit.kernels.layout import CodeLayout
from saekit.kernels.select import auxk_select
from saekit.kernels.sparse import sparse_decode
from saekit.objective.losses import reconstruction_loss

AUXK_NORMALIZERS = ("residual", "none")
DENSE_COLUMNS_PER_K = 8
"""ê through dense GEMMs over the candidate columns when there are at most 8·k_aux of them
(the sparse passes otherwise): on the project's CPU the two cost the same near 16·k_aux
(benchmarks/README.md, "AuxK"); on a GPU GEMMs gain more."""


def auxk_loss(
    preacts: Preacts,
    residual_ND: Tensor,
    W_dec_MD: Tensor | None,
    dead_mask_M: Tensor,
    *,
    k_aux: int | None = None,
    alpha: float = 1 / 32,
    normalizer: str = "residual",
    dead_cols: Tensor | None = None,
    token_fraction: float = 1.0,
    decode: Callable[[Tensor, CodeLayout], Tensor] | None = None,
) -> Tensor:
    """AuxK (Gao et al. 2024, appendix A.2/B.1): dead latents learn to explain the residual.

    e = stopgrad(residual) (pass x_n − x̂_n); candidates = ReLU(pre) on dead latents, −∞
    elsewhere; z_aux = top-k_aux of the candidates, k_aux = max(1, min(d // 2, M)) by default,
    a FIXED shape: an entry that is not dead or not positive contributes 0, so nothing syncs.
    ê = z_aux W_dec with NO b_dec (e already accounts for it; adding it double-counts, see
    sparsify PR #134, docs/references/auxk-bdec-double-count-fix.txt).
    L_aux = α · min(n_dead / k_aux, 1) · mean_n ‖ê − e‖² / V with V = mean_n ‖e − ē‖²
    ("residual", OpenAI) or 1 ("none"). Gradients reach W_dec and, through the selected
    pre-activations, W_enc and b_enc (and b_dec through the encoder input, legitimately).
    Returns a 0-d tensor, exactly 0 when no latent is dead.

    ``dead_cols``: a superset of the dead latents (:class:`DeadSet`), or None for all M. The
    selection is searched among these columns only (the same selection), so the cost
    follows what can be dead: none (empty) costs nothing, and with a few, ê and its backward
    are dense GEMMs over those columns (:mod:`saekit.kernels.columns`).

    ``token_fraction`` f < 1 (opt-in): mean_n over a uniform random subset of S = ⌈f·N⌉ tokens
    (without replacement) instead of all N; V still over all N. An unbiased estimate of L_aux
    and of its gradient for the batch, with Var = (α·share/V)² · (1 − S/N) · s²/S, s² the
    variance of the per-token ‖ê_n − e_n‖² over the batch (sampling without replacement).

    ``decode``: a dictionary whose decoder is not one [M, d] matrix (a cross-layer transcoder:
    ``W_dec_MD`` None) decodes the selected code itself, (values, layout) -> [N, d] without
    b_dec (saekit.core.encoding.EncoderView.decode_code); the selection is the same.
    """
    if normalizer not in AUXK_NORMALIZERS:
        raise ValueError(f"auxk normalizer must be one of {AUXK_NORMALIZERS}, got {normalizer!r}")
    d = residual_ND.shape[-1]
    e_ND = residual_ND.detach().reshape(-1, d)
    n_tokens, d_sae = preacts.detached.shape
    k_aux = auxk_k(k_aux, d, d_sae)
    if dead_cols is not None and dead_cols.numel() == 0:
        return e_ND.new_zeros(())  # no latent can be dead: the exact 0, and no work
    rows_S = sample_tokens(n_tokens, token_fraction, e_ND.device)
    pre_SM = preacts.detached if rows_S is None else preacts.detached.index_select(0, rows_S)
    e_SD = e_ND if rows_S is None else e_ND.index_select(0, rows_S)
    dead_M = dead_mask_M.to(device=pre_SM.device, dtype=torch.bool)
    if dead_cols is None:
        pre_SC, dead_C = pre_SM, dead_M
    else:
        pre_SC, dead_C = pre_SM.index_select(1, dead_cols), dead_M[dead_cols]
    fresh = rows_S is not None or dead_cols is not None  # pre_SC is a gathered copy
    index_Sk, keep_Sk, value_Sk = auxk_select(pre_SC, dead_C, k_aux, overwrite=fresh)
    encoder = preacts.encoder_inputs()  # the fast path's: columns of pre recomputed here
    if (
        decode is None
        and dead_cols is not None
        and encoder is not None
        and dead_cols.numel() <= DENSE_COLUMNS_PER_K * index_Sk.shape[1]
    ):
        x_n_SD = encoder.x_n_ND if rows_S is None else encoder.x_n_ND.index_select(0, rows_S)
        e_hat_SD = columns_decode(
            pre_SC, index_Sk, keep_Sk, dead_cols, x_n_SD, encoder.input_center_D,
            encoder.W_enc_MD, encoder.b_enc_M, W_dec_MD,
        )  # fmt: skip
    else:
        latent_Sk = index_Sk if dead_cols is None else dead_cols[index_Sk]
        e_hat_SD = selected_decode(preacts, latent_Sk, keep_Sk, value_Sk, W_dec_MD, rows_S, decode)
    n_dead = dead_mask_M.to(device=e_SD.device, dtype=e_SD.dtype).sum()
    return auxk_value(e_SD, e_hat_SD, e_ND, n_dead, k_aux, alpha, normalizer)


def auxk_k(k_aux: int | None, d: int, d_sae: int) -> int:
    """k_aux: the configured one (at most M), by default max(1, min(d // 2, M))."""
    return max(1, min(d // 2, d_sae) if k_aux is None else min(k_aux, d_sae))


def selected_decode(
    preacts: Preacts,
    latent_Sk: Tensor,
    keep_Sk: Tensor,
    value_Sk: Tensor,
    W_dec_MD: Tensor | None,
    rows_S: Tensor | None = None,
    decode: Callable[[Tensor, CodeLayout], Tensor] | None = None,
) -> Tensor:
    """ê = Σ_j keep·pre[token, latent_j] W_dec,latent_j per token [S, d] (no b_dec), through
    the sparse passes: the selected pre-activations carry their gradient to the encoder. Rows
    [S] of the batch (None: all, S = N); ``decode``: the dictionary's own (:func:`auxk_loss`)."""
    n_tokens, d_sae = preacts.detached.shape
    if rows_S is None:
        layout = CodeLayout.fixed_k(latent_Sk, d_sae)
    else:
        token_E = rows_S.repeat_interleave(latent_Sk.shape[1])
        layout = CodeLayout(token_E, latent_Sk.reshape(-1), n_tokens, d_sae)
    pre_E = preacts.selected(value_Sk.reshape(-1), layout)
    z_E = torch.where(keep_Sk.reshape(-1), pre_E, torch.zeros_like(pre_E))
    if decode is None:
        e_hat_ND = sparse_decode(z_E, layout.latent, layout.token, W_dec_MD, n_tokens, layout)
    else:
        e_hat_ND = decode(z_E, layout)
    return e_hat_ND if rows_S is None else e_hat_ND.index_select(0, rows_S)


def auxk_value(
    e_SD: Tensor,
    e_hat_SD: Tensor,
    e_ND: Tensor,
    n_dead: Tensor,
    k_aux: int,
    alpha: float,
    normalizer: str,
    variance: Tensor | None = None,
) -> Tensor:
    """L_aux = α · min(n_dead / k_aux, 1) · mean_s ‖ê_s − e_s‖² / V (:func:`auxk_loss`), V the
    variance of the residual over all N tokens ``e_ND`` ("residual"; ``variance``: V computed
    by the caller over a larger batch) or 1 ("none")."""
    mse = reconstruction_loss(e_SD, e_hat_SD)  # mean_s ‖ê_s − e_s‖², one fused kernel
    if normalizer == "residual":
        if variance is None:
            variance = torch.var(e_ND, dim=0, correction=0).sum()  # mean_n ‖e_n − ē‖², one pass
        mse = mse / variance.clamp_min(torch.finfo(variance.dtype).tiny)
    n_dead = n_dead.to(mse.dtype)
    return alpha * (n_dead / k_aux).clamp(max=1.0) * mse


def matryoshka_auxk_loss(
    preacts: Preacts,
    residual_PND: Tensor,
    W_dec_MD: Tensor,
    dead_mask_M: Tensor,
    prefixes: list[int],
    *,
    k_aux: int | None = None,
    alpha: float = 1 / 32,
    normalizer: str = "none",
) -> Tensor:
    """AuxK per Matryoshka level (SAELens ``MatryoshkaBatchTopKTrainingSAE``'s
    ``use_matryoshka_aux_loss``, used by the SynthSAEBench paper's Matryoshka SAEs):

        L = Σ_j AuxK(dead latents of level j = [p_{j−1}, p_j), e_j = x − x̂_{p_j})

    with :func:`auxk_loss` for each term (its own min(n_dead_j / k_aux, 1) scale), where x̂_{p_j}
    is the reconstruction from the latents below p_j (``residual_PND[j]`` = e_j, detached
    here). A level without dead latents adds exactly 0."""
    dead_M = dead_mask_M.to(dtype=torch.bool)
    total = residual_PND.new_zeros(())
    start = 0
    for j, end in enumerate(prefixes):
        level_dead = torch.zeros_like(dead_M)
        level_dead[start:end] = dead_M[start:end]
        total = total + auxk_loss(
            preacts, residual_PND[j], W_dec_MD, level_dead, k_aux=k_aux, alpha=alpha,
            normalizer=normalizer,
        )  # fmt: skip
        start = end
    return total


def sample_tokens(n_tokens: int, fraction: float, device: torch.device) -> Tensor | None:
    """⌈f·N⌉ token indices drawn uniformly without replacement, sorted; None when f ≥ 1 (all).
    Drawn from torch's default generator of ``device`` (no host sync)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"auxk token_fraction must be in (0, 1], got {fraction!r}")
    n_sample = math.ceil(fraction * n_tokens)
    if n_sample >= n_tokens:
        return None
    return torch.randperm(n_tokens, device=device)[:n_sample].sort().values


class DeadSet:
    """The columns that can be dead before the next refresh: a superset of every step's dead
    mask, so AuxK searches only these (exactly the same selection) and costs nothing while no
    latent is near death.

    A latent is dead at a step when its tokens-since-fired counter c ≥ T (``dead_tokens``).
    Counters grow by the tokens counted, so from a refresh with counters c₀ until ``slack``
    more tokens are counted, c ≤ c₀ + slack: the columns {c₀ + slack ≥ T} hold every latent
    dead meanwhile. The refresh reads them on the host (one transfer of the indices); it runs
    when the tokens counted since the last one (a host integer) exceed the slack, i.e. every
    ``refresh_steps`` steps of the current batch size, and never otherwise.
    """

    def __init__(self, dead_tokens: int, refresh_steps: int = 25):
        self.dead_tokens, self.refresh_steps = dead_tokens, refresh_steps
        self.columns: Tensor | None = None
        self.slack = self.counted = 0
        self._counters: tuple[Tensor, int] | None = None  # the counters it follows, version

    def count(self, n_tokens: int, counters_M: Tensor) -> None:
        """``n_tokens`` were counted, giving ``counters_M``."""
        self.counted += n_tokens
        self._counters = (counters_M, counters_M._version)

    def permute_(self, perm_M: Tensor, before_M: Tensor, after_M: Tensor) -> None:
        """The latents were reordered (new latent j is old latent perm[j]), the counters
        ``before_M`` becoming ``after_M``: the same columns, renamed, on the same refresh
        schedule (a refresh already due stays due: counters it did not follow, or edited)."""
        old = self._counters
        if old is None or old[0] is not before_M or before_M._version != old[1]:
            return
        if self.columns is None:  # never refreshed: the next get refreshes
            return
        inverse_M = torch.empty_like(perm_M)
        inverse_M[perm_M] = torch.arange(perm_M.numel(), device=perm_M.device)
        self.columns = inverse_M[self.columns].sort().values
        self._counters = (after_M, after_M._version)

    def get(self, counters_M: Tensor, batch_tokens: int) -> Tensor:
        """The current superset [C] (int64, sorted), refreshed when due, or when the counters
        were replaced or edited other than by :meth:`count` (a resume, a test)."""
        followed = self._counters is not None and self._counters[0] is counters_M
        if (
            self.columns is None
            or self.counted > self.slack
            or not followed
            or counters_M._version != self._counters[1]
        ):
            self.slack = self.refresh_steps * batch_tokens
            near_M = counters_M + self.slack >= self.dead_tokens
            self.columns = torch.nonzero(near_M).reshape(-1)  # the one host transfer
            self.counted = 0
            self._counters = (counters_M, counters_M._version)
        return self.columns


def input_target(x_n_ND: Tensor, b_dec_D: Tensor) -> Tensor:
    """The target of the "input" revival: stopgrad(x_n − b_dec), the centred input itself.

    AuxK's target, the residual x_n − x̂_n, is what the live latents get wrong, so a latent
    revived by it may learn a live latent's error instead of a feature ("residual peeking",
    SAELens question #666). Fitting the input with dead latents alone (the same top-k_aux
    selection and decode as :func:`auxk_loss`, without b_dec) gives every dead latent a
    gradient toward directions the data has, whatever the live latents currently miss.
    docs/research.md measures what the revived latents become under each signal.
    """
    return (x_n_ND - b_dec_D).detach()


def dead_preact_loss(
    preacts: Preacts, dead_mask_M: Tensor, theta: Tensor, dec_norms_M: Tensor
) -> Tensor:
    """L = mean_n Σ_{i dead} ReLU(θ − pre_ni) · ‖W_dec,i‖ / max(n_dead, 1): revival without a
    residual target, normalised per dead latent.

    The normalisation keeps L at the scale of one latent's threshold gap (≈ θ, O(1) in the
    normalised space where E‖x_n‖² = d) however many latents are dead: unnormalised, hundreds of
    dead latents gave a term ~1000 against a reconstruction of ~50, whose gradient took the
    whole clipped norm and the SAE diverged. Each dead latent's encoder row has its own Adam
    moments, so the 1/n_dead factor does not slow its revival.

    AuxK asks dead latents to fit the live latents' residual, so a revived latent may become an
    error-correction term for an undertrained live one (SAELens question #666). This loss only
    pushes a dead latent's pre-activation up toward the firing threshold θ, through the encoder
    (θ and the decoder norms are detached), much as JumpReLU's threshold gradient does; what the
    latent then encodes is decided by the reconstruction loss once it fires.

    θ: the activation's ``firing_threshold``: [N, 1] per token (TopK), 0-d per batch
    (BatchTopK), or [M] per latent (JumpReLU).
    """
    total = dead_preact_sum(preacts, dead_mask_M, theta, dec_norms_M)
    return total / dead_mask_M.to(total.dtype).sum().clamp_min(1.0)


def dead_preact_sum(
    preacts: Preacts, dead_mask_M: Tensor, theta: Tensor, dec_norms_M: Tensor
) -> Tensor:
    """mean_n Σ_{i dead} ReLU(θ − pre_ni) · ‖W_dec,i‖, :func:`dead_preact_loss` before its
    1/max(n_dead, 1): a sum over latents, so a latent-sharded part computes its own latents'
    share (saekit.objective.sharded)."""
    pre_NM = preacts.dense()
    weight_M = dead_mask_M.to(pre_NM.dtype) * dec_norms_M.detach()
    gap_NM = torch.relu(theta.detach() - pre_NM)
    return (gap_NM * weight_M).sum(-1).mean()
