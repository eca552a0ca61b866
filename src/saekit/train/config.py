"""Run configuration: documented dataclasses, loadable from YAML or TOML, overridable by key.

A run is one activation stream (``DataConfig``) feeding one or more SAEs (``SAETrainConfig``).
Overrides use dotted paths: ``steps=2000``, ``saes.0.sae.k=16``, ``data.synthetic.d=128``.
Every error names the offending field.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from saekit.data.synthetic import SyntheticConfig
from saekit.sae import SAEConfig

PENALTIES = ("l1", "log", "tanh", "sqrt", "l0")
REVIVALS = ("auxk", "preact", "none")


@dataclass
class SAETrainConfig:
    """One SAE of a run: architecture, objective, optimizer and schedule."""

    sae: SAEConfig
    """The SAE's architecture (d_in is filled from the data if 0)."""
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
    penalty: str | None = None
    """Sparsity penalty: l1, log, tanh, sqrt, l0 (on |z|·‖W_dec,i‖), or None."""
    penalty_coefficient: float = 0.0
    """λ, the penalty's coefficient (the controller's starting value when target_l0 is set)."""
    penalty_eps: float = 0.1
    """ε of the log and sqrt penalties."""
    penalty_tanh_c: float = 1.0
    """c of the tanh penalty."""
    target_l0: float | None = None
    """If set, a controller moves λ toward this L0."""
    revival: str = "auxk"
    """Dead-latent revival: auxk (residual), preact (pre-activation loss) or none."""
    revival_coefficient: float = 1 / 32
    """α of the revival loss."""
    auxk_normalizer: str = "residual"
    """AuxK normaliser V: residual (variance of the residual) or none."""
    dead_tokens: int = 200_000
    """A latent is dead after this many tokens without firing (real LMs: ~10M)."""
    matryoshka: str | None = None
    """Matryoshka prefixes: random (truncated Pareto each step) or fixed (groups), or None."""
    matryoshka_n_prefixes: int = 10
    """random: number of prefixes P (including the full width)."""
    matryoshka_min_prefix: int = 1
    """random: smallest prefix length m."""
    matryoshka_groups: list[int] = field(default_factory=list)
    """fixed: group sizes summing to d_sae."""
    b_dec_init: str = "mean"
    """b_dec initialisation from data: mean or geometric_median."""
    autocast_bf16: bool = False
    """Run the forward in bf16 autocast with fp32 master weights and thresholds."""
    seed: int = 0
    """Seed of the SAE's initialisation and its random prefixes."""

    def validate(self) -> None:
        self.sae.validate()
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.penalty is not None and self.penalty not in PENALTIES:
            raise ValueError(f"penalty: unknown penalty {self.penalty!r}; choose from {PENALTIES}")
        if self.penalty_coefficient < 0:
            raise ValueError("penalty_coefficient must be non-negative")
        if self.target_l0 is not None and self.target_l0 <= 0:
            raise ValueError("target_l0 must be positive")
        if self.penalty == "l0" and self.sae.activation != "jumprelu":
            raise ValueError("penalty 'l0' needs activation 'jumprelu' (its thresholds)")
        if self.revival not in REVIVALS:
            raise ValueError(f"revival: unknown {self.revival!r}; choose from {REVIVALS}")
        if self.auxk_normalizer not in ("residual", "none"):
            raise ValueError("auxk_normalizer must be 'residual' or 'none'")
        if self.matryoshka not in (None, "random", "fixed"):
            raise ValueError(f"matryoshka must be random, fixed or None, got {self.matryoshka!r}")
        if self.matryoshka == "fixed" and sum(self.matryoshka_groups) != self.sae.d_sae:
            raise ValueError(
                f"matryoshka_groups sum to {sum(self.matryoshka_groups)}, not d_sae = "
                f"{self.sae.d_sae}"
            )
        if self.warmup_steps < 0 or not 0 <= self.decay_start <= 1:
            raise ValueError("warmup_steps must be >= 0 and decay_start in [0, 1]")
        if self.dead_tokens <= 0:
            raise ValueError("dead_tokens must be positive")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else 2e-4 / math.sqrt(self.sae.d_sae / 2**14)

    def default_name(self) -> str:
        parts = [("matryoshka-" if self.matryoshka else "") + self.sae.activation]
        if self.sae.k is not None and self.sae.activation in ("topk", "batchtopk"):
            parts.append(f"k{self.sae.k}")
        if self.penalty:
            parts.append(self.penalty)
        parts.append(f"M{self.sae.d_sae}")
        return "-".join(parts)


@dataclass
class DataConfig:
    """Where activations come from."""

    source: str = "synthetic"
    """synthetic (built-in ground truth) or cache (a directory written by `saekit cache`)."""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    """Settings of the synthetic generator."""
    cache_dir: str | None = None
    """cache: the activation cache directory."""
    shuffle_buffer_tokens: int = 262_144
    """cache: tokens held in the shuffle buffer."""


@dataclass
class RunConfig:
    """A training run: one stream, many SAEs."""

    data: DataConfig = field(default_factory=DataConfig)
    saes: list[SAETrainConfig] = field(default_factory=list)
    batch_size: int = 4096
    """Tokens per training step."""
    steps: int = 1000
    """Training steps."""
    log_every: int = 25
    """Steps between log lines (the only host syncs of the loop)."""
    checkpoint_every: int = 500
    """Steps between resumable checkpoints (0: only at the end and on a signal)."""
    eval_tokens: int = 65_536
    """Tokens of held-out data for the final evaluation."""
    out_dir: str = "runs/latest"
    """Run directory."""
    device: str = "cpu"
    """Torch device."""
    threads: int = 0
    """torch.set_num_threads (0: leave the default)."""
    progress: bool = True
    """Show a progress bar."""
    seed: int = 0
    """Seed of the data stream."""

    def validate(self) -> None:
        if not self.saes:
            raise ValueError("saes: a run needs at least one SAE")
        for field_name in ("batch_size", "steps", "eval_tokens"):
            if getattr(self, field_name) <= 0:
                raise ValueError(f"{field_name} must be positive, got {getattr(self, field_name)}")
        if self.log_every <= 0 or self.checkpoint_every < 0:
            raise ValueError("log_every must be positive and checkpoint_every >= 0")
        if self.data.source not in ("synthetic", "cache"):
            raise ValueError(f"data.source must be synthetic or cache, got {self.data.source!r}")
        if self.data.source == "cache":
            if not self.data.cache_dir:
                raise ValueError("data.cache_dir is required when data.source is 'cache'")
            if not Path(self.data.cache_dir).is_dir():
                raise ValueError(f"data.cache_dir: no such directory {self.data.cache_dir!r}")
        names = [s.name for s in self.saes]
        if len(set(names)) != len(names):
            raise ValueError(f"saes: names must be unique, got {names}")
        for i, s in enumerate(self.saes):
            try:
                s.validate()
            except ValueError as exc:
                raise ValueError(f"saes.{i}: {exc}") from exc


# ----------------------------------------------------------------------------- (de)serialise


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, where)
            except (TypeError, ValueError) as exc:
                errors.append(str(exc))
        raise ValueError(f"{where}: {value!r} does not fit {tp}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        return [_convert(item, v, f"{where}.{i}") for i, v in enumerate(value)]
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ValueError(f"{where}: expected {len(args)} values, got {value!r}")
        return tuple(_convert(a, v, where) for a, v in zip(args, value, strict=True))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if tp in (int, str, bool, float):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise ValueError(f"{where}: expected {tp.__name__}, got {value!r}")
        return value
    raise TypeError(f"{where}: unsupported type {tp}")


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, checking every field's type; errors name it."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{where or cls.__name__}: unknown field(s) {unknown}")
    kwargs = {}
    for name, value in data.items():
        path = f"{where}.{name}" if where else name
        kwargs[name] = _convert(hints[name], value, path)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ValueError(f"{where or cls.__name__}: {exc}") from exc
    except ValueError as exc:
        raise ValueError(f"{where or cls.__name__}: {exc}") from exc


def load_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML (.yaml/.yml) or TOML (.toml) file as a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file not found: {path}")
    text = path.read_text()
    if path.suffix == ".toml":
        import tomllib

        return tomllib.loads(text)
    data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"config file {path}: expected a mapping at the top level")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a nested mapping."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw else ""
        node: Any = data
        parts = key.split(".")
        for part in parts[:-1]:
            if isinstance(node, list):
                idx = int(part)
                while len(node) <= idx:
                    node.append({})
                node = node[idx]
            else:
                node = node.setdefault(part, {})
        last = parts[-1]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return data


def build_run_config(data: dict[str, Any]) -> RunConfig:
    """A validated RunConfig; SAE d_in set from the data when 0 and names defaulted."""
    raw = copy.deepcopy(data)
    d = None
    data_cfg = raw.get("data", {})
    if data_cfg.get("source", "synthetic") == "synthetic":
        d = data_cfg.get("synthetic", {}).get("d", SyntheticConfig.d)
    for s in raw.get("saes", []):
        sae = s.setdefault("sae", {})
        if not sae.get("d_in"):
            if d is None:
                d = _cache_width(data_cfg.get("cache_dir"))
            sae["d_in"] = d
    cfg = from_dict(RunConfig, raw)
    for s in cfg.saes:
        if not s.name:
            s.name = s.default_name()
    cfg.validate()
    return cfg


def _cache_width(cache_dir: str | None) -> int:
    import json

    if not cache_dir:
        raise ValueError("data.cache_dir is required when data.source is 'cache'")
    manifest = Path(cache_dir) / "manifest.json"
    if not manifest.is_file():
        raise ValueError(f"data.cache_dir: no manifest.json in {cache_dir!r}")
    return int(json.loads(manifest.read_text())["d"])
