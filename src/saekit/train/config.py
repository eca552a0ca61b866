"""Run configuration: documented dataclasses, loadable from YAML or TOML, overridable by key.

A run is one activation stream (``DataConfig``) feeding one or more SAEs (``SAETrainConfig``).
Overrides use dotted paths: ``steps=2000``, ``saes.0.sae.activation.k=16``,
``data.synthetic.d=128``.
Every error names the offending field.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from saekit.activations import ACTIVATIONS
from saekit.configs import check_finite, from_dict, to_dict
from saekit.data.hf import HookPoint
from saekit.data.synthetic import SyntheticConfig
from saekit.objective import (
    FixedPrefixes,
    MatryoshkaConfig,
    Objective,
    PenaltyConfig,
    RandomPrefixes,
    RevivalConfig,
    build_objective,
)
from saekit.sae import SAEConfig
from saekit.train.config_files import apply_overrides, load_config_file

__all__ = [
    "DataConfig",
    "RunConfig",
    "SAETrainConfig",
    "apply_overrides",
    "build_run_config",
    "from_dict",
    "load_config_file",
    "to_dict",
]


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
    penalty: PenaltyConfig | None = None
    """Sparsity penalty, e.g. ``{kind: l1, coefficient: 0.1, target_l0: 12}``; kinds l1, log,
    sqrt, tanh (on |z|·‖W_dec,i‖) and l0 (JumpReLU thresholds). saekit.objective documents
    each kind's fields."""
    revival: RevivalConfig | None = None
    """Dead-latent revival: ``{kind: auxk, coefficient: 0.03125}``, ``preact`` or ``none``.
    Unset: auxk where the activation takes it (TopK family), none otherwise."""
    matryoshka: MatryoshkaConfig | None = None
    """Matryoshka prefixes: ``{kind: random, n_prefixes: 10, min_prefix: 1}`` or
    ``{kind: fixed, groups: [...]}``; unset for a plain SAE."""
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
            self.sae = from_dict(SAEConfig, self.sae, "sae")
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
        d_sae = self.sae.d_sae
        if isinstance(self.matryoshka, FixedPrefixes) and sum(self.matryoshka.groups) != d_sae:
            raise ValueError(
                f"matryoshka.groups sum to {sum(self.matryoshka.groups)}, not sae.d_sae = {d_sae}"
            )
        if isinstance(self.matryoshka, RandomPrefixes):
            m, n = self.matryoshka.min_prefix, self.matryoshka.n_prefixes
            if m >= d_sae or n - 1 > d_sae - m:
                raise ValueError(
                    f"matryoshka: cannot draw n_prefixes - 1 = {n - 1} distinct prefixes of at "
                    f"least min_prefix = {m} below sae.d_sae = {d_sae}"
                )
        self.objective()

    def objective(self) -> Objective:
        """This SAE's loss terms (raises ValueError for a combination that does not fit)."""
        return build_objective(ACTIVATIONS[self.sae.activation.kind], self.penalty, self.revival)

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


RESERVED_NAMES = ("checkpoint",)
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+=,@-]*$")


def check_name(name: str) -> None:
    """An SAE's name is a directory name inside the run directory, never a path."""
    if not _NAME.match(name) or name in RESERVED_NAMES or len(name) > 200:
        raise ValueError(
            f"name must be a plain directory name (letters, digits, _ . + = , @ -, not starting "
            f"with . or -, at most 200 characters, not {RESERVED_NAMES}), got {name!r}"
        )


@dataclass
class DataConfig:
    """Where activations come from."""

    source: str = "synthetic"
    """synthetic (built-in ground truth), cache (a directory written by `saekit cache`) or hf
    (a transformers model run on text while training)."""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    """Settings of the synthetic generator."""
    cache_dir: str | None = None
    """cache: the activation cache directory."""
    shuffle_buffer_tokens: int = 262_144
    """cache, hf: tokens held in the token-level shuffle buffer (cache: 0 reads in file order)."""
    model: str | None = None
    """hf: the model, a hub id or a local directory (loaded with AutoModelForCausalLM)."""
    hook: str | None = None
    """hf: hook point, e.g. transformer.h.8:input (residual stream before block 8)."""
    dataset: str | None = None
    """hf: documents from a Hugging Face dataset, a hub id or a local path (or use text_file)."""
    dataset_split: str = "train"
    """hf: split of the dataset."""
    dataset_config: str | None = None
    """hf: configuration name of the dataset."""
    text_file: str | None = None
    """hf: documents from a local file: .jsonl (one per line) or text (blank-line separated)."""
    text_field: str = "text"
    """hf: field holding the text in dataset records and .jsonl lines."""
    streaming: bool = True
    """hf: stream the dataset instead of downloading it whole."""
    context_length: int = 128
    """hf: tokens per context (BOS first, documents packed with EOS between them)."""
    model_batch_size: int = 32
    """hf: contexts per model forward."""
    model_dtype: str = "float32"
    """hf: dtype of the model weights: float32, bfloat16 or float16 (activations are float32)."""
    local_files_only: bool = False
    """hf: never download; load the model and tokenizer from the local cache or directory."""
    keep_bos: bool = False
    """hf: train on BOS positions too (by default they are dropped, as are padding positions)."""
    prefetch: int = 2
    """hf: model batches harvested ahead in a background thread (0: no thread)."""

    def validate(self) -> None:
        """Raise ValueError naming the offending ``data.`` field."""
        sources = ("synthetic", "cache", "hf")
        if self.source not in sources:
            raise ValueError(f"data.source must be one of {sources}, got {self.source!r}")
        if self.shuffle_buffer_tokens < 0:
            raise ValueError("data.shuffle_buffer_tokens must be >= 0")
        if self.source == "cache":
            if not self.cache_dir:
                raise ValueError("data.cache_dir is required when data.source is 'cache'")
            if not Path(self.cache_dir).is_dir():
                raise ValueError(f"data.cache_dir: no such directory {self.cache_dir!r}")
        if self.source == "hf":
            for name in ("model", "hook"):
                if not getattr(self, name):
                    raise ValueError(f"data.{name} is required when data.source is 'hf'")
            if (self.dataset is None) == (self.text_file is None):
                raise ValueError("data: set exactly one of data.dataset and data.text_file")
            if self.text_file is not None and not Path(self.text_file).is_file():
                raise ValueError(f"data.text_file: no such file {self.text_file!r}")
            if self.context_length < 2:
                raise ValueError(f"data.context_length must be >= 2, got {self.context_length}")
            if self.model_batch_size < 1:
                raise ValueError("data.model_batch_size must be positive")
            if self.model_dtype not in ("float32", "bfloat16", "float16"):
                raise ValueError(
                    f"data.model_dtype must be float32, bfloat16 or float16, got"
                    f" {self.model_dtype!r}"
                )
            if self.prefetch < 0:
                raise ValueError("data.prefetch must be >= 0")
            HookPoint.parse(self.hook)


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
    wandb_project: str | None = None
    """Also log to Weights & Biases under this project (off by default; needs `pip install
    wandb`; set WANDB_MODE=offline to log without a network)."""
    seed: int = 0
    """Seed of the data stream: the batches drawn from synthetic data (data.synthetic.seed fixes
    its true features), the document order and shuffle buffer of model and cache sources."""
    parallel: str = "data"
    """Several processes (torchrun, --nproc): data (every process trains every SAE on its share of
    each batch, gradients averaged) or sweep (the SAEs spread over the processes, each seeing the
    whole batch). Ignored by a single process."""

    def validate(self) -> None:
        if not self.saes:
            raise ValueError("saes: a run needs at least one SAE")
        if self.parallel not in ("data", "sweep"):
            raise ValueError(f"parallel must be data or sweep, got {self.parallel!r}")
        if self.batch_size < 2:
            raise ValueError(
                f"batch_size must be >= 2 (FVU and AuxK divide by the batch's variance), got "
                f"{self.batch_size}"
            )
        for field_name in ("steps", "eval_tokens"):
            if getattr(self, field_name) <= 0:
                raise ValueError(f"{field_name} must be positive, got {getattr(self, field_name)}")
        if self.log_every <= 0:
            raise ValueError(f"log_every must be positive, got {self.log_every}")
        if self.checkpoint_every < 0:
            raise ValueError(
                f"checkpoint_every must be >= 0 (0: only at the end and on a signal), got "
                f"{self.checkpoint_every}"
            )
        for field_name in ("threads", "seed"):
            if getattr(self, field_name) < 0:
                raise ValueError(f"{field_name} must be >= 0, got {getattr(self, field_name)}")
        if not self.out_dir:
            raise ValueError("out_dir must not be empty")
        check_device(self.device)
        self.data.validate()
        names = [s.name for s in self.saes]
        if len(set(names)) != len(names):
            raise ValueError(f"saes: names must be unique, got {names}")
        for i, s in enumerate(self.saes):
            try:
                s.validate()
            except ValueError as exc:
                raise ValueError(f"saes.{i}: {exc}") from exc


def check_device(device: str) -> None:
    """A torch device string this machine has."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(
            f"device: not a torch device: {device!r} (e.g. cpu, cuda, cuda:1)"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda", "mps", "xpu"):
        raise ValueError(f"device: unsupported device type {dev.type!r} (cpu or cuda)")


def build_run_config(data: dict[str, Any]) -> RunConfig:
    """A validated RunConfig; SAE d_in set from the data when 0 and names defaulted.

    Model sources also fill each SAE's ``hook`` and ``model_name`` (when unset) so saved SAEs
    are self-describing: from the manifest for a cache, from ``data.model``/``data.hook`` for hf.
    For hf, d_in defaults to the model's hidden size (its config's hidden_size / n_embd /
    d_model, read without loading weights): right for residual-stream and block-output hooks;
    set d_in for other hooks (the source checks the real width before training).
    """
    if not isinstance(data, dict):
        raise ValueError(f"a run config is a mapping of fields, got {data!r}")
    raw = copy.deepcopy(data)
    data_cfg = raw.get("data", {})
    if not isinstance(data_cfg, dict):
        raise ValueError(f"data: expected a mapping, got {data_cfg!r}")
    saes = raw.get("saes", [])
    if not isinstance(saes, list):
        raise ValueError(f"saes: expected a list of SAE configs, got {saes!r}")
    for i, s in enumerate(saes):
        if not isinstance(s, dict) or not isinstance(s.get("sae", {}), dict):
            key, value = (
                (f"saes.{i}", s) if not isinstance(s, dict) else (f"saes.{i}.sae", s["sae"])
            )
            raise ValueError(f"{key}: expected a mapping, got {value!r}")
    stream_cfg = from_dict(DataConfig, data_cfg, "data")
    stream_cfg.validate()
    origin: dict[str, str] = {}  # SAEConfig fields saying where the activations come from
    d_data: int | None = None  # the activations' width, when known without loading a model
    if stream_cfg.source == "synthetic":
        d_data = stream_cfg.synthetic.d
    elif stream_cfg.source == "cache":
        from saekit.data.cache import ActivationCache

        cache = ActivationCache(stream_cfg.cache_dir)
        origin = {"model_name": cache.model, "hook": cache.hook}
        d_data = cache.d
    else:
        origin = {"model_name": stream_cfg.model, "hook": str(HookPoint.parse(stream_cfg.hook))}
    for i, s in enumerate(saes):
        sae = s.setdefault("sae", {})
        if not sae.get("d_in"):
            if d_data is None:
                from saekit.data.lm_source import model_hidden_size

                d_data = model_hidden_size(stream_cfg.model, stream_cfg.local_files_only)
            sae["d_in"] = d_data
        elif stream_cfg.source == "cache" and sae["d_in"] != d_data:
            raise ValueError(
                f"saes.{i}.sae.d_in = {sae['d_in']} but the activation cache"
                f" {stream_cfg.cache_dir} has width {d_data}"
            )
        for key, value in origin.items():
            if sae.get(key) is None:
                sae[key] = value
    cfg = from_dict(RunConfig, raw)
    for s in cfg.saes:
        if not s.name:
            s.name = s.default_name()
    cfg.validate()
    return cfg
