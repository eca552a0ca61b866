"""`SAEConfig`: a dictionary's architecture, saved in cfg.json.

One config covers sparse autoencoders and transcoders (Dunefsky et al. 2024, arXiv:2406.11944):
a transcoder reads one hook and predicts another (``d_out`` set), optionally with an affine skip
path (``skip``; Paulo et al. 2025, arXiv:2501.18823). An SAE is the transcoder whose target is
its own input: ``d_out`` None.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from saekit.activations import ACTIVATIONS
from saekit.activations.base import ActivationConfig
from saekit.core.configs import from_dict, to_dict
from saekit.model.normalisation import WhiteningConfig


class DictionaryConfig:
    """Base of what an ``sae:`` entry of a run describes: :class:`SAEConfig` (an SAE or a
    transcoder; no ``kind``), or a dictionary over N hooks named by ``kind``: ``clt``
    (saekit.model.clt.CLTConfig) or ``crosscoder`` (saekit.model.crosscoder.CrosscoderConfig).
    Those register here when their module is imported (saekit.model.dictionary imports them
    all; saekit.train.member_config imports it)."""

    KIND: ClassVar[str | None] = None
    """The ``kind`` naming this architecture in plain data (None: SAEConfig, which has none)."""
    variants: ClassVar[dict[str, type[DictionaryConfig]]] = {}
    """``kind`` → config class of the dictionaries over N hooks (no kind: SAEConfig)."""
    prefixes_apply: ClassVar[bool] = True
    """Whether Matryoshka prefixes mean something for it (a CLT's flat latents: no)."""

    @property
    def n_latents(self) -> int:
        """All the dictionary's latents (a CLT: n_layers·d_sae): the length of its latent
        vectors, dead-latent counters and activation parameters."""
        raise NotImplementedError

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("KIND"):
            DictionaryConfig.variants[cls.KIND] = cls

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Any:
        return from_dict(cls, data)

    @classmethod
    def from_plain(cls, value: Any, where: str) -> DictionaryConfig:
        """The config of plain data (saekit.core.configs calls it for a field of this type):
        a mapping without ``kind`` (or ``kind: sae``) is an SAEConfig, else the kind's class."""
        variants = DictionaryConfig.variants
        if isinstance(value, DictionaryConfig):
            chosen: type = type(value)
        elif not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        else:
            kind = value.get("kind")
            if kind is None or kind == "sae":
                chosen = SAEConfig
            elif isinstance(kind, str) and kind in variants:
                chosen = variants[kind]
            else:
                raise ValueError(
                    f"{where}.kind: unknown dictionary {kind!r}; choose one of "
                    f"{['sae', *sorted(variants)]} (none: sae)"
                )
        if not issubclass(chosen, cls):
            raise ValueError(f"{where}: a {chosen.__name__} where a {cls.__name__} is expected")
        if isinstance(value, DictionaryConfig):
            return value
        data = {k: v for k, v in value.items() if not (k == "kind" and chosen is SAEConfig)}
        return from_dict(chosen, data, where)


@dataclass
class SAEConfig(DictionaryConfig):
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
    encoder_steps: int = 1
    """n ≥ 1 encoder steps: 1 is the affine encoder σ((x − b_dec) W_encᵀ + b_enc); each further
    step c ← σ(c + (x − c W_dec − b_dec) W_encᵀ + b_enc) is a LISTA step (Gregor & LeCun 2010;
    saekit.model.lista). SAEs only, with an activation of pre-activations alone (topk,
    batchtopk, jumprelu, relu, abstopk); no format but saekit's expresses n > 1."""

    def __post_init__(self) -> None:
        self.activation = ActivationConfig.parse(self.activation, "activation")
        if self.whitening is not None:
            self.whitening = WhiteningConfig.parse(self.whitening, "whitening")
        self.validate()

    @property
    def n_latents(self) -> int:
        """M: d_sae."""
        return self.d_sae

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
        check_positive(self, ("d_in", "d_sae") + (("d_out",) if self.transcoder else ()))
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
        check_dtype(self.dtype)
        check_positive(self, ("encoder_steps",))
        if self.encoder_steps > 1:
            if self.transcoder:  # the residual x − x̂ would mix the input's and target's spaces
                raise ValueError(
                    "encoder_steps > 1 applies to SAEs, not transcoders (d_out is set): the "
                    "residual x − x̂ is undefined when x̂ predicts another hook"
                )
            check_per_layer_activation(self.activation, "encoder_steps > 1 (LISTA steps)")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SAEConfig:
        return from_dict(cls, data)


def check_positive(cfg: Any, names: tuple[str, ...]) -> None:
    """Each field of ``names`` a positive integer, or ValueError naming it."""
    for name in names:
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_dtype(dtype: str) -> None:
    if dtype not in ("float32", "float64", "bfloat16", "float16"):
        raise ValueError(
            f"dtype must be a floating torch dtype (float32, float64, bfloat16, float16), got"
            f" {dtype!r}"
        )


def check_hook_list(cfg: Any, name: str, length: int, what: str) -> None:
    """Field ``name`` None or a list of ``length`` distinct hook names (``what`` says why)."""
    value = getattr(cfg, name)
    if value is None:
        return
    if len(value) != length or len(set(value)) != len(value):
        raise ValueError(f"{name} must name {length} distinct hooks ({what}), got {value!r}")


def check_per_layer_activation(activation: ActivationConfig, what: str) -> None:
    """Refuse, in one line, an activation that cannot encode from given pre-activations or has
    a loss of its own over one [M, d] decoder (saekit.activations.base.Activation)."""
    cls, kind = ACTIVATIONS[activation.kind], activation.kind
    reasons = []
    if not cls.overrides("encode_preacts") or not cls.uses_encoder_weights:
        reasons.append("it does not encode from the affine encoder's pre-activations alone")
    if not cls.uses_encoder_bias:
        reasons.append("it owns its encoder bias")
    if cls.overrides("reconstruction_loss") or cls.overrides("auxiliary_loss"):
        reasons.append("its own loss reads a single [M, d] decoder")
    if reasons:
        raise ValueError(
            f"activation.kind {kind!r} does not apply to {what}: {'; '.join(reasons)} (use "
            "topk, batchtopk, jumprelu, relu or abstopk)"
        )
