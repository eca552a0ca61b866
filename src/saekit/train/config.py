"""Run configuration: documented dataclasses, loadable from YAML or TOML, overridable by key.

A run is one activation stream (``DataConfig``) feeding one or more SAEs (``SAETrainConfig``).
Overrides use dotted paths: ``steps=2000``, ``saes.0.sae.activation.k=16``,
``data.synthetic.d=128``.
Every error names the offending field.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from saekit.core.configs import from_dict, to_dict
from saekit.data.hf import HookPoint
from saekit.data.synthetic import SyntheticConfig
from saekit.train.config_files import apply_overrides, load_config_file
from saekit.train.member_config import SAETrainConfig

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
    """hf: the model, a hub id or a local directory."""
    model_class: str = "auto"
    """hf: how to load the model: causal-lm, masked-lm, encoder (the bare model, AutoModel) or
    auto (from its config; saekit/data/models.py)."""
    hook: str | None = None
    """hf: hook point, e.g. transformer.h.8:input (residual stream before block 8)."""
    target_hook: str | None = None
    """hf: a transcoder's target, harvested in the same forward pass as ``hook``, e.g.
    model.layers.5.mlp (``hook`` model.layers.5.post_attention_layernorm); batches are then
    [input | target] and every SAE of the run is a transcoder (d_out: the target's width)."""
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
    bos_token: str = "auto"
    """hf: token starting each context: auto (BOS, else EOS, else CLS), none, or a token."""
    eos_token: str = "auto"
    """hf: token after each document: auto (EOS, else BOS, else SEP), none, or a token."""
    keep_bos: bool = False
    """hf: train on BOS positions too (by default they are dropped, as are padding positions)."""
    prefetch: int = 2
    """hf: model batches harvested ahead in a background thread (0: no thread)."""
    outlier_norm: float | None = None
    """hf: drop tokens whose activation norm exceeds this multiple of the median norm of their
    model batch (massive-activation tokens; saekit/data/harvest.py); None: keep them all."""

    def unused_fields(self) -> tuple[str, ...]:
        """Fields ``to_dict`` leaves out: the generator's settings when the data is not synthetic
        (a cache or model run's config.yaml would otherwise carry a ``synthetic:`` section)."""
        return () if self.source == "synthetic" else ("synthetic",)

    def validate(self) -> None:
        """Raise ValueError naming the offending ``data.`` field."""
        sources = ("synthetic", "cache", "hf")
        if self.source not in sources:
            raise ValueError(f"data.source must be one of {sources}, got {self.source!r}")
        if self.shuffle_buffer_tokens < 0:
            raise ValueError("data.shuffle_buffer_tokens must be >= 0")
        # numbers checked whatever the source (a fuzzed config must not carry a bad one along)
        if self.context_length < 2:
            raise ValueError(f"data.context_length must be >= 2, got {self.context_length}")
        if self.model_batch_size < 1:
            raise ValueError("data.model_batch_size must be positive")
        if self.prefetch < 0:
            raise ValueError("data.prefetch must be >= 0")
        if self.outlier_norm is not None and not self.outlier_norm > 1:
            raise ValueError(
                f"data.outlier_norm must be > 1 (a multiple of the median), got {self.outlier_norm}"
            )
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
            if self.model_dtype not in ("float32", "bfloat16", "float16"):
                raise ValueError(
                    f"data.model_dtype must be float32, bfloat16 or float16, got"
                    f" {self.model_dtype!r}"
                )
            from saekit.data.models import MODEL_CLASSES

            if self.model_class not in MODEL_CLASSES:
                raise ValueError(
                    f"data.model_class must be one of {MODEL_CLASSES}, got {self.model_class!r}"
                )
            HookPoint.parse(self.hook)
            if self.target_hook is not None:
                HookPoint.parse(self.target_hook)
        elif self.target_hook is not None:
            raise ValueError("data.target_hook applies to data.source 'hf' only")


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
        if self.steps <= 0:
            raise ValueError(f"steps must be positive, got {self.steps}")
        if self.eval_tokens < 2:  # one token has no variance: FVU would be inf
            raise ValueError(
                f"eval_tokens must be >= 2 (FVU divides by their variance), got {self.eval_tokens}"
            )
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
    are self-describing: from the manifest for a cache, from ``data.model``/``data.hook`` for hf;
    and ``metadata.training_data``, the documents it trains on (saekit.data.documents).
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
        metadata = s.get("sae", {}).get("metadata", {})
        if not isinstance(metadata, dict):  # filled below, before the types are checked
            raise ValueError(f"saes.{i}.sae.metadata: expected a mapping, got {metadata!r}")
    stream_cfg = from_dict(DataConfig, data_cfg, "data")
    stream_cfg.validate()
    origin: dict[str, str] = {}  # SAEConfig fields saying where the activations come from
    d_data: int | None = None  # the activations' width, when known without loading a model
    d_target: int | None = None  # a transcoder stream's target width
    if stream_cfg.source == "synthetic":
        d_data, d_target = stream_cfg.synthetic.d, stream_cfg.synthetic.d_out
    elif stream_cfg.source == "cache":
        from saekit.data.cache import ActivationCache

        cache = ActivationCache(stream_cfg.cache_dir)
        origin = {"model_name": cache.model, "hook": cache.hook}
        d_data = cache.d_in
        if cache.target_hook is not None:  # a transcoder cache: rows [hook | target_hook]
            origin["target_hook"], d_target = cache.target_hook, cache.d - cache.d_in
    else:
        origin = {"model_name": stream_cfg.model, "hook": str(HookPoint.parse(stream_cfg.hook))}
        if stream_cfg.target_hook is not None:
            origin["target_hook"] = str(HookPoint.parse(stream_cfg.target_hook))
    from saekit.data.documents import training_record

    record = training_record(stream_cfg, raw.get("eval_tokens", RunConfig.eval_tokens))
    for i, s in enumerate(saes):
        sae = s.setdefault("sae", {})
        if record is not None:  # kept on resume: the run's data cannot change
            sae.setdefault("metadata", {}).setdefault("training_data", record)
        penalty = s.get("penalty")
        if isinstance(penalty, dict) and penalty.get("target_l0") is not None:
            # for `saekit eval`'s L0-off-target warning
            sae.setdefault("metadata", {})["target_l0"] = penalty["target_l0"]
        if not sae.get("d_in"):
            if d_data is None:
                from saekit.data.models import model_hidden_size

                d_data = model_hidden_size(stream_cfg.model, stream_cfg.local_files_only)
            sae["d_in"] = d_data
        elif d_data is not None and sae["d_in"] != d_data:
            where = (
                f"the activation cache {stream_cfg.cache_dir}"
                if stream_cfg.source == "cache"
                else "the synthetic data (data.synthetic.d)"
            )
            raise ValueError(f"saes.{i}.sae.d_in = {sae['d_in']} but {where} has width {d_data}")
        paired = d_target is not None or "target_hook" in origin
        if paired and not sae.get("d_out"):
            if d_target is None:  # an MLP's output: the model's width (set d_out otherwise)
                from saekit.data.models import model_hidden_size

                d_target = model_hidden_size(stream_cfg.model, stream_cfg.local_files_only)
            sae["d_out"] = d_target
        elif not paired and sae.get("d_out") is not None:
            raise ValueError(
                f"saes.{i}.sae.d_out is set but the data has no target: set data.target_hook "
                "(hf) or data.synthetic.d_out for a transcoder"
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
