"""Latent parallelism in one process: the parts of a mesh run as threads whose comms exchange
tensors in memory (:class:`ThreadComm`), against one process training the whole SAE on the whole
batch (float64, so a selection can only differ by a real fault, never by rounding).

The same checks run on real gloo processes in tests/train/test_latent_parallel.py; here they are
fast enough for every mesh shape and every configuration, and for the mutation check.
"""

from __future__ import annotations

import copy
import json
import threading
from pathlib import Path

import pytest
import torch

from saekit.activations.abstopk import AbsTopK
from saekit.core.comm import LocalComm
from saekit.core.encoding import as_dense
from saekit.core.shard import LatentShard, scale_grad, sum_partials
from saekit.data.sources.synthetic import SyntheticSource
from saekit.data.synthetic.generator import SyntheticData
from saekit.kernels.sharded_select import chosen_overall, chosen_per_row
from saekit.objective import terms
from saekit.objective.config import PreactRevival
from saekit.objective.sharded import ShardedObjective
from saekit.train.config import build_run_config, stream_settings
from saekit.train.latent_parallel import LatentTrainer
from saekit.train.latent_parts import normal_rows
from saekit.train.mesh import Mesh
from saekit.train.trainer import Trainer

BATCH = 64
STEPS = 20
SYNTHETIC = {"d": 16, "n_features": 48, "mean_l0": 3.0}
# dead after one batch without firing: the dead counters and AuxK matter from the second step
BASE = {"lr": 1e-2, "warmup_steps": 1, "decay_start": 1.0, "dead_tokens": BATCH}


def sae(activation, **extra) -> dict:
    return {"sae": {"d_sae": 64, "activation": activation, "dtype": "float64"}, **BASE, **extra}


TOPK_AUXK = sae({"kind": "topk", "k": 3}, revival={"kind": "auxk"}, seed=1)
BATCHTOPK = sae({"kind": "batchtopk", "k": 3}, seed=2)
JUMPRELU_L0 = sae(
    {"kind": "jumprelu", "ste_to_input": True},
    penalty={"kind": "l0", "coefficient": 0.05, "target_l0": 4.0},  # the λ controller
    seed=3,
)
MATRYOSHKA = sae({"kind": "topk", "k": 3}, matryoshka={"kind": "random", "n_prefixes": 4}, seed=4)
RELU_L1 = sae("relu", penalty={"kind": "l1", "coefficient": 0.05, "target_l0": 4.0}, seed=5)
QUADRATIC = sae(
    "jumprelu", penalty={"kind": "quadratic_l0", "coefficient": 0.05, "target_l0": 4.0}, seed=6
)
INPUT_BATCHTOPK = sae({"kind": "batchtopk", "k": 2}, revival={"kind": "input"}, seed=7)
MATRYOSHKA_L1 = sae(
    "relu",
    penalty={"kind": "log", "coefficient": 0.05},
    matryoshka={"kind": "fixed", "groups": [10, 30, 24]},  # prefix ends inside parts
    seed=8,
)
HTOPK = sae({"kind": "hierarchical_topk", "k": 3}, seed=9)
# the "preact" revival at each kind of firing threshold: per token, per latent, per batch
TOPK_PREACT = sae({"kind": "topk", "k": 3}, revival={"kind": "preact"}, seed=10, name="topk-preact")
JUMPRELU_PREACT = sae(
    {"kind": "jumprelu", "init_threshold": 1.0},  # high: some latents never fire at first
    penalty={"kind": "l0", "coefficient": 0.05},
    revival={"kind": "preact"},
    seed=11,
    name="jumprelu-preact",
)
BATCHTOPK_PREACT = sae(
    {"kind": "batchtopk", "k": 2}, revival={"kind": "preact"}, seed=12, name="btopk-preact"
)
SAES = [TOPK_AUXK, BATCHTOPK, JUMPRELU_L0, MATRYOSHKA, RELU_L1, QUADRATIC, INPUT_BATCHTOPK]
SAES += [MATRYOSHKA_L1, HTOPK, TOPK_PREACT, JUMPRELU_PREACT, BATCHTOPK_PREACT]
TRANSCODER = copy.deepcopy(TOPK_AUXK)
TRANSCODER["sae"]["skip"] = True


def run_config(out_dir: Path, saes: list[dict], parallel="data", d_out: int | None = None, **kw):
    synthetic = {**SYNTHETIC, **({"d_out": d_out} if d_out else {})}
    fields = {
        "data": {"source": "synthetic", "synthetic": synthetic},
        "saes": copy.deepcopy(saes),
        "batch_size": BATCH,
        "steps": STEPS,
        "log_every": 5,
        "checkpoint_every": 0,
        "eval_tokens": 128,
        "out_dir": str(out_dir),
        "progress": False,
        "parallel": parallel,
    }
    return build_run_config({**fields, **kw})


# ----------------------------------------------------------------- a mesh of threads


class ThreadGroup:
    """The shared slots of one group of threads."""

    def __init__(self, size: int):
        self.size = size
        self.barrier = threading.Barrier(size, timeout=60)
        self.slots: list = [None] * size
        self.calls: list[tuple] = []  # (collective, op, what, numel) as rank 0 made them


class ThreadComm:
    """A Comm between threads: every collective exchanges through the group's slots."""

    def __init__(self, group: ThreadGroup, rank: int):
        self.group, self.rank = group, rank
        self.world_size, self.is_main = group.size, rank == 0

    def _exchange(self, value, call):
        g = self.group
        if self.rank == 0:
            g.calls.append(call)
        g.barrier.wait()
        g.slots[self.rank] = value
        g.barrier.wait()
        every = list(g.slots)
        g.barrier.wait()
        return every

    def all_reduce(self, x, op="sum", what="tensor"):
        every = self._exchange(x.detach().clone(), ("all_reduce", op, what, x.numel()))
        stacked = torch.stack(every)
        if op in ("sum", "avg"):
            out = stacked.sum(0) / (self.world_size if op == "avg" else 1)
        else:
            out = stacked.amin(0) if op == "min" else stacked.amax(0)
        return x.copy_(out.to(x.dtype))

    def all_gather(self, x, what="tensor"):
        return torch.stack(self._exchange(x.detach().clone(), ("all_gather", "", what, x.numel())))

    def broadcast(self, x, src=0, what="tensor"):
        return x.copy_(self._exchange(x.detach().clone(), ("broadcast", src, what, x.numel()))[src])

    def gather(self, payload, what="bytes"):
        every = self._exchange(payload, ("gather", "", what, len(payload)))
        return every if self.is_main else None

    def barrier(self, what="barrier"):
        self._exchange(None, ("barrier", "", what, 0))

    def agree_stop(self, signum):
        flags = self._exchange(signum or 0, ("agree_stop", "", "stop", 1))
        return max(flags) or None


def thread_meshes(D: int, T: int) -> list[Mesh]:
    """The mesh of every rank r = d·T + t (saekit.train.mesh's numbering)."""
    world = ThreadGroup(D * T)
    latent = [ThreadGroup(T) for _ in range(D)]
    data = [ThreadGroup(D) for _ in range(T)]
    meshes = []
    for r in range(D * T):
        d, t = divmod(r, T)
        meshes.append(
            Mesh(
                ThreadComm(world, r),
                ThreadComm(latent[d], t) if T > 1 else LocalComm(),
                ThreadComm(data[t], d) if D > 1 else LocalComm(),
                d,
                t,
                D,
                T,
            )
        )
    return meshes


def run_mesh(cfg, D: int, T: int, fit=None) -> list[LatentTrainer]:
    """Every rank's trainer after ``fit(trainer)`` (default: ``trainer.fit()``), each in its
    own thread named ``rank<r>``."""
    meshes = thread_meshes(D, T)
    trainers: list = [None] * (D * T)
    errors: list = []

    def rank(r: int) -> None:
        try:
            mesh = meshes[r]
            source, _ = cfg.data.latent_parallel_sources(
                stream_settings(cfg), mesh.data_index, D, mesh.latent
            )
            trainers[r] = LatentTrainer(cfg, source, mesh)
            (fit or (lambda tr: tr.fit(progress=False)))(trainers[r])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append((r, exc))
            for mesh in meshes:  # the others fail at their next collective instead of waiting
                for comm in mesh[:3]:
                    if isinstance(comm, ThreadComm):
                        comm.group.barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,), name=f"rank{r}") for r in range(D * T)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise errors[0][1]
    return trainers


def whole_states(trainers: list[LatentTrainer]) -> dict[str, torch.Tensor]:
    """Every member's whole state: per-latent tensors concatenated over the latent ranks of data
    group 0, the rest rank 0's; asserts that every data group holds the same parts."""
    mesh = trainers[0].mesh
    T = mesh.T
    out = {}
    for i, member in enumerate(trainers[0].members):
        keys = member.part_state_keys()
        own = [tr.members[i].state_tensors() for tr in trainers]
        for r in range(T, len(trainers)):  # data group copies agree exactly
            for key, value in own[r].items():
                assert torch.equal(value, own[r % T][key]), (member.cfg.name, r, key)
        for key, value in own[0].items():
            whole = torch.cat([own[t][key] for t in range(T)]) if key in keys else value
            out[f"{member.cfg.name}.{key}"] = whole.detach().clone()
    return out


def one_process(cfg) -> dict[str, torch.Tensor]:
    trainer = Trainer(cfg, SyntheticSource(SyntheticData(cfg.data.synthetic), BATCH))
    trainer.fit(progress=False)
    return {
        f"{m.cfg.name}.{k}": v.detach().clone()
        for m in trainer.members
        for k, v in m.state_tensors().items()
    }


def record_selections(monkeypatch) -> dict[str, list[torch.Tensor]]:
    """The latents each objective call sees, by thread: {thread name: [dense bool [N, M]]}."""
    seen: dict[str, list[torch.Tensor]] = {}

    def record(latents):
        name = threading.current_thread().name
        seen.setdefault(name, []).append(as_dense(latents).detach() != 0)

    plain, sharded = terms.Objective.__call__, ShardedObjective.__call__

    def plain_call(self, inputs):
        record(inputs.out.latents)
        return plain(self, inputs)

    def sharded_call(self, s):
        record(s.enc.latents)
        return sharded(self, s)

    monkeypatch.setattr(terms.Objective, "__call__", plain_call)
    monkeypatch.setattr(ShardedObjective, "__call__", sharded_call)
    return seen


@pytest.fixture
def selections(monkeypatch):
    return record_selections(monkeypatch)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[dict, list[torch.Tensor], Path]:
    """One process on SAES: its states after 20 steps and its selection at every call."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        seen = record_selections(monkeypatch)
        out_dir = tmp_path_factory.mktemp("one")
        states = one_process(run_config(out_dir, SAES))
    return states, seen["MainThread"], out_dir


def assemble(seen: dict[str, list[torch.Tensor]], D: int, T: int) -> list[torch.Tensor]:
    """Each call's selection over the whole batch and all latents, from the ranks' blocks."""
    calls = []
    for j in range(len(seen["rank0"])):
        rows = [torch.cat([seen[f"rank{d * T + t}"][j] for t in range(T)], 1) for d in range(D)]
        calls.append(torch.cat(rows, 0))
    return calls


def logged_revival(path: Path) -> list[float]:
    return [json.loads(line)["revival"] for line in path.read_text().splitlines()]


def assert_same(expected: dict, got: dict) -> None:
    assert expected.keys() == got.keys()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-9, atol=1e-12, msg=key)


# ----------------------------------------------------------------- the tests


@pytest.mark.parametrize(("D", "T"), [(1, 2), pytest.param(1, 4, marks=pytest.mark.slow), (2, 2)])
def test_a_latent_sharded_run_selects_and_trains_as_one_process(
    tmp_path, reference, selections, D, T
):
    """Every configuration at once (TopK + AuxK, BatchTopK, JumpReLU with the L0 controller,
    Matryoshka, ReLU + L1, the quadratic L0 penalty, the input revival, Matryoshka prefixes
    inside a part, HierarchicalTopK, the "preact" revival of TopK, JumpReLU and BatchTopK):
    the same latents at every one of 20 steps, the same weights, Adam moments and dead
    counters after them, on every mesh."""
    expected, reference, one_dir = reference
    trainers = run_mesh(run_config(tmp_path / "mesh", SAES, {"data": D, "latent": T}), D, T)
    got = assemble(selections, D, T)
    assert len(got) == len(reference) == STEPS * len(SAES)
    for j, (a, b) in enumerate(zip(reference, got, strict=True)):
        assert torch.equal(a, b), f"step {j // len(SAES)}, SAE {j % len(SAES)}"
    assert_same(expected, whole_states(trainers))
    for i in (0, SAES.index(TOPK_PREACT), SAES.index(JUMPRELU_PREACT)):
        dead = expected[f"{trainers[0].members[i].cfg.name}.tokens_since_fired"]
        assert (dead >= BATCH).any() and (dead == 0).any(), i  # a revival had latents to revive
    for cfg in (TOPK_PREACT, JUMPRELU_PREACT, BATCHTOPK_PREACT):  # the logged value: θ's too
        logged = [
            logged_revival(d / cfg["name"] / "metrics.jsonl") for d in (one_dir, tmp_path / "mesh")
        ]
        assert any(v > 0 for v in logged[0]), cfg["name"]
        torch.testing.assert_close(logged[1], logged[0], rtol=1e-9, atol=1e-12, msg=cfg["name"])


def test_a_latent_sharded_transcoder_trains_as_one_process(tmp_path, selections):
    expected = one_process(run_config(tmp_path / "one", [TRANSCODER], d_out=8))
    reference = selections.pop("MainThread")
    cfg = run_config(tmp_path / "mesh", [TRANSCODER], {"data": 2, "latent": 2}, d_out=8)
    trainers = run_mesh(cfg, 2, 2)
    got = assemble(selections, 2, 2)
    assert all(torch.equal(a, b) for a, b in zip(reference, got, strict=True))
    states = whole_states(trainers)
    assert {k for k in states if k.endswith(("W_skip", "target_scale"))}
    assert_same(expected, states)


def test_the_step_reduces_the_decoder_partial_sums_in_one_all_reduce(tmp_path):
    """Per step of a TopK SAE without dead latents: in the latent group one all-gather of the
    [N, k] candidates and ONE all-reduce, of the [N, d] partial sums; nothing else of size N."""
    cfg = run_config(tmp_path / "mesh", [{**TOPK_AUXK, "dead_tokens": 10**9}], {"latent": 2})
    cfg.steps = 3
    trainers = run_mesh(cfg, 1, 2)
    calls = trainers[0].mesh.latent.group.calls
    n, d, k = BATCH, SYNTHETIC["d"], 3
    big = [c for c in calls if c[3] >= n]
    gather = ("all_gather", "", "TopK candidates", n * k)
    assert big == [gather, ("all_reduce", "sum", "decoder partial sums", n * d)] * cfg.steps


def test_normal_rows_are_the_rows_of_one_draw():
    for rows, cols, parts in [(64, 16, 4), (1000, 7, 4), (100, 33, 2), (10, 1, 2), (7, 2, 7)]:
        g = torch.Generator().manual_seed(3)
        whole = torch.randn(rows, cols, generator=g)
        after = torch.randn(5, generator=g)
        width = rows // parts
        for t in range(parts):
            g = torch.Generator().manual_seed(3)
            got = normal_rows(g, rows, cols, t * width, width)
            assert torch.equal(got, whole[t * width : (t + 1) * width]), (rows, cols, t)
            assert torch.equal(torch.randn(5, generator=g), after)  # the stream left as one call


def test_selections_across_parts_keep_exactly_the_global_winners():
    """chosen_per_row / chosen_overall on T = 3 parts (threads) against topk of the whole."""
    g = torch.Generator().manual_seed(0)
    whole = torch.randn(5, 12, generator=g, dtype=torch.float64)
    group, T, k = ThreadGroup(3), 3, 4
    found: list = [None] * T

    def part(t: int) -> None:
        comm = ThreadComm(group, t)
        mine = whole[:, t * 4 : (t + 1) * 4]
        values, index = mine.topk(k, dim=-1)
        kept = chosen_per_row(values, k, comm, "rows")
        flat = mine.reshape(-1)
        overall = chosen_overall(flat, 9, comm, "all")
        found[t] = (torch.zeros_like(mine, dtype=torch.bool).scatter(1, index, kept), overall)

    threads = [threading.Thread(target=part, args=(t,)) for t in range(T)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    rows = torch.cat([f[0] for f in found], 1)
    expected = torch.zeros_like(rows).scatter(1, whole.topk(k, dim=-1).indices, True)
    assert torch.equal(rows, expected) and (rows.sum(1) == k).all()
    overall = torch.stack([f[1].view(5, 4) for f in found], 1).reshape(5, 12)
    top9 = torch.zeros(60, dtype=torch.bool).scatter(0, whole.reshape(-1).topk(9).indices, True)
    assert torch.equal(overall, top9.view(5, 12))


def test_sum_partials_sums_forward_and_passes_the_gradient_and_scale_grad_scales_it():
    x = torch.arange(3.0, requires_grad=True)
    y = sum_partials(x * 2, LocalComm())
    y.sum().backward()
    assert torch.equal(x.grad, torch.full((3,), 2.0))
    x.grad = None
    scale_grad(x, 0.25).pow(2).sum().backward()
    assert torch.equal(x.grad, 0.25 * 2 * torch.arange(3.0))
    assert LatentShard(LocalComm(), LocalComm(), LocalComm(), 1, 4, 64).offset == 16


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"saes": [sae({"kind": "topk", "k": 20})]}, "exceeds d_sae = 16 per process"),
        ({"saes": [sae("gated", penalty={"kind": "l1", "coefficient": 0.1})]}, "no latent-sharded"),
        (
            {
                "saes": [
                    sae({"kind": "topk", "k": 3}, revival={"kind": "auxk", "token_fraction": 0.5})
                ]
            },
            "token_fraction < 1 has no latent-sharded form",
        ),
        ({"parallel": {"latent": 0}}, "parallel.latent must be an integer >= 1"),
        ({"parallel": {"latent": 3}}, "not divisible by parallel.latent = 3"),
    ],
)
def test_what_latent_parallelism_cannot_do_is_refused_in_one_line(tmp_path, change, message):
    fields = {"saes": [TOPK_AUXK], "parallel": {"latent": 4}, **change}
    with pytest.raises(ValueError, match=message) as info:
        run_config(tmp_path, fields.pop("saes"), fields.pop("parallel"))
    assert "\n" not in str(info.value)


def test_the_preact_revival_of_an_activation_without_a_sharded_threshold_is_refused():
    with pytest.raises(ValueError, match="'preact' has no latent-sharded form for") as info:
        ShardedObjective(AbsTopK, None, PreactRevival())
    assert "\n" not in str(info.value)
