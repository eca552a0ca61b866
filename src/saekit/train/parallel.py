"""Data-parallel and sweep-parallel training: which rank trains what, reads what, writes what.

A run's ranks share one :class:`saekit.core.comm.Comm` (one process: :class:`LocalComm`, and
``torch.distributed`` is never touched; under torchrun
:class:`saekit.train.comm.ProcessGroupComm`, built by :mod:`saekit.train.run_distributed`).
The trainer gives each member the comm of the ranks that share its batches
(:func:`batch_comm`), and writes and loads checkpoints with :func:`save_checkpoint` and
:func:`load_checkpoint` below.

**parallel = "data"**: every rank trains every SAE on its part of each step's batch.
``batch_size`` stays the *global* tokens per step; each rank reads ``batch_size / world`` of them
(synthetic data: rank r at step i reads batch index ``i·world + r`` of ``batch_size / world``
tokens). Per step and SAE (:meth:`saekit.train.member.Member.train_step`): one bucketed
all-reduce of the gradients (averaged; ``None`` grads stay ``None`` only if they are ``None`` on
every rank), one of the "fired" mask (MAX = logical OR; the counters then add the global batch),
and for BatchTopK one MIN of the smallest kept activation, so every rank holds identical weights,
Adam moments, ``tokens_since_fired`` and θ. With the λ controller, L0 is averaged too. Logged
metrics are averaged over ranks in the one transfer of each log interval. Rank 0 writes logs,
checkpoints and the final SAEs; the others wait at a barrier.

Differences from one process on the concatenated batch (everything else matches to float
rounding; see tests/train/test_distributed.py):

- BatchTopK keeps the k·N_local largest activations of each rank's batch, not the k·N_global
  largest of the concatenated batch (sparsify does the same): the L0 per token is still k on
  average, but which activations are kept differs slightly. θ follows the union of the kept sets:
  its EMA input is the MIN over ranks of each rank's smallest positive kept activation.
- Per-batch statistics inside a loss are per rank: AuxK's normaliser V (``auxk_normalizer:
  residual``) and the BatchTopK threshold of the pre-activation revival loss. With
  ``auxk_normalizer: none`` AuxK matches exactly.
- ``reconstruction_tilt`` t ≠ 0 tilts each rank's own tokens (its own m and logsumexp): the
  gradient is the mean over ranks of each rank's tilted gradient, not the tilt of the whole
  batch (t = 0, the mean, matches exactly).
- Logged FVU is the mean over ranks of each rank's batch FVU (as it is already a mean over steps).
- Resuming on a different world size continues at the same step with the same global batch, but
  reads other tokens (rank r reads index ``step·world' + r``, of ``batch_size / world'`` tokens):
  a statistically identical stream, not the identical one. Same world size: exact.

**parallel = "sweep"**: SAE i trains on rank ``i % world``; every rank sees the whole batch
(synthetic: each rank generates it, which is cheap; other sources: rank 0 reads and broadcasts each
batch, :class:`saekit.data.sources.distributed.BroadcastSource`). Each SAE gets exactly the result
of training it alone: its member's comm is a :class:`LocalComm`. Ranks meet once per log interval
(stop agreement) and at checkpoints, where the members' states are gathered to rank 0 and written as
one ordinary checkpoint (resumable on any world size, or by one process). Final SAEs and reports are
gathered to rank 0, which writes them and ``summary.json``; each rank writes ``metrics.jsonl`` of
its own SAEs (so ``out_dir`` must be on a filesystem every rank shares, as it must for resuming).

**parallel = {data: D, latent: T}**: every SAE's latents split over T processes, each batch over
D groups of them: its own member, step and sharded checkpoints
(:mod:`saekit.train.latent_parallel`).

A failed collective raises :class:`saekit.train.launch.DistributedFailure`; the last checkpoint
stays loadable (it is written atomically). A signal is honoured at the next log interval, where
the ranks agree to stop together.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import Tensor

from saekit.core.atomic import atomic_write_text
from saekit.core.comm import Comm, LocalComm
from saekit.train.checkpoint import (
    MemberState,
    checkpoint_dir,
    read_training_checkpoint,
    write_training_checkpoint,
)

PARALLEL_FILE = "parallel.json"  # world size of the last checkpoint (data position on resume)


def sweep_indices(n_saes: int, rank: int, world_size: int) -> list[int]:
    """The SAEs rank ``rank`` trains in a sweep: i with i % world_size == rank."""
    return [i for i in range(n_saes) if i % world_size == rank]


def trained_here(parallel: str, n_saes: int, comm: Comm) -> list[int]:
    """Indices of the run's SAEs this rank trains: all of them, or its share of a sweep."""
    if parallel == "sweep":
        return sweep_indices(n_saes, comm.rank, comm.world_size)
    return list(range(n_saes))


def batch_comm(parallel: str, comm: Comm) -> Comm:
    """The comm of the ranks that split each batch: all of them (data), none (sweep)."""
    return LocalComm() if parallel == "sweep" else comm


def writes_logs(parallel: str, comm: Comm) -> bool:
    """Whether this rank writes metrics.jsonl of its members and calls the log callbacks."""
    return parallel == "sweep" or comm.is_main


# ------------------------------------------------------------------------- gathering


def gather_indexed(
    comm: Comm, tensors: dict[int, dict[str, Tensor]], meta: dict[int, Any], what: str
) -> tuple[dict[int, dict[str, Tensor]], dict[int, Any]] | None:
    """Gather per-SAE tensors and JSON metadata, keyed by global SAE index, to rank 0 (None on
    the others): one safetensors payload per rank."""
    flat = {
        f"{i}.{key}": value.detach().contiguous().cpu()
        for i, own in tensors.items()
        for key, value in own.items()
    }
    payload = save_safetensors_bytes(
        flat, metadata={"meta": json.dumps({str(i): m for i, m in meta.items()})}
    )
    parts = comm.gather(payload, what)
    if parts is None:
        return None
    all_tensors: dict[int, dict[str, Tensor]] = {}
    all_meta: dict[int, Any] = {}
    for part in parts:
        part_tensors = load_safetensors_bytes(part)
        header = json.loads(part[8 : 8 + int.from_bytes(part[:8], "little")])
        for key, value in json.loads(header["__metadata__"]["meta"]).items():
            i = int(key)
            all_meta[i] = value
            start = f"{key}."
            all_tensors[i] = {
                k[len(start) :]: v for k, v in part_tensors.items() if k.startswith(start)
            }
    return all_tensors, all_meta


# ------------------------------------------------------------------------- checkpoints


def save_checkpoint(
    comm: Comm,
    parallel: str,
    run_dir: Path,
    step: int,
    config: dict[str, Any],
    states: dict[int, MemberState],
) -> Path:
    """Checkpoint the run: ``states`` are this rank's members' by global index, ``config`` the
    whole run's. One process writes them; data parallel: rank 0 writes its own (every rank's
    are the same); sweep: rank 0 gathers every rank's and writes them as one ordinary checkpoint.
    With the torch RNG state of the writer, and beside it the parallel record."""
    if comm.world_size == 1:
        rng = torch.get_rng_state()
        return write_training_checkpoint(run_dir, step, config, list(states.values()), rng)
    every: list[MemberState] | None = list(states.values()) if comm.is_main else None
    if parallel == "sweep":
        gathered = gather_indexed(
            comm,
            {i: s.tensors for i, s in states.items()},
            {i: {"name": s.name, "meta": s.meta} for i, s in states.items()},
            "checkpoint state",
        )
        if gathered is not None:
            tensors, meta = gathered
            every = [
                MemberState(meta[i]["name"], tensors[i], meta[i]["meta"]) for i in sorted(meta)
            ]
    if every is not None:
        write_training_checkpoint(run_dir, step, config, every, torch.get_rng_state())
        write_parallel_record(run_dir, parallel, comm.world_size, step)
    comm.barrier("barrier(after checkpoint)")
    return checkpoint_dir(run_dir)


def load_checkpoint(
    comm: Comm, parallel: str, run_dir: Path, names: list[str], indices: list[int]
) -> tuple[int, list[MemberState]]:
    """The step and the states of this rank's members (``indices`` into the run's SAEs, named
    ``names``, which the checkpoint must hold in that order); restores the RNG."""
    checkpoint = read_training_checkpoint(run_dir, names)
    torch.set_rng_state(checkpoint.torch_rng)
    step = checkpoint.step
    if parallel == "data" and comm.world_size > 1:
        readers = data_readers(run_dir, step)
        if comm.is_main and readers != comm.world_size:
            print(
                f"saekit: resuming at step {step} on {comm.world_size} processes a checkpoint "
                f"whose stream was read by {readers}: same global batch, but rank r now reads "
                f"batch index step·{comm.world_size} + r, so the tokens differ from the "
                "uninterrupted run's",
                file=sys.stderr,
            )
    return step, [checkpoint.members[i] for i in indices]


def write_parallel_record(run_dir: Path, parallel: str, world_size: int, step: int) -> None:
    """Beside the checkpoint (not in it: its format is the single-process one)."""
    record = {"parallel": parallel, "world_size": world_size, "step": step}
    atomic_write_text(Path(run_dir) / PARALLEL_FILE, json.dumps(record) + "\n")


def data_readers(run_dir: Path, step: int) -> int:
    """Into how many parts the run checkpointed at ``step`` split each batch: its data-parallel
    world size, else 1 (one process or a sweep; also for a record left by an older checkpoint)."""
    path = Path(run_dir) / PARALLEL_FILE
    record = json.loads(path.read_text()) if path.is_file() else {}
    if record.get("parallel") == "data" and record.get("step") == step:
        return int(record["world_size"])
    return 1
