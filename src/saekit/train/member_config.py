"""One SAE of a run (an entry of ``saes``): architecture, objective, optimizer and schedule."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from saekit.activations import ACTIVATIONS
from saekit.core.configs import check_finite
from saekit.model import dictionary  # noqa: F401  (registers every kind ``sae:`` may name)
from saekit.model.config import DictionaryConfig, SAEConfig
from saekit.objective.config import (
    FixedPrefixes,
    MatryoshkaConfig,
    PenaltyConfig,
    QuadraticL0Penalty,
    RandomPrefixes,
    RevivalConfig,
)
from saekit.objective.terms import Objective, build_objective


@dataclass
class SAETrainConfig:
    """One SAE of a run: architecture, objective, optimizer and schedule."""

    sae: DictionaryConfig
    """The SAE's architecture (d_in is filled from the data if 0): an SAE or transcoder, or a
    dictionary over N hooks named by ``kind`` (``clt``: a cross-layer transcoder, saekit.model.clt;
    ``crosscoder``: saekit.model.crosscoder), whose hooks the data selects (data.input_hooks,
    data.target_hooks)."""
    name: str = ""
    """Directory name inside the run directory (default: derived from the architecture)."""
    lr: float | None = None
    """Adam learning rate; default 2e-4 / sqrt(d_sae / 2^14) (OpenAI's width scaling)."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """Adam (β1, β2)."""
    warmup_steps: int = 50
    """Linear learning-rate warm-up from 0 over this many steps."""
    decay_start: float = 0.8
    """Fraction of the run after which the learning rate decays linearly to 0."""
    grad_clip: float = 1.0
    """Max global gradient norm (0 disables)."""
    penalty: PenaltyConfig | None = None
    """Sparsity penalty, e.g. ``{kind: l1, coefficient: 0.1, target_l0: 12}``; kinds l1, log,
    sqrt, tanh (on |z|·‖W_dec,i‖) and l0 (JumpReLU thresholds). saekit.objective.terms documents
    each kind's fields."""
    revival: RevivalConfig | None = None
    """Dead-latent revival: ``{kind: auxk, coefficient: 0.03125}``, ``preact`` or ``none``.
    Unset: auxk where the activation takes it (TopK family), none otherwise."""
    matryoshka: MatryoshkaConfig | None = None
    """Matryoshka prefixes: ``{kind: random, n_prefixes: 10, min_prefix: 1}`` or
    ``{kind: fixed, groups: [...]}``, either with ``sort_every: N`` (frequency-sorted levels);
    unset for a plain SAE."""
    reconstruction_tilt: float = 0.0
    """t of the tilted reconstruction loss (TERM, arXiv 2007.01162; losses.tilted_mean):
    R(t) = m·(1/t)·log mean_n exp(t·ℓ_n/m), ℓ_n a token's squared error, m its batch mean
    (detached); under Matryoshka each level's tokens are tilted, then the levels averaged.
    t > 0 weights the worst-reconstructed tokens up, t < 0 down; 0 (default): the plain mean.
    The logged "reconstruction" is R(t); FVU is unchanged. An SAE or transcoder only."""
    dead_tokens: int = 200_000
    """A latent is dead after this many tokens without firing (real LMs: ~10M)."""
    b_dec_init: str = "mean"
    """b_dec initialisation from data: mean or geometric_median."""
    autocast_bf16: bool = False
    """Run the forward in bf16 autocast with fp32 master weights and thresholds."""
    seed: int = 0
    """Seed of the SAE's initialisation and its random prefixes."""

    def __post_init__(self) -> None:
        # Built from Python with plain data ({"kind": ...} or a kind name), as SAEConfig allows.
        if isinstance(self.sae, dict):
            self.sae = DictionaryConfig.from_plain(self.sae, "sae")
        for name, family in (
            ("penalty", PenaltyConfig),
            ("revival", RevivalConfig),
            ("matryoshka", MatryoshkaConfig),
        ):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, family.parse(value, name))

    def validate(self) -> None:
        self.sae.validate()
        if self.lr is not None:
            check_finite("lr", self.lr, 0.0, strict=True)
        check_finite("grad_clip", self.grad_clip, 0.0)
        for i, beta in enumerate(self.adam_betas):
            if not 0 <= beta < 1:
                raise ValueError(f"adam_betas.{i} must be in [0, 1), got {beta!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.decay_start <= 1:
            raise ValueError(f"decay_start must be in [0, 1], got {self.decay_start}")
        if self.dead_tokens <= 0:
            raise ValueError(f"dead_tokens must be a positive integer, got {self.dead_tokens}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        check_name(self.name)
        if self.b_dec_init not in ("mean", "geometric_median"):
            raise ValueError(
                f"b_dec_init must be mean or geometric_median, got {self.b_dec_init!r}"
            )
        check_finite("reconstruction_tilt", self.reconstruction_tilt)
        if self.reconstruction_tilt and not isinstance(self.sae, SAEConfig):
            raise ValueError(
                f"reconstruction_tilt does not apply to sae.kind {self.sae.kind!r} (an SAE or "
                "transcoder only)"
            )
        d_sae = self.sae.n_latents
        if self.matryoshka is not None and not self.sae.prefixes_apply:
            raise ValueError(
                f"matryoshka does not apply to sae.kind {self.sae.kind!r}: prefixes of its flat "
                "latents would drop whole layers (train it without matryoshka)"
            )
        if self.matryoshka is not None and self.matryoshka.sort_every and self.sae.KIND:
            raise ValueError(
                f"matryoshka.sort_every does not apply to sae.kind {self.sae.KIND!r} yet (it "
                "reorders an SAE's or transcoder's latents only)"
            )
        if isinstance(self.matryoshka, FixedPrefixes) and sum(self.matryoshka.groups) != d_sae:
            raise ValueError(
                f"matryoshka.groups sum to {sum(self.matryoshka.groups)}, not sae.d_sae = {d_sae}"
            )
        if isinstance(self.penalty, QuadraticL0Penalty) and self.matryoshka is not None:
            raise ValueError(
                "penalty.kind 'quadratic_l0' with matryoshka is not defined (its target is the "
                "full SAE's L0); use penalty.kind 'l0' with target_l0"
            )
        if isinstance(self.matryoshka, RandomPrefixes):
            m, n = self.matryoshka.min_prefix, self.matryoshka.n_prefixes
            if m >= d_sae or n - 1 > d_sae - m:
                raise ValueError(
                    f"matryoshka: cannot draw n_prefixes - 1 = {n - 1} distinct prefixes of at "
                    f"least min_prefix = {m} below sae.d_sae = {d_sae}"
                )
        if self.revival is not None and self.revival.kind == "matryoshka_auxk":
            if not isinstance(self.matryoshka, FixedPrefixes):
                raise ValueError(
                    "revival.kind 'matryoshka_auxk' needs matryoshka.kind 'fixed' (its levels)"
                )
        k_aux = getattr(self.revival, "k_aux", None)
        if k_aux is not None and k_aux > d_sae:
            raise ValueError(f"revival.k_aux = {k_aux} exceeds sae.d_sae = {d_sae}")
        kind = self.sae.activation.kind
        level_k = getattr(self.matryoshka, "level_k", None)
        if level_k is not None and ACTIVATIONS[kind].overrides("level_code"):
            k = self.sae.activation.k  # level_code's activations have a k (Activation.level_code)
            if level_k[-1] != k:
                raise ValueError(
                    f"matryoshka.level_k must end with sae.activation.k = {k} (the last level is "
                    f"the full code), got {level_k}"
                )
        if self.matryoshka is not None and ACTIVATIONS[kind].overrides("reconstruction_loss"):
            raise ValueError(
                f"matryoshka does not apply to sae.activation.kind {kind!r}: it has its own "
                "reconstruction loss over prefixes"
            )
        if self.sae.whitening is not None and not ACTIVATIONS[kind].uses_encoder_weights:
            raise ValueError(
                f"sae.whitening does not apply to sae.activation.kind {kind!r}: its decoder "
                "encodes (tied), and folding the whitening on save gives the encoder Mᵀ but the "
                "decoder M⁻¹"
            )
        self.objective()

    def objective(self) -> Objective:
        """This SAE's loss terms (raises ValueError for a combination that does not fit)."""
        return build_objective(
            ACTIVATIONS[self.sae.activation.kind], self.penalty, self.revival,
            reconstruction_tilt=self.reconstruction_tilt, matryoshka_cfg=self.matryoshka,
        )  # fmt: skip

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else 2e-4 / math.sqrt(self.sae.d_sae / 2**14)

    def default_name(self) -> str:
        parts = self.sae.activation.name_parts()
        if self.matryoshka is not None:
            parts[0] = "matryoshka-" + parts[0]
        if self.penalty is not None:
            parts.append(self.penalty.kind)
        parts.append(f"M{self.sae.d_sae}")
        return "-".join(parts)


RESERVED_NAMES = (
    "checkpoint", "config.yaml", "summary.json", "l0_vs_fvu.png", "l0_histogram.png",
    "encoder_bias.png", "cos_heatmap.png",
)  # fmt: skip
"""The run directory's own files and directories (saekit.train.outputs, report.plots)."""
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+=,@-]*$")


def check_name(name: str) -> None:
    """An SAE's name is a directory name inside the run directory, never a path."""
    if not _NAME.match(name) or name in RESERVED_NAMES or len(name) > 200:
        raise ValueError(
            f"name must be a plain directory name (letters, digits, _ . + = , @ -, not starting "
            f"with . or -, at most 200 characters, not {RESERVED_NAMES}), got {name!r}"
        )
