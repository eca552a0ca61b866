"""Latent parallelism on gloo: 2 and 4 CPU processes against one process (float64).

The workers run the real launch path (:func:`saekit.train.run_distributed.run_distributed`, the
process groups of :mod:`saekit.train.mesh`), record the latents every objective call selects
and save their parts; the test puts the parts together. The same checks on every configuration
and mesh run fast on threads in tests/train/test_latent_member.py.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from test_latent_member import (
    BATCHTOPK,
    JUMPRELU_L0,
    MATRYOSHKA,
    SAES,
    STEPS,
    TOPK_AUXK,
    TRANSCODER,
    assert_same,
    one_process,
    record_selections,
    run_config,
)

from saekit.model.sae import SAE
from saekit.train.checkpoint import checkpoint_dir

TIMEOUT_S = 5  # of the failure tests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_env(rank: int, port: int, world: int, timeout_s: float) -> None:
    """What torchrun sets for a worker."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        SAEKIT_DIST_TIMEOUT=str(timeout_s),
    )
    torch.set_num_threads(1)


def spawn(fn, world: int, *args) -> list:
    """Start ``world`` workers ``fn(rank, port, world, *args)``; the processes, not joined."""
    mp.set_forkserver_preload(["torch", "saekit.train.run", "test_latent_parallel"])
    ctx = mp.start_processes(
        fn, args=(free_port(), world, *args), nprocs=world, join=False, start_method="forkserver"
    )
    return ctx.processes


def join_all(processes, timeout_s: float) -> list[int | None]:
    deadline = time.monotonic() + timeout_s
    for p in processes:
        p.join(max(0.0, deadline - time.monotonic()))
    codes = [p.exitcode for p in processes]
    for p in processes:
        if p.is_alive():
            p.kill()
            p.join()
    return codes


def save_rank(trainer, path: Path, selected: list[torch.Tensor] | None = None) -> None:
    """This rank's member states (its parts) and selections, for the test to put together."""
    out = {
        f"{m.cfg.name}.{k}": v.detach().clone().contiguous()
        for m in trainer.members
        for k, v in m.state_tensors().items()
    }
    for j, mask in enumerate(selected or []):
        out[f"selected.{j}"] = mask.to(torch.uint8).contiguous()
    save_file(out, str(path))


def whole(out_dir: Path, D: int, T: int, names_keys: dict[str, set[str]]) -> dict:
    """Every member's whole state from the rank files (parts of data group 0 concatenated), and
    each call's selection over the whole batch; data groups must hold the same parts."""
    ranks = [load_file(str(out_dir / f"rank{r}.safetensors")) for r in range(D * T)]
    states, selections = {}, []
    for key, value in ranks[0].items():
        for r in range(T, D * T):
            assert torch.equal(ranks[r][key], ranks[r % T][key]) or key.startswith("selected.")
        if key.startswith("selected."):
            continue
        name, rest = key.split(".", 1)
        part = rest in names_keys[name]
        states[key] = torch.cat([ranks[t][key] for t in range(T)]) if part else value
    for j in range(sum(k.startswith("selected.") for k in ranks[0])):
        rows = [
            torch.cat([ranks[d * T + t][f"selected.{j}"] for t in range(T)], 1) for d in range(D)
        ]
        selections.append(torch.cat(rows).bool())
    return {"states": states, "selections": selections}


# ---------------------------------------------------------------------- workers


def _equality_worker(rank: int, port: int, world: int, out_dir: str, runs: str) -> None:
    """Each run (mesh, SAEs, d_out) in turn in one process group: parts and selections saved,
    with the part keys of every member."""
    from saekit.train.launch import init_from_env
    from saekit.train.run_distributed import run_distributed

    join_env(rank, port, world, timeout_s=60)
    init_from_env("cpu")
    for name, (D, T), saes, d_out in json.loads(runs):
        with pytest.MonkeyPatch.context() as monkeypatch:
            seen = record_selections(monkeypatch)
            run_dir = Path(out_dir) / name
            trainer, reports = run_distributed(
                run_config(run_dir, saes, {"data": D, "latent": T}, d_out)
            )
        assert (len(reports) == len(saes)) == (rank == 0)
        save_rank(trainer, run_dir / f"rank{rank}.safetensors", next(iter(seen.values())))
        keys = {m.cfg.name: sorted(m.part_state_keys()) for m in trainer.members}
        (run_dir / "part_keys.json").write_text(json.dumps(keys))
    torch.distributed.destroy_process_group()


def check_equal(tmp_path: Path, out: Path, name: str, D: int, T: int, saes, d_out=None):
    """The mesh run ``name`` against one process: every selection, every state, and the SAE
    directories rank 0 gathered and wrote (what SAE.load and every command read)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        seen = record_selections(monkeypatch)
        expected = one_process(run_config(tmp_path / f"one-{name}", saes, d_out=d_out))
    keys = {k: set(v) for k, v in json.loads((out / name / "part_keys.json").read_text()).items()}
    got = whole(out / name, D, T, keys)
    reference = seen["MainThread"]
    assert len(got["selections"]) == len(reference) == STEPS * len(saes)
    for j, (a, b) in enumerate(zip(reference, got["selections"], strict=True)):
        assert torch.equal(a, b), f"{name}: step {j // len(saes)}, SAE {j % len(saes)}"
    assert_same(expected, got["states"])
    cfg = run_config(out / name, saes, d_out=d_out)
    for s in cfg.saes:
        sae = SAE(s.sae)
        sae.load_state_dict({k[len(s.name) + 5 :]: v for k, v in expected.items() if
                             k.startswith(f"{s.name}.sae.")})  # fmt: skip
        saved = SAE.load(out / name / s.name)
        folded = sae.folded_copy()
        for key, value in folded.state_dict().items():
            if key != "activation.threshold" or not s.sae.activation.kind == "batchtopk":
                torch.testing.assert_close(saved.state_dict()[key], value, msg=key)
        assert (out / name / s.name / "eval.json").is_file()


# ---------------------------------------------------------------------- tests


def test_two_gloo_processes_train_a_latent_sharded_sae_as_one_process(tmp_path):
    """T = 2 on gloo: TopK + AuxK selects the same latents at each of 20 steps and ends with
    the same weights as one process; rank 0 writes the gathered SAE (the other configurations:
    the slow test below, and on threads tests/train/test_latent_member.py)."""
    out = tmp_path / "mesh"
    runs = [["t2", [1, 2], [TOPK_AUXK], None]]
    assert join_all(spawn(_equality_worker, 2, str(out), json.dumps(runs)), 120) == [0, 0]
    check_equal(tmp_path, out, "t2", 1, 2, [TOPK_AUXK])


@pytest.mark.slow  # 4 processes, ~1 min on 2 cores; CI runs it (make test-slow)
def test_four_gloo_processes_train_every_configuration_as_one_process(tmp_path):
    """T = 4 and D = 2 × T = 2 on gloo, every configuration, and a transcoder."""
    out = tmp_path / "mesh"
    runs = [
        ["t4", [1, 4], SAES, None],
        ["d2t2", [2, 2], SAES, None],
        ["transcoder", [2, 2], [TRANSCODER], 8],
    ]
    assert join_all(spawn(_equality_worker, 4, str(out), json.dumps(runs)), 600) == [0] * 4
    check_equal(tmp_path, out, "t4", 1, 4, SAES)
    check_equal(tmp_path, out, "d2t2", 2, 2, SAES)
    check_equal(tmp_path, out, "transcoder", 2, 2, [TRANSCODER], 8)


KILLED = [TOPK_AUXK, BATCHTOPK, JUMPRELU_L0, MATRYOSHKA]


def _killed_worker(rank: int, port: int, world: int, out_dir: str) -> None:
    """D = 2 × T = 2, checkpoints every 5 steps; every rank stops in step 12 and waits for
    the kill."""
    from saekit.train.latent_member import LatentMember
    from saekit.train.run_distributed import run_distributed

    join_env(rank, port, world, timeout_s=120)
    train_step = LatentMember.train_step

    def waiting_train_step(self, x, step):
        if step == 12:
            (Path(out_dir) / f"waiting{rank}").write_text("")
            time.sleep(300)
        return train_step(self, x, step)

    LatentMember.train_step = waiting_train_step
    run_distributed(run_config(Path(out_dir), KILLED, {"data": 2, "latent": 2}, checkpoint_every=5))


def _resumed_worker(rank: int, port: int, world: int, out_dir: str) -> None:
    from saekit.train.run import resume_config
    from saekit.train.run_distributed import run_distributed

    join_env(rank, port, world, timeout_s=60)
    trainer, _ = run_distributed(resume_config(out_dir), resume=True)
    save_rank(trainer, Path(out_dir) / f"rank{rank}.safetensors")
    keys = {m.cfg.name: sorted(m.part_state_keys()) for m in trainer.members}
    (Path(out_dir) / "part_keys.json").write_text(json.dumps(keys))


@pytest.mark.slow  # a kill -9 of 4 processes and a resume on 2; CI runs it (make test-slow)
def test_a_run_killed_mid_way_resumes_on_another_mesh_where_it_would_have_been(tmp_path):
    """Killed (SIGKILL, every rank) in step 12 of 20 on D = 2 × T = 2, resumed from the step-10
    checkpoint on D = 1 × T = 2 (config.yaml's parallel edited): the same 20-step states as
    one process, and the metrics log of an uninterrupted run."""
    run_dir = tmp_path / "run"
    processes = spawn(_killed_worker, 4, str(run_dir))
    deadline = time.monotonic() + 300
    while not all((run_dir / f"waiting{r}").exists() for r in range(4)):
        assert time.monotonic() < deadline and all(p.is_alive() for p in processes)
        time.sleep(0.1)
    for p in processes:
        os.kill(p.pid, signal.SIGKILL)
    join_all(processes, 10)
    assert json.loads((run_dir / "parallel.json").read_text())["step"] == 10
    config = (run_dir / "config.yaml").read_text()
    assert "  data: 2\n  latent: 2\n" in config
    (run_dir / "config.yaml").write_text(config.replace("  data: 2\n", "  data: 1\n"))
    assert join_all(spawn(_resumed_worker, 2, str(run_dir)), 300) == [0, 0]
    keys = {k: set(v) for k, v in json.loads((run_dir / "part_keys.json").read_text()).items()}
    expected = one_process(run_config(tmp_path / "one", KILLED))
    assert_same(expected, whole(run_dir, 1, 2, keys)["states"])
    name = run_config(run_dir, KILLED).saes[0].name
    steps = [json.loads(line)["step"] for line in (run_dir / name / "metrics.jsonl").open()]
    assert steps == [5, 10, 15, 20]


def _failing_worker(rank: int, port: int, world: int, out_dir: str, mode: str) -> None:
    """Rank 1 dies (os._exit) or hangs at the start of its 4th step; rank 0 must fail cleanly."""
    from saekit.train.latent_member import LatentMember
    from saekit.train.launch import DistributedFailure
    from saekit.train.run_distributed import run_distributed

    join_env(rank, port, world, timeout_s=TIMEOUT_S)
    train_step = LatentMember.train_step

    def faulty_train_step(self, x, step):
        if rank == 1 and step == 3:
            (Path(out_dir) / "fault_time").write_text(repr(time.time()))
            if mode == "die":
                os._exit(3)
            time.sleep(300)
        return train_step(self, x, step)

    LatentMember.train_step = faulty_train_step
    cfg = run_config(Path(out_dir), [TOPK_AUXK], {"latent": 2}, checkpoint_every=2, steps=50)
    try:
        run_distributed(cfg)
    except DistributedFailure as exc:
        (Path(out_dir) / f"error{rank}.txt").write_text(f"{time.time()!r}\n{exc}")
        sys.exit(1)


@pytest.mark.slow  # waits out a process-group timeout; CI runs it (make test-slow)
@pytest.mark.parametrize("mode", ["die", "hang"])
def test_a_dead_or_hung_part_stops_the_other_with_a_named_error(tmp_path, mode):
    """Rank 1 (latent part 1) dies or hangs in step 4: rank 0 exits non-zero with an error
    naming the collective, at once (die) or within the timeout (hang), and the step-2
    checkpoint stays loadable: resumed, and as a whole SAE."""
    from saekit.train.latent_checkpoint import gathered_state

    out = tmp_path / "run"
    out.mkdir()
    processes = spawn(_failing_worker, 2, str(out), mode)
    processes[0].join(60)
    survivor_code = processes[0].exitcode
    join_all(processes, 0)
    assert survivor_code == 1
    fault = float((out / "fault_time").read_text())
    failed_at, message = (out / "error0.txt").read_text().split("\n", 1)
    assert float(failed_at) - fault < (3 if mode == "die" else TIMEOUT_S + 10)
    assert "rank 0/2" in message and "failed: another rank died or did not respond" in message
    assert "saekit train --resume" in message
    meta = json.loads((checkpoint_dir(out) / "state.json").read_text())
    assert meta["step"] == 2 and meta["latent"]["parts"] == 2
    cfg = run_config(out, [TOPK_AUXK], steps=50)
    sae = SAE(cfg.saes[0].sae)
    sae.load_state_dict(gathered_state(out, 0))
    assert torch.isfinite(sae.W_dec).all()
