"""Training checkpoints of a latent-parallel run: sharded, and resumable on any mesh.

``<run>/checkpoint/`` is the ordinary checkpoint (:mod:`saekit.train.checkpoint`: the same
``state.json`` with its hash, ``state.safetensors`` with the torch RNG) whose
``state.safetensors`` holds each SAE's replicated state only (b_dec, W_skip, the scales, Adam's
step counts, θ of BatchTopK, the λ controller, the log sums), plus one
``latent-<t>-of-<T>.safetensors`` per latent rank t holding the rows of its part: W_enc, b_enc,
W_dec, per-latent thresholds, their Adam moments and the dead counters. ``state.json`` records
T, every part file's sha256 and which keys are per-latent. No process ever holds more than its
own part: data group 0's ranks each write theirs (t > 0 into ``<run>/.checkpoint-parts/``,
renamed into the new checkpoint by rank 0, which writes the rest and swaps the directory in
atomically, :func:`saekit.core.atomic.replace_directory`), so a kill at any moment leaves the
previous checkpoint whole.

A resume on T' parts reads, for part t', global rows [t'·M/T', (t'+1)·M/T') from whichever part
files hold them (safetensors slices: again no more than a part in memory): any T' that divides
M. An ordinary checkpoint (one process, data parallel) is the case T = 1 (its
``state.safetensors`` holds every row), so a run can also switch to latent parallelism on
resume. The whole SAE as an ordinary SAE directory is written at the end of the run (gathered,
saekit.train.latent_parallel), and :func:`gathered_state` reads it from a checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as save_safetensors_bytes
from safetensors.torch import save_file
from torch import Tensor

from saekit._version import __version__
from saekit.core.atomic import atomic_write_bytes, replace_directory, sha256_file
from saekit.model.format import CheckpointError
from saekit.train.checkpoint import (
    FORMAT,
    STATE_META,
    STATE_META_HASH,
    STATE_TENSORS,
    checkpoint_dir,
    read_checkpoint_meta,
)
from saekit.train.latent_member import LatentMember
from saekit.train.latent_parts import Axis
from saekit.train.mesh import Mesh

STAGING = ".checkpoint-parts"
"""Where latent ranks t > 0 of data group 0 write their part before rank 0 renames it in."""


def part_file(t: int, T: int) -> str:
    return f"latent-{t}-of-{T}.safetensors"


def save_latent_checkpoint(
    mesh: Mesh,
    run_dir: Path,
    step: int,
    config: dict[str, Any],
    members: list[LatentMember],
    logs: list[tuple[dict[str, Tensor], int]],
) -> Path:
    """Checkpoint every member's part (module docstring); ``logs``: each member's log-interval
    sums and their step count (replicated after the trainer's averaging is not needed: rank 0's
    are kept, as a data-parallel checkpoint keeps them)."""
    run_dir = Path(run_dir)
    t, T = mesh.latent_index, mesh.T
    rows: dict[str, Tensor] = {}
    shared: dict[str, Tensor] = {"torch_rng": torch.get_rng_state()}
    described = []
    for i, (member, (sums, n_steps)) in enumerate(zip(members, logs, strict=True)):
        keys = member.part_state_keys()
        for key, value in member.state_tensors().items():
            target = rows if key in keys else shared
            target[f"m{i}.{key}"] = value.detach().contiguous().cpu()
        for key, value in sums.items():
            shared[f"m{i}.log.{key}"] = value.detach().cpu()
        meta = {**member.state_meta(), "log_steps": n_steps}
        axes = {k: list(v) for k, v in member.part_state_axes().items() if v != (0, 1)}
        described.append(
            {"name": member.cfg.name, **meta, "part_keys": sorted(keys), "part_axes": axes}
        )
    payload = b""
    staging = run_dir / STAGING
    if mesh.data_index == 0 and t > 0:
        staging.mkdir(parents=True, exist_ok=True)
        data = save_safetensors_bytes(rows)
        atomic_write_bytes(staging / part_file(t, T), data)
        payload = json.dumps({"t": t, "sha256": sha256_file(staging / part_file(t, T))}).encode()
    hashes = mesh.world.gather(payload, "checkpoint part hashes")
    if hashes is not None:  # world rank 0 = latent rank 0 of data group 0
        found = {0: ""}
        for raw in hashes:
            if raw:
                entry = json.loads(raw)
                found[entry["t"]] = entry["sha256"]

        def fill(tmp: Path) -> None:
            save_file(rows, str(tmp / part_file(0, T)))
            found[0] = sha256_file(tmp / part_file(0, T))
            for other in range(1, T):
                os.replace(staging / part_file(other, T), tmp / part_file(other, T))
            save_file(shared, str(tmp / STATE_TENSORS))
            meta = {
                "format": FORMAT,
                "saekit_version": __version__,
                "step": step,
                "data_position": step,
                "config": config,
                "members": described,
                "sha256": sha256_file(tmp / STATE_TENSORS),
                "latent": {
                    "parts": T,
                    "data": mesh.D,
                    "files": [part_file(j, T) for j in range(T)],
                    "sha256": [found[j] for j in range(T)],
                },
            }
            (tmp / STATE_META).write_text(json.dumps(meta, indent=2))
            (tmp / STATE_META_HASH).write_text(sha256_file(tmp / STATE_META) + "\n")

        replace_directory(checkpoint_dir(run_dir), fill)
        if staging.is_dir() and not any(staging.iterdir()):
            staging.rmdir()
    mesh.world.barrier("barrier(after checkpoint)")
    return checkpoint_dir(run_dir)


def _parts_of(meta: dict[str, Any], path: Path) -> list[tuple[Path, str | None]]:
    """(file, sha256 or None: checked with state.json) of each part, in latent order."""
    latent = meta.get("latent")
    if latent is None:  # an ordinary checkpoint: one part, state.safetensors
        return [(path / STATE_TENSORS, None)]
    if not isinstance(latent, dict) or not isinstance(latent.get("files"), list):
        raise CheckpointError(f"{path / STATE_META}: latent is not a record of part files")
    return [
        (path / str(name), str(digest))
        for name, digest in zip(latent["files"], latent["sha256"], strict=True)
    ]


class PartReader:
    """Rows of a sharded checkpoint's per-latent tensors, from the part files that hold them."""

    def __init__(self, run_dir: Path, meta: dict[str, Any]):
        self.path = checkpoint_dir(run_dir)
        self.meta = meta
        self.parts = _parts_of(meta, self.path)
        self.checked: set[Path] = set()

    def rows(self, key: str, d_sae: int, start: int, count: int, axis: Axis = (0, 1)) -> Tensor:
        """Global latents [start, start + count) of tensor ``key`` (d_sae of them along the
        axis (dim, groups) in every group: saekit.train.latent_parts), group by group."""
        n_parts, (dim, groups) = len(self.parts), axis
        width = d_sae // n_parts
        pieces: list[list[Tensor]] = [[] for _ in range(groups)]
        for j, (file, digest) in enumerate(self.parts):
            lo, hi = max(start, j * width), min(start + count, (j + 1) * width)
            if lo >= hi:
                continue
            if digest is not None and file not in self.checked:
                if not file.is_file() or sha256_file(file) != digest:
                    raise CheckpointError(f"{file}: missing, or sha256 mismatch (corrupt)")
                self.checked.add(file)
            with safe_open(str(file), framework="pt") as f:
                if key not in f.keys():  # noqa: SIM118
                    raise CheckpointError(f"{file}: no tensor {key!r}")
                stored = f.get_slice(key)
                for g, group in enumerate(pieces):  # part j holds width latents per group
                    a, b = g * width + lo - j * width, g * width + hi - j * width
                    group.append(stored[(slice(None),) * dim + (slice(a, b),)])
        return torch.cat([torch.cat(group, dim) for group in pieces], dim)


def load_latent_checkpoint(
    run_dir: Path, members: list[LatentMember], names: list[str]
) -> tuple[int, list[tuple[dict[str, Tensor], dict[str, Any]]]]:
    """The step and, per member, (tensors of ITS part, meta) from the checkpoint, whatever T
    wrote it; restores the torch RNG."""
    meta = read_checkpoint_meta(run_dir)
    path = checkpoint_dir(run_dir)
    found = [m["name"] for m in meta["members"]]
    if found != list(names):
        raise CheckpointError(f"{path}: checkpoint holds SAEs {found}, the run has {names}")
    shared_file = path / STATE_TENSORS
    if sha256_file(shared_file) != meta["sha256"]:
        raise CheckpointError(f"{shared_file}: sha256 mismatch (corrupt or truncated)")
    reader = PartReader(run_dir, meta)
    out = []
    with safe_open(str(shared_file), framework="pt") as f:
        stored = set(f.keys())
        torch.set_rng_state(f.get_tensor("torch_rng"))
        for i, member in enumerate(members):
            prefix, axes = f"m{i}.", member.part_state_axes()
            keys = set(axes)
            tensors = {
                k[len(prefix) :]: f.get_tensor(k)
                for k in stored
                if k.startswith(prefix) and k[len(prefix) :] not in keys
            }
            shard, M = member.shard, member.cfg.sae.d_sae
            held = set(meta["members"][i].get("part_keys", keys))
            for key in sorted(keys & held):
                if meta.get("latent") is None and f"{prefix}{key}" not in stored:
                    continue  # e.g. Adam moments before the first step
                tensors[key] = reader.rows(
                    f"{prefix}{key}", M, shard.offset, shard.width, axes[key]
                )
            member_meta = {
                k: v for k, v in meta["members"][i].items() if k not in ("part_keys", "part_axes")
            }
            out.append((tensors, member_meta))
    return int(meta["step"]), out


def gathered_state(run_dir: Path, index: int = 0) -> dict[str, Tensor]:
    """Dictionary ``index``'s whole state dict (what its ``load_state_dict`` takes) from a run's
    training checkpoint, sharded or not, in one process: the last checkpoint of a run that died
    as an SAE, a crosscoder or a CLT (``build_dictionary(cfg).load_state_dict(...)``)."""
    meta = read_checkpoint_meta(run_dir)
    path = checkpoint_dir(run_dir)
    reader = PartReader(run_dir, meta)
    prefix, out = f"m{index}.", {}
    part_keys = set(meta["members"][index].get("part_keys", []))
    axes = meta["members"][index].get("part_axes", {})
    with safe_open(str(path / STATE_TENSORS), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118
            if key.startswith(f"{prefix}sae."):
                out[key[len(prefix) + 4 :]] = f.get_tensor(key)
    d_sae = int(meta["config"]["saes"][index]["sae"]["d_sae"])
    for key in part_keys:
        if key.startswith("sae."):
            axis = tuple(axes.get(key, (0, 1)))
            out[key[4:]] = reader.rows(f"{prefix}{key}", d_sae, 0, d_sae, axis)  # type: ignore[arg-type]
    return out
