"""A run on every rank of a torchrun launch: build each rank's trainer, train, evaluate, save.

How data and sweep parallelism divide the work is documented in :mod:`saekit.train.parallel`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from saekit.data.sources.interface import ActivationSource
from saekit.model.dictionary import Dictionary, build_dictionary
from saekit.train.checkpoint import checkpoint_dir
from saekit.train.comm import ProcessGroupComm
from saekit.train.config import RunConfig, check_source_width, stream_settings
from saekit.train.latent_parallel import run_latent
from saekit.train.launch import DistContext, destroy_group_quietly, init_from_env
from saekit.train.mesh import ParallelMesh
from saekit.train.outputs import evaluate_member, save_outputs, write_run_config
from saekit.train.parallel import gather_indexed
from saekit.train.reports import MemberReport
from saekit.train.trainer import Trainer


def run_distributed(
    cfg: RunConfig, resume: bool = False, timeout_s: float | None = None
) -> tuple[Trainer, list[MemberReport]]:
    """``run_training`` on every rank of a torchrun launch; the reports on rank 0 ([] elsewhere).

    The process group is created from the environment (or reused); ``cfg.parallel`` picks data or
    sweep parallelism.
    """
    ctx = init_from_env(cfg.device, timeout_s)
    try:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if isinstance(cfg.parallel, ParallelMesh):  # saekit.train.latent_parallel
            return run_latent(cfg, ctx, resume)
        trainer, eval_source = build_trainer(ctx, cfg)
        if ctx.is_main:
            write_run_config(cfg)
        if resume:
            trainer.load_checkpoint()
        trainer.fit()
        if cfg.parallel == "sweep":
            reports = _finish_sweep(trainer, eval_source, cfg)
        else:
            reports = _finish_data(trainer, eval_source, cfg)
        return trainer, reports
    finally:
        if ctx.owns_group:
            destroy_group_quietly()


def build_trainer(ctx: DistContext, cfg: RunConfig) -> tuple[Trainer, ActivationSource]:
    """This rank's trainer (its comm, source and members) and the source to evaluate on."""
    world = ctx.world_size
    out = cfg.out_dir
    comm = ProcessGroupComm(
        ctx,
        hint=f"The last checkpoint in {checkpoint_dir(Path(out))} is loadable; resume with: "
        f"saekit train --resume {out}.",
    )
    rank_cfg = dataclasses.replace(
        cfg, device=str(ctx.device), progress=cfg.progress and ctx.is_main
    )
    if cfg.parallel == "sweep":
        if len(cfg.saes) < world:
            raise ValueError(
                f"parallel: sweep spreads the SAEs over the processes: {len(cfg.saes)} SAE(s) "
                f"for {world} processes leaves some idle; use parallel: data or fewer processes"
            )
        # generated data: each rank makes the same batches (cheaper than sending); else rank 0
        # reads and broadcasts
        source = cfg.data.sweep_source(stream_settings(rank_cfg), comm)
        check_source_width(cfg, source)
        return Trainer(rank_cfg, source, comm), source  # it trains this rank's share

    if cfg.batch_size % world:
        raise ValueError(
            f"batch_size {cfg.batch_size} must be divisible by the number of processes {world} "
            "(parallel: data splits each step's batch evenly)"
        )
    local = dataclasses.replace(rank_cfg, batch_size=cfg.batch_size // world)
    # generated data: each rank its own batch indices; a stream splits itself by rank
    source, eval_source = cfg.data.data_parallel_sources(stream_settings(local), ctx.rank, world)
    check_source_width(cfg, source)
    return Trainer(rank_cfg, source, comm), eval_source


def _finish_data(
    trainer: Trainer, eval_source: ActivationSource, cfg: RunConfig
) -> list[MemberReport]:
    """Rank 0 evaluates and saves (its SAEs are every rank's); the others wait."""
    reports: list[MemberReport] = []
    if trainer.comm.is_main:
        reports = [
            evaluate_member(m, eval_source, cfg.eval_tokens, cfg.batch_size)
            for m in trainer.members
        ]
        save_outputs(trainer.out_dir, {m.cfg.name: m.sae for m in trainer.members}, reports)
    trainer.comm.barrier("barrier(after final evaluation)")
    return reports


def _finish_sweep(
    trainer: Trainer, eval_source: ActivationSource, cfg: RunConfig
) -> list[MemberReport]:
    """Each rank evaluates its SAEs; weights and reports gathered to rank 0, which saves them."""
    comm = trainer.comm
    own = list(zip(trainer.indices, trainer.members, strict=True))
    gathered = gather_indexed(
        comm,
        {i: member.sae.state_dict() for i, member in own},
        {
            i: evaluate_member(m, eval_source, cfg.eval_tokens, cfg.batch_size).to_json()
            for i, m in own
        },
        "final SAEs and reports",
    )
    reports: list[MemberReport] = []
    if gathered is not None:
        tensors, by_index = gathered
        saes: dict[str, Dictionary] = {}
        for i, sae_cfg in enumerate(cfg.saes):
            sae = build_dictionary(sae_cfg.sae, device="cpu")  # a CLT's or crosscoder's too
            sae.load_state_dict(tensors[i])
            saes[sae_cfg.name] = sae
        reports = [MemberReport.from_json(by_index[i]) for i in range(len(cfg.saes))]
        save_outputs(Path(cfg.out_dir), saes, reports)
    comm.barrier("barrier(after final save)")
    return reports
