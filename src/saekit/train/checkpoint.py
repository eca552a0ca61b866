"""Resumable training checkpoints: safetensors for tensors, JSON for the rest, written atomically.

Layout: ``<run>/checkpoint/{state.safetensors, state.json}``. A new checkpoint is written into a
temporary directory, fsynced, then swapped in (the previous one is kept as ``checkpoint.old``
until the swap is done), so an interruption at any point leaves a loadable checkpoint.
Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from saekit._version import __version__
from saekit.atomic import fsync_dir, fsync_file, sha256_file
from saekit.sae import CheckpointError
from saekit.train.config import to_dict

if TYPE_CHECKING:
    from saekit.train.trainer import Trainer

STATE_TENSORS = "state.safetensors"
STATE_META = "state.json"
FORMAT = "saekit.train-checkpoint/1"


def write_training_checkpoint(trainer: Trainer) -> Path:
    final = trainer.checkpoint_dir
    tmp = final.parent / f".checkpoint.tmp-{os.getpid()}"
    old = final.parent / "checkpoint.old"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    tensors: dict[str, torch.Tensor] = {"torch_rng": torch.get_rng_state()}
    members_meta = []
    for i, member in enumerate(trainer.members):
        for key, value in member.state_tensors().items():
            tensors[f"m{i}.{key}"] = value.detach().contiguous().cpu()
        members_meta.append({"name": member.cfg.name, **member.state_meta()})
    save_file(tensors, str(tmp / STATE_TENSORS))
    fsync_file(tmp / STATE_TENSORS)
    meta = {
        "format": FORMAT,
        "saekit_version": __version__,
        "step": trainer.step,
        "data_position": trainer.step,
        "config": to_dict(trainer.cfg),
        "members": members_meta,
        "sha256": sha256_file(tmp / STATE_TENSORS),
    }
    (tmp / STATE_META).write_text(json.dumps(meta, indent=2))
    fsync_file(tmp / STATE_META)
    fsync_dir(tmp)
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if old.exists():
        shutil.rmtree(old)
    return final


def checkpoint_location(run_dir: Path) -> Path:
    """The checkpoint to resume from (``checkpoint.old`` if a swap was interrupted)."""
    for name in ("checkpoint", "checkpoint.old"):
        path = run_dir / name
        if (path / STATE_META).is_file():
            return path
    raise CheckpointError(f"no training checkpoint in {run_dir}")


def read_checkpoint_meta(run_dir: Path) -> dict:
    path = checkpoint_location(run_dir)
    try:
        meta = json.loads((path / STATE_META).read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path / STATE_META}: not valid JSON ({exc})") from exc
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def read_training_checkpoint(trainer: Trainer) -> None:
    path = checkpoint_location(trainer.out_dir)
    meta = read_checkpoint_meta(trainer.out_dir)
    if meta["sha256"] != sha256_file(path / STATE_TENSORS):
        raise CheckpointError(f"{path / STATE_TENSORS}: sha256 mismatch (corrupt or truncated)")
    names = [m["name"] for m in meta["members"]]
    expected = [m.cfg.name for m in trainer.members]
    if names != expected:
        raise CheckpointError(f"{path}: checkpoint holds SAEs {names}, the run has {expected}")
    with safe_open(str(path / STATE_TENSORS), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    torch.set_rng_state(tensors["torch_rng"])
    for i, member in enumerate(trainer.members):
        prefix = f"m{i}."
        own = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            member.load_state(own, meta["members"][i])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise CheckpointError(f"{path}: SAE {member.cfg.name}: {exc}") from exc
    trainer.step = int(meta["step"])
