"""A cross-layer transcoder's kernels (saekit/kernels/layered.py) against plain float64 loops:
the L encoders written into one (reused) buffer, their dense backward, and the per-layer sparse
decode with its gradients, both ways of cutting a code by layer (TopK per layer: by position,
without a host read; any other code: sorted, with the L counts read on the host).

    pre[n, l·M + i] = x_n^l · W_enc[l, i] + b_enc[l, i]
    out[n, l'·d + j] = Σ_{e: token_e = n, l_e ≤ l'} v_e · W_dec[l_e][i_e, l' − l_e, j]
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from saekit.kernels.layered import LayerPreacts, layer_encoders, layered_decode
from saekit.kernels.layout import CodeLayout

L, M, D, D_OUT, N, K = 3, 6, 4, 5, 7, 2


def weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    W_enc = torch.randn(L, M, D, generator=g, dtype=torch.float64)
    b_enc = torch.randn(L, M, generator=g, dtype=torch.float64)
    W_dec = [torch.randn(M, L - l, D_OUT, generator=g, dtype=torch.float64) for l in range(L)]
    x = 2 * torch.randn(N, L * D, generator=g, dtype=torch.float64) + 1.5  # nonzero mean
    return W_enc, b_enc, W_dec, x


def loop_pre(x, W_enc, b_enc):
    return torch.stack([
        torch.cat([
            torch.stack([x[n, l * D : (l + 1) * D] @ W_enc[l, i] + b_enc[l, i] for i in range(M)])
            for l in range(L)
        ])
        for n in range(N)
    ])  # fmt: skip


def loop_decode(values, latent, token, W_dec):
    out = [[torch.zeros((), dtype=torch.float64) for _ in range(L * D_OUT)] for _ in range(N)]
    for v, j, n in zip(values, latent.tolist(), token.tolist(), strict=True):
        layer, i = divmod(j, M)
        for t in range(layer, L):
            for c in range(D_OUT):
                out[n][t * D_OUT + c] = out[n][t * D_OUT + c] + v * W_dec[layer][i, t - layer, c]
    return torch.stack([torch.stack(row) for row in out])


def topk_per_layer_code(pre, k=K):
    """k per token and layer, entries token by token, layer by layer (TopK's grouped layout)."""
    top = pre.detach().view(N * L, M).topk(k, dim=-1, sorted=False)
    latent_Nk = (top.indices + (torch.arange(L).repeat(N) * M).unsqueeze(1)).view(N, L * k)
    layout = CodeLayout.fixed_k(latent_Nk, L * M, groups=L)
    return top.values.reshape(-1), layout


def free_code(pre):
    """A code whose per-layer counts are data: every positive entry (layer 1 left empty)."""
    keep = pre.detach() > 0.5
    keep[:, M : 2 * M] = False
    token, latent = keep.nonzero(as_tuple=True)
    return pre.detach()[token, latent], CodeLayout(token, latent, N, L * M)


def test_encoders_write_each_layer_into_its_columns_of_one_buffer():
    W_enc, b_enc, _, x = weights()
    expected = loop_pre(x, W_enc, b_enc)
    torch.testing.assert_close(layer_encoders(x, W_enc, b_enc), expected)
    out = torch.full((N, L * M), float("nan"), dtype=torch.float64)
    assert layer_encoders(x, W_enc, b_enc, out=out) is out
    torch.testing.assert_close(out, expected)


def test_the_clt_buffer_is_reused_only_when_nothing_holds_it():
    W_enc, b_enc, _, x = weights()
    owner = object.__new__(type("Owner", (), {}))
    first = LayerPreacts(x, W_enc, b_enc, owner=owner).detached
    held = first.clone()
    second = LayerPreacts(x + 1, W_enc, b_enc, owner=owner).detached
    assert second.data_ptr() != first.data_ptr()  # ``first`` still held: a new buffer
    torch.testing.assert_close(first, held, rtol=0, atol=0)
    ptr = second.data_ptr()
    del first, second
    third = LayerPreacts(x * 2, W_enc, b_enc, owner=owner).detached
    assert third.data_ptr() == ptr
    torch.testing.assert_close(third, loop_pre(x * 2, W_enc, b_enc))


def test_the_dense_backward_is_the_loops_gradient():
    W_enc, b_enc, _, x = weights()
    leaves = [t.clone().requires_grad_(True) for t in (x, W_enc, b_enc)]
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(N, L * M, generator=g, dtype=torch.float64)
    (LayerPreacts(*leaves).dense() * weight).sum().backward()
    refs = [t.clone().requires_grad_(True) for t in (x, W_enc, b_enc)]
    (loop_pre(*refs) * weight).sum().backward()
    for got, ref in zip(leaves, refs, strict=True):
        torch.testing.assert_close(got.grad, ref.grad)


@pytest.mark.parametrize("code", [topk_per_layer_code, free_code], ids=["topk", "free"])
def test_decode_and_its_gradients_match_the_loop(code):
    _, _, W_dec, x = weights()
    W_enc, b_enc, _, _ = weights(seed=1)
    values, layout = code(loop_pre(x, W_enc, b_enc))
    W = [w.clone().requires_grad_(True) for w in W_dec]
    v = values.clone().requires_grad_(True)
    out = layered_decode(v, layout.latent, layout.token, W, N, layout)
    W_ref = [w.clone().requires_grad_(True) for w in W_dec]
    v_ref = values.clone().requires_grad_(True)
    expected = loop_decode(v_ref, layout.latent, layout.token, W_ref)
    torch.testing.assert_close(out, expected)
    g = torch.Generator().manual_seed(4)
    weight = torch.randn(N, L * D_OUT, generator=g, dtype=torch.float64)
    (out * weight).sum().backward()
    (expected * weight).sum().backward()
    torch.testing.assert_close(v.grad, v_ref.grad)
    for got, ref in zip(W, W_ref, strict=True):
        if ref.grad is None:  # a layer with no entries gets no gradient from the decode
            assert got.grad is None
        else:
            torch.testing.assert_close(got.grad, ref.grad)


@contextlib.contextmanager
def no_host_reads(monkeypatch):
    """Any read of a tensor's values on the host (what waits for a GPU) raises."""

    def refuse(*_args, **_kwargs):
        raise AssertionError("a host read")

    with monkeypatch.context() as m:
        for name in ("tolist", "item", "__bool__", "__int__", "__float__", "__index__"):
            m.setattr(torch.Tensor, name, refuse)
        yield


def test_topk_per_layer_decodes_without_reading_the_code_on_the_host(monkeypatch):
    _, _, W_dec, x = weights()
    W_enc, b_enc, _, _ = weights(seed=1)
    pre = loop_pre(x, W_enc, b_enc)
    values, layout = topk_per_layer_code(pre)
    W = [w.clone().requires_grad_(True) for w in W_dec]
    v = values.clone().requires_grad_(True)
    with no_host_reads(monkeypatch):
        layered_decode(v, layout.latent, layout.token, W, N, layout).sum().backward()
    # a code whose per-layer counts are data reads them (the check above would notice)
    values, layout = free_code(pre)
    with no_host_reads(monkeypatch), pytest.raises(AssertionError, match="a host read"):
        layered_decode(values, layout.latent, layout.token, W_dec, N, layout)


def test_grouped_layout_needs_groups_that_divide_k_and_d_sae():
    with pytest.raises(ValueError, match="3 latent groups must divide both k = 4 and d_sae"):
        CodeLayout.fixed_k(torch.zeros(2, 4, dtype=torch.long), 9, groups=3)
