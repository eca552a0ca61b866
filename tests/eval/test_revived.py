"""The revived-latent classes (saekit.eval.revived) on hand-built decoders."""

from __future__ import annotations

import math

import torch

from saekit.eval.revived import class_shares, classify_revived, error_directions


def test_each_class_is_recognised():
    eye = torch.eye(8, dtype=torch.float64)
    directions = eye[:6]  # six orthonormal features in R^8
    e0 = (eye[3] + eye[4] + eye[5]) / math.sqrt(3)  # latent 0's error: no single feature
    snap = torch.zeros(8, 8, dtype=torch.float64)
    snap[0], snap[1] = eye[0], eye[1]  # live latents on features 0 and 1
    end = snap.clone()
    end[2] = 2 * eye[2]  # a new feature
    end[3] = -eye[0]  # a duplicate of live latent 0 (sign does not matter)
    end[4] = e0 + 0.1 * eye[6]  # latent 0's error
    end[5] = eye[1] + eye[2]  # a composite of features 1 and 2
    end[6] = eye[7]  # none of these
    errors = torch.zeros(8, 8, dtype=torch.float64)
    errors[0] = 3 * e0
    live = torch.tensor([True, True] + [False] * 6)
    revived = torch.tensor([False, False, True, True, True, True, True, False])
    got = classify_revived(end, snap, revived, live, errors, directions)
    assert got == ["feature", "duplicate", "error", "composite", "other"]
    shares = class_shares(got)
    assert shares["feature"] == 0.2 and sum(shares.values()) == 1.0
    assert set(class_shares([]).values()) == {0.0}


def test_error_directions_are_mean_residuals_over_firing_tokens():
    g = torch.Generator().manual_seed(0)
    z = torch.rand(30, 4, generator=g) * (torch.rand(30, 4, generator=g) < 0.5)
    z[:, 3] = 0  # never fires
    residual = torch.randn(30, 5, generator=g, dtype=torch.float64)
    got = error_directions(z, residual)
    for j in range(4):
        rows = [residual[n] for n in range(30) if z[n, j] != 0]
        want = sum(rows) / len(rows) if rows else torch.zeros(5, dtype=torch.float64)
        assert torch.allclose(got[j], want)
