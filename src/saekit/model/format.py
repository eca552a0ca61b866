"""The on-disk format of an SAE directory: file names, format versions, what loading checks.

``saekit.sae/2`` (written today): cfg.json holds ``{format, saekit_version, config, scale_folded,
tensors, sha256}`` with the activation as ``{kind, fields}``. ``saekit.sae/1`` (the first
release) had flat activation fields; :func:`upgrade_v1_config` reads it. The tensor names are
the same in both.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from saekit._version import __version__
from saekit.activations import ACTIVATIONS
from saekit.core.atomic import recover_directory, replace_directory, sha256_file

CHECKPOINT_FORMAT = "saekit.sae/2"
FORMATS_READ = ("saekit.sae/1", CHECKPOINT_FORMAT)
WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "cfg.json"


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt or disagrees with its config."""


V1_FIELDS: dict[str, Any] = {
    "k": None,
    "kernel": "torch",
    "threshold_beta": 0.999,
    "jumprelu_init_threshold": 0.001,
    "jumprelu_bandwidth": 0.001,
    "prolu_variant": "ste",
}
"""saekit.sae/1's flat activation fields and their defaults then."""
V1_ACTIVATION_FIELDS: dict[str, dict[str, str]] = {
    "topk": {"k": "k", "kernel": "kernel"},
    "batchtopk": {"k": "k", "kernel": "kernel", "threshold_beta": "threshold_beta"},
    "jumprelu": {"jumprelu_init_threshold": "init_threshold", "jumprelu_bandwidth": "bandwidth"},
    "prolu": {"prolu_variant": "variant"},
}
"""A saekit.sae/1 activation's flat fields → their names in today's activation config (that
frozen format knew these four kinds; the others had no fields)."""


def upgrade_v1_config(data: dict[str, Any]) -> dict[str, Any]:
    """cfg.json's config of format saekit.sae/1 (flat activation fields) in today's shape."""
    data = dict(data)
    kind = data.pop("activation", "topk")
    flat = {name: data.pop(name, default) for name, default in V1_FIELDS.items()}
    fields = V1_ACTIVATION_FIELDS.get(kind, {}) if isinstance(kind, str) else {}
    data["activation"] = {"kind": kind, **{new: flat[old] for old, new in fields.items()}}
    return data


def upgrade_tensors(config: dict[str, Any], found: dict[str, Tensor]) -> dict[str, Tensor]:
    """An older checkpoint's tensors under today's names, as its activation upgrades them
    (``Activation.upgrade_tensors``; JumpReLU's log θ of before ``threshold_param``)."""
    activation = config.get("activation")
    if isinstance(activation, dict) and activation.get("kind") in ACTIVATIONS:
        return ACTIVATIONS[activation["kind"]].upgrade_tensors(activation, found)
    return found


def check_state_matches(expected: dict[str, Tensor], found: dict[str, Tensor], where: str) -> None:
    """Raise CheckpointError naming every missing, unexpected or mis-shaped tensor."""
    problems = []
    for name in sorted(set(expected) - set(found)):
        problems.append(f"missing tensor {name!r}")
    for name in sorted(set(found) - set(expected)):
        problems.append(f"unexpected tensor {name!r}")
    for name in sorted(set(expected) & set(found)):
        if tuple(expected[name].shape) != tuple(found[name].shape):
            problems.append(
                f"tensor {name!r} has shape {tuple(found[name].shape)}, the config implies "
                f"{tuple(expected[name].shape)}"
            )
        elif expected[name].dtype != found[name].dtype:
            problems.append(
                f"tensor {name!r} has dtype {found[name].dtype}, expected {expected[name].dtype}"
            )
    if problems:
        raise CheckpointError(f"{where}: " + "; ".join(problems))


def read_config(path: Path, verify: bool = True) -> dict[str, Any]:
    """The SAE config held in ``path``'s cfg.json, in today's shape; checks the format and (with
    ``verify``) that the weights' sha256 is the one recorded. One-line CheckpointErrors."""
    cfg_path, weights = path / CONFIG_FILE, path / WEIGHTS_FILE
    for p in (cfg_path, weights):
        if not p.is_file():
            raise CheckpointError(f"checkpoint {path}: missing {p.name}")
    try:
        meta = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(
            f"checkpoint {path}: {CONFIG_FILE} is not valid JSON ({exc})"
        ) from exc
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {path}: {CONFIG_FILE} does not hold a JSON object")
    if meta.get("format") not in FORMATS_READ:
        raise CheckpointError(
            f"checkpoint {path}: format {meta.get('format')!r}, expected one of {FORMATS_READ}"
        )
    if verify and "sha256" not in meta:
        raise CheckpointError(
            f"checkpoint {path}: {CONFIG_FILE} records no sha256 of {WEIGHTS_FILE} (load with "
            "verify=False to skip the check)"
        )
    if verify and meta.get("sha256") != sha256_file(weights):
        raise CheckpointError(
            f"checkpoint {path}: {WEIGHTS_FILE} does not match the sha256 in {CONFIG_FILE} "
            "(corrupt, truncated or from another save)"
        )
    try:
        data = meta["config"]
        return upgrade_v1_config(data) if meta["format"] == "saekit.sae/1" else data
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path}: bad config in {CONFIG_FILE}: {exc}") from exc


def files_to_carry_over(path: Path) -> list[Path]:
    """The other files of an SAE directory (metrics.jsonl, eval.json); refuse a path that is
    not a directory, or one with subdirectories (a run directory, not an SAE's)."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"SAE.save: {path} exists and is not a directory")
    if not path.is_dir():
        return []
    entries = sorted(path.iterdir())
    subdirs = [e.name for e in entries if e.is_dir()]
    if subdirs:
        raise ValueError(
            f"SAE.save: {path} holds directories {subdirs}; save an SAE into a directory of its "
            "own (saving swaps the whole directory)"
        )
    return [e for e in entries if e.name not in (WEIGHTS_FILE, CONFIG_FILE)]


def write_dictionary(path: Path, state: dict[str, Tensor], config: dict[str, Any]) -> Path:
    """Write a dictionary directory (an SAE's, a transcoder's, a CLT's, a crosscoder's):
    ``sae.safetensors`` with ``state`` and ``cfg.json`` with ``config`` and the weights' sha256.
    The directory is rebuilt beside the old one and swapped in
    (:func:`saekit.core.atomic.replace_directory`), so the two files always agree; other files
    already in the directory (a run's metrics.jsonl, eval.json) are carried over."""
    recover_directory(path)  # a save killed mid-swap left the old directory aside
    kept = files_to_carry_over(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}

    def fill(tmp: Path) -> None:
        for entry in kept:
            try:  # a hard link costs nothing, however long the run's metrics.jsonl
                os.link(entry, tmp / entry.name)
            except OSError:
                shutil.copy2(entry, tmp / entry.name)
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": CHECKPOINT_FORMAT})
        meta = {
            "format": CHECKPOINT_FORMAT,
            "saekit_version": __version__,
            "config": config,
            "scale_folded": True,
            "tensors": {
                k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in tensors.items()
            },
            "sha256": sha256_file(tmp / WEIGHTS_FILE),
        }
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2))

    replace_directory(path, fill)
    return path


def read_weights(path: Path, config: dict[str, Any], module: nn.Module) -> dict[str, Tensor]:
    """The tensors of ``path``'s ``sae.safetensors`` under today's names, checked against
    ``module`` (built from ``config``, the one :func:`read_config` returned): every name, shape
    and dtype, and every parameter finite. One-line CheckpointErrors."""
    try:
        with safe_open(str(path / WEIGHTS_FILE), framework="pt") as f:
            found = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"checkpoint {path}: cannot read {WEIGHTS_FILE}: {exc}") from exc
    found = upgrade_tensors(config, found)
    check_state_matches(module.state_dict(), found, where=f"checkpoint {path}")
    nonfinite = [n for n, _ in module.named_parameters() if not torch.isfinite(found[n]).all()]
    if nonfinite:  # a diverged run's weights would evaluate to FVU nan and export silently
        raise CheckpointError(f"checkpoint {path}: tensor(s) {nonfinite} hold NaN or inf")
    return found


def read_dictionary_config(path: Path, verify: bool, expected: type) -> Any:
    """The ``expected`` dictionary config held in ``path`` (hash-checked with ``verify``), or a
    one-line CheckpointError naming what it holds instead."""
    from saekit.model.config import DictionaryConfig  # its variants import this module

    data = read_config(path, verify)
    try:
        cfg = DictionaryConfig.from_plain(data, "config")
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path}: bad config in cfg.json: {exc}") from exc
    if not isinstance(cfg, expected):
        found = getattr(cfg, "kind", "sae")
        raise CheckpointError(
            f"checkpoint {path} holds a {found!r}, not a {expected.KIND!r} (load any with "
            "saekit.model.dictionary.load_dictionary)"
        )
    return cfg


class FoldedSave:
    """``folded_copy``, ``save`` and ``load`` of a dictionary whose buffers ``scale_buffers``
    fold into its weights (``fold_scale_``): the cross-layer transcoder's and the crosscoder's.
    The directory is an SAE's: ``sae.safetensors`` and ``cfg.json``, whose config names the
    ``kind``."""

    config_class: ClassVar[type]
    scale_buffers: ClassVar[tuple[str, ...]]

    def folded_copy(self) -> Any:
        """The dictionary that takes raw activations (itself when its scales are all 1)."""
        if all(bool((getattr(self, name) == 1).all()) for name in self.scale_buffers):
            return self
        folded = type(self)(copy.deepcopy(self.cfg), device="cpu")
        folded.load_state_dict({k: v.cpu() for k, v in self.state_dict().items()})
        folded.fold_scale_()
        return folded

    def save(self, path: str | os.PathLike) -> Path:
        """Write the directory ``path`` with the scales folded (this dictionary unchanged),
        atomically (:func:`write_dictionary`)."""
        path = Path(path)
        recover_directory(path)
        folded = self.folded_copy()
        return write_dictionary(path, folded.state_dict(), folded.cfg.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu", verify=True) -> Any:
        """Load a directory written by :meth:`save`, in eval mode; a one-line CheckpointError for
        a missing, corrupt or mismatched one (another kind's included)."""
        path = Path(path)
        recover_directory(path)
        cfg = read_dictionary_config(path, verify, cls.config_class)
        model = cls(cfg, device="cpu")
        model.load_state_dict(read_weights(path, cfg.to_dict(), model))
        return model.to(device).eval()
