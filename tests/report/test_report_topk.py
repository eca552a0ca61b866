"""The report's per-latent top-k contexts, uniform sample and histogram against brute force over
every activation of a small run (plain Python loops over all tokens)."""

from __future__ import annotations

import pytest
import torch

from saekit.report.collect import CollectConfig, LatentCollector
from saekit.report.topk import ActivationHistogram, select_top

B, T, M = 3, 10, 5


def batches(n_batches: int, seed: int = 0, levels: int = 4):
    """Activations quantised to a few levels (many exact ties), ~half zero, a BOS-like first
    position that is not kept, token ids distinct per stream position."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n_batches):
        z = torch.randint(0, levels, (B, T, M), generator=g).float() * 0.5
        z[torch.rand(B, T, M, generator=g) < 0.4] = 0.0
        keep = torch.ones(B, T, dtype=torch.bool)
        keep[:, 0] = False
        z[:, 0] += 9.0  # the largest values sit on positions that do not count
        ids = torch.arange(B * T).view(B, T) + i * B * T
        out.append((z, keep, ids))
    return out


def brute_force_top(data, k: int, left: int, right: int):
    """Per latent: [(value, key, window ids, window acts)] of the k best, by value descending,
    then key ascending (the documented tie rule), from a list of every firing token."""
    result = []
    for m in range(M):
        entries = []
        for i, (z, keep, ids) in enumerate(data):
            for b in range(B):
                for t in range(T):
                    if keep[b, t] and z[b, t, m] > 0:
                        key = i * B * T + b * T + t
                        win_ids, win_acts = [], []
                        for p in range(t - left, t + right + 1):
                            inside = 0 <= p < T
                            win_ids.append(int(ids[b, p]) if inside else -1)
                            shade = inside and bool(keep[b, p])
                            win_acts.append(float(z[b, p, m]) if shade else 0.0)
                        entries.append((float(z[b, t, m]), key, win_ids, win_acts))
        entries.sort(key=lambda e: (-e[0], e[1]))
        result.append(entries[:k])
    return result


@pytest.mark.parametrize("k", [1, 4, 50])
def test_top_contexts_equal_brute_force_with_ties(k):
    data = batches(6)
    collector = LatentCollector(torch.arange(M), CollectConfig(top_k=k, samples=3, left=3, right=2))
    for z, keep, ids in data:
        collector.update(z, keep, ids)
    expected = brute_force_top(data, k, left=3, right=2)
    top = collector.top.sorted()
    for m in range(M):
        n = len(expected[m])
        assert int(top.filled[m].sum()) == n
        assert top.key[m, :n].tolist() == [e[1] for e in expected[m]]
        assert top.value[m, :n].tolist() == [e[0] for e in expected[m]]
        assert top.tokens[m, :n].tolist() == [e[2] for e in expected[m]]
        assert top.acts[m, :n].tolist() == [e[3] for e in expected[m]]
    # the trap is armed: a tie straddles the cut (the k-th and the (k+1)-th best are equal)
    every = brute_force_top(data, 10**6, left=3, right=2)
    assert any(len(all_m) > k and all_m[k][0] == all_m[k - 1][0] for all_m in every)


def test_all_equal_activations_keep_the_first_tokens_seen():
    z = torch.ones(B, T, M)
    keep = torch.ones(B, T, dtype=torch.bool)
    collector = LatentCollector(torch.arange(M), CollectConfig(top_k=4, samples=2))
    for i in range(3):
        collector.update(z, keep, torch.zeros(B, T, dtype=torch.long) + i)
    assert collector.top.sorted().key.tolist() == [[0, 1, 2, 3]] * M


def test_select_top_is_each_latents_stable_sort_prefix():
    g = torch.Generator().manual_seed(3)
    score = torch.randint(0, 3, (200,), generator=g).double()
    latent = torch.randint(0, 6, (200,), generator=g)
    latent[latent == 4] = 3  # latent 4: no candidate
    vals, idx = select_top(score, latent, 6, 7)
    for m in range(6):
        mine = (latent == m).nonzero().flatten()
        ref = score[mine].sort(descending=True, stable=True)
        n = min(7, mine.numel())
        assert vals[m, :n].tolist() == ref.values[:n].tolist()
        assert idx[m, :n].tolist() == mine[ref.indices[:n]].tolist()
        assert vals[m, n:].eq(float("-inf")).all()


def test_uniform_sample_is_the_bottom_k_of_the_same_draws():
    """The sample holds, per latent, the firing tokens with the smallest uniform draws (the
    collector's generator replayed here), so it is a uniform sample without replacement."""
    data = batches(5, seed=1)
    cfg = CollectConfig(top_k=2, samples=6, seed=7)
    collector = LatentCollector(torch.arange(M), cfg)
    g = torch.Generator().manual_seed(7)
    entries = [[] for _ in range(M)]
    for i, (z, keep, ids) in enumerate(data):
        collector.update(z, keep, ids)
        firing = [
            (b, t, m)
            for b in range(B)
            for t in range(T)
            for m in range(M)
            if keep[b, t] and z[b, t, m] > 0
        ]  # one draw per firing (token, latent) pair, in this order
        u = torch.rand(len(firing), generator=g, dtype=torch.float64).tolist()
        for (b, t, m), draw in zip(firing, u, strict=True):
            entries[m].append((draw, i * B * T + b * T + t))
    for m in range(M):
        expected = [key for _, key in sorted(entries[m])[:6]]
        assert collector.sample.sorted().key[m, : len(expected)].tolist() == expected


def test_histogram_equals_binning_every_value_at_the_final_range():
    g = torch.Generator().manual_seed(2)
    hist = ActivationHistogram(3, n_bins=8)
    values = []
    for scale in (0.5, 1.0, 4.0, 3.0, 40.0):  # the range doubles several times
        z = torch.rand(50, 3, generator=g, dtype=torch.float64) * scale
        z[z < 0.2 * scale] = 0.0
        z[:, 2] = 0.0  # a dead latent
        latent = torch.arange(3).expand_as(z)
        hist.update(z[z > 0], latent[z > 0])
        values.append(z)
    z = torch.cat(values)
    for m in range(3):
        hi = float(hist.hi[m])
        expected = [0] * 8
        for v in z[:, m].tolist():
            if v > 0:
                assert v <= hi
                expected[min(int(v // (hi / 8)), 7)] += 1
        assert hist.counts[m].tolist() == expected
    assert hist.counts[2].sum() == 0 and hist.counts[:2].sum() == (z[:, :2] > 0).sum()


def test_memory_is_bounded_by_latents_and_slots_not_tokens():
    collector = LatentCollector(torch.arange(M), CollectConfig(top_k=4, samples=8))
    data = batches(40, seed=4)
    collector.update(*data[0])
    size = collector.nbytes()
    for batch in data[1:]:
        collector.update(*batch)
    assert collector.nbytes() == size
    assert collector.n_tokens == 40 * B * (T - 1)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="top_k"):
        CollectConfig(top_k=0)
    with pytest.raises(ValueError, match="even"):
        ActivationHistogram(2, n_bins=5)
