"""Synthetic activations built from known sparse features in superposition (the built-in data).

x = Σ_i c_i f_i + μ + noise, with F unit directions f_i in R^d (F > d: superposition), feature i
active with probability p_i (Zipf-like), magnitudes c_i > 0 when active, a nonzero mean μ and
Gaussian noise. Three kinds:

- ``independent``: features fire independently.
- ``hierarchical``: the first ``n_parents`` features are parents; each has ``children_per_parent``
  mutually exclusive children, and a child fires only with its parent (exactly one child per
  active parent). This is the setting in which feature absorption shows up.
- ``correlated``: activity comes from a Gaussian copula with a low-rank correlation structure.

Transcoder ground truth (``d_out`` set): each batch also carries a target
y = Σ_i c_i g_i + ν + noise (+ x Aᵀ with ``skip_strength``), g_i known unit output directions
[F, d_out]: a known sparse map from the input's features to the target, so a transcoder's
decoder rows can be matched to g (``directions``). A batch is then [x | y], the layout of a
transcoder's training stream (SAE.split_stream).

Batches are a pure function of (seed, batch index), so a resumed run sees exactly the same data.
Everything is vectorised; nothing loops over examples.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor


@dataclass
class SyntheticConfig:
    """The ground-truth generator's settings."""

    d: int = 64
    """Activation width."""
    n_features: int = 256
    """Number of true features F (more than d: superposition)."""
    mean_l0: float = 6.0
    """Expected number of active true features per token (the true L0)."""
    zipf_exponent: float = 0.6
    """Feature i fires with probability ∝ (i + 1)^-exponent (capped at 1)."""
    magnitude_mean: float = 1.0
    """Mean magnitude of an active feature."""
    magnitude_std: float = 0.25
    """Standard deviation of magnitudes (uniform distribution, clipped at 5% of the mean)."""
    noise_std: float = 0.02
    """Standard deviation of isotropic Gaussian noise per dimension."""
    mean_norm: float = 2.0
    """Norm of the data's mean offset μ (nonzero by default: b_dec has something to learn)."""
    kind: str = "independent"
    """independent, hierarchical or correlated."""
    n_parents: int = 16
    """hierarchical: number of parent features."""
    children_per_parent: int = 4
    """hierarchical: mutually exclusive children per parent."""
    parent_probability: float = 0.1
    """hierarchical: firing probability of each parent."""
    correlation_rank: int = 8
    """correlated: rank of the shared factors of the copula."""
    correlation_strength: float = 0.5
    """correlated: share of each feature's latent variance from the shared factors, in [0, 1)."""
    seed: int = 0
    """Seed of the directions, frequencies and every batch."""
    d_out: int | None = None
    """Transcoder ground truth: width of the target y = Σ c_i g_i + ν + noise (module
    docstring); None: activations only (SAE data)."""
    skip_strength: float = 0.0
    """Transcoder ground truth: y also gets x Aᵀ, A a fixed Gaussian [d_out, d] map scaled so
    each entry has standard deviation skip_strength / √d (a dense linear part: what a skip
    transcoder's W_skip is for)."""

    def __post_init__(self) -> None:
        names = ("d", "n_features", "n_parents", "children_per_parent", "correlation_rank")
        for name in names + (("d_out",) if self.d_out is not None else ()):
            if getattr(self, name) <= 0:
                raise ValueError(
                    f"SyntheticConfig.{name} must be a positive integer, got {getattr(self, name)}"
                )
        for name, strict in (
            ("zipf_exponent", False),
            ("magnitude_mean", True),
            ("magnitude_std", False),
            ("noise_std", False),
            ("mean_norm", False),
            ("skip_strength", False),
        ):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0 or (strict and value == 0):
                raise ValueError(
                    f"SyntheticConfig.{name} must be a finite number {'>' if strict else '>='} 0,"
                    f" got {value!r}"
                )
        if not 0 < self.parent_probability <= 1:
            raise ValueError(
                f"SyntheticConfig.parent_probability must be in (0, 1], got"
                f" {self.parent_probability!r}"
            )
        if self.seed < 0:
            raise ValueError(f"SyntheticConfig.seed must be >= 0, got {self.seed}")
        if self.skip_strength and self.d_out is None:
            raise ValueError("SyntheticConfig.skip_strength needs d_out (transcoder data)")
        if self.kind not in ("independent", "hierarchical", "correlated"):
            raise ValueError(
                f"SyntheticConfig.kind must be independent, hierarchical or correlated, "
                f"got {self.kind!r}"
            )
        if not 0 < self.mean_l0 <= self.n_features:
            raise ValueError(
                f"SyntheticConfig.mean_l0 must be in (0, n_features = {self.n_features}], got"
                f" {self.mean_l0!r}"
            )
        if self.kind == "hierarchical":
            n_tree = self.n_parents * (1 + self.children_per_parent)
            if n_tree > self.n_features:
                raise ValueError(
                    f"SyntheticConfig: {self.n_parents} parents with {self.children_per_parent} "
                    f"children need {n_tree} features, more than n_features = {self.n_features}"
                )
            tree_l0 = 2 * self.n_parents * self.parent_probability  # a parent and one child
            free_l0 = self.mean_l0 - tree_l0
            if (
                free_l0 < -1e-9
                or (n_tree == self.n_features and free_l0 > 1e-9)
                or (n_tree < self.n_features and free_l0 <= 1e-9)
            ):
                raise ValueError(
                    f"SyntheticConfig.mean_l0 = {self.mean_l0} cannot be met: the parent/child "
                    f"tree contributes {tree_l0:g} and {self.n_features - n_tree} free features "
                    "must supply the rest (a positive amount, if there are any)"
                )
        if not 0 <= self.correlation_strength < 1:
            raise ValueError(
                f"SyntheticConfig.correlation_strength must be in [0, 1), got"
                f" {self.correlation_strength!r}"
            )


class SyntheticBatch(NamedTuple):
    x: Tensor
    """[N, d] activations ([N, d + d_out]: input then target, for transcoder data)."""
    coefficients: Tensor
    """[N, F] true feature coefficients (0 where inactive)."""


def zipf_probabilities(n: int, exponent: float, total: float) -> Tensor:
    """Probabilities ∝ (i+1)^-exponent, capped at 1, summing to ``total`` (float64)."""
    weights = torch.arange(1, n + 1, dtype=torch.float64).pow(-exponent)
    probs = weights * (total / weights.sum())
    for _ in range(100):  # redistribute the mass lost to the cap at 1
        capped = probs.clamp(max=1.0)
        missing = total - capped.sum()
        free = capped < 1.0
        if missing <= 1e-12 or not free.any():
            return capped
        probs = torch.where(free, capped * (1 + missing / capped[free].sum()), capped)
    return probs.clamp(max=1.0)


def batch_seed(seed: int, index: int) -> int:
    """A 32-bit generator seed for batch ``index`` (torch's CPU generator keeps 32 bits).

    A per-seed offset from splitmix64 plus the index: distinct batches of one seed never share
    a generator seed, and two seeds' runs overlap only if their offsets fall within a run's
    length of each other (chance about n_batches / 2^32).
    """
    z = (seed + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    z ^= z >> 31
    return (z + index) & 0xFFFFFFFF


def bernoulli_activity(p: Tensor, n: int, g: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """[n, F] independent activity (feature i fires with probability p_i), a uniform v in [0, 1)
    for active entries independent of it, and the uniform draw u itself.

    One uniform draw per entry serves both (u < p fires; then u / p is uniform), which halves
    the cost of a batch.
    """
    u = torch.rand(n, p.shape[0], generator=g)
    return u < p, u / p, u


def magnitudes(active: Tensor, v: Tensor, mean: float, std: float) -> Tensor:
    """Coefficients: 0 where inactive, else uniform on mean ± √3·std (so its standard deviation
    is ``std``; ``v`` uniform in [0, 1)), clipped at 5% of the mean."""
    half_width = std * math.sqrt(3.0)
    values = (mean + half_width * (2 * v - 1)).clamp_min(0.05 * mean)
    return torch.where(active, values, torch.zeros(()))


class SyntheticData:
    """A ground-truth generator: ``batch(i, n)`` is the i-th batch of n tokens."""

    def __init__(self, cfg: SyntheticConfig, stream_seed: int = 0):
        """``cfg.seed`` fixes the ground truth (directions, frequencies, mean) and, with
        ``stream_seed`` (a run's ``seed``; 0 leaves the batches as ``cfg.seed`` alone gives
        them), the batches drawn from it."""
        self.cfg = cfg
        self.stream_seed = stream_seed
        g = torch.Generator().manual_seed(cfg.seed)
        F, d = cfg.n_features, cfg.d
        directions = torch.randn(F, d, generator=g, dtype=torch.float64)
        self.input_directions = (directions / directions.norm(dim=-1, keepdim=True)).float()
        """[F, d] unit true directions of the activations x."""
        self.directions = self.input_directions
        """[F, d_out] what decoder rows should recover: the input directions for SAE data, the
        output directions g for transcoder data."""
        mean = torch.randn(d, generator=g, dtype=torch.float64)
        self.mean = (mean / mean.norm() * cfg.mean_norm).float()
        """[d] the data's mean offset."""
        self.parent_of = torch.full((F,), -1, dtype=torch.long)
        """[F] index of each feature's parent, -1 for none."""
        if cfg.kind == "hierarchical":
            P, C = cfg.n_parents, cfg.children_per_parent
            n_free = F - P * (1 + C)
            free_total = cfg.mean_l0 - 2 * P * cfg.parent_probability
            probs = torch.cat(
                [
                    torch.full((P,), cfg.parent_probability, dtype=torch.float64),
                    torch.full((P * C,), cfg.parent_probability / C, dtype=torch.float64),
                    zipf_probabilities(n_free, cfg.zipf_exponent, free_total)
                    if n_free
                    else torch.zeros(0, dtype=torch.float64),
                ]
            )
            self.parent_of[P : P + P * C] = torch.arange(P).repeat_interleave(C)
        else:
            probs = zipf_probabilities(F, cfg.zipf_exponent, cfg.mean_l0)
        self.probabilities = probs.float()
        """[F] marginal firing probability of each feature."""
        if cfg.kind == "correlated":
            factors = torch.randn(F, cfg.correlation_rank, generator=g, dtype=torch.float64)
            factors /= factors.norm(dim=-1, keepdim=True)
            self.factors = (factors * math.sqrt(cfg.correlation_strength)).float()
        if cfg.d_out is not None:  # drawn last: the input side is the same as without a target
            out_FD = torch.randn(F, cfg.d_out, generator=g, dtype=torch.float64)
            self.directions = (out_FD / out_FD.norm(dim=-1, keepdim=True)).float()
            target_mean = torch.randn(cfg.d_out, generator=g, dtype=torch.float64)
            self.target_mean = (target_mean / target_mean.norm() * cfg.mean_norm).float()
            """[d_out] the target's mean offset ν."""
            skip = torch.randn(cfg.d_out, d, generator=g, dtype=torch.float64)
            self.skip_map = (skip * (cfg.skip_strength / math.sqrt(d))).float()
            """[d_out, d] the target's dense linear part A (zero unless skip_strength)."""

    @property
    def true_l0(self) -> float:
        """Expected number of active true features per token."""
        return float(self.probabilities.sum())

    def _active(self, n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        """[n, F] activity and, for active entries, a uniform v in [0, 1) independent of it
        (one uniform draw per entry serves both: :func:`bernoulli_activity`)."""
        cfg, F = self.cfg, self.cfg.n_features
        p = self.probabilities
        if cfg.kind == "correlated":
            shared = torch.randn(n, cfg.correlation_rank, generator=g) @ self.factors.T
            own = torch.randn(n, F, generator=g) * math.sqrt(1 - cfg.correlation_strength)
            u = 1 - torch.special.ndtr(shared + own)  # uniform; fires when u < p
            return u < p, u / p
        active, v, u = bernoulli_activity(p, n, g)
        if cfg.kind == "hierarchical":
            P, C = cfg.n_parents, cfg.children_per_parent
            children = slice(P, P + P * C)
            child = torch.randint(C, (n, P), generator=g)
            one_hot = torch.nn.functional.one_hot(child, C).bool()  # [n, P, C]
            active[:, children] = (one_hot & active[:, :P].unsqueeze(-1)).reshape(n, P * C)
            v[:, children] = u[:, children]  # children's activity does not depend on u
        return active, v

    def batch(self, index: int, n: int) -> SyntheticBatch:
        """The ``index``-th batch of ``n`` tokens: deterministic in (seed, index, n).

        Magnitudes are uniform with the configured mean and standard deviation (clipped at 5%
        of the mean).
        """
        cfg = self.cfg
        g = torch.Generator().manual_seed(batch_seed(cfg.seed ^ (self.stream_seed << 32), index))
        active, v = self._active(n, g)
        coefficients = magnitudes(active, v, cfg.magnitude_mean, cfg.magnitude_std)
        noise = cfg.noise_std * torch.randn(n, cfg.d, generator=g)
        x = torch.addmm(self.mean + noise, coefficients, self.input_directions)
        if cfg.d_out is not None:
            noise_y = cfg.noise_std * torch.randn(n, cfg.d_out, generator=g)
            y = torch.addmm(self.target_mean + noise_y, coefficients, self.directions)
            x = torch.cat([x, torch.addmm(y, x, self.skip_map.T)], dim=-1)
        return SyntheticBatch(x, coefficients)

    def stream(self, batch_size: int, start: int = 0) -> Iterator[Tensor]:
        """Endless activation batches from batch index ``start`` on."""
        index = start
        while True:
            yield self.batch(index, batch_size).x
            index += 1
