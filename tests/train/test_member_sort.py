"""Frequency-sorted Matryoshka levels (``matryoshka.sort_every``, Member.count_and_sort): the
sort follows a plain reference, moves everything per-latent (Adam's moments, the dead counters,
AuxK's dead columns, the firing counts), resumes exactly, and is off by default."""

from __future__ import annotations

import pytest
import torch
from arch_helpers import D, M, make_member
from test_trainer import (
    assert_same_state,
    interrupt_at,
    losses_logged,
    make_trainer,
    params,
    sae_entry,
)
from test_trainer import run_config as trainer_run_config

from saekit.core.comm import LocalComm
from saekit.core.configs import from_dict
from saekit.core.encoding import as_dense
from saekit.kernels import select as kernel_select
from saekit.model.latent_order import latent_state_keys
from saekit.objective.revival import DeadSet
from saekit.train.checkpoint import read_checkpoint_meta
from saekit.train.member import Member
from saekit.train.member_config import SAETrainConfig
from saekit.train.trainer import TrainingInterrupted

F64 = torch.float64
BATCHTOPK = {"kind": "batchtopk", "k": 3}
LEVELS = [4, 4, 8]  # fixed Matryoshka groups of the M = 16 latents


def batches(n: int, seed: int = 2) -> list[torch.Tensor]:
    """[B, T, D] batches (3-D input), mean 3, spread 7: the traps of arch_helpers.data."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 8, D, generator=g, dtype=F64) * 7 + 3 for _ in range(n)]


def member(sort_every: int = 0, levels: bool = True, **extra) -> Member:
    """A float64 Matryoshka-BatchTopK member with AuxK per level (the recipe's), half its latents
    dead so AuxK and its dead columns act."""
    spec = {"kind": "fixed", "groups": LEVELS, "sort_every": sort_every} if levels else None
    revival = {"kind": "matryoshka_auxk", "coefficient": 1.0} if levels else "auxk"
    m = make_member(BATCHTOPK, revival=revival, matryoshka=spec, dead_tokens=64, lr=3e-2, **extra)
    m.tokens_since_fired[::2] = 10**6
    return m


def reference_order(counts: list[int]) -> list[int]:
    """New latent j = old latent perm[j]: most firings first, ties in the current order."""
    return sorted(range(len(counts)), key=lambda i: -counts[i])


def moments(m: Member) -> dict[str, torch.Tensor]:
    names = {id(p): n for n, p in m.sae.named_parameters()}
    return {
        f"{names[id(p)]}.{key}": value.clone()
        for p, state in m.optimizer.state.items()
        for key, value in state.items()
        if value.dim()
    }


def permuted(state: dict[str, torch.Tensor], keys: list[str], perm: torch.Tensor) -> dict:
    """``state`` with its per-latent entries (a key of ``keys``, or an Adam moment of one)
    reordered by ``perm``."""
    return {k: v[perm] if k in keys or k.rsplit(".", 1)[0] in keys else v for k, v in state.items()}


def test_a_sort_follows_the_plain_reference_of_the_steps_counts():
    off, on = member(0), member(3)
    data = batches(3)
    counts = torch.zeros(M, dtype=torch.int64)
    for step, x in enumerate(data):  # the same steps; the reference counts each step's firings
        off.sae.train()
        with torch.no_grad():
            counts += (as_dense(off.sae(x).latents) != 0).sum(0)
        off.train_step(x, step)
        on.train_step(x, step)
    perm = torch.tensor(reference_order(counts.tolist()))
    assert not perm.equal(torch.arange(M)) and counts.unique().numel() < M  # moved, with ties
    keys = latent_state_keys(on.sae)
    expected = permuted({k: v.clone() for k, v in off.sae.state_dict().items()}, keys, perm)
    assert_same_state({k: v for k, v in on.sae.state_dict().items()}, expected)
    assert_same_state(moments(on), permuted(moments(off), keys, perm))
    assert torch.equal(on.tokens_since_fired, off.tokens_since_fired[perm])
    assert not on.fire_counts.any()  # counted afresh from the sort on


@pytest.mark.parametrize("levels", [False, True])
def test_one_step_after_a_permutation_is_the_unpermuted_step_permuted(levels):
    a, b = member(levels=levels), member(levels=levels)
    data = batches(4)
    for step, x in enumerate(data[:3]):  # Adam's moments and the counters are under way
        a.train_step(x, step)
        b.train_step(x, step)
    for m in (a, b):  # dead latents before the last step: AuxK acts in it
        m.tokens_since_fired[::3] = 10**6
    g = torch.Generator().manual_seed(7)
    if levels:  # within each level: the Matryoshka loss is the same, so the step must be too
        starts = [0, 4, 8]
        perm = torch.cat(
            [s + torch.randperm(n, generator=g) for s, n in zip(starts, LEVELS, strict=True)]
        )
    else:
        perm = torch.randperm(M, generator=g)
    b.permute_latents_(perm)
    ma, mb = a.train_step(data[3], 3), b.train_step(data[3], 3)
    for field in ("loss", "reconstruction", "revival", "l0", "fvu", "dead_fraction"):
        torch.testing.assert_close(getattr(mb, field), getattr(ma, field), rtol=1e-12, atol=0)
    assert float(ma.revival) > 0  # AuxK acted on the dead latents
    keys = latent_state_keys(b.sae)
    close = dict(rtol=1e-10, atol=1e-12)
    expected = permuted(dict(a.sae.state_dict()), keys, perm)
    for key, value in b.sae.state_dict().items():
        torch.testing.assert_close(value, expected[key], **close, msg=key)
    expected = permuted(moments(a), keys, perm)
    for key, value in moments(b).items():
        torch.testing.assert_close(value, expected[key], **close, msg=key)
    assert torch.equal(b.tokens_since_fired, a.tokens_since_fired[perm])


def test_the_dead_columns_are_renamed_on_the_same_refresh_schedule():
    counters = torch.tensor([0, 50, 900, 10, 700, 0, 999, 5])
    dead_set = DeadSet(dead_tokens=1000, refresh_steps=2)
    dead_set.count(100, counters)
    columns = dead_set.get(counters, batch_tokens=100).clone()  # slack 200: {2, 4, 6}
    dead_set.count(100, counters)
    perm = torch.tensor([6, 0, 2, 7, 1, 4, 3, 5])
    after = counters[perm]
    dead_set.permute_(perm, counters, after)
    renamed = dead_set.get(after, batch_tokens=100)  # no refresh due: the renamed columns
    assert torch.equal(renamed, torch.nonzero(after + 200 >= 1000).reshape(-1))
    assert torch.equal(after[renamed].sort().values, counters[columns].sort().values)
    assert dead_set.counted == 100  # the schedule kept
    edited = after.clone()
    dead_set.permute_(perm, counters, edited)  # counters it does not follow: refresh stays due
    dead_set.get(edited, batch_tokens=100)
    assert dead_set.counted == 0


def test_a_step_that_sorts_never_syncs_with_the_host(request, monkeypatch):
    monkeypatch.setattr(kernel_select, "reads_free", lambda tensor: False)  # a GPU's path
    m = member(1)  # sorts after every step
    data = batches(3)
    m.train_step(data[0], 0)  # refreshes AuxK's dead columns: its one host transfer
    request.getfixturevalue("host_sync_raises")
    for step, x in enumerate(data[1:], start=1):
        m.train_step(x, step)


class TwoRanks(LocalComm):
    """Two ranks holding the same batch: a sum doubles."""

    world_size = 2

    def all_reduce(self, x, op="sum", what="tensor"):
        return x.mul_(2) if op == "sum" else x


def test_data_parallel_counts_add_over_ranks():
    m = member(5)
    m.comm = TwoRanks()
    per_latent = torch.arange(M, dtype=torch.int64)
    m.count_and_sort(per_latent.clone(), step=0)
    assert torch.equal(m.fire_counts, 2 * per_latent)


# ------------------------------------------------------------------------- a run


FIXED = {"kind": "fixed", "groups": [16, 16, 32]}
RANDOM = {"kind": "random", "n_prefixes": 4}


def run_config(tmp_path, sort_every: int | None, steps=12, levels=FIXED, **extra):
    spec = {**levels} if sort_every is None else {**levels, "sort_every": sort_every}
    revival = "matryoshka_auxk" if levels is FIXED else "auxk"
    entry = sae_entry("batchtopk", matryoshka=spec, revival=revival, name="mat")
    return trainer_run_config(tmp_path, [entry], steps=steps, **extra)


def full_state(m: Member) -> dict[str, torch.Tensor]:
    return {**params(m), "fire_counts": m.fire_counts.clone()}


@pytest.mark.parametrize("levels", [FIXED, RANDOM], ids=["fixed", "random"])
def test_a_run_that_sorts_resumes_exactly(tmp_path, levels):
    full = make_trainer(run_config(tmp_path / "full", 3, levels=levels))
    full.fit()
    cfg = run_config(tmp_path / "cut", 3, levels=levels)
    first = make_trainer(cfg)
    interrupt_at(first, 8)  # after 8 steps: 2 counted since the sort after step 6
    with pytest.raises(TrainingInterrupted):
        first.fit()
    assert read_checkpoint_meta(tmp_path / "cut")["step"] == 8
    assert first.members[0].fire_counts.any()
    resumed = make_trainer(cfg)
    resumed.load_checkpoint()
    resumed.fit()
    assert_same_state(full_state(resumed.members[0]), full_state(full.members[0]))
    assert losses_logged(tmp_path / "full", "mat") == losses_logged(tmp_path / "cut", "mat")


def test_off_is_the_run_without_the_key_and_on_changes_the_run(tmp_path):
    runs = {}
    for name, sort_every in (("unset", None), ("off", 0), ("on", 4)):
        trainer = make_trainer(run_config(tmp_path / name, sort_every, steps=8))
        trainer.fit()
        runs[name] = trainer.members[0]
    assert_same_state(params(runs["off"]), params(runs["unset"]))
    assert "fire_counts" not in runs["off"].state_tensors()  # the checkpoint as before
    on, off = params(runs["on"]), params(runs["off"])
    assert not torch.equal(on["W_dec"], off["W_dec"])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"matryoshka": {"kind": "fixed", "groups": [16], "sort_every": -1}}, "sort_every must"),
        (
            {
                "sae": {
                    "kind": "crosscoder",
                    "n_sources": 2,
                    "d_in": 4,
                    "d_sae": 16,
                    "activation": BATCHTOPK,
                },  # fmt: skip
                "matryoshka": {"kind": "random", "n_prefixes": 3, "sort_every": 5},
            },
            "sort_every does not apply to sae.kind 'crosscoder'",
        ),
    ],
)
def test_what_sorting_does_not_fit_is_refused_in_one_line(change, message):
    entry = {"sae": {"d_in": 4, "d_sae": 16, "activation": BATCHTOPK}, "name": "s", **change}
    with pytest.raises(ValueError, match=message):
        SAETrainConfig(**entry).validate()


def test_sort_every_outside_matryoshka_is_an_unknown_field():
    entry = {"sae": {"d_in": 4, "d_sae": 16, "activation": BATCHTOPK}, "sort_every": 5}
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['sort_every'\]"):
        from_dict(SAETrainConfig, entry)


def test_latent_parallelism_refuses_sorting(tmp_path):
    with pytest.raises(ValueError, match="sort_every has no latent-sharded form"):
        run_config(tmp_path, 4, parallel={"data": 1, "latent": 2})
