"""Latent parallelism: dictionaries wider than one device, their latents split over processes.

``parallel: {data: D, latent: T}`` (:mod:`saekit.train.mesh`): every SAE's M latents are split
into T parts of M/T (:mod:`saekit.core.shard`), each batch into D data groups; D·T processes,
launched by torchrun or ``saekit train --nproc``. A process holds 1/T of each SAE's weights,
Adam moments and [N/D, M/T] pre-activations. Its step (:class:`saekit.train.latent_member.
LatentMember`) selects, reconstructs and updates exactly as one process training the whole SAE
on the whole batch does (to float rounding): the same latents at every step (TopK, BatchTopK,
AuxK select across parts), the same weights (tests/train/test_latent_parallel.py).

The run (:func:`run_latent`): build the mesh and this rank's sources (generated data: every rank
its data group's rows of each batch; a stream: latent rank 0 reads its data group's share and
broadcasts it to its group), train, checkpoint (:mod:`saekit.train.latent_checkpoint`: sharded,
resumable on any (D, T)), then gather each SAE to rank 0 (one part at a time from each latent
rank of data group 0), which evaluates it and writes the ordinary SAE directories every command
reads (eval, splice, report, export). Gathering needs the whole SAE in rank 0's host memory;
an evaluation that keeps the SAE sharded (encode and splice by parts, the metrics reduced
across them) is the next step for SAEs too wide to gather.

A rank that dies or hangs makes every other rank's next collective fail (the step has several
per batch), at once or within ``SAEKIT_DIST_TIMEOUT``: each raises
:class:`saekit.train.launch.DistributedFailure` naming the collective, and the last checkpoint,
written atomically, stays loadable.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch

from saekit.core.atomic import atomic_write_text
from saekit.core.configs import to_dict
from saekit.data.sources.interface import ActivationSource
from saekit.model.dictionary import Dictionary, build_dictionary
from saekit.train.checkpoint import NoCheckpoint, checkpoint_dir, read_checkpoint_meta
from saekit.train.comm import ProcessGroupComm
from saekit.train.config import RunConfig, check_source_width, stream_settings
from saekit.train.latent_checkpoint import load_latent_checkpoint, save_latent_checkpoint
from saekit.train.latent_member import LatentMember
from saekit.train.latent_parts import join_parts
from saekit.train.launch import DistContext
from saekit.train.member import Member
from saekit.train.member_config import SAETrainConfig
from saekit.train.mesh import Mesh, ParallelMesh, build_mesh, local_mesh
from saekit.train.outputs import evaluate_member, save_outputs, write_run_config
from saekit.train.parallel import PARALLEL_FILE, gather_indexed
from saekit.train.reports import MemberReport
from saekit.train.trainer import LogRecord, Trainer


class LatentTrainer(Trainer):
    """The trainer of one rank of a latent-parallel run: its members are LatentMembers (their
    parts), its checkpoints sharded."""

    def __init__(self, cfg: RunConfig, source: ActivationSource, mesh: Mesh | None = None):
        self.mesh = mesh if mesh is not None else local_mesh()
        super().__init__(cfg, source, self.mesh.world)

    def make_member(self, i: int) -> LatentMember:
        return LatentMember(self.cfg.saes[i], self.cfg.steps, self.cfg.device, self.mesh)

    def save_checkpoint(self) -> Path:
        path = save_latent_checkpoint(
            self.mesh,
            self.out_dir,
            self.step,
            to_dict(self.cfg),
            self.members,  # type: ignore[arg-type]
            [(sums, self._n_in_interval) for sums in self._sums],
        )
        if self.comm.is_main:
            record = {
                "parallel": "latent",
                "data": self.mesh.D,
                "latent": self.mesh.T,
                "world_size": self.comm.world_size,
                "step": self.step,
            }
            atomic_write_text(self.out_dir / PARALLEL_FILE, json.dumps(record) + "\n")
        return path

    def load_checkpoint(self) -> None:
        """Continue from the checkpoint, whatever mesh (or an ordinary run) wrote it."""
        from saekit.model.format import CheckpointError

        step, states = load_latent_checkpoint(
            self.out_dir,
            self.members,  # type: ignore[arg-type]
            [s.name for s in self.cfg.saes],
        )
        for member, (tensors, meta) in zip(self.members, states, strict=True):
            try:
                member.load_state(tensors, meta)
            except (RuntimeError, KeyError, ValueError) as exc:
                raise CheckpointError(
                    f"{self.checkpoint_dir}: SAE {member.cfg.name}: {exc}"
                ) from exc
        self.step = step
        device = torch.device(self.cfg.device)
        self._sums = [
            {k[4:]: v.to(device) for k, v in tensors.items() if k.startswith("log.")}
            for tensors, _ in states
        ]
        self._n_in_interval = int(states[0][1].get("log_steps", 0)) if states else 0
        self._warn_other_data_split()
        self.trim_metrics()

    def _warn_other_data_split(self) -> None:
        path = self.out_dir / PARALLEL_FILE
        record = json.loads(path.read_text()) if path.is_file() else {}
        before = record.get("data", 1) if record.get("step") == self.step else 1
        if self.comm.is_main and before != self.mesh.D and record.get("parallel") == "latent":
            print(
                f"saekit: resuming at step {self.step} with {self.mesh.D} data group(s) a "
                f"checkpoint written by {before}: generated data gives every mesh the same "
                "batches; a model or cache stream splits by data group, so its tokens differ",
                file=sys.stderr,
            )


class Gathered(NamedTuple):
    """A whole dictionary on rank 0 with its training config: what evaluate_member reads."""

    cfg: SAETrainConfig
    sae: Dictionary


def gather_sae(mesh: Mesh, member: LatentMember) -> Dictionary | None:
    """The whole dictionary on world rank 0 (CPU; None elsewhere): each latent rank of data
    group 0 sends its part (one payload at a time), rank 0 joins the per-latent tensors in
    latent order along their axes (saekit.train.latent_parts: a CLT's every layer) and keeps
    its replicated ones."""
    if mesh.data_index != 0:
        return None
    own = {k: v for k, v in member.sae.state_dict().items() if k in member.part_names}
    t = mesh.latent_index
    gathered = gather_indexed(mesh.latent, {t: own}, {t: None}, "SAE parts")
    if gathered is None:
        return None
    parts, _ = gathered
    state = {k: v.cpu() for k, v in member.sae.state_dict().items()}
    for key, axis in member.axes.items():
        state[key] = join_parts([parts[t][key] for t in range(mesh.T)], axis)
    sae = build_dictionary(member.cfg.sae, device="cpu")
    sae.load_state_dict(state)
    return sae


def build_latent_trainer(
    cfg: RunConfig, ctx: DistContext | None
) -> tuple[LatentTrainer, ActivationSource | None]:
    """This rank's mesh, sources and trainer (``ctx`` None: one process)."""
    spec = cfg.parallel
    assert isinstance(spec, ParallelMesh)
    if ctx is None:
        spec.shape(1)
        mesh = local_mesh()
    else:
        out = cfg.out_dir
        world = ProcessGroupComm(
            ctx,
            hint=f"The last checkpoint in {checkpoint_dir(Path(out))} is loadable; resume with: "
            f"saekit train --resume {out}.",
        )
        mesh = build_mesh(ctx, world, spec)
    if cfg.batch_size % mesh.D:
        raise ValueError(
            f"batch_size {cfg.batch_size} must be divisible by parallel.data = {mesh.D} (each "
            "data group trains on an equal share of each batch)"
        )
    device = str(ctx.device) if ctx is not None else cfg.device
    main = mesh.world.is_main
    rank_cfg = dataclasses.replace(cfg, device=device, progress=cfg.progress and main)
    source, eval_source = cfg.data.latent_parallel_sources(
        stream_settings(rank_cfg),
        mesh.data_index,
        mesh.D,
        mesh.latent,  # type: ignore[arg-type]
    )
    check_source_width(cfg, source)
    return LatentTrainer(rank_cfg, source, mesh), eval_source


def run_latent(
    cfg: RunConfig,
    ctx: DistContext | None,
    resume: bool = False,
    callbacks: list[Callable[[Member, LogRecord], None]] | None = None,
) -> tuple[LatentTrainer, list[MemberReport]]:
    """Train, checkpoint, gather, evaluate and save a latent-parallel run on this rank; the
    reports on rank 0 ([] elsewhere). ``callbacks``: the trainer's log callbacks (wandb)."""
    trainer, eval_source = build_latent_trainer(cfg, ctx)
    trainer.log_callbacks.extend(callbacks or [])
    mesh = trainer.mesh
    if resume and _has_checkpoint(trainer.out_dir):
        trainer.load_checkpoint()
    else:
        trainer.trim_metrics()
    if mesh.world.is_main:  # after the checkpoint loaded: a failed resume leaves it as it was
        write_run_config(cfg)
    trainer.fit()
    reports: list[MemberReport] = []
    saes: dict[str, Dictionary] = {}
    for member in trainer.members:
        sae = gather_sae(mesh, member)  # type: ignore[arg-type]
        if sae is not None:
            saes[member.cfg.name] = sae.to(trainer.cfg.device)
    if saes and eval_source is not None:
        reports = [
            evaluate_member(
                Gathered(m.cfg, saes[m.cfg.name]),  # type: ignore[arg-type]
                eval_source,
                cfg.eval_tokens,
                cfg.batch_size,
            )
            for m in trainer.members
        ]
        save_outputs(trainer.out_dir, saes, reports)
    mesh.world.barrier("barrier(after final save)")
    return trainer, reports


def _has_checkpoint(run_dir: Path) -> bool:
    try:
        read_checkpoint_meta(run_dir)
    except NoCheckpoint:
        return False
    return True
