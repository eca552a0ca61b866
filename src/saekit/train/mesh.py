"""The 2-D process mesh of latent parallelism: ``parallel: {data: D, latent: T}``.

D·T processes: global rank r is data group d = r // T and latent rank t = r % T, so a latent
group (the T ranks holding one batch's latents between them, which meet at every step's [N, d]
all-reduce) is T consecutive ranks: one node's GPUs under torchrun's numbering, where NVLink
is. A data group (the D ranks holding the same latents, which average their gradients) is
every T-th rank. ``data`` may be left out (0): D = world size / T.

The groups are explicit ``torch.distributed.new_group`` calls, each given the run's timeout
(``SAEKIT_DIST_TIMEOUT``): a ``DeviceMesh`` builds the same groups but with the default 30-minute
timeout, which would let a hung rank stall a latent group long after the run's own deadline.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NamedTuple

import torch.distributed as dist

from saekit.activations import ACTIVATIONS
from saekit.core.comm import Comm, LocalComm
from saekit.model.clt import CLTConfig
from saekit.model.config import SAEConfig
from saekit.objective.sharded import ShardedObjective
from saekit.train.comm import ProcessGroupComm
from saekit.train.launch import DistContext
from saekit.train.member_config import SAETrainConfig


@dataclass
class ParallelMesh:
    """Latent parallelism: every SAE's latents split over ``latent`` processes, each batch over
    ``data`` groups of them (data × latent = the number of processes)."""

    data: int = 0
    """D: groups that split each batch (0: the number of processes / latent)."""
    latent: int = 1
    """T: processes holding one SAE's latents between them (d_sae / T each)."""

    def validate(self) -> None:
        for name, low in (("data", 0), ("latent", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"parallel.{name} must be an integer >= {low}, got {value!r}")

    def shape(self, world_size: int) -> tuple[int, int]:
        """(D, T) on ``world_size`` processes, or a one-line ValueError."""
        T = self.latent
        D = self.data or max(1, world_size // T)
        if D * T != world_size:
            raise ValueError(
                f"parallel: data × latent = {D} × {T} = {D * T}, but the run has {world_size} "
                "process(es) (--nproc)"
            )
        return D, T


def check_processes(parallel: object, n_processes: int) -> None:
    """Before a launch: the mesh of ``parallel: {data, latent}`` fits ``n_processes`` (one-line
    ValueError); nothing to check for data or sweep."""
    if isinstance(parallel, ParallelMesh):
        parallel.shape(n_processes)


def check_latent_saes(saes: list[SAETrainConfig], T: int) -> None:
    """Every SAE (transcoder, crosscoder, CLT: its M per layer) splits into T parts and has a
    sharded form, or a ValueError naming it."""
    for i, s in enumerate(saes):
        try:
            kind, M = s.sae.activation.kind, s.sae.d_sae  # a CLT's M: per layer
            if M % T:
                raise ValueError(f"sae.d_sae = {M} is not divisible by parallel.latent = {T}")
            if isinstance(s.sae, SAEConfig) and s.sae.encoder_steps > 1:
                raise ValueError(
                    "sae.encoder_steps > 1 has no latent-sharded form (parallel.latent)"
                )
            # a CLT's part selects from its own L encoders' pre-activations
            hook = "encode_preacts_sharded" if isinstance(s.sae, CLTConfig) else "encode_sharded"
            if not ACTIVATIONS[kind].overrides(hook):
                raise ValueError(
                    f"sae.activation.kind {kind!r} has no latent-sharded form (parallel.latent)"
                )
            try:
                s.sae.activation.check_d_sae(M // T)
            except ValueError as exc:
                raise ValueError(f"{exc} per process (d_sae / parallel.latent)") from None
            ShardedObjective(ACTIVATIONS[kind], s.penalty, s.revival, s.reconstruction_tilt)
            if getattr(s.matryoshka, "detach_inner", False) or getattr(
                s.matryoshka, "level_k", None
            ):
                raise ValueError(
                    "matryoshka.detach_inner and matryoshka.level_k have no latent-sharded form "
                    "yet (parallel.latent)"
                )
            if s.matryoshka is not None and s.matryoshka.sort_every:
                raise ValueError(
                    "matryoshka.sort_every has no latent-sharded form (parallel.latent)"
                )
            if (
                isinstance(s.sae, CLTConfig)
                and s.revival is not None
                and s.revival.kind == "preact"
            ):
                # untested on a CLT part's [N, L·M/T] per-layer thresholds: refused until it is
                raise ValueError(
                    "revival.kind 'preact' has no latent-sharded form for a cross-layer "
                    "transcoder yet (parallel.latent)"
                )
        except ValueError as exc:
            raise ValueError(f"saes.{i}: {exc}") from None


class Mesh(NamedTuple):
    """This process's place in the mesh and the comms of its groups."""

    world: Comm
    latent: Comm
    """Its latent group (T ranks)."""
    data: Comm
    """Its data group (D ranks)."""
    data_index: int
    latent_index: int
    D: int
    T: int


def local_mesh() -> Mesh:
    """One process: D = T = 1, every comm the identity."""
    one = LocalComm()
    return Mesh(one, one, one, 0, 0, 1, 1)


def build_mesh(ctx: DistContext, world: ProcessGroupComm, spec: ParallelMesh) -> Mesh:
    """The groups of ``spec`` on the run's ranks (every rank builds every group, in the same
    order, as ``new_group`` requires); a group of one rank is a LocalComm, the whole world is
    ``world`` itself."""
    D, T = spec.shape(ctx.world_size)
    d, t = divmod(ctx.rank, T)
    timeout = timedelta(seconds=ctx.timeout_s)
    latent_groups = [list(range(g * T, (g + 1) * T)) for g in range(D)]
    data_groups = [list(range(g, D * T, T)) for g in range(T)]

    def comm_of(groups: list[list[int]], mine: int) -> Comm:
        size = len(groups[0])
        if size == 1:
            return LocalComm()
        if size == ctx.world_size:
            return world
        made: list[Any] = [dist.new_group(ranks, timeout=timeout) for ranks in groups]
        return ProcessGroupComm(ctx, world.hint, made[mine])

    return Mesh(world, comm_of(latent_groups, d), comm_of(data_groups, t), d, t, D, T)
