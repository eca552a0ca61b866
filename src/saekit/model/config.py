"""`SAEConfig`: a dictionary's architecture, saved in cfg.json.

One config covers sparse autoencoders and transcoders (Dunefsky et al. 2024, arXiv:2406.11944):
a transcoder reads one hook and predicts another (``d_out`` set), optionally with an affine skip
path (``skip``; Paulo et al. 2025, arXiv:2501.18823). An SAE is the transcoder whose target is
its own input: ``d_out`` None.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from saekit.activations.base import ActivationConfig
from saekit.core.configs import from_dict, to_dict
from saekit.model.normalisation import WhiteningConfig


@dataclass
class SAEConfig:
    """An SAE's (or transcoder's) architecture. Every field is saved in cfg.json."""

    d_in: int
    """d: width of the activations the SAE reads."""
    d_sae: int
    """M: number of latents."""
    activation: ActivationConfig
    """The architecture: a kind and its fields, e.g. ``{kind: topk, k: 32}`` or ``relu``
    (saekit.activations lists the kinds; each module documents its fields)."""
    hook: str | None = None
    """Hook point the activations came from (informational)."""
    model_name: str | None = None
    """Model the activations came from (informational)."""
    dtype: str = "float32"
    """Parameter dtype."""
    whitening: WhiteningConfig | None = None
    """Train on whitened inputs (x/s − μ)·M, e.g. ``{kind: zca, eps: 0.001}``
    (saekit.model.normalisation); folded into the weights on save, where it becomes None."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Free-form extra information carried in cfg.json."""
    d_out: int | None = None
    """Transcoders: width of the target the dictionary predicts (another hook's activations).
    None: an SAE, whose target is its input."""
    target_hook: str | None = None
    """Transcoders: hook point of the target (the splice evaluation replaces its output)."""
    skip: bool = False
    """Transcoders: an affine skip path, ŷ = z W_dec + x W_skipᵀ + b_dec (W_skip [d_out, d_in])."""

    def __post_init__(self) -> None:
        self.activation = ActivationConfig.parse(self.activation, "activation")
        if self.whitening is not None:
            self.whitening = WhiteningConfig.parse(self.whitening, "whitening")
        self.validate()

    @property
    def transcoder(self) -> bool:
        """True when the target is not the input (``d_out`` set)."""
        return self.d_out is not None

    @property
    def target_width(self) -> int:
        """Width of what the decoder produces: d_out for a transcoder, d_in for an SAE."""
        return self.d_in if self.d_out is None else self.d_out

    @property
    def stream_width(self) -> int:
        """Width of a training batch: the input, then (transcoders) the target's columns."""
        return self.d_in + (self.d_out or 0)

    def validate(self) -> None:
        """Raise ValueError naming the offending field."""
        for name in ("d_in", "d_sae") + (("d_out",) if self.transcoder else ()):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not self.transcoder:
            for name in ("target_hook", "skip"):
                if getattr(self, name):
                    raise ValueError(
                        f"{name} is set but d_out is not: only a transcoder (d_out = the "
                        "target's width) has a target hook or a skip path"
                    )
        elif self.whitening is not None:  # its fold on save is written for y = x
            raise ValueError("whitening applies to SAEs, not transcoders (d_out is set)")
        self.activation.check_d_sae(self.d_sae)
        if self.dtype not in ("float32", "float64", "bfloat16", "float16"):
            raise ValueError(
                f"dtype must be a floating torch dtype (float32, float64, bfloat16, float16), got"
                f" {self.dtype!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SAEConfig:
        return from_dict(cls, data)
