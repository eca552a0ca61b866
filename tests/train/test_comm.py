"""The collectives (saekit.core.comm, saekit.train.comm) and how the training step calls them.

A comm is collectives only; the member calls them where its step reads (no callback). The
process-group implementation's ops are checked on 2 gloo ranks in tests/train/test_distributed.py.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from saekit.core.comm import COLLECTIVES, Comm, LocalComm
from saekit.core.configs import from_dict
from saekit.train.comm import ProcessGroupComm
from saekit.train.member import Member
from saekit.train.member_config import SAETrainConfig

D, M, N = 6, 16, 32


class RecordingComm(LocalComm):
    """A rank of ``world_size`` whose collectives record (collective, op or src, what) and
    return what ``results`` makes of the tensor (default: unchanged, as if every rank agreed)."""

    def __init__(self, world_size: int = 2, results=None):
        self.world_size = world_size
        self.calls: list[tuple] = []
        self.results = results or {}

    def all_reduce(self, x, op="sum", what="tensor"):
        self.calls.append(("all_reduce", op, what))
        change = self.results.get(what.split(" of ")[0])
        return x.copy_(change(x)) if change else x

    def broadcast(self, x, src=0, what="tensor"):
        self.calls.append(("broadcast", src, what))
        return x


def member(activation, comm: Comm, penalty=None, name="m") -> Member:
    cfg = from_dict(
        SAETrainConfig,
        {
            "sae": {"d_in": D, "d_sae": M, "activation": activation},
            "penalty": penalty,
            "name": name,
            "warmup_steps": 0,
        },
    )
    cfg.validate()
    m = Member(cfg, 10, "cpu", comm)
    m.init_from_data(torch.randn(64, D, generator=torch.Generator().manual_seed(0)))
    return m


def batch(seed: int = 1) -> torch.Tensor:
    return torch.randn(N, D, generator=torch.Generator().manual_seed(seed))


CONTROLLER = {"kind": "l1", "coefficient": 0.01, "target_l0": 4.0}


@pytest.mark.parametrize(
    ("activation", "penalty", "own"),
    [
        ({"kind": "topk", "k": 3}, None, []),
        ({"kind": "batchtopk", "k": 3}, None, [("all_reduce", "min", "BatchTopK batch min")]),
        ("relu", CONTROLLER, [("all_reduce", "avg", "L0")]),
    ],
)
def test_a_data_parallel_step_calls_its_collectives_in_order(activation, penalty, own):
    comm = RecordingComm()
    m = member(activation, comm, penalty)
    m.share_initial_state()
    dtypes = {t.dtype for t in m.sae.state_dict().values()}
    assert comm.calls == [("broadcast", 0, "initial m")] * len(dtypes)  # one bucket per dtype
    comm.calls.clear()
    m.train_step(batch(), 0)
    gradients = ("all_reduce", "avg", "gradients of m")  # after backward, before the update
    assert comm.calls == [gradients, ("all_reduce", "max", "fired mask"), *own]


def test_one_process_runs_no_collective():
    comm = RecordingComm(world_size=1)
    m = member({"kind": "topk", "k": 3}, comm)
    m.share_initial_state()
    m.train_step(batch(), 0)
    assert comm.calls == []


def test_the_step_uses_what_the_collectives_return():
    """Gradients the comm zeroes move no weight (Adam's first step is then exactly 0); the dead
    counters add the global batch (world_size × N) for latents that fired on no rank, and reset
    those the fired mask's MAX marks."""
    comm = RecordingComm(results={"gradients": torch.zeros_like})
    m = member("relu", comm, {"kind": "l1", "coefficient": 0.01})
    before = {k: v.clone() for k, v in m.sae.state_dict().items()}
    m.train_step(batch(), 0)
    for key, value in m.sae.state_dict().items():
        assert torch.equal(value, before[key]), key
    moved = member("relu", LocalComm(), {"kind": "l1", "coefficient": 0.01})
    moved.train_step(batch(), 0)
    assert not torch.equal(moved.sae.W_enc, before["W_enc"])  # the same step, one process

    silent = RecordingComm(results={"fired mask": torch.zeros_like})
    m = member({"kind": "topk", "k": 3}, silent)
    m.train_step(batch(), 0)
    assert (m.tokens_since_fired == 2 * N).all()
    everywhere = RecordingComm(results={"fired mask": torch.ones_like})
    m = member({"kind": "topk", "k": 3}, everywhere)
    m.train_step(batch(), 0)
    assert (m.tokens_since_fired == 0).all()


def public_methods(cls) -> set[str]:
    return {
        name
        for name, value in inspect.getmembers(cls)
        if not name.startswith("_") and callable(value)
    }


@pytest.mark.parametrize("cls", [LocalComm, ProcessGroupComm])
def test_a_comm_exposes_collectives_only(cls):
    assert public_methods(cls) == COLLECTIVES
    assert public_methods(Comm) == COLLECTIVES  # the protocol the step is written against


def test_local_comm_is_the_identity():
    x = torch.arange(4.0)
    comm = LocalComm()
    for op in ("sum", "avg", "min", "max"):
        assert comm.all_reduce(x, op) is x and torch.equal(x, torch.arange(4.0))
    assert comm.broadcast(x) is x
    assert torch.equal(comm.all_gather(x), x.unsqueeze(0))  # [world_size = 1, *x.shape]
    assert comm.gather(b"abc") == [b"abc"]
    assert comm.agree_stop(15) == 15 and comm.agree_stop(None) is None
