"""Reconstruction and sparsity metrics, accumulated as ratios of sums over a whole evaluation set.

FVU = Σ_n ‖x − x̂‖² / Σ_n ‖x − x̄‖², x̄ the mean over the whole set (never a mean of per-batch
ratios). Sums are kept in float64 on the device; nothing syncs until
:meth:`MetricAccumulator.result`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
from torch import Tensor

from saekit.core.encoding import SparseCode


def latent_counts(latents: Tensor | SparseCode) -> tuple[Tensor, Tensor]:
    """Per token, the number of nonzero latents [N]; per latent, the tokens it fired on [M]."""
    if isinstance(latents, SparseCode):
        fired = (latents.values != 0).to(torch.int64)
        per_token = torch.zeros(latents.n_tokens, dtype=torch.int64, device=fired.device)
        per_token.index_add_(0, latents.token, fired)
        per_latent = torch.zeros(latents.d_sae, dtype=torch.int64, device=fired.device)
        per_latent.index_add_(0, latents.latent, fired)
        return per_token, per_latent
    nonzero = latents != 0
    return nonzero.sum(-1), nonzero.sum(0)


def batch_fvu(x: Tensor, x_hat: Tensor) -> Tensor:
    """Fraction of variance unexplained of one batch, Σ‖x − x̂‖² / Σ‖x − x̄‖², in the inputs'
    dtype (the training log's: no float64 copies of [N, d] per step). The evaluation sums the
    same ratio over a whole set in float64 (:class:`MetricAccumulator`)."""
    x = x.reshape(-1, x.shape[-1])
    x_hat = x_hat.reshape(-1, x_hat.shape[-1])
    return (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()


@dataclass
class EvalResult:
    n_tokens: int
    fvu: float
    explained_variance: float
    mse: float
    l0: float
    dead_fraction: float
    dense_fraction: float
    l0_histogram: list[int]
    """Entry j counts tokens with j active latents (the last bin also holds larger counts)."""
    latent_density: list[float]
    """Per latent, the share of tokens it fired on."""

    def summary(self) -> dict[str, float]:
        d = asdict(self)
        d.pop("l0_histogram")
        d.pop("latent_density")
        return d


class MetricAccumulator:
    """Streams batches; holds only O(d + M) float64 sums."""

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        device: torch.device | str = "cpu",
        max_l0_bin: int = 512,
        dense_threshold: float = 0.1,
    ):
        f64 = dict(dtype=torch.float64, device=device)
        self.n = torch.zeros((), **f64)
        self.sum_x = torch.zeros(d_in, **f64)
        self.sum_sq_x = torch.zeros((), **f64)
        self.sum_sq_err = torch.zeros((), **f64)
        self.fired = torch.zeros(d_sae, dtype=torch.int64, device=device)
        self.l0_hist = torch.zeros(max_l0_bin + 1, dtype=torch.int64, device=device)
        self.l0_tokens = torch.zeros((), dtype=torch.int64, device=device)
        self.l0_sum = torch.zeros((), dtype=torch.int64, device=device)
        self.dense_threshold = dense_threshold

    @torch.no_grad()
    def add_reconstruction(self, x: Tensor, x_hat: Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()
        x_hat = x_hat.reshape(-1, x_hat.shape[-1]).double()
        self.n += x.shape[0]
        self.sum_x += x.sum(0)
        self.sum_sq_x += x.pow(2).sum()
        self.sum_sq_err += (x - x_hat).pow(2).sum()

    @torch.no_grad()
    def add_latents(self, latents: Tensor | SparseCode) -> None:
        self.add_counts(*latent_counts(latents))

    @torch.no_grad()
    def add_counts(self, per_token: Tensor, per_latent: Tensor) -> None:
        """Active latents per token [N] and tokens fired on per latent [M] (:func:`latent_counts`;
        a multi-layer dictionary adds its layers' counts, :mod:`saekit.eval.parts`)."""
        self.fired += per_latent
        self.l0_hist += torch.bincount(
            per_token.clamp(max=self.l0_hist.numel() - 1), minlength=self.l0_hist.numel()
        )
        self.l0_tokens += per_token.numel()
        self.l0_sum += per_token.sum()  # exact: the histogram's last bin is clipped

    def add(self, x: Tensor, x_hat: Tensor, latents: Tensor | SparseCode) -> None:
        self.add_reconstruction(x, x_hat)
        self.add_latents(latents)

    def total_variance(self) -> Tensor:
        """Σ_n ‖x − x̄‖² = Σ‖x‖² − N‖x̄‖²."""
        return self.sum_sq_x - self.sum_x.pow(2).sum() / self.n

    def fvu(self) -> Tensor:
        return self.sum_sq_err / self.total_variance()

    def result(self) -> EvalResult:
        n_tok = int(self.l0_tokens) or int(self.n)
        hist = self.l0_hist.cpu()
        l0 = int(self.l0_sum) / max(n_tok, 1)
        density = (self.fired.double() / max(n_tok, 1)).cpu()
        fvu = float(self.fvu())
        last = int(torch.nonzero(hist).max()) + 1 if hist.any() else 1
        return EvalResult(
            n_tokens=int(self.n),
            fvu=fvu,
            explained_variance=1.0 - fvu,
            mse=float(self.sum_sq_err / self.n),
            l0=l0,
            dead_fraction=float((self.fired == 0).double().mean()),
            dense_fraction=float((density > self.dense_threshold).double().mean()),
            l0_histogram=hist[:last].tolist(),
            latent_density=density.tolist(),
        )


@dataclass(frozen=True)
class ReconstructionMetrics:
    """The scalar metrics of an evaluation, as the reports write them (:meth:`EvalResult.summary`
    in the same order): the part of a run's ``eval.json`` and of ``saekit eval``'s report they
    share."""

    n_tokens: int
    """Tokens whose reconstruction was scored."""
    fvu: float
    """Fraction of variance unexplained, Σ‖x − x̂‖² / Σ‖x − x̄‖² over the whole set."""
    explained_variance: float
    """1 − FVU."""
    mse: float
    """Mean over tokens of the squared error ‖x − x̂‖² (summed over the d components)."""
    l0: float
    """Mean number of active latents per token."""
    dead_fraction: float
    """Share of latents that never fired on these tokens."""
    dense_fraction: float
    """Share of latents that fired on more than ``dense_threshold`` (10%) of the tokens."""

    @classmethod
    def of(cls, result: EvalResult) -> ReconstructionMetrics:
        return cls(**result.summary())

    def to_json(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> ReconstructionMetrics:
        return cls(**{f.name: d[f.name] for f in fields(cls)})
