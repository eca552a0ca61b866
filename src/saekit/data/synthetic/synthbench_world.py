"""SynthSAEBench ground truth (arXiv 2602.14687): the world an SAE is scored against.

Definitions follow the paper and the SAELens docs page "synth_sae_bench" (the SynthSAEBench-16k
v2 settings are :func:`synthsaebench_16k`); the code is saekit's own. The world is

- F unit feature directions in R^d, drawn Gaussian and then orthogonalised by Adam on
  L = Σ_{i≠j} (f_i·f_j)² + F·Σ_i (‖f_i‖² − 1)², then renormalised;
- a bias vector of norm ``bias_norm`` added to every token;
- Zipf base firing probabilities p_i ∝ (i+1)^−a, rescaled linearly onto [p_min, p_max];
- a forest of ``n_roots`` trees (branching ``branching``, ``depth`` levels below the roots,
  features numbered breadth first from 0): a child fires only with its parent, siblings are
  mutually exclusive (one uniformly random winner), and a child's magnitude is multiplied by
  parent value / parent mean ("v2"; v1 only gated). Probabilities are compensated so a
  feature's marginal rate stays near its base rate: p_child · (1/p_parent) ·
  (1 + Σ_{siblings j} p_j / p_parent), clamped at 1;
- a Gaussian copula with a low-rank correlation: g = ε Wᵀ + η·s, ε ~ N(0, I_r),
  W = scale·N(0,1)^{F×r} (rows with ‖w_i‖² > 0.99 shrunk to 0.99), s_i = √(1 − ‖w_i‖²);
  feature i fires when g_i > Φ⁻¹(1 − p_i);
- magnitudes ReLU(μ_i + σ_i·N(0,1)), μ linear from ``magnitude_start`` to ``magnitude_end``
  over the features, σ_i = |N(std_mean, std_std²)| drawn once per feature.

Sampling (:mod:`saekit.data.synthetic.synthbench_sampler`) is sparse; batch i is a pure function of
(seed, stream seed, i).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

CORRELATION_MAX_ROW = 0.99
"""A factor row's squared norm is capped here so every feature keeps own noise (SAELens)."""


@dataclass
class SynthBenchConfig:
    """The generator's settings; defaults are SynthSAEBench-16k v2."""

    n_features: int = 16_384
    d: int = 768
    zipf_exponent: float = 0.5
    p_max: float = 0.4
    p_min: float = 5e-4
    n_roots: int = 128
    """Trees of the hierarchy (0: no hierarchy)."""
    branching: int = 4
    depth: int = 3
    """Levels below the roots (depth 3: root, child, grandchild, great-grandchild)."""
    scale_children: bool = True
    """v2: a child's magnitude is multiplied by its parent's value / the parent's mean."""
    correlation_rank: int = 25
    correlation_scale: float = 0.1
    """0 turns the correlation off (features fire independently)."""
    ortho_steps: int = 100
    ortho_lr: float = 3e-4
    magnitude_start: float = 5.0
    magnitude_end: float = 4.0
    std_mean: float = 0.5
    std_std: float = 0.5
    bias_norm: float = 0.5
    bos_share: float = 0.0
    """Share of BOS-like tokens on which no feature fires (x = the bias only): per-token
    information that varies, as in an LM stream (docs/research.md, question 1)."""
    seed: int = 42
    sampler: str = "sparse"
    """sparse: saekit's sampler (O(firings) per batch; SAELens's distribution); saelens: SAELens's
    own draws, draw for draw (O(N·F) per batch; :mod:`saekit.data.synthetic.saelens_sampler`)."""
    world_path: str | None = None
    """A world SAELens saved (``SyntheticModel.save``: its directory): read instead of generated
    (:mod:`saekit.data.synthetic.saelens_world`): the fields above that SAELens's config maps
    onto are taken from the file (one set to another value is an error); its tensors are what
    is sampled."""

    def __post_init__(self) -> None:
        for name in ("n_features", "d", "branching", "depth", "correlation_rank"):
            if getattr(self, name) <= 0:
                raise ValueError(f"synthbench.{name} must be a positive integer")
        for name in ("n_roots", "ortho_steps", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"synthbench.{name} must be >= 0")
        if not 0 < self.p_min < self.p_max <= 1:
            raise ValueError("synthbench: need 0 < p_min < p_max <= 1")
        for name in ("zipf_exponent", "magnitude_start", "magnitude_end", "std_std"):
            if not getattr(self, name) > 0:
                raise ValueError(f"synthbench.{name} must be > 0")
        for name in ("correlation_scale", "ortho_lr", "bias_norm", "std_mean"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"synthbench.{name} must be a finite number >= 0")
        if self.sampler not in ("sparse", "saelens"):
            raise ValueError(f"synthbench.sampler must be sparse or saelens, got {self.sampler!r}")
        if self.sampler == "saelens" and self.bos_share:
            raise ValueError(
                "synthbench.sampler saelens has no BOS-like tokens: bos_share must be 0"
            )
        if not 0 <= self.bos_share < 1:
            raise ValueError("synthbench.bos_share must be in [0, 1)")
        if self.n_tree > self.n_features:
            raise ValueError(
                f"synthbench: the hierarchy needs {self.n_tree} features, more than "
                f"n_features = {self.n_features}"
            )

    @property
    def n_tree(self) -> int:
        """Features inside the hierarchy (roots and all their descendants)."""
        return self.n_roots * sum(self.branching**level for level in range(self.depth + 1))


def synthsaebench_16k() -> SynthBenchConfig:
    """SynthSAEBench-16k v2 (arXiv 2602.14687; SAELens docs "synth_sae_bench")."""
    return SynthBenchConfig()


def zipf_linear_probabilities(n: int, exponent: float, p_max: float, p_min: float) -> Tensor:
    """[n] float64: r_i = (i+1)^−exponent mapped linearly so r_0 ↦ p_max and r_{n−1} ↦ p_min."""
    r = torch.arange(1, n + 1, dtype=torch.float64).pow(-exponent)
    if n == 1:
        return torch.tensor([p_max], dtype=torch.float64)
    return p_min + (p_max - p_min) * (r - r[-1]) / (r[0] - r[-1])


def hierarchy_parents(cfg: SynthBenchConfig) -> tuple[Tensor, Tensor, Tensor]:
    """([F] parent or −1, [F] depth or −1, [F] first child or −1): trees numbered breadth first.

    Level L holds n_roots·branching^L features; the k-th feature of level L+1 is a child of
    the (k // branching)-th feature of level L, so a parent's children are consecutive.
    """
    F = cfg.n_features
    parent = torch.full((F,), -1, dtype=torch.long)
    depth = torch.full((F,), -1, dtype=torch.long)
    first_child = torch.full((F,), -1, dtype=torch.long)
    if cfg.n_roots == 0:
        return parent, depth, first_child
    start = 0
    for level in range(cfg.depth + 1):
        size = cfg.n_roots * cfg.branching**level
        depth[start : start + size] = level
        if level > 0:
            prev_start = start - size // cfg.branching
            parent[start : start + size] = prev_start + torch.arange(size) // cfg.branching
        if level < cfg.depth:
            first_child[start : start + size] = start + size + cfg.branching * torch.arange(size)
        start += size
    return parent, depth, first_child


def compensated_probabilities(base_F: Tensor, parent_F: Tensor) -> Tensor:
    """[F] float64: base rates corrected for gating and mutual exclusion, clamped at 1.

    A child fires only with its parent (÷ p_parent) and loses to each active sibling
    (× (1 + Σ_{siblings j ≠ i} p_j / p_parent)); base probabilities, not corrected ones, enter.
    """
    base = base_F.double()
    out = base.clone()
    child = parent_F >= 0
    if child.any():
        par = parent_F[child]
        p_par = base[par]
        sibling_sum = torch.zeros_like(base).index_add_(0, par, base[child])[par]
        me = 1 + (sibling_sum - base[child]).clamp_min(0) / p_par
        out[child] = base[child] / p_par * me
    return out.clamp(max=1.0)


def orthogonalise(directions_FD: Tensor, steps: int, lr: float) -> Tensor:
    """Adam on L = Σ_{i≠j} (f_i·f_j)² + F·Σ_i (‖f_i‖² − 1)², then unit rows (float64 math).

    The gradient is in closed form, ∇_i = 4·(F Fᵀ F)_i − 4‖f_i‖² f_i + 4F(‖f_i‖² − 1) f_i,
    which costs O(F d²) per step instead of the O(F² d) of the pairwise Gram matrix.
    """
    f = directions_FD.double()
    f = f / f.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    n = f.shape[0]
    m = torch.zeros_like(f)
    v = torch.zeros_like(f)
    beta1, beta2, eps = 0.9, 0.999, 1e-8  # torch.optim.Adam defaults
    for t in range(1, steps + 1):
        sq = f.pow(2).sum(-1, keepdim=True)  # [F, 1]
        grad = 4 * (f @ (f.T @ f)) - 4 * sq * f + 4 * n * (sq - 1) * f
        m = beta1 * m + (1 - beta1) * grad
        v = beta2 * v + (1 - beta2) * grad.pow(2)
        m_hat = m / (1 - beta1**t)
        v_hat = v / (1 - beta2**t)
        f = f - lr * m_hat / (v_hat.sqrt() + eps)
    return f / f.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def orthogonality_loss(directions_FD: Tensor) -> Tensor:
    """The loss :func:`orthogonalise` descends (float64, dense Gram: for tests and small F)."""
    f = directions_FD.double()
    gram = f @ f.T
    off = gram - torch.diag(gram.diagonal())
    return off.pow(2).sum() + f.shape[0] * (gram.diagonal() - 1).pow(2).sum()


class SynthBenchWorld:
    """The fixed parts of a world: directions, bias, probabilities, hierarchy, correlation."""

    def __init__(self, cfg: SynthBenchConfig):
        self.cfg = cfg
        F, d = cfg.n_features, cfg.d
        if cfg.world_path is not None:
            raise ValueError(
                "SynthBenchWorld generates a world; read synthbench.world_path with "
                "saekit.data.synthetic.saelens_world.load_saelens_world"
            )
        g = torch.Generator().manual_seed(cfg.seed)
        raw = torch.randn(F, d, generator=g, dtype=torch.float64)
        self.directions = orthogonalise(raw, cfg.ortho_steps, cfg.ortho_lr).float()
        """[F, d] unit feature directions."""
        bias = torch.randn(d, generator=g, dtype=torch.float64)
        self.bias = (bias / bias.norm() * cfg.bias_norm).float()
        """[d] added to every token."""
        self.parent, self.depth, self.first_child = hierarchy_parents(cfg)
        """[F] parent index (−1: root or free); [F] level in its tree (−1: free); [F] index of
        the first of a parent's consecutive children (−1: a leaf or free)."""
        self.top_level = torch.nonzero(self.depth <= 0).flatten()
        """Roots and free features: the ones drawn without a parent."""
        self.exclusive = self.first_child >= 0
        """[F] bool: a parent whose children are mutually exclusive (every parent here; a world
        read from SAELens may set it on some parents only)."""
        self.scales_children = self.exclusive & cfg.scale_children
        """[F] bool: a parent that scales its children by its value / its mean (v2)."""
        self.base_probabilities = zipf_linear_probabilities(
            F, cfg.zipf_exponent, cfg.p_max, cfg.p_min
        )
        """[F] float64 target marginal rates."""
        self.probabilities = compensated_probabilities(self.base_probabilities, self.parent)
        """[F] float64 rates drawn before the hierarchy is applied."""
        self.magnitude_mean = torch.linspace(cfg.magnitude_start, cfg.magnitude_end, F)
        """[F] μ_i."""
        self.magnitude_std = (
            (cfg.std_mean + cfg.std_std * torch.randn(F, generator=g, dtype=torch.float64))
            .abs()
            .float()
        )
        """[F] σ_i (folded normal)."""
        self.factor = None
        """[F, r] correlation factor W (None: independent firing)."""
        if cfg.correlation_scale > 0:
            w = cfg.correlation_scale * torch.randn(
                F, cfg.correlation_rank, generator=g, dtype=torch.float64
            )
            sq = w.pow(2).sum(-1, keepdim=True)
            w = torch.where(sq > CORRELATION_MAX_ROW, w * (CORRELATION_MAX_ROW / sq).sqrt(), w)
            self.factor = w.float()
        own = 1 - (self.factor.double().pow(2).sum(-1) if self.factor is not None else 0)
        self.own_std = torch.as_tensor(own, dtype=torch.float64).expand(F).sqrt().float()
        """[F] s_i = √(1 − ‖w_i‖²)."""
        self.thresholds = (math.sqrt(2) * torch.special.erfinv(1 - 2 * self.probabilities)).float()
        """[F] Φ⁻¹(1 − p_i): feature i fires when its copula variable exceeds this."""

    PARTS = ("directions", "bias", "parent", "depth", "first_child", "top_level", "exclusive",
             "scales_children", "base_probabilities", "probabilities", "magnitude_mean",
             "magnitude_std", "factor", "own_std", "thresholds")  # fmt: skip
    """Everything a world is: what :meth:`from_parts` takes."""

    @classmethod
    def from_parts(cls, cfg: SynthBenchConfig, **parts: Tensor | None) -> SynthBenchWorld:
        """A world whose tensors were read, not generated (one per name in :attr:`PARTS`)."""
        if set(parts) != set(cls.PARTS):
            raise ValueError(f"a world needs exactly {cls.PARTS}, got {sorted(parts)}")
        world = cls.__new__(cls)
        world.cfg = cfg
        for name, value in parts.items():
            setattr(world, name, value)
        return world

    def correlation_matrix(self) -> Tensor:
        """[F, F] float64 correlation of the copula variables (W Wᵀ + diag(s²)); small F only."""
        F = self.cfg.n_features
        if self.factor is None:
            return torch.eye(F, dtype=torch.float64)
        w = self.factor.double()
        return w @ w.T + torch.diag(self.own_std.double().pow(2))
