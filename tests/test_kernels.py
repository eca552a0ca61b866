"""The sparse fast paths equal their plain references, in values and in gradients.

Traps built in: k = 1, latents repeated across tokens, tokens with no entry, M not a multiple of
8, 3-D inputs, nonzero b_dec and b_enc, a dataset scale ≠ 1, all / none / some latents dead. A
last test runs a whole fast training step with every host-sync entry point made to raise.
"""

from __future__ import annotations

import pytest
import torch

from saekit.kernels import sparse as K
from saekit.losses import auxk_loss, reconstruction_loss
from saekit.sae import SAE, SAEConfig

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-4)}
DTYPES = [torch.float64, torch.float32]


def random_code(n_tokens, d_sae, per_token, *, seed=0, empty_every=0, dtype=torch.float64):
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


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_sparse_decode_equals_reference_in_values_and_gradients(shape, dtype):
    n_tokens, d_sae, d, per_token, empty_every = shape
    values, latent, token = random_code(
        n_tokens, d_sae, per_token, empty_every=empty_every, dtype=dtype
    )
    W = torch.randn(d_sae, d, dtype=dtype)
    grad_out = torch.randn(n_tokens, d, dtype=dtype)
    results = []
    for fn in (K.sparse_decode, K.sparse_decode_reference):
        v, Wp = values.clone().requires_grad_(), W.clone().requires_grad_()
        out = fn(v, latent, token, Wp, n_tokens)
        out.backward(grad_out)
        results.append((out.detach(), v.grad, Wp.grad))
    for fast, ref in zip(*results, strict=True):
        torch.testing.assert_close(fast, ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_sparse_preacts_equals_reference_in_values_and_gradients(shape, dtype):
    n_tokens, d_sae, d, per_token, empty_every = shape
    _, latent, token = random_code(n_tokens, d_sae, per_token, empty_every=empty_every, dtype=dtype)
    x_c, W, b = (
        torch.randn(n_tokens, d, dtype=dtype),
        torch.randn(d_sae, d, dtype=dtype),
        torch.randn(d_sae, dtype=dtype),
    )
    grad_v = torch.randn(latent.numel(), dtype=dtype)
    results = []
    for fn in (K.sparse_preacts, K.sparse_preacts_reference):
        xp, Wp, bp = (t.clone().requires_grad_() for t in (x_c, W, b))
        values = fn(xp, Wp, bp, token, latent)
        values.backward(grad_v)
        results.append((values.detach(), xp.grad, Wp.grad, bp.grad))
    for fast, ref in zip(*results, strict=True):
        torch.testing.assert_close(fast, ref, **TOL[dtype])


def test_preacts_at_gives_b_dec_the_gradient_through_the_centred_input():
    n_tokens, d_sae, d = 9, 21, 6
    x_n, W, b_enc, b_dec = (
        torch.randn(*s, dtype=torch.float64) for s in ((n_tokens, d), (d_sae, d), (d_sae,), (d,))
    )
    latent = torch.randint(0, d_sae, (n_tokens, 3))
    token = torch.arange(n_tokens).unsqueeze(1).expand(-1, 3)
    grad = torch.randn(n_tokens, 3, dtype=torch.float64)

    params = [t.clone().requires_grad_() for t in (W, b_enc, b_dec)]
    pre = torch.addmm(params[1], x_n - params[2], params[0].T)
    pre.gather(1, latent).backward(grad)
    expected = [p.grad for p in params]

    params = [t.clone().requires_grad_() for t in (W, b_enc, b_dec)]
    enc = K.encode_dense(x_n, params[0], params[1], params[2])
    values = K.preacts_at(enc, token, latent)
    torch.testing.assert_close(values, pre.detach().gather(1, latent))
    values.backward(grad)
    for p, e in zip(params, expected, strict=True):
        torch.testing.assert_close(p.grad, e)


def make_sae(activation, d=24, d_sae=37, k=3, dtype="float64", seed=0):
    torch.manual_seed(seed)
    sae = SAE(SAEConfig(d_in=d, d_sae=d_sae, activation=activation, k=k, dtype=dtype))
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(0, 0.1)
        sae.scale.fill_(1.7)
    return sae.train()


def grads(sae):
    return {n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
@pytest.mark.parametrize("k", [1, 4])
def test_fast_forward_matches_sae_forward_on_3d_input_with_nonzero_biases(activation, k):
    sae = make_sae(activation, k=k)
    x = torch.randn(2, 5, 24, dtype=torch.float64) + 3.0  # nonzero mean

    ref = sae(x)
    reconstruction_loss(ref.x_n, ref.x_hat_n).backward()
    expected = grads(sae)
    sae.zero_grad()

    fast = K.fast_forward(sae, x)
    reconstruction_loss(fast.x_n, fast.x_hat_n).backward()
    assert fast.x_hat.shape == x.shape
    torch.testing.assert_close(fast.x_hat, ref.x_hat)
    torch.testing.assert_close(fast.latents.to_dense(), ref.latents.to_dense())
    assert set(grads(sae)) == set(expected) == {"W_enc", "b_enc", "W_dec", "b_dec"}
    for name, g in grads(sae).items():
        torch.testing.assert_close(g, expected[name], msg=name)


@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("n_dead", [0, 5, 37])
@pytest.mark.parametrize("n_cols", [None, 40, 20])
def test_fast_auxk_equals_losses_auxk_in_value_and_gradients(n_dead, n_cols, dense):
    if n_cols is not None and n_cols < n_dead:
        pytest.skip("with fewer gathered columns than dead latents the selection is a subset")
    sae = make_sae("topk", d=16, d_sae=37, k=3)
    x = torch.randn(3, 4, 16, dtype=torch.float64)
    dead = torch.zeros(37, dtype=torch.bool)
    dead[torch.randperm(37, generator=torch.Generator().manual_seed(2))[:n_dead]] = True

    ref = sae(x)
    residual = ref.x_n - ref.x_hat_n
    loss_ref = auxk_loss(ref.pre, residual, sae.W_dec, dead, k_aux=6)
    loss_ref.backward()
    expected = grads(sae)
    sae.zero_grad()

    fast = K.fast_forward(sae, x)
    residual = fast.x_n - fast.x_hat_n
    loss = K.auxk_loss_fast(
        fast.enc, residual, sae.W_dec, dead, k_aux=6, n_cols=n_cols, dense=dense
    )
    torch.testing.assert_close(loss, loss_ref)
    if n_dead == 0:
        assert loss.item() == 0.0
        return
    loss.backward()
    for name, g in grads(sae).items():
        torch.testing.assert_close(g, expected.get(name, torch.zeros_like(g)), msg=name)


def test_auxk_select_keeps_only_dead_positive_entries():
    pre = torch.tensor([[3.0, -1.0, 2.0, 5.0], [-2.0, -3.0, 1.0, 0.5]])
    dead = torch.tensor([True, True, False, True])
    latent, keep = K.auxk_select(pre, dead, k_aux=3)
    chosen = {(n, int(latent[n, j])) for n in range(2) for j in range(3) if keep[n, j]}
    assert chosen == {(0, 0), (0, 3), (1, 3)}


def test_bf16_encoder_matmul_keeps_fp32_weights_and_close_values():
    sae = make_sae("topk", d=32, d_sae=64, k=4, dtype="float32")
    x = torch.randn(10, 32)
    ref = sae(x)
    fast = K.fast_forward(sae, x, autocast_dtype=torch.bfloat16)
    reconstruction_loss(fast.x_n, fast.x_hat_n).backward()
    assert sae.W_enc.grad.dtype == torch.float32
    assert fast.pre.dtype == torch.float32
    torch.testing.assert_close(fast.pre, ref.pre.detach(), rtol=0.05, atol=0.05)


@pytest.mark.parametrize(
    "activation,dense_auxk", [("topk", False), ("topk", True), ("batchtopk", False)]
)
def test_fast_training_step_never_syncs_with_the_host(activation, dense_auxk, host_sync_raises):
    sae = make_sae(activation, d=16, d_sae=40, k=4, dtype="float32")
    # fused Adam reads its step count on the device; the default CPU Adam calls .item() on it.
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3, fused=True)
    dead = torch.arange(40) % 2 == 0
    x = torch.randn(3, 5, 16)
    for _ in range(2):
        out = K.fast_forward(sae, x)
        loss = reconstruction_loss(out.x_n, out.x_hat_n)
        residual = out.x_n - out.x_hat_n
        loss = loss + K.auxk_loss_fast(
            out.enc, residual, sae.W_dec, dead, n_cols=24, dense=dense_auxk
        )
        loss.backward()
        sae.remove_parallel_grad_()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sae.normalize_decoder_()
        if activation == "batchtopk":
            sae.activation.update_threshold(sae.activation.batch_min_positive(out.latents))


def test_triton_kernels_match_the_torch_path():
    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        pytest.skip("the triton kernels need a CUDA device")
    from saekit.kernels import triton_kernels as T

    values, latent, token = random_code(64, 300, 8, empty_every=5, dtype=torch.float32)
    values, latent, token = values.cuda(), latent.cuda(), token.cuda()
    W = torch.randn(300, 48, device="cuda")
    x_c = torch.randn(64, 48, device="cuda")
    layout = K.CodeLayout(token, latent, 64, 300)
    torch.testing.assert_close(
        T.decode(values, W, layout),
        K.sparse_decode_reference(values, latent, token, W, 64),
        rtol=1e-4,
        atol=1e-4,
    )
    grad_v = torch.randn_like(values)
    expected = torch.zeros_like(W).index_add_(0, latent, grad_v[:, None] * x_c[token])
    torch.testing.assert_close(
        T.encoder_weight_grad(grad_v, x_c, layout), expected, rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize("per_token,full_rows", [(4, 2), (8, 1), (3, 6)])
def test_batchtopk_candidates_select_the_exact_batch_top_k_when_flagged_exact(per_token, full_rows):
    g = torch.Generator().manual_seed(3)
    pre = torch.randn(12, 29, generator=g, dtype=torch.float64)
    pre[5] += 3.0  # one token owns many of the batch's largest entries
    k = 3
    ref = pre.reshape(-1).topk(k * 12).indices.sort().values
    values, flat, exact = K.batchtopk_select(pre, k, per_token, full_rows)
    assert bool(exact)
    assert torch.equal(flat, ref)
    torch.testing.assert_close(values, pre.reshape(-1)[ref])


def test_batchtopk_candidates_flag_a_selection_they_cannot_guarantee():
    pre = torch.zeros(6, 20, dtype=torch.float64)
    pre[:3] = torch.arange(20, dtype=torch.float64) + 100.0  # three tokens own everything
    values, flat, exact = K.batchtopk_select(pre, k=2, per_token=2, full_rows=1)
    assert not bool(exact)


def test_fast_forward_batchtopk_candidate_path_matches_sae_forward():
    sae = make_sae("batchtopk", k=3)
    x = torch.randn(4, 6, 24, dtype=torch.float64)
    ref = sae(x)
    fast = K.fast_forward(sae, x, batchtopk_per_token=6)
    torch.testing.assert_close(fast.latents.to_dense(), ref.latents.to_dense())


def test_fast_path_pre_still_carries_the_dense_gradient_for_losses_that_need_it():
    sae = make_sae("topk", d=16, d_sae=37, k=3)
    x = torch.randn(3, 4, 16, dtype=torch.float64)
    dead = torch.arange(37) % 3 == 0
    ref = sae(x)
    auxk_loss(ref.pre, ref.x_n - ref.x_hat_n, sae.W_dec, dead, k_aux=6).backward()
    expected = grads(sae)
    sae.zero_grad()
    fast = K.fast_forward(sae, x)
    for preacts_at in (None, fast.preacts_at):  # dense safety net, then the sparse path
        loss = auxk_loss(
            fast.pre, fast.x_n - fast.x_hat_n, sae.W_dec, dead, k_aux=6, preacts_at=preacts_at
        )
        loss.backward(retain_graph=True)
        for name, g in grads(sae).items():
            torch.testing.assert_close(g, expected[name], msg=name)
        sae.zero_grad()
