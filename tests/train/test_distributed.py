"""Data- and sweep-parallel training: 2 gloo processes on the CPU against one process.

Each test spawns its workers (``torch.multiprocessing``, a free port on 127.0.0.1); workers are
module-level functions so the spawn start method can import them.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from saekit.data.sources.interface import ActivationSource
from saekit.data.sources.synthetic import SyntheticSource
from saekit.data.synthetic.generator import SyntheticData
from saekit.train.config import build_run_config
from saekit.train.launch import launch_command
from saekit.train.parallel import sweep_indices
from saekit.train.trainer import Trainer

WORLD = 2
BATCH = 64  # global tokens per step: 32 per rank
TIMEOUT_S = 5  # of the failure tests
SYNTHETIC = {"d": 16, "n_features": 48, "mean_l0": 3.0}

# A TopK SAE with AuxK (normaliser "none": exact under data parallelism) and dead latents after
# one batch without firing, so the dead counters and AuxK both matter within 4 steps; and a
# BatchTopK SAE (its θ must agree across ranks).
TOPK = {
    "sae": {"d_sae": 64, "activation": {"kind": "topk", "k": 3}},
    "lr": 1e-2,
    "warmup_steps": 1,
    "decay_start": 1.0,  # no decay: a 2-step run resumed to 4 steps equals a 4-step run
    "dead_tokens": BATCH,
    "revival": {"kind": "auxk", "normalizer": "none"},
    "seed": 1,
}
BATCHTOPK = {
    "sae": {"d_sae": 64, "activation": {"kind": "batchtopk", "k": 3}},
    "lr": 1e-2,
    "warmup_steps": 1,
    "decay_start": 1.0,
    "seed": 2,
}
RELU_L1 = {
    "sae": {"d_sae": 32, "activation": "relu"},
    "lr": 1e-2,
    "penalty": {"kind": "l1", "coefficient": 0.05, "target_l0": 4.0},  # the λ controller
    "seed": 3,
}


def run_config(out_dir: Path, saes: list[dict], steps: int, parallel: str = "data", **extra):
    return build_run_config(
        {
            "data": {"source": "synthetic", "synthetic": SYNTHETIC},
            "saes": saes,
            "batch_size": BATCH,
            "steps": steps,
            "log_every": 2,
            "checkpoint_every": 2,
            "eval_tokens": 128,
            "out_dir": str(out_dir),
            "progress": False,
            "parallel": parallel,
            **extra,
        }
    )


def clt_sweep_config(out_dir: Path):
    """Two cross-layer transcoders on the multihook source (the gathered weights are a CLT's)."""
    train = {"lr": 1e-2, "warmup_steps": 1, "decay_start": 1.0}
    saes = [
        {"name": kind, "sae": {"kind": "clt", "d_sae": 8, "activation": {"kind": kind, "k": k}}}
        | train
        for kind, k in (("topk", 2), ("batchtopk", 3))
    ]
    hooks = [f"layers.{i}.mlp" for i in range(3)]
    return build_run_config(
        {
            "data": {
                "source": "multihook",
                "multihook": {"kind": "clt", "n_layers": 3, "d": 8, "n_features": 16},
                "input_hooks": [f"{h}:input" for h in hooks],
                "target_hooks": hooks,
            },
            "saes": saes,
            "batch_size": BATCH,
            "steps": 3,
            "eval_tokens": 128,
            "out_dir": str(out_dir),
            "progress": False,
            "parallel": "sweep",
        }
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_group_env(rank: int, port: int, timeout_s: float) -> None:
    """What torchrun sets for a worker."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        SAEKIT_DIST_TIMEOUT=str(timeout_s),
    )
    torch.set_num_threads(1)


def spawn(fn, *args) -> list:
    """Start WORLD workers ``fn(rank, port, *args)``; the processes, not joined."""
    # forkserver: torch and saekit are imported once, by the server, not by every worker
    mp.set_forkserver_preload(["torch", "saekit.train.run", "test_distributed"])
    ctx = mp.start_processes(
        fn, args=(free_port(), *args), nprocs=WORLD, join=False, start_method="forkserver"
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


def member_states(trainer) -> dict[str, torch.Tensor]:
    return {
        f"{m.cfg.name}.{k}": v.detach().clone().cpu()
        for m in trainer.members
        for k, v in m.state_tensors().items()
    }


class FakeModelSource(ActivationSource):
    """A stand-in for a model source (cache or hf), in float16; batch i is filled with i."""

    def batches(self, start: int = 0):
        i = start
        while True:
            yield torch.full((8, 4), float(i), dtype=torch.float16) + torch.arange(4)
            i += 1

    def sample_for_init(self) -> torch.Tensor:
        return torch.arange(12.0).reshape(3, 4)

    def eval_batches(self, n_tokens: int, batch_size: int):
        for start in range(0, n_tokens, batch_size):
            yield torch.arange(start, min(n_tokens, start + batch_size), dtype=torch.float32), None


# ---------------------------------------------------------------------- workers


def _parallel_runs_worker(rank: int, port: int, out_dir: str) -> None:
    """Data parallel (2 steps, then resumed to 4), then a sweep, in one process group."""
    from saekit.train.launch import init_from_env
    from saekit.train.run import resume_config
    from saekit.train.run_distributed import run_distributed

    join_group_env(rank, port, timeout_s=30)
    init_from_env("cpu")  # one group for the three runs (run_distributed reuses it)
    check_collectives(rank, Path(out_dir))
    data_dir = Path(out_dir) / "data"
    run_distributed(run_config(data_dir, [TOPK, BATCHTOPK], steps=2))
    trainer, _ = run_distributed(resume_config(data_dir, 4), resume=True)
    save_file(member_states(trainer), str(data_dir / f"rank{rank}.safetensors"))
    sweep = run_config(
        Path(out_dir) / "sweep", [TOPK, BATCHTOPK, RELU_L1], steps=4, parallel="sweep"
    )
    run_distributed(sweep)
    run_distributed(clt_sweep_config(Path(out_dir) / "clt-sweep"))
    stop_on_a_signal_to_rank_1(rank, Path(out_dir) / "signal")
    for parallel in ("sweep", "data"):  # a model source: broadcast (sweep), split by rank (data)
        cache_cfg = cache_run_config(Path(out_dir), parallel)
        run_distributed(cache_cfg)

    from saekit.data.sources.distributed import BroadcastSource
    from saekit.train.comm import ProcessGroupComm

    comm = ProcessGroupComm(init_from_env("cpu"))
    source = BroadcastSource(FakeModelSource() if rank == 0 else None, comm)
    batches = source.batches(start=5)
    received = {"batch5": next(batches), "batch6": next(batches), "init": source.sample_for_init()}
    for _ in range(2):  # the second pass reads the kept copies: no collective
        for j, (x, coefficients) in enumerate(source.eval_batches(40, 16)):
            assert coefficients is None
            received[f"eval{j}"] = x
    save_file(received, str(Path(out_dir) / f"broadcast{rank}.safetensors"))
    torch.distributed.destroy_process_group()


def check_collectives(rank: int, out_dir: Path) -> None:
    """Every collective of ProcessGroupComm on rank-dependent inputs; the results saved."""
    from saekit.train.comm import ProcessGroupComm
    from saekit.train.launch import init_from_env

    comm = ProcessGroupComm(init_from_env("cpu"))
    got = {}
    for op in ("sum", "avg", "min", "max"):
        x = torch.tensor([rank + 1.0, 10.0 * (rank + 1)])
        assert comm.all_reduce(x, op) is x  # in place
        got[op] = x
    got["broadcast"] = comm.broadcast(torch.full((3,), float(rank)), src=1)
    parts = comm.gather(bytes([rank]) * (rank + 2))
    assert (parts is None) == (rank != 0)
    got["gather"] = torch.tensor(list(b"|".join(parts or [])), dtype=torch.uint8)
    got["stop"] = torch.tensor([comm.agree_stop(15 if rank == 1 else None) or 0])
    comm.barrier()
    save_file(got, str(out_dir / f"collectives{rank}.safetensors"))


def cache_run_config(out_dir: Path, parallel: str, cache_dir: Path | None = None):
    return build_run_config(
        {
            "data": {"source": "cache", "cache_dir": str(cache_dir or out_dir / "cache")},
            "saes": [TOPK, BATCHTOPK],
            "batch_size": BATCH,
            "steps": 3,
            "eval_tokens": 64,
            "out_dir": str(out_dir / f"cache-{parallel}"),
            "progress": False,
            "parallel": parallel,
        }
    )


def stop_on_a_signal_to_rank_1(rank: int, out_dir: Path) -> None:
    """SIGTERM reaches rank 1 only, in step 1: both ranks stop at the next log step (2)."""
    from saekit.train.member import Member
    from saekit.train.run_distributed import run_distributed
    from saekit.train.trainer import TrainingInterrupted

    train_step = Member.train_step

    def signalled_train_step(self, x, step):
        if rank == 1 and step == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        return train_step(self, x, step)

    Member.train_step = signalled_train_step
    message = "not stopped"
    try:
        run_distributed(run_config(out_dir, [TOPK], steps=10, checkpoint_every=0))
    except TrainingInterrupted as exc:
        message = str(exc)
    finally:
        Member.train_step = train_step
    (out_dir / f"stopped{rank}.txt").write_text(message)


@pytest.fixture(scope="module")
def parallel_runs(tmp_path_factory) -> Path:
    """One spawn of 2 workers for the data-parallel and the sweep-parallel checks."""
    from saekit.data.cache.writing import write_cache

    out = tmp_path_factory.mktemp("parallel")
    g = torch.Generator().manual_seed(0)
    acts = [torch.randn(128, SYNTHETIC["d"], generator=g) + 1 for _ in range(5)]
    write_cache(out / "cache", acts, "blocks.0:output", "fake-model", shard_tokens=128)
    assert join_all(spawn(_parallel_runs_worker, str(out)), 120) == [0, 0]
    return out


def _failing_worker(rank: int, port: int, out_dir: str, mode: str) -> None:
    """Rank 1 dies (os._exit) or hangs at the start of its 4th step; rank 0 must fail cleanly."""
    from saekit.train.launch import DistributedFailure
    from saekit.train.member import Member
    from saekit.train.run_distributed import run_distributed

    join_group_env(rank, port, timeout_s=TIMEOUT_S)
    train_step = Member.train_step

    def faulty_train_step(self, x, step):
        if rank == 1 and step == 3:
            (Path(out_dir) / "fault_time").write_text(repr(time.time()))
            if mode == "die":
                os._exit(3)
            time.sleep(300)
        return train_step(self, x, step)

    Member.train_step = faulty_train_step
    try:
        run_distributed(run_config(Path(out_dir), [TOPK], steps=50))
    except DistributedFailure as exc:
        (Path(out_dir) / f"error{rank}.txt").write_text(f"{time.time()!r}\n{exc}")
        sys.exit(1)


# ---------------------------------------------------------------------- tests


class ConcatenatedSource(SyntheticSource):
    """One process reading, at step i, the batches both ranks read: indices 2i and 2i + 1."""

    def batches(self, start: int = 0):
        i = start
        while True:
            half = self.batch_size // WORLD
            yield torch.cat([self.data.batch(i * WORLD + r, half).x for r in range(WORLD)])
            i += 1


def test_data_parallel_equals_one_process_on_the_concatenated_batches(parallel_runs, tmp_path):
    """2 ranks × 32 tokens, 2 steps, checkpoint, resumed to 4 steps == 1 process × 64 tokens:
    weights, Adam moments and dead counters (TopK + AuxK); every rank holds the same state,
    including the BatchTopK threshold."""
    run_dir = parallel_runs / "data"

    cfg = run_config(tmp_path / "single", [TOPK, BATCHTOPK], steps=4)
    single = Trainer(cfg, ConcatenatedSource(SyntheticData(cfg.data.synthetic), BATCH))
    single.fit(progress=False)
    expected = member_states(single)
    ranks = [load_file(str(run_dir / f"rank{r}.safetensors")) for r in range(WORLD)]

    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), f"ranks disagree on {key}"
    topk = cfg.saes[0].name
    compared = [k for k in expected if k.startswith(f"{topk}.")]
    assert {f"{topk}.sae.W_enc", f"{topk}.opt.0.exp_avg_sq", f"{topk}.tokens_since_fired"} <= set(
        compared
    )
    for key in compared:
        torch.testing.assert_close(ranks[0][key], expected[key], rtol=1e-4, atol=1e-6, msg=key)
    dead = ranks[0][f"{topk}.tokens_since_fired"]
    assert (dead >= BATCH).any() and (dead == 0).any()  # some latents dead, some alive
    # NVIDIA recipe anchor (per-rank dead counters): the counters equal (above) those of one
    # process fed 64-token batches, so they grow by the GLOBAL batch per step on every rank
    # (a per-rank counter would grow by BATCH / WORLD = 32 and differ).
    assert (dead % BATCH == 0).all() and int(dead.max()) <= 4 * BATCH
    theta = ranks[0][f"{cfg.saes[1].name}.sae.activation.threshold"]
    assert theta > 0
    # rank 0 wrote the outputs, with metrics averaged over ranks
    assert json.loads((run_dir / "parallel.json").read_text())["world_size"] == WORLD
    metrics = (run_dir / topk / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in metrics] == [2, 4]
    assert len(json.loads((run_dir / "summary.json").read_text())) == 2


def test_sweep_parallel_gives_each_sae_the_result_of_training_it_alone(parallel_runs, tmp_path):
    """3 SAEs over 2 ranks (2 + 1): the gathered checkpoint, read by one process, equals a
    one-process run of the same sweep, exactly; rank 0 writes every SAE and the summary."""
    assert sweep_indices(3, 0, 2) == [0, 2] and sweep_indices(3, 1, 2) == [1]
    run_dir = parallel_runs / "sweep"

    cfg = run_config(tmp_path / "single", [TOPK, BATCHTOPK, RELU_L1], steps=4)
    single = Trainer(cfg, SyntheticSource(SyntheticData(cfg.data.synthetic), BATCH))
    single.fit(progress=False)
    gathered = Trainer(
        run_config(run_dir, [TOPK, BATCHTOPK, RELU_L1], steps=4),
        SyntheticSource(SyntheticData(cfg.data.synthetic), BATCH),
    )
    gathered.load_checkpoint()
    assert gathered.step == 4
    expected, got = member_states(single), member_states(gathered)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [r["name"] for r in summary] == [s.name for s in cfg.saes]
    for s in cfg.saes:
        assert (run_dir / s.name / "sae.safetensors").is_file()
        assert (run_dir / s.name / "metrics.jsonl").is_file()


def test_sweep_parallel_of_cross_layer_transcoders_saves_each_as_one_process_does(
    parallel_runs, tmp_path
):
    """Two CLTs over 2 ranks: rank 0 rebuilds each gathered CLT (once built as an SAE: an
    AttributeError after training) and saves what one process saves, exactly."""
    from saekit.model.clt import CrossLayerTranscoder
    from saekit.model.dictionary import load_dictionary
    from saekit.train.run import run_training

    cfg = clt_sweep_config(tmp_path / "single")
    run_training(cfg)
    for s in cfg.saes:
        got = load_dictionary(parallel_runs / "clt-sweep" / s.name)
        expected = load_dictionary(tmp_path / "single" / s.name)
        assert isinstance(got, CrossLayerTranscoder)
        for key, value in expected.state_dict().items():
            assert torch.equal(got.state_dict()[key], value), (s.name, key)


@pytest.mark.slow  # waits out a process-group timeout; CI runs it (make test-slow)
@pytest.mark.parametrize("mode", ["die", "hang"])
def test_a_dead_or_hung_rank_stops_the_other_with_an_error(tmp_path, mode):
    """Rank 1 dies (os._exit) or hangs in step 4; rank 0 exits non-zero with a clear error at once
    (die) or within the timeout (hang), and the step-2 checkpoint stays loadable."""
    out = tmp_path / "run"
    out.mkdir()
    processes = spawn(_failing_worker, str(out), mode)
    deadline_s = 60
    processes[0].join(deadline_s)
    survivor_code = processes[0].exitcode
    join_all(processes, 0)  # kill the hung rank
    assert survivor_code == 1
    fault = float((out / "fault_time").read_text())
    failed_at, message = (out / "error0.txt").read_text().split("\n", 1)
    assert float(failed_at) - fault < (3 if mode == "die" else TIMEOUT_S + 10)
    assert "rank 0/2" in message and "another rank died or did not respond" in message
    assert "saekit train --resume" in message

    cfg = run_config(out, [TOPK], steps=50)
    resumed = Trainer(cfg, SyntheticSource(SyntheticData(cfg.data.synthetic), BATCH))
    resumed.load_checkpoint()
    assert resumed.step == 2  # the last periodic checkpoint


@pytest.mark.slow  # a real torchrun launch, ~17 s; CI runs it (make test-slow)
def test_nproc_flag_launches_torchrun_and_only_rank_0_reports(tmp_path):
    out = tmp_path / "cli"
    argv = ["train", "--nproc", "2", "--steps", "2", "--batch-size", "64", "--out", str(out)]
    assert launch_command(2, argv)[-7:] == [
        "train",
        "--steps",
        "2",
        "--batch-size",
        "64",
        "--out",
        str(out),
    ]
    sets = ["saes.0.sae.d_sae=32", "eval_tokens=128", "data.synthetic.n_features=64", "log_every=1"]
    cmd = [sys.executable, "-m", "saekit", *argv, "--no-progress", *[f"--set={s}" for s in sets]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("| SAE |") == 1  # one summary table, from rank 0
    assert json.loads((out / "parallel.json").read_text())["world_size"] == 2
    assert len(json.loads((out / "summary.json").read_text())) == 1


def test_process_group_collectives_combine_every_rank(parallel_runs):
    for rank in range(WORLD):
        got = load_file(str(parallel_runs / f"collectives{rank}.safetensors"))
        assert got["sum"].tolist() == [3.0, 30.0] and got["avg"].tolist() == [1.5, 15.0]
        assert got["min"].tolist() == [1.0, 10.0] and got["max"].tolist() == [2.0, 20.0]
        assert got["broadcast"].tolist() == [1.0, 1.0, 1.0]  # from src = 1
        assert got["stop"].tolist() == [15]  # rank 1's signal stops both
    gathered = load_file(str(parallel_runs / "collectives0.safetensors"))["gather"]
    assert bytes(gathered.tolist()) == b"\x00\x00|\x01\x01\x01"  # rank order, own lengths
    assert load_file(str(parallel_runs / "collectives1.safetensors"))["gather"].numel() == 0


def test_sweep_broadcast_source_gives_every_rank_rank_0s_batches(parallel_runs):
    """Sweep parallel on a model source: rank 0 reads, every rank gets the same tensors (dtype,
    shape, values), and evaluation batches are broadcast once and kept."""
    fake = FakeModelSource()
    batches = fake.batches(5)
    expected = {"batch5": next(batches), "batch6": next(batches), "init": fake.sample_for_init()}
    expected.update({f"eval{j}": x for j, (x, _) in enumerate(fake.eval_batches(40, 16))})
    for rank in range(WORLD):
        got = load_file(str(parallel_runs / f"broadcast{rank}.safetensors"))
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            assert got[key].dtype == value.dtype and torch.equal(got[key], value), (rank, key)


def test_sweep_on_a_model_source_equals_one_process_and_data_parallel_runs(parallel_runs, tmp_path):
    """On an activation cache: the sweep (batches broadcast by rank 0) equals one process
    exactly; data parallel (the cache split by rank) trains and reports."""
    from saekit.train.config import make_source

    cfg = cache_run_config(parallel_runs, "sweep")
    gathered = Trainer(cfg, make_source(cfg))
    gathered.load_checkpoint()
    single_cfg = cache_run_config(tmp_path, "sweep", cache_dir=parallel_runs / "cache")
    single = Trainer(single_cfg, make_source(single_cfg))
    single.fit(progress=False)
    expected, got = member_states(single), member_states(gathered)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    summary = json.loads((parallel_runs / "cache-data" / "summary.json").read_text())
    assert [r["name"] for r in summary] == [s.name for s in cfg.saes]


def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(parallel_runs):
    messages = [(parallel_runs / "signal" / f"stopped{r}.txt").read_text() for r in range(WORLD)]
    assert all(f"stopped by signal {int(signal.SIGTERM)} at step 2" in m for m in messages)
    assert json.loads((parallel_runs / "signal" / "parallel.json").read_text())["step"] == 2
