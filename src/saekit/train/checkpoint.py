"""Resumable training checkpoints: plain data in, plain data out; nothing is ever unpickled.

Layout: ``<run>/checkpoint/{state.safetensors, state.json}``. The tensors of every SAE (prefixed
``m<i>.``) and the torch RNG state go to safetensors; step, config and each SAE's name and
non-tensor state go to JSON, with the sha256 of the tensor file; ``state.json.sha256`` holds the
JSON's own sha256 (checkpoints from before it have none: their JSON is parsed and type-checked
only). Both halves are verified before a resume overwrites anything. The directory is replaced with
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
STATE_META_HASH = "state.json.sha256"
FORMAT = "saekit.train-checkpoint/1"


@dataclass
class MemberState:
    """One SAE's resumable state, as ``Member.state_tensors()`` and ``state_meta()`` give it."""

    name: str
    tensors: dict[str, Tensor]
    meta: dict[str, Any]
    """JSON-serialisable."""


class NoCheckpoint(CheckpointError):
    """The run has no checkpoint at all (neither half): it stopped before its first one."""


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
        (tmp / STATE_META_HASH).write_text(sha256_file(tmp / STATE_META) + "\n")

    return replace_directory(checkpoint_dir(run_dir), fill)


def read_checkpoint_meta(run_dir: Path) -> dict[str, Any]:
    """The JSON half of the checkpoint (step, config, members' non-tensor state), hash-checked
    (when its hash is recorded), parsed and type-checked: :class:`NoCheckpoint` when neither
    half is there, a one-line :class:`CheckpointError` naming the file when it is unreadable."""
    path = checkpoint_dir(run_dir)
    recover_directory(path)
    meta_path = path / STATE_META
    if not meta_path.is_file():
        if (path / STATE_TENSORS).exists():
            raise CheckpointError(f"{meta_path}: missing (the checkpoint is incomplete)")
        raise NoCheckpoint(f"no training checkpoint in {run_dir}")
    hash_path = path / STATE_META_HASH
    if hash_path.is_file():
        recorded = hash_path.read_text(errors="replace").strip()
        if recorded != sha256_file(meta_path):
            raise CheckpointError(f"{meta_path}: sha256 mismatch (edited, corrupt or truncated)")
    try:
        meta = json.loads(meta_path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{meta_path}: not valid JSON ({exc})") from exc
    problem = _meta_problem(meta)
    if problem:
        raise CheckpointError(f"{meta_path}: {problem}")
    return meta


def _meta_problem(meta: Any) -> str | None:
    """What is wrong with the parsed JSON half, or None."""
    if not isinstance(meta, dict):
        return f"expected a JSON object, got {type(meta).__name__}"
    if meta.get("format") != FORMAT:
        return f"format {meta.get('format')!r}, expected {FORMAT!r}"
    step = meta.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        return f"step {step!r} is not a non-negative integer"
    if not isinstance(meta.get("config"), dict):
        return "config is not a JSON object"
    if not isinstance(meta.get("sha256"), str):
        return "sha256 of the tensor file is missing"
    members = meta.get("members")
    if not isinstance(members, list) or not all(
        isinstance(m, dict) and isinstance(m.get("name"), str) for m in members
    ):
        return "members is not a list of objects with a name"
    return None


def verify_training_checkpoint(run_dir: Path) -> dict[str, Any] | None:
    """Both halves checked (the JSON as :func:`read_checkpoint_meta`, the tensors against the
    sha256 it records) before a resume overwrites anything: the JSON half, or None when the run
    has no checkpoint at all."""
    try:
        meta = read_checkpoint_meta(run_dir)
    except NoCheckpoint:
        return None
    _check_tensor_hash(checkpoint_dir(run_dir), meta)
    return meta


def _check_tensor_hash(path: Path, meta: dict[str, Any]) -> None:
    tensors = path / STATE_TENSORS
    if not tensors.is_file():
        raise CheckpointError(f"{tensors}: missing (the checkpoint is incomplete)")
    if meta["sha256"] != sha256_file(tensors):
        raise CheckpointError(f"{tensors}: sha256 mismatch (corrupt or truncated)")


def read_training_checkpoint(
    run_dir: Path, expected_names: list[str] | None = None
) -> TrainingCheckpoint:
    """Read and verify the checkpoint; with ``expected_names``, check it holds exactly those
    SAEs in that order."""
    meta = read_checkpoint_meta(run_dir)
    path = checkpoint_dir(run_dir)
    if meta.get("latent") is not None:  # its rows are in part files: saekit.train.latent_checkpoint
        raise CheckpointError(
            f"{path}: a latent-sharded checkpoint: resume it with parallel: {{latent: T}} (any T "
            "dividing d_sae; set it in config.yaml)"
        )
    _check_tensor_hash(path, meta)
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
