"""Run configuration: documented dataclasses, loadable from YAML or TOML, overridable by key.

A run is one activation stream (``data``: a source config, saekit.data.sources) feeding one or
more SAEs (``SAETrainConfig``).
Overrides use dotted paths: ``steps=2000``, ``saes.0.sae.activation.k=16``,
``data.synthetic.d=128``.
Every error names the offending field.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from saekit.core.configs import from_dict, to_dict
from saekit.data.sources.config import SourceConfig
from saekit.data.sources.interface import ActivationSource, StreamSettings
from saekit.data.sources.registry import source_config
from saekit.data.sources.synthetic import SyntheticSourceConfig
from saekit.model.config import DictionaryConfig
from saekit.train.config_files import apply_overrides, load_config_file
from saekit.train.member_config import SAETrainConfig
from saekit.train.mesh import ParallelMesh, check_latent_saes

__all__ = [
    "RunConfig",
    "SAETrainConfig",
    "apply_overrides",
    "build_run_config",
    "from_dict",
    "load_config_file",
    "make_source",
    "to_dict",
]


@dataclass
class RunConfig:
    """A training run: one stream, many SAEs."""

    data: SourceConfig = field(default_factory=SyntheticSourceConfig)
    """Where activations come from: ``source`` names the kind (synthetic, synthbench, hf, cache;
    saekit/data/sources/), the other fields are that kind's."""
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
    parallel: str | ParallelMesh = "data"
    """Several processes (torchrun, --nproc): data (every process trains every SAE on its share of
    each batch, gradients averaged) or sweep (the SAEs spread over the processes, each seeing the
    whole batch), both ignored by a single process; or ``{data: D, latent: T}``: each SAE's
    latents split over T processes, each batch over D groups of them (saekit.train.mesh)."""

    def validate(self) -> None:
        if not self.saes:
            raise ValueError("saes: a run needs at least one SAE")
        if isinstance(self.parallel, ParallelMesh):
            self.parallel.validate()
        elif self.parallel not in ("data", "sweep"):
            raise ValueError(
                f"parallel must be data, sweep or {{data: D, latent: T}}, got {self.parallel!r}"
            )
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
        if isinstance(self.parallel, ParallelMesh):
            check_latent_saes(self.saes, self.parallel.latent)


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
    and ``metadata.training_data``, the documents it trains on (saekit.data.documents.held_out).
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
    stream_cfg = raw["data"] = source_config(data_cfg)  # parsed once: a cache's manifest too
    origin = stream_cfg.origin()  # SAEConfig fields saying where the activations come from
    known = stream_cfg.input_width()  # the activations' width, when known without a model
    d_data, d_target = known, stream_cfg.target_width()
    paired = stream_cfg.has_target()  # a transcoder stream: [input | target]
    record = stream_cfg.provenance(raw.get("eval_tokens", RunConfig.eval_tokens))
    for i, s in enumerate(saes):
        sae = s.setdefault("sae", {})
        if record is not None:  # kept on resume: the run's data cannot change
            sae.setdefault("metadata", {}).setdefault("training_data", record)
        penalty = s.get("penalty")
        if isinstance(penalty, dict) and penalty.get("target_l0") is not None:
            # for `saekit eval`'s L0-off-target warning
            sae.setdefault("metadata", {})["target_l0"] = penalty["target_l0"]
        if sae.get("kind", "sae") != "sae":  # a dictionary over N hooks (clt, crosscoder)
            fill_from_hooks(f"saes.{i}.sae", sae, stream_cfg, origin)
            continue
        groups = stream_cfg.hook_groups()
        if groups is not None and (len(groups[0]) > 1 or len(groups[1]) > 1):
            raise ValueError(
                f"saes.{i}.sae: an SAE or transcoder reads one hook (and predicts one), but the "
                f"data selects {len(groups[0])} input and {len(groups[1])} target hooks: set "
                f"saes.{i}.sae.kind to clt or crosscoder"
            )
        if not sae.get("d_in"):
            if d_data is None:
                d_data = stream_cfg.model_width()
            sae["d_in"] = d_data
        elif known is not None and sae["d_in"] != known:
            raise ValueError(
                f"saes.{i}.sae.d_in = {sae['d_in']} but {stream_cfg.describe()} has width {known}"
            )
        if paired and not sae.get("d_out"):
            if d_target is None:  # an MLP's output: the model's width (set d_out otherwise)
                d_target = stream_cfg.model_width()
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


def fill_from_hooks(
    where: str, sae: dict[str, Any], stream_cfg: SourceConfig, origin: dict
) -> None:
    """A dictionary over N hooks (``sae.kind``: clt or crosscoder) takes its count, hooks and
    widths from the data's selection (data.input_hooks, data.target_hooks): fields left unset
    are filled, fields set must agree."""
    cls = DictionaryConfig.variants.get(sae["kind"])
    if cls is None:
        return  # parsing refuses the unknown kind, naming the known ones
    groups = stream_cfg.hook_groups()
    if groups is None:
        raise ValueError(
            f"{where}.kind {cls.KIND!r} reads named hooks of a model: use data.source hf or cache"
            " with data.input_hooks"
        )
    inputs, targets = groups
    if bool(targets) != cls.reads_targets:
        need = (
            "data.target_hooks, one per data.input_hooks"
            if cls.reads_targets
            else "data.input_hooks alone (it reconstructs its sources: no data.target_hooks)"
        )
        raise ValueError(f"{where}.kind {cls.KIND!r} needs {need}")
    fields: dict[str, Any] = {cls.count_field: len(inputs), "hooks": inputs}
    if targets:
        fields["target_hooks"] = targets
    for key, group in (("d_in", inputs), ("d_out", targets)):
        widths = {stream_cfg.hook_width(name) for name in group}
        if len(widths) > 1:
            raise ValueError(
                f"{where}: the hooks {group} have widths {sorted(widths)}; a {cls.KIND} reads "
                "hooks of one width"
            )
        if group and (widths != {None} or not sae.get(key)):  # hf: the model's hidden size
            fields[key] = widths.pop() if widths != {None} else stream_cfg.model_width()
    for key, value in fields.items():
        if sae.get(key) in (None, 0):
            sae[key] = value
        elif sae[key] != value:
            raise ValueError(f"{where}.{key} = {sae[key]!r} but the data gives {value!r}")
    if sae.get("model_name") is None and origin.get("model_name") is not None:
        sae["model_name"] = origin["model_name"]


def stream_settings(cfg: RunConfig) -> StreamSettings:
    """What the run tells its source."""
    return StreamSettings(cfg.batch_size, cfg.seed, cfg.eval_tokens, cfg.device)


def check_source_width(cfg: RunConfig, source: ActivationSource) -> None:
    """Every SAE's width against the one ``source`` measured (a cache's, a model hook's)."""
    width = source.measured_width
    if width is None:
        return
    for i, s in enumerate(cfg.saes):
        if s.sae.stream_width != width:
            field = "d_in + d_out" if s.sae.transcoder else "d_in"
            raise ValueError(
                f"saes.{i}.sae.{field} = {s.sae.stream_width} but the activations at"
                f" {source.description} have width {width}; set saes.{i}.sae.{field}={width}"
            )


def make_source(cfg: RunConfig, rank: int = 0, world_size: int = 1) -> ActivationSource:
    """The run's batch source (rank ``rank``'s share of a stream source), checked against its
    SAEs' widths (multi-process runs: saekit.train.run_distributed)."""
    source = cfg.data.build(stream_settings(cfg), rank, world_size)
    check_source_width(cfg, source)
    return source
