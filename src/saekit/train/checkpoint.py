"""Resumable training checkpoints: plain data in, plain data out; nothing is ever unpickled.

Layout: ``<run>/checkpoint/{state.safetensors, state.json}``. The tensors of every SAE (prefixed
``m<i>.``) and the torch RNG state go to safetensors; step, config and each SAE's name and
non-tensor state go to JSON, with the sha256 of the tensor file. The directory is replaced with
:func:`saekit.core.atomic.replace_directory`, so an interruption at any point leaves a loadable
checkpoint; readers apply its recovery rule first.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from saekit._version import __version__
from saekit.core.atomic import recover_directory, replace_directory, sha256_file
from saekit.model.format import CheckpointError

CHECKPOINT_DIR = "checkpoint"
STATE_TENSORS = "state.safetensors"
STATE_META = "state.json"
FORMAT = "saekit.train-checkpoint/1"


@dataclass
class MemberState:
    """One SAE's resumable state, as ``Member.state_tensors()`` and ``state_meta()`` give it."""

    name: str
    tensors: dict[str, Tensor]
    meta: dict[str, Any]
    """JSON-serialisable."""


class TrainingCheckpoint(NamedTuple):
    step: int
    """Steps done; also the data position (the next batch index to read)."""
    config: dict[str, Any]
    """The run's config as ``train.config.to_dict`` gives it."""
    members: list[MemberState]
    torch_rng: Tensor
    """``torch.get_rng_state()`` of the writer."""


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def write_training_checkpoint(
    run_dir: Path,
    step: int,
    config: dict[str, Any],
    members: list[MemberState],
    torch_rng: Tensor,
) -> Path:
    """Replace ``<run_dir>/checkpoint`` atomically; returns its path."""
    tensors: dict[str, Tensor] = {"torch_rng": torch_rng}
    for i, member in enumerate(members):
        for key, value in member.tensors.items():
            tensors[f"m{i}.{key}"] = value.detach().contiguous().cpu()

    def fill(tmp: Path) -> None:
        save_file(tensors, str(tmp / STATE_TENSORS))
        meta = {
            "format": FORMAT,
            "saekit_version": __version__,
            "step": step,
            "data_position": step,
            "config": config,
            "members": [{"name": m.name, **m.meta} for m in members],
            "sha256": sha256_file(tmp / STATE_TENSORS),
        }
        (tmp / STATE_META).write_text(json.dumps(meta, indent=2))

    return replace_directory(checkpoint_dir(run_dir), fill)


def read_checkpoint_meta(run_dir: Path) -> dict[str, Any]:
    """The JSON half of the checkpoint (step, config, members' non-tensor state)."""
    path = checkpoint_dir(run_dir)
    recover_directory(path)
    if not (path / STATE_META).is_file():
        raise CheckpointError(f"no training checkpoint in {run_dir}")
    try:
        meta = json.loads((path / STATE_META).read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path / STATE_META}: not valid JSON ({exc})") from exc
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def read_training_checkpoint(
    run_dir: Path, expected_names: list[str] | None = None
) -> TrainingCheckpoint:
    """Read and verify the checkpoint; with ``expected_names``, check it holds exactly those
    SAEs in that order."""
    meta = read_checkpoint_meta(run_dir)
    path = checkpoint_dir(run_dir)
    if meta["sha256"] != sha256_file(path / STATE_TENSORS):
        raise CheckpointError(f"{path / STATE_TENSORS}: sha256 mismatch (corrupt or truncated)")
    names = [m["name"] for m in meta["members"]]
    if expected_names is not None and names != list(expected_names):
        raise CheckpointError(
            f"{path}: checkpoint holds SAEs {names}, the run has {list(expected_names)}"
        )
    with safe_open(str(path / STATE_TENSORS), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    members = []
    for i, member_meta in enumerate(meta["members"]):
        prefix = f"m{i}."
        own = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        rest = {k: v for k, v in member_meta.items() if k != "name"}
        members.append(MemberState(member_meta["name"], own, rest))
    return TrainingCheckpoint(int(meta["step"]), meta["config"], members, tensors["torch_rng"])
