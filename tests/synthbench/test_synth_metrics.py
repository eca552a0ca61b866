"""SynthSAEBench metrics (saekit.synthbench.metrics) against plain float64 loops.

Traps: a nonzero data mean, a dead latent, two latents on one feature, 3-D inputs, all dead.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from saekit.synthbench.metrics import SynthMetricAccumulator


def world(seed=0, M=6, F=5, d=4, N=200):
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(F, d, generator=g, dtype=torch.float64)
    W_dec = torch.randn(M, d, generator=g, dtype=torch.float64)
    W_dec[1] = -3 * directions[2] + 0.1 * W_dec[1]  # sign and scale do not matter
    W_dec[4] = directions[2]  # a second latent on feature 2: uniqueness < 1
    coeffs = torch.rand(N, F, generator=g, dtype=torch.float64) * (
        torch.rand(N, F, generator=g) < 0.3
    )
    z = torch.rand(N, M, generator=g, dtype=torch.float64) * (torch.rand(N, M, generator=g) < 0.4)
    z[:, 3] = 0  # a dead latent
    x = coeffs @ directions + 2.0  # nonzero mean
    x_hat = 0.8 * x + 0.05 * torch.randn(N, d, generator=g, dtype=torch.float64)
    return directions, W_dec, coeffs, z, x, x_hat


def reference(directions, W_dec, coeffs, z, x, x_hat):
    M, F = W_dec.shape[0], directions.shape[0]
    cos = [
        [
            abs(float(W_dec[i] @ directions[j]) / float(W_dec[i].norm() * directions[j].norm()))
            for j in range(F)
        ]
        for i in range(M)
    ]
    match = [max(range(F), key=lambda j: cos[i][j]) for i in range(M)]
    prec, rec, f1 = [], [], []
    for i in range(M):
        tp = fp = fn = 0
        for n in range(x.shape[0]):
            fires, true = bool(z[n, i] != 0), bool(coeffs[n, match[i]] > 0)
            tp += fires and true
            fp += fires and not true
            fn += (not fires) and true
        p = tp / (tp + fp) if tp + fp else 0.0
        r = tp / (tp + fn) if tp + fn else 0.0
        prec.append(p)
        rec.append(r)
        f1.append(2 * p * r / (p + r) if p + r else 0.0)
    best = max(  # brute-force one-to-one matching (M >= F here)
        sum(cos[perm[j]][j] for j in range(F)) for perm in itertools.permutations(range(M), F)
    )
    mean = x.mean(0)
    ev = 1 - float(((x - x_hat) ** 2).sum()) / float(((x - mean) ** 2).sum())
    shrink = sum(float(x_hat[n].norm() / x[n].norm()) for n in range(x.shape[0])) / x.shape[0]
    return dict(
        precision=sum(prec) / M,
        recall=sum(rec) / M,
        f1=sum(f1) / M,
        mcc=best / min(M, F),
        uniqueness=len(set(match)) / M,
        explained_variance=ev,
        shrinkage=shrink,
        l0=float((z != 0).sum()) / x.shape[0],
        dead=int(sum(1 for i in range(M) if (z[:, i] == 0).all())),
    )


def test_scores_match_plain_loops_streamed_over_3d_batches():
    directions, W_dec, coeffs, z, x, x_hat = world()
    acc = SynthMetricAccumulator(W_dec, directions)
    for chunk in range(4):  # 3-D inputs, streamed
        s = slice(50 * chunk, 50 * chunk + 50)
        acc.add(x[s].reshape(5, 10, -1), x_hat[s].reshape(5, 10, -1), z[s].reshape(5, 10, -1),
                coeffs[s].reshape(5, 10, -1))  # fmt: skip
    got = acc.result().as_dict()
    want = reference(directions, W_dec, coeffs, z, x, x_hat)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    assert want["uniqueness"] < 1 and want["dead"] == 1


def test_all_latents_dead_score_zero_detection_and_perfect_latents_score_one():
    directions, W_dec, coeffs, z, x, x_hat = world()
    acc = SynthMetricAccumulator(W_dec, directions)
    acc.add(x, x_hat, torch.zeros_like(z), coeffs)
    scores = acc.result()
    assert (scores.precision, scores.recall, scores.f1, scores.dead) == (0.0, 0.0, 0.0, 6)
    perfect = SynthMetricAccumulator(directions * 2.5, directions)
    perfect.add(x, x, coeffs, coeffs)
    s = perfect.result()
    assert (s.precision, s.recall, s.f1, s.mcc, s.uniqueness) == pytest.approx((1, 1, 1, 1, 1))
    assert (s.explained_variance, s.shrinkage) == pytest.approx((1.0, 1.0))


def test_no_tokens_is_an_error():
    directions, W_dec, *_ = world()
    with pytest.raises(ValueError, match="no evaluation tokens"):
        SynthMetricAccumulator(W_dec, directions).result()
