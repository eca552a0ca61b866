"""Per-part metrics of a multi-hook dictionary (saekit.eval.parts) against float64 plain loops:
a CLT's per-target FVU and per-layer L0, a crosscoder's per-source FVU."""

from __future__ import annotations

import pytest
import torch

from saekit.core.encoding import SparseCode
from saekit.eval.parts import PartAccumulator


def loop_fvu(ys, y_hats):
    """Σ_n Σ_j (y − ŷ)² / Σ_n Σ_j (y − ȳ)², ȳ the mean over every token, by plain loops."""
    rows = [r for y in ys for r in y.reshape(-1, y.shape[-1]).double().tolist()]
    hats = [r for y in y_hats for r in y.reshape(-1, y.shape[-1]).double().tolist()]
    n, d = len(rows), len(rows[0])
    mean = [sum(r[j] for r in rows) / n for j in range(d)]
    err = sum((r[j] - h[j]) ** 2 for r, h in zip(rows, hats, strict=True) for j in range(d))
    var = sum((r[j] - mean[j]) ** 2 for r in rows for j in range(d))
    return err, var, n


def batches(seed, shapes, width, mean, std):
    """3-D [B, T, width] targets with a nonzero mean and their imperfect predictions."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for shape in shapes:
        y = mean + std * torch.randn(*shape, width, generator=g)
        out.append((y, y + 0.4 * std * torch.randn(*shape, width, generator=g) + 0.1))
    return out


def codes(seed, n, M, dead):
    """A code [n, M]: about a quarter of the entries active, the ``dead`` latents never."""
    g = torch.Generator().manual_seed(seed)
    z = torch.rand(n, M, generator=g) * (torch.rand(n, M, generator=g) < 0.25)
    z[:, dead] = 0
    return z


def test_clt_parts_equal_plain_loops():
    widths, M, L = [5, 3, 4], 6, 3
    shapes = [(2, 3), (1, 5)]  # 3-D input, two batches of different sizes
    per_target = [batches(10 + t, shapes, widths[t], 3.0 * (t + 1), 0.5 + t) for t in range(L)]
    dead = [[0, 1], [], list(range(M))]  # some, none and all of a layer's latents dead
    layer_codes = [
        [codes(20 * b + layer, 6 if b == 0 else 5, M, dead[layer]) for b in range(2)]
        for layer in range(L)
    ]
    acc = PartAccumulator(["t0", "t1", "t2"], widths, layer_latents=M, input_hooks=["a", "b", "c"])
    for b in range(2):
        for t in range(L):
            acc.add(t, *per_target[t][b])
        z = torch.cat([layer_codes[layer][b] for layer in range(L)], dim=-1)  # [n, L·M]
        if b == 0:  # a sparse code (fired entries only, by token), then a dense one
            tok, lat = z.nonzero(as_tuple=True)
            acc.add_latents(SparseCode(z[tok, lat], lat, tok, z.shape[0], L * M))
        else:
            acc.add_latents(z)
    whole, parts = acc.result()

    errs, vars_ = [], []
    total_l0, fired_all = 0.0, []
    for t in range(L):
        err, var, n = loop_fvu(*zip(*per_target[t], strict=True))
        errs.append(err)
        vars_.append(var)
        assert parts[t].fvu == pytest.approx(err / var, rel=1e-12)
        assert parts[t].mse == pytest.approx(err / n, rel=1e-12)
        rows = [r for z in layer_codes[t] for r in z.tolist()]
        l0 = sum(sum(1 for v in r if v != 0) for r in rows) / len(rows)
        fired = [any(r[i] != 0 for r in rows) for i in range(M)]
        assert parts[t].l0 == pytest.approx(l0, rel=1e-12)
        assert parts[t].dead_fraction == pytest.approx(fired.count(False) / M)
        assert parts[t].input_hook == "abc"[t] and parts[t].name == f"t{t}"
        total_l0 += l0
        fired_all += fired
    assert [p.dead_fraction for p in parts] == [2 / M, 0.0, 1.0]  # some, none, all dead
    assert whole.n_tokens == n == 11
    assert whole.fvu == pytest.approx(sum(errs) / sum(vars_), rel=1e-12)
    assert whole.mse == pytest.approx(sum(errs) / n, rel=1e-12)
    assert whole.l0 == pytest.approx(total_l0, rel=1e-12)
    assert whole.dead_fraction == pytest.approx(fired_all.count(False) / (L * M))
    # the histogram counts a token's active latents over every layer
    per_token = [
        sum(sum(1 for v in layer_codes[t][b][i].tolist() if v != 0) for t in range(L))
        for b in range(2)
        for i in range(layer_codes[0][b].shape[0])
    ]
    assert whole.l0_histogram == [per_token.count(j) for j in range(max(per_token) + 1)]
    # the trap is real: the pooled FVU is not the mean of the parts' FVUs
    assert abs(whole.fvu - sum(p.fvu for p in parts) / L) > 1e-3


def test_crosscoder_sources_share_one_latent_space():
    S, d, M = 2, 4, 5
    shapes = [(3, 2), (2, 2)]
    per_source = [batches(30 + s, shapes, d, -2.0 + 4 * s, 1.0 + s) for s in range(S)]
    z = [codes(40 + b, 6 if b == 0 else 4, M, [4]) for b in range(2)]
    acc = PartAccumulator(["A", "B"], [d, d], d_sae=M)
    for b in range(2):
        for s in range(S):
            acc.add(s, *per_source[s][b])
        acc.add_latents(z[b])
    whole, parts = acc.result()
    for s in range(S):
        err, var, _ = loop_fvu(*zip(*per_source[s], strict=True))
        assert parts[s].fvu == pytest.approx(err / var, rel=1e-12)
        assert parts[s].l0 is None and parts[s].dead_fraction is None
        assert "l0" not in parts[s].to_json()
    rows = [r for zb in z for r in zb.tolist()]
    assert whole.l0 == pytest.approx(sum(sum(v != 0 for v in r) for r in rows) / len(rows))
    assert whole.dead_fraction == pytest.approx(1 / M)


def test_mismatched_parts_are_refused():
    with pytest.raises(ValueError, match="give layer_latents .* or d_sae"):
        PartAccumulator(["a"], [3])
    acc = PartAccumulator(["a", "b"], [3, 3], layer_latents=2)
    acc.add(0, torch.ones(4, 3), torch.ones(4, 3))
    acc.add(1, torch.ones(3, 3), torch.ones(3, 3))
    acc.add_latents(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="different token counts"):
        acc.result()
