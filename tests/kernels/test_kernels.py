"""The sparse fast paths equal their plain references, in values and in gradients.

Three layers: the primitives (bag sum, row dot), the code layout and the sparse decode against
float64 Python loops; :class:`SparsePreacts` (the encoder's sparse and dense backwards) against
dense float64 autograd; and whole SAEs with ``kernel: torch`` (sparse fast path) against the same
weights with ``kernel: reference`` (dense autograd through the encoder, dense [N, M] latents), in
forward values and in the gradients of a loss with reconstruction and a revival term.

Traps built in: k = 1, latents repeated across tokens, tokens with no entry, M not a multiple of
8, 3-D inputs, nonzero b_dec and b_enc, a nonzero data mean, a dataset scale ≠ 1, all / none /
some latents dead. A last test runs whole fast training steps with every host-sync entry point
made to raise.
"""

from __future__ import annotations

import pytest
import torch

from saekit.core.comm import LocalComm
from saekit.core.encoding import Preacts, SparseCode, as_dense, encoder_preacts
from saekit.kernels import primitives
from saekit.kernels import select as kernel_select
from saekit.kernels.layout import CodeLayout
from saekit.kernels.primitives import bag_sum, row_dot
from saekit.kernels.select import auxk_select, batchtopk_select, topk_select
from saekit.kernels.sparse import SparsePreacts, sparse_decode, sparse_decode_reference
from saekit.model.config import SAEConfig
from saekit.model.sae import SAE
from saekit.objective.config import AuxKRevival, PreactRevival
from saekit.objective.terms import AuxK, Objective, PreactTerm, Reconstruction, TermInputs

F64 = torch.float64
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-4)}
DTYPES = [torch.float64, torch.float32]


def random_code(n_tokens, d_sae, per_token, *, seed=0, empty_every=0, dtype=F64):
    """A token-sorted code with ``per_token`` entries per token (distinct latents within a
    token, repeated across tokens); every ``empty_every``-th token has no entry."""
    g = torch.Generator().manual_seed(seed)
    latent_NK = torch.stack(
        [torch.randperm(d_sae, generator=g)[:per_token] for _ in range(n_tokens)]
    )
    token_NK = torch.arange(n_tokens).unsqueeze(1).expand(-1, per_token)
    keep = torch.ones(n_tokens, dtype=torch.bool)
    if empty_every:
        keep[::empty_every] = False
    token_E, latent_E = token_NK[keep].reshape(-1), latent_NK[keep].reshape(-1)
    values_E = torch.randn(token_E.numel(), generator=g, dtype=dtype)
    return values_E, latent_E, token_E


SHAPES = [  # (N, M, d, entries per token, empty_every)
    (7, 13, 5, 1, 0),
    (16, 37, 24, 4, 3),
    (33, 61, 8, 9, 0),
    (5, 12, 7, 12, 2),  # every latent of the token
]


def offsets_of(token_E: torch.Tensor, n_tokens: int) -> list[int]:
    """Start of each token's entries, by a scan."""
    tokens = token_E.tolist()
    return [next((e for e, t in enumerate(tokens) if t >= n), len(tokens)) for n in range(n_tokens)]


# ------------------------------------------------------------------------------ primitives


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_bag_sum_equals_a_python_loop(shape, dtype):
    n_tokens, d_sae, d, per_token, empty_every = shape
    weights, rows, token = random_code(
        n_tokens, d_sae, per_token, empty_every=empty_every, dtype=dtype
    )
    W = torch.randn(d_sae, d, dtype=dtype)
    offsets = offsets_of(token, n_tokens)
    bounds = [*offsets, rows.numel()]
    w, r, Wl = weights.double().tolist(), rows.tolist(), W.double().tolist()
    expected = [
        [sum(w[e] * Wl[r[e]][j] for e in range(bounds[b], bounds[b + 1])) for j in range(d)]
        for b in range(n_tokens)
    ]
    out = bag_sum(weights, rows, torch.tensor(offsets), W)
    assert out.dtype == dtype
    torch.testing.assert_close(out, torch.tensor(expected, dtype=dtype), **TOL[dtype])
    if empty_every:
        assert not out[::empty_every].any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_row_dot_equals_a_python_loop(shape, dtype):
    n_tokens, d_sae, d, per_token, empty_every = shape
    _, latent, token = random_code(n_tokens, d_sae, per_token, empty_every=empty_every)
    A, B = torch.randn(n_tokens, d, dtype=dtype), torch.randn(d_sae, d, dtype=dtype)
    Al, Bl = A.double().tolist(), B.double().tolist()
    expected = [
        sum(Al[n][j] * Bl[m][j] for j in range(d))
        for n, m in zip(token.tolist(), latent.tolist(), strict=True)
    ]
    out = row_dot(A, B, token, latent, torch.tensor(offsets_of(token, n_tokens)))
    assert out.dtype == dtype
    torch.testing.assert_close(out, torch.tensor(expected, dtype=dtype), **TOL[dtype])


def bag_sum_by_loop(weights, rows, offsets, W):
    bounds = [*offsets, rows.numel()]
    w, r, Wl = weights.double().tolist(), rows.tolist(), W.double().tolist()
    return [
        [
            sum(w[e] * Wl[r[e]][j] for e in range(bounds[b], bounds[b + 1]))
            for j in range(len(Wl[0]))
        ]
        for b in range(len(offsets))
    ]


@pytest.mark.parametrize("tile", [None, 4])
def test_bag_sum_on_column_slices_equals_a_python_loop(monkeypatch, tile):
    """The CPU bag sum over slices of W's columns (many uses of each row): at the library's own
    threshold (every row read 128 times, d = 130: two full slices and a 2-column one), and at a
    4-column slice forced on a small case (d = 11: slices of 4, 4 and 3)."""
    if tile is None:
        n_bags, d_sae, d, per_bag = 64, 8, 2 * primitives.TILE_COLUMNS + 2, 16
    else:
        monkeypatch.setattr(primitives, "TILE_COLUMNS", tile)
        monkeypatch.setattr(primitives, "TILE_MIN_USES", 1)
        n_bags, d_sae, d, per_bag = 9, 5, 11, 3
    g = torch.Generator().manual_seed(4)
    rows = torch.randint(0, d_sae, (n_bags * per_bag,), generator=g)
    weights = torch.randn(rows.numel(), generator=g)
    W = torch.randn(d_sae, d, generator=g)
    offsets = list(range(0, rows.numel(), per_bag))
    offsets[3] = offsets[4]  # bag 3 is empty
    assert primitives._tiled(weights, W)
    out = bag_sum(weights, rows, torch.tensor(offsets), W)
    torch.testing.assert_close(out, torch.tensor(bag_sum_by_loop(weights, rows, offsets, W)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_row_dot_at_repeated_unsorted_coordinates(dtype):
    """Any coordinates (token non-decreasing): a latent repeated within a token, latents in no
    order, tokens with no entry at the start, middle and end."""
    token = torch.tensor([1, 1, 1, 1, 3, 3, 4])
    latent = torch.tensor([5, 0, 5, 2, 7, 1, 7])
    n_tokens, d_sae, d = 6, 8, 11
    g = torch.Generator().manual_seed(3)
    A = torch.randn(n_tokens, d, generator=g, dtype=dtype)
    B = torch.randn(d_sae, d, generator=g, dtype=dtype)
    Al, Bl = A.double().tolist(), B.double().tolist()
    expected = [
        sum(Al[n][j] * Bl[m][j] for j in range(d))
        for n, m in zip(token.tolist(), latent.tolist(), strict=True)
    ]
    out = row_dot(A, B, token, latent, torch.tensor(offsets_of(token, n_tokens)))
    torch.testing.assert_close(out, torch.tensor(expected, dtype=dtype), **TOL[dtype])


def test_code_layout_matches_scans_and_stable_sorts():
    n_tokens, d_sae = 16, 37
    _, latent, token = random_code(n_tokens, d_sae, 4, empty_every=3)
    layout = CodeLayout(token, latent, n_tokens, d_sae)
    assert layout.token_offsets.tolist() == offsets_of(token, n_tokens)
    order, token_by_latent, latent_offsets = layout.by_latent()
    lat = latent.tolist()
    expected_order = sorted(range(len(lat)), key=lambda e: lat[e])  # Python's sort is stable
    assert order.tolist() == expected_order
    assert token_by_latent.tolist() == [token.tolist()[e] for e in expected_order]
    sorted_lat = [lat[e] for e in expected_order]
    assert latent_offsets.tolist() == [
        next((i for i, v in enumerate(sorted_lat) if v >= m), len(sorted_lat)) for m in range(d_sae)
    ]
    with pytest.raises(ValueError, match="backend"):
        CodeLayout(token, latent, n_tokens, d_sae, backend="cuda")


def test_fixed_k_layout_equals_the_general_one():
    latent_Nk = torch.stack([torch.randperm(11)[:3] for _ in range(5)])
    fixed = CodeLayout.fixed_k(latent_Nk, 11)
    token = torch.arange(5).repeat_interleave(3)
    general = CodeLayout(token, latent_Nk.reshape(-1), 5, 11)
    assert torch.equal(fixed.token, token) and torch.equal(fixed.latent, general.latent)
    assert torch.equal(fixed.token_offsets, general.token_offsets)
    for a, b in zip(fixed.by_latent(), general.by_latent(), strict=True):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------ sparse decode


@pytest.mark.parametrize("with_layout", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_sparse_decode_equals_reference_and_a_loop_in_values_and_gradients(
    shape, dtype, with_layout
):
    n_tokens, d_sae, d, per_token, empty_every = shape
    values, latent, token = random_code(
        n_tokens, d_sae, per_token, empty_every=empty_every, dtype=dtype
    )
    W = torch.randn(d_sae, d, dtype=dtype)
    grad_out = torch.randn(n_tokens, d, dtype=dtype)

    # float64 loops: out[n] = Σ_{token_e = n} v_e W[latent_e]; grad v_e = g[token_e]·W[latent_e];
    # grad W[m] = Σ_{latent_e = m} v_e g[token_e]
    v, lat, tok = values.double().tolist(), latent.tolist(), token.tolist()
    Wl, G = W.double().tolist(), grad_out.double().tolist()
    out_loop = [[0.0] * d for _ in range(n_tokens)]
    grad_W_loop = [[0.0] * d for _ in range(d_sae)]
    for e, (n, m) in enumerate(zip(tok, lat, strict=True)):
        for j in range(d):
            out_loop[n][j] += v[e] * Wl[m][j]
            grad_W_loop[m][j] += v[e] * G[n][j]
    grad_v_loop = [sum(G[n][j] * Wl[m][j] for j in range(d)) for n, m in zip(tok, lat, strict=True)]
    loop = [torch.tensor(t, dtype=dtype) for t in (out_loop, grad_v_loop, grad_W_loop)]

    def fast(v_, l_, t_, W_, n_):
        layout = CodeLayout(t_, l_, n_, d_sae) if with_layout else None
        return sparse_decode(v_, l_, t_, W_, n_, layout)

    for fn in (fast, sparse_decode_reference):
        v_, W_ = values.clone().requires_grad_(), W.clone().requires_grad_()
        out = fn(v_, latent, token, W_, n_tokens)
        out.backward(grad_out)
        for got, want in zip((out.detach(), v_.grad, W_.grad), loop, strict=True):
            assert got.dtype == dtype
            torch.testing.assert_close(got, want, **TOL[dtype])


# ------------------------------------------------------------------------------ SparsePreacts


def encoder_inputs(n_tokens, d_sae, d, dtype=F64, seed=0):
    """x_n with a nonzero mean, W_enc, b_enc, b_dec (both nonzero)."""
    g = torch.Generator().manual_seed(seed)
    x_n = 2.0 * torch.randn(n_tokens, d, generator=g, dtype=dtype) + 1.5
    W_enc = torch.randn(d_sae, d, generator=g, dtype=dtype)
    b_enc = 0.3 * torch.randn(d_sae, generator=g, dtype=dtype)
    b_dec = torch.randn(d, generator=g, dtype=dtype)
    return x_n, W_enc, b_enc, b_dec


def loop_preacts(x_n, W_enc, b_enc, b_dec) -> torch.Tensor:
    """pre[n][m] = Σ_j (x_n[n][j] − b_dec[j])·W_enc[m][j] + b_enc[m], in float64 Python."""
    X, W, bd = x_n.double().tolist(), W_enc.double().tolist(), b_dec.double().tolist()
    be = [0.0] * len(W) if b_enc is None else b_enc.double().tolist()
    return torch.tensor(
        [
            [sum((xr[j] - bd[j]) * W[m][j] for j in range(len(bd))) + be[m] for m in range(len(W))]
            for xr in X
        ],
        dtype=F64,
    )


def two_preacts(inputs, use_b_enc=True):
    """(fast, leaves) and (reference, leaves): SparsePreacts and dense float64 autograd Preacts
    on separate leaf copies of the same inputs (x_n, W_enc, b_enc, b_dec)."""
    out = []
    for cls, dtype in ((SparsePreacts, inputs[0].dtype), (None, F64)):
        leaves = [t.detach().to(dtype).clone().requires_grad_() for t in inputs]
        x_n, W_enc, b_enc, b_dec = leaves
        b = b_enc if use_b_enc else None
        pre = cls(x_n, W_enc, b, b_dec) if cls else Preacts(encoder_preacts(x_n, W_enc, b, b_dec))
        out.append((pre, leaves))
    return out


def compare_leaf_grads(fast_leaves, ref_leaves, dtype, use_b_enc=True):
    names = ("x_n", "W_enc", "b_enc", "b_dec")
    for name, a, b in zip(names, fast_leaves, ref_leaves, strict=True):
        if name == "b_enc" and not use_b_enc:
            assert a.grad is None
            continue
        assert a.grad is not None and a.grad.dtype == dtype, name
        assert b.grad.abs().sum() > 0, name
        torch.testing.assert_close(a.grad, b.grad.to(dtype), **TOL[dtype], msg=name)


@pytest.mark.parametrize("use_b_enc", [True, False], ids=["b_enc", "no-b_enc"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_sparse_preacts_at_equals_dense_autograd_in_values_and_gradients(shape, dtype, use_b_enc):
    n_tokens, d_sae, d, per_token, empty_every = shape
    _, latent, token = random_code(n_tokens, d_sae, per_token, empty_every=empty_every)
    inputs = encoder_inputs(n_tokens, d_sae, d, dtype)
    grad_E = torch.randn(latent.numel(), dtype=dtype)
    (fast, fast_leaves), (ref, ref_leaves) = two_preacts(inputs, use_b_enc)

    expected_pre = loop_preacts(*inputs[:2], inputs[2] if use_b_enc else None, inputs[3])
    torch.testing.assert_close(fast.detached, expected_pre.to(dtype), **TOL[dtype])
    torch.testing.assert_close(ref.detached, expected_pre, **TOL[F64])

    values = fast.at(token, latent)
    ref_values = ref.at(token, latent)
    torch.testing.assert_close(values.detach(), ref_values.detach().to(dtype), **TOL[dtype])
    values.backward(grad_E)
    ref_values.backward(grad_E.double())
    compare_leaf_grads(fast_leaves, ref_leaves, dtype, use_b_enc)


def test_sparse_preacts_at_takes_coordinates_of_any_shape_and_adds_repeated_ones():
    n_tokens, d_sae, d = 9, 21, 6
    inputs = encoder_inputs(n_tokens, d_sae, d)
    latent = torch.randint(0, d_sae, (n_tokens, 3), generator=torch.Generator().manual_seed(4))
    latent[2, 1] = latent[2, 0]  # the same (token, latent) twice: its gradient counts twice
    token = torch.arange(n_tokens).unsqueeze(1).expand(-1, 3)
    grad = torch.randn(n_tokens, 3, dtype=F64)
    (fast, fast_leaves), (ref, ref_leaves) = two_preacts(inputs)
    values = fast.at(token, latent)
    assert values.shape == (n_tokens, 3)
    expected = loop_preacts(*inputs).gather(1, latent)
    torch.testing.assert_close(values.detach(), expected, **TOL[F64])
    values.backward(grad)
    ref.dense().gather(1, latent).backward(grad)
    compare_leaf_grads(fast_leaves, ref_leaves, F64)


@pytest.mark.parametrize("use_b_enc", [True, False], ids=["b_enc", "no-b_enc"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_preacts_dense_equals_dense_autograd_in_values_and_gradients(dtype, use_b_enc):
    n_tokens, d_sae, d = 11, 29, 7
    inputs = encoder_inputs(n_tokens, d_sae, d, dtype, seed=5)
    grad_NM = torch.randn(n_tokens, d_sae, dtype=dtype)
    (fast, fast_leaves), (ref, ref_leaves) = two_preacts(inputs, use_b_enc)
    pre = fast.dense()
    torch.testing.assert_close(pre.detach(), ref.dense().detach().to(dtype), **TOL[dtype])
    pre.backward(grad_NM)
    ref.dense().backward(grad_NM.double())
    compare_leaf_grads(fast_leaves, ref_leaves, dtype, use_b_enc)


def test_sparse_preacts_without_autograd_build_no_graph():
    inputs = [t.requires_grad_() for t in encoder_inputs(4, 9, 3)]
    fast = SparsePreacts(*inputs)
    assert not fast.detached.requires_grad
    with torch.no_grad():
        values = fast.at(torch.tensor([0, 3]), torch.tensor([8, 2]))
    assert not values.requires_grad
    torch.testing.assert_close(values, loop_preacts(*inputs)[[0, 3], [8, 2]], **TOL[F64])


# ------------------------------------------------------------------------------ selections


@pytest.mark.parametrize("k", [1, 3, 7])
def test_topk_select_is_each_tokens_k_largest(k):
    pre = torch.randn(6, 7, generator=torch.Generator().manual_seed(6), dtype=F64)
    values, latent = topk_select(pre, k)
    assert values.shape == latent.shape == (6, k)
    for n, row in enumerate(pre.tolist()):
        kept = sorted(range(7), key=lambda i: row[i], reverse=True)[:k]
        assert sorted(latent[n].tolist()) == sorted(kept)
        assert values[n].tolist() == [row[i] for i in latent[n].tolist()]


@pytest.mark.parametrize("k", [1, 3])
def test_batchtopk_select_is_the_batch_k_times_N_largest_in_token_order(k):
    pre = torch.randn(12, 29, generator=torch.Generator().manual_seed(3), dtype=F64)
    pre[5] += 3.0  # one token owns many of the batch's largest entries
    values, flat = batchtopk_select(pre, k)
    entries = pre.reshape(-1).tolist()
    largest = sorted(range(len(entries)), key=lambda e: entries[e], reverse=True)[: k * 12]
    assert flat.tolist() == sorted(largest)  # sorted by flat index: token-major
    assert values.tolist() == [entries[e] for e in sorted(largest)]
    assert int((flat // 29 == 5).sum()) > k


def test_auxk_select_keeps_only_dead_positive_entries():
    pre = torch.tensor([[3.0, -1.0, 2.0, 5.0], [-2.0, -3.0, 1.0, 0.5]])
    dead = torch.tensor([True, True, False, True])
    latent, keep, value = auxk_select(pre, dead, k_aux=3)
    chosen = {(n, int(latent[n, j])) for n in range(2) for j in range(3) if keep[n, j]}
    assert chosen == {(0, 0), (0, 3), (1, 3)}
    for n, j in zip(*torch.nonzero(keep).T.tolist(), strict=True):  # the values of pre there
        assert value[n, j] == pre[n, latent[n, j]]
    latent, keep, _ = auxk_select(pre, dead, k_aux=10)  # k_aux is clamped to M
    assert latent.shape == keep.shape == (2, 4)
    latent, keep, _ = auxk_select(pre, torch.zeros(4, dtype=torch.bool), k_aux=2)
    assert not keep.any()  # none dead: nothing kept


# ------------------------------------------------------------------------------ fast = reference

D, D_SAE = 16, 37


def make_pair(kind, k, dtype="float64", seed=0, kernel="torch"):
    """The same SAE twice: ``kernel`` (the sparse fast path) and "reference" (dense autograd).
    Traps: s = 1.7, b_dec nonzero, b_enc nonzero and negative, W_enc untied from W_dec."""
    saes = []
    for kernel_ in (kernel, "reference"):
        activation = {"kind": kind, "k": k, "kernel": kernel_}
        saes.append(SAE(SAEConfig(d_in=D, d_sae=D_SAE, activation=activation, dtype=dtype)))
    fast, ref = saes
    torch.manual_seed(seed)
    with torch.no_grad():
        fast.b_dec.normal_()
        fast.b_enc.copy_(-(0.1 * torch.randn_like(fast.b_enc)).abs() - 0.05)
        fast.W_enc.add_(0.3 * torch.randn_like(fast.W_enc))
        fast.scale.fill_(1.7)
    ref.load_state_dict(fast.state_dict())
    return fast.train(), ref.train()


def make_x(dtype=F64, seed=1, sae=None):
    """3-D activations with a nonzero mean. With ``sae``, the first token is s·b_dec: its
    pre-activations are b_enc < 0, so TopK keeps k negative values there, which ReLU zeroes."""
    g = torch.Generator().manual_seed(seed)
    x = 2.0 * torch.randn(3, 4, D, generator=g, dtype=dtype) + 3.0
    if sae is not None:
        x[0, 0] = (sae.scale * sae.b_dec).detach().to(dtype)
    return x


def assert_rel(actual, expected, tol):
    err = (actual.double() - expected.double()).norm()
    assert err <= tol * expected.double().norm(), f"relative error {err / expected.norm():.2e}"


def dead_mask(n_dead):
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[torch.randperm(D_SAE, generator=torch.Generator().manual_seed(2))[:n_dead]] = True
    return dead


REVIVALS = {
    "auxk": (AuxK(AuxKRevival(k_aux=6)), None),
    "auxk-default-k_aux": (AuxK(AuxKRevival(normalizer="none")), None),
    "preact": (PreactTerm(PreactRevival(coefficient=0.5)), None),
    "auxk-matryoshka": (AuxK(AuxKRevival(k_aux=6)), [5, 20, D_SAE]),
}
PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")


def step_terms(sae, x, dead, revival, prefixes):
    out = sae(x)
    objective = Objective([Reconstruction(), revival])
    total, parts = objective(TermInputs(sae, out, dead, torch.tensor(0.0), prefixes))
    grads = {}
    for name, value in [*parts.items(), ("total", total)]:
        g = torch.autograd.grad(
            value, [getattr(sae, p) for p in PARAMS], retain_graph=True, allow_unused=True
        )
        grads[name] = {p: gp for p, gp in zip(PARAMS, g, strict=True)}
    return out, parts, grads


DEAD = {"none-dead": 0, "some-dead": 11, "all-dead": D_SAE}
CASES = [  # (kind, k, revival, dead)
    *[(kind, k, "auxk", dead) for kind in ("topk", "batchtopk") for k in (1, 4) for dead in DEAD],
    *[(kind, 4, "preact", dead) for kind in ("topk", "batchtopk") for dead in DEAD],
    *[(kind, 1, "auxk-default-k_aux", "some-dead") for kind in ("topk", "batchtopk")],
    *[(kind, 4, "auxk-matryoshka", "some-dead") for kind in ("topk", "batchtopk")],
]


@pytest.mark.parametrize(
    "kind, k, revival, dead", CASES, ids=["-".join(map(str, case)) for case in CASES]
)
def test_fast_path_equals_reference_path_in_forward_and_gradients(kind, k, revival, dead):
    n_dead = DEAD[dead]
    fast, ref = make_pair(kind, k)
    x = make_x(sae=fast)
    assert float(fast.scale) != 1.0 and fast.b_dec.abs().min() > 0 and x.mean().abs() > 1
    term, prefixes = REVIVALS[revival]
    dead = dead_mask(n_dead)

    out_f, parts_f, grads_f = step_terms(fast, x, dead, term, prefixes)
    out_r, parts_r, grads_r = step_terms(ref, x, dead, term, prefixes)

    assert isinstance(out_f.latents, SparseCode) and isinstance(out_r.latents, torch.Tensor)
    if kind == "topk":  # the ReLU trap is armed: token 0 keeps k entries, all ReLU'd to 0
        assert (out_r.pre[0] < 0).all() and not out_r.latents[0].any()
    assert out_f.x_hat.shape == x.shape
    for a, b in [
        (out_f.x_hat, out_r.x_hat),
        (out_f.x_hat_n, out_r.x_hat_n),
        (as_dense(out_f.latents), out_r.latents),
        (out_f.pre, out_r.pre),
    ]:
        torch.testing.assert_close(a.detach(), b.detach(), **TOL[F64])
    assert set(parts_f) == set(parts_r) == {"reconstruction", "revival"}
    for name in parts_f:
        torch.testing.assert_close(parts_f[name], parts_r[name], **TOL[F64], msg=name)
    if n_dead == 0 and revival.startswith("auxk"):
        assert float(parts_f["revival"].detach()) == 0.0  # exactly 0, not just small
    for part in grads_f:
        for p in PARAMS:
            a, b = grads_f[part][p], grads_r[part][p]
            if a is None or b is None:  # a term that does not reach p, on both paths
                assert a is None and b is None, (part, p)
                continue
            torch.testing.assert_close(a, b, **TOL[F64], msg=f"{part}: d/d{p}")
    if n_dead and revival != "preact":
        # AuxK reaches the decoder and, through the selected pre-activations, the encoder
        for p in PARAMS:
            assert grads_r["revival"][p].abs().sum() > 0, p
    if n_dead and revival == "preact":
        for p in ("W_enc", "b_enc", "b_dec"):
            assert grads_r["revival"][p].abs().sum() > 0, p


@pytest.mark.parametrize("kind", ["topk", "batchtopk"])
def test_fast_path_equals_reference_path_in_float32(kind):
    fast, ref = make_pair(kind, 4, dtype="float32")
    x = make_x(torch.float32)
    term, prefixes = REVIVALS["auxk"]
    out_f, parts_f, grads_f = step_terms(fast, x, dead_mask(11), term, prefixes)
    out_r, parts_r, grads_r = step_terms(ref, x, dead_mask(11), term, prefixes)
    torch.testing.assert_close(out_f.x_hat, out_r.x_hat, **TOL[torch.float32])
    for p in PARAMS:
        a, b = grads_f["total"][p], grads_r["total"][p]
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, **TOL[torch.float32], msg=p)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("kind", ["topk", "batchtopk"])
def test_fast_path_equals_reference_path_without_autograd(kind, training):
    fast, ref = make_pair(kind, 3)
    if kind == "batchtopk":
        for sae in (fast, ref):
            sae.activation.update_threshold(torch.tensor(0.4))
    fast.train(training)
    ref.train(training)
    x = make_x(seed=3)
    with torch.no_grad():
        out_f, out_r = fast(x), ref(x)
    torch.testing.assert_close(out_f.x_hat, out_r.x_hat, **TOL[F64])
    torch.testing.assert_close(as_dense(out_f.latents), as_dense(out_r.latents), **TOL[F64])
    torch.testing.assert_close(fast.encode(x), ref.encode(x), **TOL[F64])
    assert (fast.encode(x) != 0).any()


@pytest.mark.parametrize("kind", ["topk", "batchtopk"])
def test_bf16_autocast_keeps_fp32_gradients_and_close_values(kind):
    """Under the trainer's bf16 autocast, on both paths: the encoder matmul runs in bf16, the
    fp32 master weights get fp32 gradients, and values stay close to the fp32 ones."""
    fast, ref = make_pair(kind, 4, dtype="float32")
    x = make_x(torch.float32)
    exact = ref(x)
    term, _ = REVIVALS["auxk"]
    outs = []
    for sae in (fast, ref):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = sae(x)
            total, _ = Objective([Reconstruction(), term])(
                TermInputs(sae, out, dead_mask(11), torch.tensor(0.0), None)
            )
        assert out.encoding.preacts.detached.dtype == torch.bfloat16
        total.backward()
        for p in PARAMS:
            assert getattr(sae, p).grad.dtype == torch.float32, p
        torch.testing.assert_close(out.pre.float(), exact.pre.detach(), rtol=0.05, atol=0.05)
        outs.append(out)
    # both paths select from the same bf16 pre-activations (a near-tie may flip a selection
    # against fp32, not between them): equal selections, close reconstructions and gradients
    fast_z, ref_z = as_dense(outs[0].latents).float(), outs[1].latents.float()
    assert torch.equal(fast_z != 0, ref_z != 0)
    assert_rel(outs[0].x_hat, outs[1].x_hat, 0.02)
    for p in PARAMS:
        assert_rel(getattr(fast, p).grad, getattr(ref, p).grad, 0.02)


# ------------------------------------------------------------------------------ no host sync


@pytest.mark.parametrize("revival", ["auxk", "preact"])
@pytest.mark.parametrize("kind", ["topk", "batchtopk"])
def test_fast_training_step_never_syncs_with_the_host(kind, revival, host_sync_raises, monkeypatch):
    # the path a GPU takes: BatchTopK reads its exactness flag on the host only for CPU tensors
    monkeypatch.setattr(kernel_select, "reads_free", lambda tensor: False)
    fast, _ = make_pair(kind, 4, dtype="float32")
    # fused Adam reads its step count on the device; the default CPU Adam calls .item() on it.
    opt = torch.optim.Adam(fast.parameters(), lr=1e-3, fused=True)
    objective = Objective([Reconstruction(), REVIVALS[revival][0]])
    dead = torch.arange(D_SAE) % 2 == 0
    x = make_x(torch.float32)
    for _ in range(2):
        out = fast(x)
        loss, _ = objective(TermInputs(fast, out, dead, torch.tensor(0.0), None))
        loss.backward()
        fast.remove_parallel_grad_()
        opt.step()
        opt.zero_grad(set_to_none=True)
        fast.normalize_decoder_()
        fast.activation.after_step(out.encoding, LocalComm())


# ------------------------------------------------------------------------------ triton


def test_triton_kernels_match_the_torch_path():
    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        pytest.skip("the triton kernels need a CUDA device")
    values, latent, token = random_code(64, 300, 8, empty_every=5, dtype=torch.float32)
    values, latent, token = values.cuda(), latent.cuda(), token.cuda()
    W = torch.randn(300, 48, device="cuda")
    A = torch.randn(64, 48, device="cuda")
    offsets = CodeLayout(token, latent, 64, 300).token_offsets
    tol = dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(
        bag_sum(values, latent, offsets, W, backend="triton"),
        bag_sum(values, latent, offsets, W),
        **tol,
    )
    torch.testing.assert_close(
        row_dot(A, W, token, latent, offsets, backend="triton"),
        row_dot(A, W, token, latent, offsets),
        **tol,
    )
    # a whole step: kernel "triton" against the dense reference on the same weights
    for kind in ("topk", "batchtopk"):
        fast, ref = make_pair(kind, 4, dtype="float32", kernel="triton")
        fast, ref = fast.cuda(), ref.cuda()
        x = make_x(torch.float32).cuda()
        dead = dead_mask(11).cuda()
        _, _, grads_f = step_terms(fast, x, dead, *REVIVALS["auxk"])
        _, _, grads_r = step_terms(ref, x, dead, *REVIVALS["auxk"])
        for p in PARAMS:
            torch.testing.assert_close(grads_f["total"][p], grads_r["total"][p], **tol, msg=p)
