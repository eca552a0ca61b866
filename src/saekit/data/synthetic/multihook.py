"""Synthetic streams of several hooks with a known map between them: the ground truth of
cross-layer transcoders and crosscoders.

F true features with Zipf-like firing probabilities (``mean_l0`` active per token in all), drawn
independently with the magnitudes of the built-in generator
(:func:`saekit.data.synthetic.generator.bernoulli_activity`, :func:`~.generator.magnitudes`).
Every hook h of a token is

    x_h = Σ_i c_i D_{i,h} + μ_h + noise_h,

with D_{i,h} a known unit vector where feature i writes into hook h and 0 where it does not, μ_h
a mean offset of norm ``mean_norm`` and isotropic Gaussian noise. A batch is
``[n, d_1 + … + d_H]``, the hooks' columns in the order of :attr:`MultiHookData.hooks`
(saekit/data/hook_columns.py). The world's kind says which hooks there are and which feature
writes which:

- ``clt`` (:class:`CLTWorldConfig`): L layers, hooks ``layers.{l}.mlp:input`` (width d) and
  ``layers.{l}.mlp`` (width d_out): the L inputs, then the L targets (a cross-layer
  transcoder's stream, saekit.model.clt).
  Feature i reads from layer l_i = i mod L (interleaved: every layer gets features of every
  frequency). It writes its read direction f_i into layer l_i's input and, with ``residual`` (a
  residual stream carries it on), into every later layer's input; it writes its own unit vector
  g_{i,l'} into the target of each layer l_i ≤ l' < l_i + s_i, its span s_i uniform in
  1..min(max_span, L − l_i). The true CLT (Ameisen et al. 2025, "Circuit Tracing") has one latent
  per feature, in layer l_i, decoding g_{i,l'} into every target it writes.
- ``crosscoder`` (:class:`CrosscoderWorldConfig`): S sources ``a``, ``b``, … of width d. A share
  ``exclusive_fraction`` of the features (chosen at random, dealt evenly to the sources) writes
  into one source only (only-a, only-b, …); the rest write into every source, each with its own
  unit vector per source (Lindsey et al. 2024's shared and model-specific features).

The structure (directions, layers, spans, owners, means) is a pure function of ``seed``; batch i
of a stream of ``stream_seed`` a pure function of (seed, stream_seed, i).
"""

from __future__ import annotations

import math
import string
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from saekit.core.configs import KindConfig
from saekit.data.hook_columns import select_columns
from saekit.data.synthetic.generator import (
    SyntheticBatch,
    batch_seed,
    bernoulli_activity,
    magnitudes,
    zipf_probabilities,
)


class MultiHookConfig(KindConfig):
    """A multi-hook world (``data.multihook`` of ``data.source: multihook``)."""

    family = "multi-hook world"
    default_kind: ClassVar[str] = "clt"

    @classmethod
    def parse(cls, value: Any, where: str) -> KindConfig:
        if isinstance(value, dict):
            value = {"kind": cls.default_kind, **value}
        return super().parse(value, where)

    def hooks(self) -> list[tuple[str, int]]:
        """``(name, width)`` of every hook, in column order."""
        raise NotImplementedError

    def plant(self, g: torch.Generator) -> Any:
        """The kind's structure, drawn from ``g`` (a plan with ``hook_directions()``)."""
        raise NotImplementedError


@dataclass
class _WorldFields(MultiHookConfig):
    """The fields every kind has."""

    d: int = 32
    """Width of every input hook (every source, for a crosscoder)."""
    n_features: int = 96
    """Number of true features F, in all."""
    mean_l0: float = 6.0
    """Expected number of active true features per token, in all."""
    zipf_exponent: float = 0.6
    """Feature i fires with probability ∝ (i + 1)^-exponent (capped at 1)."""
    magnitude_mean: float = 1.0
    """Mean magnitude of an active feature."""
    magnitude_std: float = 0.25
    """Standard deviation of magnitudes (uniform, clipped at 5% of the mean)."""
    noise_std: float = 0.02
    """Standard deviation of the Gaussian noise per dimension of every hook."""
    mean_norm: float = 2.0
    """Norm of every hook's mean offset."""
    seed: int = 0
    """Seed of the structure and of every batch."""

    def __post_init__(self) -> None:
        name = type(self).__name__
        for field in ("d", "n_features") + self._positive:
            value = getattr(self, field)
            if value is not None and value <= 0:
                raise ValueError(f"{name}.{field} must be a positive integer, got {value}")
        for field, strict in (
            ("zipf_exponent", False),
            ("magnitude_mean", True),
            ("magnitude_std", False),
            ("noise_std", False),
            ("mean_norm", False),
        ):
            value = getattr(self, field)
            if not math.isfinite(value) or value < 0 or (strict and value == 0):
                raise ValueError(
                    f"{name}.{field} must be a finite number {'>' if strict else '>='} 0,"
                    f" got {value!r}"
                )
        if not 0 < self.mean_l0 <= self.n_features:
            raise ValueError(
                f"{name}.mean_l0 must be in (0, n_features = {self.n_features}], got"
                f" {self.mean_l0!r}"
            )
        if self.seed < 0:
            raise ValueError(f"{name}.seed must be >= 0, got {self.seed}")

    _positive: ClassVar[tuple[str, ...]] = ()


def _unit_rows(n: int, d: int, g: torch.Generator) -> Tensor:
    """[n, d] random unit vectors (float64)."""
    rows = torch.randn(n, d, generator=g, dtype=torch.float64)
    return rows / rows.norm(dim=-1, keepdim=True)


class CLTPlan(NamedTuple):
    """The cross-layer map: feature i reads ``read[i]`` at layer ``layer_of[i]`` and writes
    ``write[i, l']`` into the targets l' in [layer_of[i], layer_of[i] + span[i])."""

    read: Tensor
    """[F, d] unit read directions f_i."""
    write: Tensor
    """[F, L, d_out] unit write vectors g_{i,l'} (drawn for every l'; used inside the span)."""
    layer_of: Tensor
    """[F] the layer each feature reads from."""
    span: Tensor
    """[F] how many targets each feature writes, from its own layer on."""
    residual: bool

    def writes_target(self) -> Tensor:
        """[F, L] whether feature i writes into layer l's target."""
        layers = torch.arange(self.write.shape[1])
        start = self.layer_of.unsqueeze(1)
        return (layers >= start) & (layers < start + self.span.unsqueeze(1))

    def writes_input(self) -> Tensor:
        """[F, L] whether feature i is in layer l's input."""
        layers = torch.arange(self.write.shape[1])
        start = self.layer_of.unsqueeze(1)
        return layers >= start if self.residual else layers == start

    def hook_directions(self) -> list[Tensor]:
        """D_h [F, d_h] per hook, in column order: the L inputs, then the L targets."""
        inputs, targets = self.writes_input(), self.writes_target()
        L = self.write.shape[1]
        return [self.read * inputs[:, layer, None] for layer in range(L)] + [
            self.write[:, layer] * targets[:, layer, None] for layer in range(L)
        ]


@dataclass
class CLTWorldConfig(_WorldFields):
    """Features that read one layer's input and write that layer's target and later ones."""

    kind = "clt"
    n_layers: int = 4
    """Layers L: hooks ``layers.{l}.mlp:input`` and ``layers.{l}.mlp`` for each."""
    d_out: int | None = None
    """Width of every target hook (None: d)."""
    max_span: int | None = None
    """The most targets a feature writes (None: up to the last layer)."""
    residual: bool = True
    """A feature stays in the inputs of the layers after its own (as in a residual stream);
    False: only its own layer's input holds it."""

    _positive = ("n_layers", "d_out", "max_span")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_features < self.n_layers:
            raise ValueError(
                f"CLTWorldConfig.n_features = {self.n_features} gives some of the "
                f"{self.n_layers} layers no feature; use at least n_layers"
            )

    def hooks(self) -> list[tuple[str, int]]:
        d_out = self.d if self.d_out is None else self.d_out
        layers = range(self.n_layers)
        return [(f"layers.{layer}.mlp:input", self.d) for layer in layers] + [
            (f"layers.{layer}.mlp", d_out) for layer in layers
        ]

    def plant(self, g: torch.Generator) -> CLTPlan:
        L, F = self.n_layers, self.n_features
        d_out = self.d if self.d_out is None else self.d_out
        read = _unit_rows(F, self.d, g)
        write = _unit_rows(F * L, d_out, g).reshape(F, L, d_out)
        layer_of = torch.arange(F) % L
        longest = (L - layer_of).clamp(max=self.max_span or L)
        span = 1 + (torch.rand(F, generator=g, dtype=torch.float64) * longest).long()
        return CLTPlan(read, write, layer_of, span, self.residual)


class CrosscoderPlan(NamedTuple):
    """Feature i writes ``directions[i, s]`` into source s when ``owner[i]`` is -1 (shared) or
    s (exclusive to s)."""

    directions: Tensor
    """[F, S, d] unit vectors per feature and source."""
    owner: Tensor
    """[F] -1 for a shared feature, else the one source it writes."""

    def writes_source(self) -> Tensor:
        """[F, S] whether feature i writes into source s."""
        sources = torch.arange(self.directions.shape[1])
        return (self.owner.unsqueeze(1) == -1) | (self.owner.unsqueeze(1) == sources)

    def hook_directions(self) -> list[Tensor]:
        writes = self.writes_source()
        return [self.directions[:, s] * writes[:, s, None] for s in range(writes.shape[1])]


@dataclass
class CrosscoderWorldConfig(_WorldFields):
    """Sources sharing some features, each with features of its own."""

    kind = "crosscoder"
    n_sources: int = 2
    """Sources S, hooks named ``a``, ``b``, … (at most 26)."""
    exclusive_fraction: float = 0.5
    """Share of the features written into one source only, dealt evenly to the sources."""

    _positive = ("n_sources",)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_sources > len(string.ascii_lowercase):
            raise ValueError(f"CrosscoderWorldConfig.n_sources must be <= 26, got {self.n_sources}")
        if not 0 <= self.exclusive_fraction <= 1:
            raise ValueError(
                "CrosscoderWorldConfig.exclusive_fraction must be in [0, 1], got"
                f" {self.exclusive_fraction!r}"
            )

    def hooks(self) -> list[tuple[str, int]]:
        return [(string.ascii_lowercase[s], self.d) for s in range(self.n_sources)]

    def plant(self, g: torch.Generator) -> CrosscoderPlan:
        F, S = self.n_features, self.n_sources
        directions = _unit_rows(F * S, self.d, g).reshape(F, S, self.d)
        n_exclusive = round(self.exclusive_fraction * F)
        chosen = torch.randperm(F, generator=g)[:n_exclusive]
        owner = torch.full((F,), -1, dtype=torch.long)
        owner[chosen] = torch.arange(n_exclusive) % S  # dealt in turn: counts differ by <= 1
        return CrosscoderPlan(directions, owner)


class MultiHookData:
    """A multi-hook world: ``batch(i, n)`` is the i-th batch of n tokens, all hooks."""

    def __init__(self, cfg: MultiHookConfig, stream_seed: int = 0):
        self.cfg = cfg
        self.stream_seed = stream_seed
        self.hooks = cfg.hooks()
        """``(name, width)`` per hook, in column order."""
        g = torch.Generator().manual_seed(cfg.seed)
        self.plan = cfg.plant(g)
        """The kind's structure (:class:`CLTPlan`, :class:`CrosscoderPlan`)."""
        directions = self.plan.hook_directions()
        self.directions = {
            name: D.float() for (name, _), D in zip(self.hooks, directions, strict=True)
        }
        """{hook: [F, d_h]} the vector feature i writes there (rows of 0: it does not)."""
        means = [_unit_rows(1, width, g)[0] * cfg.mean_norm for _, width in self.hooks]
        self.means = {name: m.float() for (name, _), m in zip(self.hooks, means, strict=True)}
        """{hook: [d_h]} its mean offset μ_h."""
        self.probabilities = zipf_probabilities(
            cfg.n_features, cfg.zipf_exponent, cfg.mean_l0
        ).float()
        """[F] firing probability of each feature."""
        self._directions = torch.cat(list(self.directions.values()), dim=1)  # [F, Σ d_h]
        self._mean = torch.cat(list(self.means.values()))

    @property
    def true_l0(self) -> float:
        """Expected number of active true features per token."""
        return float(self.probabilities.sum())

    def writes(self, hook: str) -> Tensor:
        """[F] whether each feature writes into ``hook``."""
        return self.directions[hook].ne(0).any(dim=1)

    def batch(self, index: int, n: int) -> SyntheticBatch:
        """The ``index``-th batch of ``n`` tokens, [n, Σ d_h]: deterministic in (seed, index, n)."""
        cfg = self.cfg
        g = torch.Generator().manual_seed(batch_seed(cfg.seed ^ (self.stream_seed << 32), index))
        active, v, _ = bernoulli_activity(self.probabilities, n, g)
        coefficients = magnitudes(active, v, cfg.magnitude_mean, cfg.magnitude_std)
        noise = cfg.noise_std * torch.randn(n, self._directions.shape[1], generator=g)
        return SyntheticBatch(torch.addmm(self._mean + noise, coefficients, self._directions),
                              coefficients)  # fmt: skip

    def stream(self, batch_size: int, start: int = 0) -> Iterator[Tensor]:
        """Endless batches from batch index ``start`` on."""
        return _stream(self.batch, batch_size, start)


class HookSelection:
    """The hooks ``names`` of a world, as an SAE (one hook) or a transcoder (input, target)
    trains on them: batches hold their columns, and the ground truth is the last one's (the
    target's, or the SAE's hook's): the features that write into it and their vectors there,
    the form of the built-in generator (``directions``, ``parent_of``, ``true_l0``, ``cfg``)."""

    def __init__(self, data: MultiHookData, names: Sequence[str]):
        self.data = data
        self.cfg = data.cfg
        self.names = list(names)
        self.columns = select_columns(data.hooks, self.names)
        self.features = torch.nonzero(data.writes(self.names[-1])).flatten()
        """Indices of the true features in the truth hook (the columns of the coefficients)."""
        self.directions = data.directions[self.names[-1]][self.features]
        """[F', d_h] their unit vectors in the truth hook."""
        self.parent_of = torch.full((len(self.features),), -1, dtype=torch.long)
        self.probabilities = data.probabilities[self.features]

    @property
    def true_l0(self) -> float:
        return float(self.probabilities.sum())

    def batch(self, index: int, n: int) -> SyntheticBatch:
        b = self.data.batch(index, n)
        return SyntheticBatch(b.x[:, self.columns], b.coefficients[:, self.features])

    def stream(self, batch_size: int, start: int = 0) -> Iterator[Tensor]:
        return _stream(self.batch, batch_size, start)


def _stream(batch: Callable[[int, int], SyntheticBatch], size: int, start: int) -> Iterator[Tensor]:
    index = start
    while True:
        yield batch(index, size).x
        index += 1
