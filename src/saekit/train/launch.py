"""Launching a multi-process run and joining its process group (torchrun or ``--nproc``).

``saekit train --nproc N`` re-runs itself under ``python -m torch.distributed.run``
(:func:`launch`); each worker sees WORLD_SIZE > 1 (:func:`launched`) and joins the group
(:func:`init_from_env`). What the ranks then do together is in :mod:`saekit.train.parallel`.

Every collective runs under the process group's timeout (``SAEKIT_DIST_TIMEOUT`` seconds,
default 1800; gloo honours it, NCCL's watchdog aborts the process). A rank that dies makes the
others' next collective fail at once; one that hangs makes it fail after the timeout. Either way
they raise :class:`DistributedFailure`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

TIMEOUT_ENV = "SAEKIT_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0


class DistributedFailure(RuntimeError):
    """A collective failed: another rank died, or stopped responding within the timeout."""


def world_size_from_env() -> int:
    """WORLD_SIZE as torchrun sets it (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched() -> bool:
    """True in a worker of a multi-process torchrun launch."""
    return world_size_from_env() > 1


def is_main_process() -> bool:
    """Rank 0, or a single process."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def launch_command(nproc: int, argv: list[str]) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc_per_node N -m saekit <argv>``,
    with ``--nproc`` removed from ``argv``."""
    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            rest.append(arg)
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "saekit",
        *rest,
    ]


def launch(nproc: int, argv: list[str]) -> int:
    """Run ``saekit <argv>`` on ``nproc`` local processes under torchrun; its exit status.

    Ctrl-C reaches the workers directly (same process group); we wait for them to write their
    checkpoint instead of killing torchrun.
    """
    proc = subprocess.Popen(launch_command(nproc, argv))
    while True:
        try:
            return proc.wait()
        except KeyboardInterrupt:
            continue


@dataclass
class DistContext:
    """This process's place in the process group."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    timeout_s: float
    owns_group: bool
    """True when :func:`init_from_env` created the group (and so destroys it)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def timeout_from_env() -> float:
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_TIMEOUT_S
    value = float(raw)
    if not value > 0:
        raise ValueError(f"{TIMEOUT_ENV} must be a positive number of seconds, got {raw!r}")
    return value


def init_from_env(device: str = "cpu", timeout_s: float | None = None) -> DistContext:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT).

    Backend nccl for CUDA devices (each rank on ``cuda:LOCAL_RANK``), gloo otherwise. An existing
    group is reused (and then left for its creator to destroy).
    """
    timeout_s = timeout_from_env() if timeout_s is None else float(timeout_s)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.device(device).type == "cuda"
    dev = torch.device("cuda", local_rank) if cuda else torch.device(device)
    if cuda:
        torch.cuda.set_device(dev)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(
            backend="nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s)
        )
    return DistContext(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        device=dev,
        backend=dist.get_backend(),
        timeout_s=timeout_s,
        owns_group=owns,
    )


def destroy_group_quietly() -> None:
    """Tear down the process group; it may already be broken by the very failure we report."""
    try:
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        pass
