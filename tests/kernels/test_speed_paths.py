"""The speed paths of issue 16 against plain float64 references.

- BatchTopK's CPU selection (candidates + exact fallback) is a valid top-k·N on adversarial
  inputs: ties at the threshold, one token holding all the mass, fewer than k·N positives.
- AuxK searched among a superset of the dead columns (``revival.DeadSet``), through the dense
  column GEMMs or the sparse passes, equals an AuxK written out by hand, in value and in every
  gradient, with none / a few / many / all latents dead.
- The token-subsampled AuxK is unbiased: its average over every subset equals the exact loss.
- The DeadSet is a superset of every step's dead mask between refreshes, and reads the host
  once per refresh.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from saekit.kernels import select as kernel_select
from saekit.kernels.select import batchtopk_above, batchtopk_candidates, batchtopk_select
from saekit.model.config import SAEConfig
from saekit.model.sae import SAE
from saekit.objective import revival
from saekit.objective.revival import DeadSet, auxk_loss

F64 = torch.float64
TOL = dict(rtol=1e-10, atol=1e-12)
PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")


# ------------------------------------------------------------------------- BatchTopK exactness


def assert_valid_batch_topk(pre, k, values, flat):
    """A valid top-k·N: k·N distinct entries, values read at them, every chosen entry ≥ every
    other, the multiset of values equal to a plain sort's, token-major order."""
    entries = pre.reshape(-1).tolist()
    n_keep = k * pre.shape[0]
    chosen = flat.tolist()
    assert len(chosen) == n_keep and len(set(chosen)) == n_keep
    assert chosen == sorted(chosen)
    assert values.tolist() == [entries[e] for e in chosen]
    others = set(range(len(entries))) - set(chosen)
    assert min(entries[e] for e in chosen) >= max(entries[e] for e in others)
    assert sorted(values.tolist()) == sorted(entries, reverse=True)[:n_keep][::-1]


def adversarial(name):
    g = torch.Generator().manual_seed(4)
    N, M = 130, 200  # 130 tokens: 2 full rows at N/64
    pre = torch.randn(N, M, generator=g, dtype=F64)
    if name == "ties":  # the threshold falls inside a block of equal values spread over tokens
        pre = torch.randint(0, 4, (N, M), generator=g).to(F64)
    elif name == "one-token-holds-all":  # every kept entry lies in token 7
        pre[7] += 100.0
    elif name == "many-heavy-tokens":  # 10 tokens own everything: more than the full rows
        pre[::13] += 100.0
    elif name == "few-positives":  # fewer than k·N positive entries in the batch
        pre = -pre.abs() - 0.1
        pre[3, :5] = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=F64)
    return pre


CASES = ["random", "ties", "one-token-holds-all", "many-heavy-tokens", "few-positives"]


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("k", [1, 4])
def test_batchtopk_select_is_exact_on_adversarial_inputs(name, k):
    pre = adversarial(name)
    values, flat = batchtopk_select(pre, k)
    assert_valid_batch_topk(pre, k, values, flat)


def kth_value(pre, k):
    return sorted(pre.reshape(-1).tolist(), reverse=True)[k * pre.shape[0] - 1]


FLOORS = {  # where the floor sits against the batch's k·N-th value τ, and what the path does
    "just-under": lambda tau, pre: tau - 1e-9,  # the floor path finds it
    "at-tau": lambda tau, pre: tau,  # fewer than k·N strictly above: fall back
    "too-high": lambda tau, pre: tau + 1.0,  # fall back
    "too-low": lambda tau, pre: float(pre.min()) - 1.0,  # every entry a candidate: fall back
}


@pytest.mark.parametrize("floor", list(FLOORS))
@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("k", [1, 4])
def test_batchtopk_select_with_a_floor_is_exact_wherever_the_floor_is(name, k, floor):
    pre = adversarial(name)
    values, flat = batchtopk_select(pre, k, floor=FLOORS[floor](kth_value(pre, k), pre))
    assert_valid_batch_topk(pre, k, values, flat)


@pytest.mark.parametrize("name", CASES)
def test_batchtopk_above_answers_only_when_it_can_certify(name):
    pre, k = adversarial(name), 4
    tau, n_keep = kth_value(pre, k), 4 * pre.shape[0]
    entries = pre.reshape(-1).tolist()
    for floor in (tau - 1e-9, tau, tau + 1.0, min(entries) - 1.0):
        above = sum(v > floor for v in entries)
        found = batchtopk_above(pre, k, floor)
        assert (found is not None) == (n_keep <= above <= 4 * n_keep)
        if found is not None:
            assert_valid_batch_topk(pre, k, *found)


def test_batchtopk_training_uses_the_previous_batch_as_floor(monkeypatch):
    """From the second training batch on, the CPU selection starts from a floor under the
    previous batch's k·N-th value, and the code is the one a plain sort gives."""
    floors, found = [], []
    real = kernel_select.batchtopk_above

    def spy(*args):
        floors.append(args[2])
        found.append(real(*args))
        return found[-1]

    monkeypatch.setattr(kernel_select, "batchtopk_above", spy)
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=D, d_sae=M, activation={"kind": "batchtopk", "k": K})).double()
    sae.train()
    g = torch.Generator().manual_seed(1)
    previous = None
    for step in range(3):
        x = torch.randn(40, D, generator=g, dtype=F64) + 0.3
        out = sae(x)
        pre = out.encoding.preacts.detached
        tau = kth_value(pre, K)
        code = out.latents
        flat = code.token * M + code.latent
        assert_valid_batch_topk(pre, K, pre.reshape(-1)[flat], flat)
        assert len(floors) == step  # none on the first batch
        if step:
            assert floors[-1] == pytest.approx(previous - 0.1 * abs(previous))
        previous = tau
    assert all(f is not None for f in found)  # the floor path itself chose these codes


def test_batchtopk_candidates_flag_is_never_a_wrong_true():
    """Where the flag says exact, the candidates alone are a valid top-k·N; where it cannot
    certify a batch (ties at the threshold, more heavy tokens than full rows), it says so."""
    flags = {}
    for name, k in itertools.product(CASES, [1, 4]):
        pre = adversarial(name)
        values, flat, exact = batchtopk_candidates(pre, k, 2 * k, 2)
        flags[name, k] = bool(exact)
        if exact:
            assert_valid_batch_topk(pre, k, values, flat)
    assert flags["one-token-holds-all", 1] and flags["one-token-holds-all", 4]
    assert not flags["ties", 4] and not flags["many-heavy-tokens", 4]


# ------------------------------------------------------------------------- AuxK by columns

D, M, K, K_AUX = 16, 37, 3, 6


def make_sae(seed=0):
    """TopK fast path with the traps: scale 1.7, b_dec and b_enc nonzero, W_enc untied."""
    cfg = SAEConfig(d_in=D, d_sae=M, activation={"kind": "topk", "k": K}, dtype="float64")
    sae = SAE(cfg)
    torch.manual_seed(seed)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.copy_(0.1 * torch.randn_like(sae.b_enc))
        sae.W_enc.add_(0.3 * torch.randn_like(sae.W_enc))
        sae.scale.fill_(1.7)
    return sae.train()


def make_x():
    g = torch.Generator().manual_seed(1)
    return 2.0 * torch.randn(3, 4, D, generator=g, dtype=F64) + 3.0  # 3-D, nonzero mean


def hand_auxk(sae, x, dead, rows=None):
    """AuxK as the formula reads, on dense float64 autograd, over the tokens ``rows``."""
    x_n = x.reshape(-1, D) / sae.scale
    pre = (x_n - sae.b_dec) @ sae.W_enc.T + sae.b_enc
    z = torch.zeros_like(pre).scatter(
        1, pre.detach().topk(K, dim=-1).indices, torch.relu(pre).gather(1, pre.topk(K).indices)
    )
    e = (x_n - (z @ sae.W_dec + sae.b_dec)).detach()
    cand = torch.where(dead, torch.relu(pre.detach()), torch.full_like(pre, -math.inf))
    chosen = cand.argsort(dim=-1, descending=True)[:, :K_AUX]
    sel = torch.zeros_like(pre).scatter(1, chosen, 1.0) * dead.to(F64)
    e_hat = (torch.relu(pre) * sel) @ sae.W_dec  # no b_dec
    per_token = (e_hat - e).pow(2).sum(-1)
    rows = torch.arange(x_n.shape[0]) if rows is None else rows
    V = (e - e.mean(0)).pow(2).sum(-1).mean()
    return (1 / 32) * torch.clamp(dead.sum() / K_AUX, max=1.0) * per_token[rows].mean() / V


def fast_auxk(sae, x, dead, cols):
    out = sae(x)
    return auxk_loss(
        out.encoding.preacts, out.x_n - out.x_hat_n, sae.W_dec, dead, k_aux=K_AUX, dead_cols=cols
    )


def grads(loss, sae):
    return torch.autograd.grad(loss, [getattr(sae, p) for p in PARAMS], allow_unused=True)


DEAD = {"none": 0, "few": 3, "many": 20, "all": M}
COLS = {  # which superset of the dead columns AuxK searches
    "all-columns": lambda dead: None,
    "exact-set": lambda dead: torch.nonzero(dead).reshape(-1),
    "superset": lambda dead: torch.nonzero(dead | (torch.arange(M) % 3 == 0)).reshape(-1),
}


@pytest.mark.parametrize("cols", list(COLS))
@pytest.mark.parametrize("n_dead", list(DEAD))
def test_auxk_over_dead_columns_equals_the_hand_formula(n_dead, cols):
    sae, x = make_sae(), make_x()
    dead = torch.zeros(M, dtype=torch.bool)
    dead[torch.randperm(M, generator=torch.Generator().manual_seed(2))[: DEAD[n_dead]]] = True
    cols_C = COLS[cols](dead)
    loss, expected = fast_auxk(sae, x, dead, cols_C), hand_auxk(sae, x, dead)
    torch.testing.assert_close(loss, expected, **TOL)
    if DEAD[n_dead] == 0:
        assert float(loss.detach()) == 0.0
        return
    for p, a, b in zip(PARAMS, grads(loss, sae), grads(expected, sae), strict=True):
        torch.testing.assert_close(a, b, **TOL, msg=p)
        assert b.abs().sum() > 0, p


def test_auxk_dense_and_sparse_column_paths_both_run(monkeypatch):
    """The two ways of decoding over columns are each checked above: a few candidate columns
    (≤ 8·k_aux) take the GEMMs, many the sparse passes."""
    calls = []
    real = revival.columns_decode
    monkeypatch.setattr(revival, "columns_decode", lambda *a: calls.append(1) or real(*a))
    sae, x = make_sae(), make_x()
    dead = torch.arange(M) < 5
    fast_auxk(sae, x, dead, torch.arange(5))
    assert calls == [1]
    monkeypatch.setattr(revival, "DENSE_COLUMNS_PER_K", 0)
    fast_auxk(sae, x, dead, torch.arange(5))
    assert calls == [1]


@pytest.mark.parametrize("path", ["dense-columns", "sparse"])
def test_auxk_over_columns_runs_under_bf16_autocast(path, monkeypatch):
    """bf16 pre-activations, fp32 gradients close to the fp32 ones (bf16 rounding may change
    the odd selected entry, hence a norm tolerance)."""
    if path == "sparse":
        monkeypatch.setattr(revival, "DENSE_COLUMNS_PER_K", 0)
    sae, x = make_sae(), make_x()
    sae.float()
    x = x.float()
    dead = torch.arange(M) < 20
    exact = fast_auxk(sae, x, dead, torch.arange(20))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fast_auxk(sae, x, dead, torch.arange(20))
    for a, b in zip(grads(loss, sae), grads(exact, sae), strict=True):
        assert a.dtype == torch.float32
        assert (a - b).norm() <= 0.1 * b.norm()


def test_token_subsampled_auxk_is_unbiased(monkeypatch):
    """Averaged over every subset of S of the N tokens, value and gradients equal the exact
    AuxK: the estimator is unbiased for the batch."""
    sae, x = make_sae(), make_x()
    dead = torch.arange(M) % 2 == 0
    n_tokens, n_sample = 12, 2
    exact = hand_auxk(sae, x, dead)
    exact_grads = grads(exact, sae)
    total, total_grads, count = 0.0, [0.0] * 4, 0
    for subset in itertools.combinations(range(n_tokens), n_sample):
        rows = torch.tensor(subset)
        monkeypatch.setattr(revival, "sample_tokens", lambda n, f, device, rows=rows: rows)
        out = sae(x)
        loss = auxk_loss(
            out.encoding.preacts, out.x_n - out.x_hat_n, sae.W_dec, dead, k_aux=K_AUX,
            token_fraction=2 / 12,
        )  # fmt: skip
        torch.testing.assert_close(loss, hand_auxk(sae, x, dead, rows), **TOL)
        total, count = total + loss, count + 1
        total_grads = [t + g for t, g in zip(total_grads, grads(loss, sae), strict=True)]
    torch.testing.assert_close(total / count, exact, **TOL)
    for p, t, g in zip(PARAMS, total_grads, exact_grads, strict=True):
        torch.testing.assert_close(t / count, g, **TOL, msg=p)


def test_sample_tokens_draws_without_replacement():
    rows = revival.sample_tokens(100, 0.13, torch.device("cpu"))
    assert rows.tolist() == sorted(set(rows.tolist())) and len(rows) == 13
    assert revival.sample_tokens(100, 1.0, torch.device("cpu")) is None
    with pytest.raises(ValueError, match="token_fraction"):
        revival.sample_tokens(100, 0.0, torch.device("cpu"))


# ------------------------------------------------------------------------- the dead set


def test_dead_set_holds_every_dead_latent_between_refreshes(monkeypatch):
    """Random firing with some latents that stop firing: at every step the dead mask lies
    inside the set, and the host is read once per refresh (every 25 steps of 64 tokens)."""
    transfers = []
    real_nonzero = torch.nonzero
    monkeypatch.setattr(torch, "nonzero", lambda t: transfers.append(1) or real_nonzero(t))
    g = torch.Generator().manual_seed(0)
    n, dead_tokens, steps = 64, 1000, 100
    counters = torch.zeros(50, dtype=torch.int64)
    dead_set = DeadSet(dead_tokens)
    rate = torch.rand(50, generator=g) * 0.3
    rate[:10] = 0.0  # these die at step 16 and stay dead
    for step in range(steps):
        cols = dead_set.get(counters, n)
        dead = counters >= dead_tokens
        assert set(torch.where(dead)[0].tolist()) <= set(cols.tolist()), step
        fired = torch.rand(50, generator=g) < rate
        counters = torch.where(fired, torch.zeros_like(counters), counters + n)
        dead_set.count(n, counters)
    assert len(transfers) == math.ceil(steps / 26)
    counters[20] = 10**6  # edited in place: the set is refreshed at once
    assert 20 in dead_set.get(counters, n).tolist()
