"""Shuffle buffer: a seeded permutation of the tokens, exactly resumable; scale estimate."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load, save

from saekit.data.buffer import ShuffleBuffer, estimate_scale

D = 3


def id_coded_chunks(sizes):
    """Chunks of rows [i, i, i] + offset so each token carries its index in column 0."""
    out, start = [], 0
    for n in sizes:
        ids = torch.arange(start, start + n, dtype=torch.float32)
        out.append(torch.stack([ids, -ids, ids + 0.5], 1))
        start += n
    return out


SIZES = [7, 50, 1, 33, 64, 13, 29, 3]  # 200 tokens, irregular chunks


def ids_of(batches):
    return torch.cat(batches)[:, 0].long()


@pytest.mark.parametrize("capacity,batch_size", [(64, 16), (37, 10), (10, 10), (500, 32)])
def test_each_token_exactly_once_per_pass(capacity, batch_size):
    chunks = id_coded_chunks(SIZES)
    batches = list(ShuffleBuffer(capacity, batch_size, seed=1).iterate(chunks))
    assert all(len(b) == batch_size for b in batches[:-1])
    assert sum(len(b) for b in batches) == 200
    ids = ids_of(batches)
    assert torch.equal(ids.sort().values, torch.arange(200))
    # rows stay intact (no column mixing)
    rows = torch.cat(batches)
    assert torch.equal(rows[:, 1], -rows[:, 0]) and torch.equal(rows[:, 2], rows[:, 0] + 0.5)
    assert not torch.equal(ids, torch.arange(200))  # actually shuffled


def test_tokens_mix_across_source_chunks():
    batches = list(ShuffleBuffer(64, 16, seed=0).iterate(id_coded_chunks([16] * 8)))
    first = ids_of(batches[:1])
    assert len(set((first // 16).tolist())) >= 3  # first batch draws from several chunks


def test_same_seed_same_order_other_seed_differs():
    run = lambda seed: ids_of(list(ShuffleBuffer(40, 8, seed=seed).iterate(id_coded_chunks(SIZES))))  # noqa: E731
    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))


def test_drop_last_drops_only_the_partial_batch():
    batches = list(ShuffleBuffer(40, 16, seed=0, drop_last=True).iterate(id_coded_chunks(SIZES)))
    assert [len(b) for b in batches] == [16] * 12  # 200 = 12 * 16 + 8


@pytest.mark.parametrize("stop_after", [0, 1, 5, 9, 11, 12])
def test_resume_from_state_is_exact(stop_after):
    source = id_coded_chunks(SIZES)
    full = list(ShuffleBuffer(40, 16, seed=9).iterate(source))
    first = ShuffleBuffer(40, 16, seed=9)
    it = first.iterate(source)
    head = [next(it) for _ in range(stop_after)]
    state = first.state_dict()
    # the state is a flat dict of tensors and ints: it survives safetensors
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    restored_tensors = load(save(tensors))
    state = {**state, **restored_tensors}
    second = ShuffleBuffer(40, 16, seed=12345)  # the seed comes from the state
    second.load_state_dict(state)
    tail = list(second.iterate(source))
    assert len(head) + len(tail) == len(full) == 13
    for a, b in zip(head + tail, full, strict=True):
        assert torch.equal(a, b)


def test_resume_rejects_other_geometry():
    buf = ShuffleBuffer(40, 16)
    with pytest.raises(ValueError, match="capacity=40"):
        ShuffleBuffer(48, 16).load_state_dict(buf.state_dict())


def test_resume_with_a_short_source_is_an_error():
    buf = ShuffleBuffer(40, 16, seed=0)
    it = buf.iterate(id_coded_chunks(SIZES))
    next(it)
    state = buf.state_dict()
    fresh = ShuffleBuffer(40, 16)
    fresh.load_state_dict(state)
    with pytest.raises(ValueError, match="before the resume point"):
        list(fresh.iterate(id_coded_chunks([10])))


def test_estimate_scale_matches_the_definition_and_stops_at_n_tokens():
    g = torch.Generator().manual_seed(0)
    batches = [3.0 * torch.randn(n, 8, generator=g) + 1.0 for n in (100, 70, 90)]
    n_tokens = 200  # cuts the last batch at 30 rows
    x = torch.cat(batches)[:n_tokens].double()
    expected = math.sqrt(float(x.pow(2).sum(1).mean()) / 8)
    assert estimate_scale(batches, n_tokens) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(math.sqrt(10.0), rel=0.1)  # E x_i^2 = 9 + 1
    normalised = x / expected
    assert float(normalised.pow(2).sum(1).mean()) == pytest.approx(8.0, rel=1e-12)
    with pytest.raises(ValueError, match="all zero"):
        estimate_scale([torch.zeros(4, 8)], 4)
