"""BatchTopK's inference threshold θ, calibrated on held-out activations; L0 against its target.

BatchTopK keeps the k·N largest pre-activations of a training batch; inference replaces that by
one global threshold, ``z = pre·1[pre > θ]`` (Bussmann, Leask & Nanda, "BatchTopK Sparse
Autoencoders", 2024). Training estimates θ as an EMA of each batch's smallest kept activation
(β = 0.999 by default), which after a short or moderate run still carries the large values of
early training: an inference L0 of 9-17 for k = 32 on a 135M model, and 0.006 for k = 6 after 50
steps on saekit's built-in data (issue 18). Calibration sets θ from data instead: the value at
which the mean inference L0 over held-out tokens is k.

With the N·M pre-activations of N held-out tokens sorted in decreasing order,
``v_1 ≥ v_2 ≥ ...``, θ = v_{kN+1} makes exactly kN of them exceed θ when v_{kN} > v_{kN+1},
so the mean L0 is k. Ties: values equal to θ do not fire (the comparison is strict), so when
v_{kN} = v_{kN+1} the L0 falls short of k by the tied count / N; pre-activations are continuous,
so ties are rare. θ is never below 0: with fewer than kN + 1 positive pre-activations θ = 0
and the L0 is the positive count / N, as in training, where the kept values pass a ReLU.

Calibration and evaluation use different tokens: at the end of a run the first half of the
held-out tokens (:func:`calibration_tokens`) calibrate θ and the held-out metrics are measured on
the rest (:func:`tokens_after`), so the reported L0 says how θ carries to tokens it was not fitted
on instead of being k by construction (issue 28: 32.00 for k = 32 on the calibration tokens,
51.5 on other text).

An SAE with LISTA encoder steps (``sae.encoder_steps`` n > 1, saekit.model.lista) applies the
same θ at every step, so the last step's pre-activations depend on θ itself and no single sort
gives it. Calibration then searches θ in rounds, each reading the calibration tokens once at a
trial θ_j: it measures the inference L0 at θ_j and proposes θ_{j+1} = v_{kN+1} of the last step's
pre-activations computed at θ_j (a fixed point of that rule has L0 = k exactly). θs whose L0 was
above or below k bracket the answer (the L0 falls as θ rises); a proposal outside the bracket is
replaced by its midpoint, because the rule alone can cycle (it did, between L0 0.8 and 3.7 for
k = 3, on a 3-step SAE in tests/eval/test_calibrate.py). It stops when the L0 is within
:data:`ROUND_TOLERANCE` of k or after :data:`MAX_ROUNDS` rounds, keeping the θ whose L0 was
closest to k. One-step SAEs calibrate in one pass, as above.

The top kN + 1 values are kept while streaming (at most k·max_tokens + 1 floats), so the
held-out set is read once and never held in memory whole.

Conversion to JumpReLU (:func:`to_jumprelu`, ``saekit convert``): the inference z = pre·1[pre > θ]
is a JumpReLU with θ_i = θ for every latent, so the converted SAE's L0 and FVU equal the
BatchTopK inference's on any data, not only on the calibration tokens. θ stays global: per-latent
thresholds set on the same tokens, each θ_i at latent i's share of the kN largest entries, fire
on exactly the entries above the global θ there (the kN largest of all N·M are those above
v_{kN+1}), so they add nothing on those tokens and can only drift from the BatchTopK SAE off
them. The thresholds are per-latent parameters, free to move if the JumpReLU is trained further.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import torch
from torch import Tensor

from saekit.model.sae import SAE

TOLERANCE = 0.10
"""How far (relative) the inference L0 may be from its target before a warning."""
MAX_ROUNDS = 20
"""At most this many calibration rounds for an SAE with encoder steps (module docstring)."""
ROUND_TOLERANCE = 0.005
"""The rounds stop when the inference L0 is within this fraction of k."""


def calibration_tokens(n_tokens: int) -> int:
    """Of ``n_tokens`` held-out tokens, how many (the first) calibrate θ: half; the held-out
    metrics are measured on the rest (module docstring)."""
    return n_tokens // 2


def tokens_after(batches: Iterable[tuple[Tensor, Any]], skip: int) -> Iterator[tuple[Tensor, Any]]:
    """``batches`` of (x, per-row extra or None) without their first ``skip`` rows: the held-out
    tokens after the calibration part."""
    for x, extra in batches:
        if skip >= len(x):
            skip -= len(x)
            continue
        if skip:
            x, extra = x[skip:], None if extra is None else extra[skip:]
            skip = 0
        yield x, extra


class Calibration(NamedTuple):
    """The calibrated and the EMA threshold, and the inference L0 each gives on the tokens."""

    threshold: float
    """θ with mean inference L0 = k on the calibration tokens (module docstring)."""
    threshold_ema: float
    """θ as training left it (the EMA)."""
    l0: float
    """Mean inference L0 at ``threshold``."""
    l0_ema: float
    """Mean inference L0 at ``threshold_ema``."""
    n_tokens: int
    """Tokens calibrated on."""


def pre_activations(sae: Any, x_ND: Tensor) -> Tensor:
    """[N, d] raw activations -> [N, M] pre-activations in the SAE's normalised space (the
    values the inference threshold is compared with). The one place calibration calls the SAE."""
    return sae.pre_acts(sae.normalise(x_ND))


@torch.no_grad()
def calibrate_batchtopk(
    sae: Any,
    batches: Iterable[Tensor] | Callable[[], Iterable[Tensor]],
    max_tokens: int,
    *,
    apply: bool = True,
) -> Calibration:
    """Choose θ on up to ``max_tokens`` tokens of ``batches`` ([n, d] raw activations) and, with
    ``apply``, write it into ``sae.activation.threshold`` (a 0-d buffer). ``batches``: an
    iterable, or a function giving a fresh one per call, which an SAE with encoder steps needs
    (a list or tuple serves as its own: the fixed point of the module docstring)."""
    fresh = batches if callable(batches) else None
    if fresh is None and isinstance(batches, (list, tuple)):
        fresh = lambda: batches  # noqa: E731 (a list is read again as it is)
    steps = getattr(sae.cfg, "encoder_steps", 1)
    if steps > 1 and fresh is None:
        raise ValueError(
            f"calibrating an SAE with encoder_steps = {steps} reads the tokens once per round:"
            " pass a list of batches or a function giving fresh ones"
        )
    with inference_mode(sae):
        first = _calibrate_once(sae, fresh() if fresh is not None else batches, max_tokens)
        calibration = first if steps == 1 else _search(sae, fresh, max_tokens, first)
    if apply:
        sae.activation.threshold.fill_(calibration.threshold)
    return calibration


def _search(
    sae: Any, fresh: Callable[[], Iterable[Tensor]], max_tokens: int, first: Calibration
) -> Calibration:
    """θ of an SAE with encoder steps, in rounds (module docstring); ``first``: the pass at
    the SAE's own θ, whose proposal starts the search."""
    k = float(sae.activation.cfg.k)
    low, high = 0.0, math.inf  # L0 ≥ k at θ ≤ low, ≤ k at θ ≥ high
    best = None  # (|L0 − k|, θ, L0)
    theta = first.threshold
    for _ in range(MAX_ROUNDS):
        with threshold_set(sae, theta):
            trial = _calibrate_once(sae, fresh(), max_tokens)  # l0_ema: the L0 at θ itself
        if best is None or abs(trial.l0_ema - k) < best[0]:
            best = (abs(trial.l0_ema - k), theta, trial.l0_ema)
        if abs(trial.l0_ema - k) <= ROUND_TOLERANCE * k:
            break
        if trial.l0_ema > k:
            low = max(low, theta)
        else:
            high = min(high, theta)
        if high <= low:  # θ = 0 fires fewer than k: nothing lower exists
            break
        theta = trial.threshold
        if not low < theta < high:
            theta = (low + high) / 2 if math.isfinite(high) else 2 * low + 1e-6
    _, theta, l0 = best
    return first._replace(threshold=theta, l0=l0)


@torch.no_grad()
def _calibrate_once(sae: Any, batches: Iterable[Tensor], max_tokens: int) -> Calibration:
    """One pass of :func:`calibrate_batchtopk` at the SAE's current θ (nothing written)."""
    k = sae.activation.cfg.k
    threshold_ema = sae.activation.threshold.detach().clone()
    keep = k * max_tokens + 1  # v_1 .. v_{k·max_tokens+1} contain v_{kN+1} for any N ≤ max
    top = None  # the largest pre-activations seen so far, at most `keep`
    n_tokens = 0
    fired_ema = 0
    for x_ND in batches:
        x_ND = x_ND[: max_tokens - n_tokens]
        if len(x_ND) == 0:
            break
        pre_NM = pre_activations(sae, x_ND.to(sae.W_enc.device)).float()
        n_tokens += len(x_ND)
        fired_ema += int((pre_NM > threshold_ema).sum())
        flat = pre_NM.reshape(-1)
        if top is not None and len(top) == keep:
            flat = flat[flat > top[-1]]  # nothing at or below the smallest kept value can enter
        merged = flat if top is None else torch.cat([top, flat])
        top = merged.topk(min(keep, len(merged))).values  # sorted, decreasing
        if n_tokens >= max_tokens:
            break
    if n_tokens == 0 or top is None:
        raise ValueError("BatchTopK calibration got no tokens")
    rank = k * n_tokens  # θ = v_{rank+1}: index `rank` of the decreasing values
    theta = top[rank] if rank < len(top) else top.new_zeros(())
    theta = theta.clamp_min(0)
    return Calibration(
        threshold=float(theta),
        threshold_ema=float(threshold_ema),
        l0=int((top > theta).sum()) / n_tokens,
        l0_ema=fired_ema / n_tokens,
        n_tokens=n_tokens,
    )


@contextlib.contextmanager
def inference_mode(sae: Any):
    """While active, ``sae`` encodes as at inference (``eval()``), then its mode is restored: a
    BatchTopK SAE in training mode keeps the k·N largest of the batch instead of applying θ, so
    with encoder steps the intermediate steps, hence the last step's pre-activations and the θ
    calibrated from them, would be training's (a member's SAE stays in training mode)."""
    was_training = sae.training
    sae.eval()
    try:
        yield
    finally:
        sae.train(was_training)


@contextlib.contextmanager
def threshold_set(sae: Any, threshold: float | None):
    """While active, the BatchTopK SAE's inference θ is ``threshold`` (None: unchanged); the
    training state keeps the EMA θ, so checkpoints, resumed runs and every data-parallel rank
    agree, while evaluation and the saved SAE use the calibrated value."""
    if threshold is None:
        yield
        return
    buffer = sae.activation.threshold
    previous = buffer.detach().clone()
    buffer.fill_(threshold)
    try:
        yield
    finally:
        buffer.copy_(previous)


def l0_target(sae_cfg: Any, target_l0: float | None = None) -> float | None:
    """The inference L0 a thresholded SAE should reach, as its activation says
    (``ActivationConfig.inference_l0_target``): k for BatchTopK, the controller's ``target_l0``
    (given, or recorded in the SAE's metadata) for a JumpReLU or penalty-trained SAE; None for
    the TopK family (exactly k by construction) and SAEs without a target."""
    if target_l0 is None:
        target_l0 = sae_cfg.metadata.get("target_l0")
    target = sae_cfg.activation.inference_l0_target(None if target_l0 is None else float(target_l0))
    return None if target is None else float(target)


def off_target(
    name: str, l0: float, target: float | None, threshold: float | None = None
) -> str | None:
    """A one-line warning when the inference L0 is more than :data:`TOLERANCE` off target;
    ``threshold``: a BatchTopK θ, whose 0 below target has its own reason (module docstring)."""
    if target is None or abs(l0 - target) <= TOLERANCE * target:
        return None
    why = ""
    if threshold is not None and threshold <= 0 and l0 < target:
        why = (
            f"; θ = 0: fewer than k·N = {target:g}·N pre-activations are positive on these "
            "tokens, so no threshold can reach k (the SAE fires less than it trained to)"
        )
    return (
        f"SAE {name}: inference L0 {l0:.2f} is {abs(l0 / target - 1):.0%} off its target"
        f" {target:g} (more than {TOLERANCE:.0%}){why}"
    )


@torch.no_grad()
def to_jumprelu(sae: SAE) -> SAE:
    """The SAE's inference as a JumpReLU SAE: the same weights, the config, thresholds and
    metadata of ``sae.activation.as_jumprelu()`` (BatchTopK: every θ_i = its θ; calibrate first
    with :func:`calibrate_batchtopk`; module docstring: why global)."""
    form = sae.activation.as_jumprelu()
    if form is None:
        raise ValueError(
            f"only a batchtopk SAE converts to jumprelu, this one is {sae.cfg.activation.kind!r}"
        )
    metadata = {**sae.cfg.metadata, **form.metadata}
    cfg = dataclasses.replace(sae.cfg, activation=form.config, metadata=metadata)
    converted = SAE(cfg, device=sae.W_enc.device)
    state = {k: v for k, v in sae.state_dict().items() if not k.startswith("activation.")}
    converted.load_state_dict({**state, "activation.threshold": converted.activation.threshold})
    converted.activation.threshold.copy_(form.threshold)
    return converted.eval()
