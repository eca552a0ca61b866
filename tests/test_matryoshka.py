"""Specifications of the Matryoshka loss, its prefix sampler, and latent re-sorting.

The one-pass loss (block deltas + cumsum, DESIGN.md "Matryoshka") must equal the naive one:
one ordinary SAE decode per prefix with the latents from p on zeroed.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from scipy import stats

from saekit.losses import (
    fixed_prefixes,
    matryoshka_loss,
    matryoshka_reconstructions,
    penalty_terms,
    prefix_length_probs,
    sample_prefixes,
)
from saekit.sae import SAE, SAEConfig
from saekit.train.permute import permute_latents_, resort_latents_by_usage

D, M, K = 10, 48, 5
B, T = 3, 6  # 18 tokens


def make_sae(activation: str, seed: int = 0, **cfg) -> tuple[SAE, torch.Tensor]:
    """An SAE fitted to x·7 + 3 (scale s ≠ 1, b_dec ≠ 0), free decoder norms, raw [B, T, d]."""
    g = torch.Generator().manual_seed(seed)
    if activation in ("topk", "batchtopk"):
        cfg.setdefault("k", K)
    sae = SAE(SAEConfig(D, M, activation, **cfg))
    sae.reset_parameters(generator=g)
    sae.init_from_data(torch.randn(64, D, generator=g) * 7 + 3)
    with torch.no_grad():
        sae.W_enc.add_(0.3 * torch.randn(M, D, generator=g))
        sae.b_enc.add_(0.1 * torch.randn(M, generator=g))
        sae.W_dec.mul_(torch.empty(M, 1).uniform_(0.5, 2.0, generator=g))
    assert abs(float(sae.scale) - 1) > 0.5 and sae.b_dec.abs().min() > 0.1
    return sae, torch.randn(B, T, D, generator=g) * 7 + 3


def naive_matryoshka(sae, out, prefixes, penalty, lam, eps=0.1):
    """(1/P) Σ_p [mean_n ‖x_n − decode(z with z_i = 0 for i ≥ p)‖² + λ·mean_n Σ_{i<p} f(a_i)]."""
    z_NM = out.latents.to_dense() if hasattr(out.latents, "to_dense") else out.latents
    norms = sae.W_dec.norm(dim=-1)
    total = 0.0
    for p in prefixes:
        keep = (torch.arange(M) < p).to(z_NM.dtype)
        x_hat_p = sae.decode_n(z_NM * keep)
        total = total + (out.x_n - x_hat_p).pow(2).sum(-1).mean()
        if penalty is not None:
            terms = penalty_terms(z_NM.abs() * norms, penalty, eps)
            total = total + lam * terms[:, :p].sum(-1).mean()
    return total / len(prefixes)


PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")


def grads_of(loss, sae):
    return torch.autograd.grad(loss, [getattr(sae, p) for p in PARAMS])


@pytest.mark.parametrize("penalty", [None, "log", "l1"])
@pytest.mark.parametrize("prefix_mode", ["fixed", "sampled"])
@pytest.mark.parametrize("form", ["sparse_topk", "sparse_batchtopk", "dense_from_code", "relu"])
def test_one_pass_matryoshka_equals_naive_per_prefix_decodes_in_value_and_gradient(
    form, prefix_mode, penalty
):
    activation = {"sparse_batchtopk": "batchtopk", "relu": "relu"}.get(form, "topk")
    sae, x = make_sae(activation)
    if prefix_mode == "fixed":
        prefixes = fixed_prefixes([4, 8, 12, 24])
    else:
        prefixes = sample_prefixes(M, 5, min_prefix=2, generator=torch.Generator().manual_seed(3))
    out = sae(x)
    latents = out.latents.to_dense() if form == "dense_from_code" else out.latents
    lam = 0.05 if penalty else 0.0
    loss = matryoshka_loss(out.x_n, latents, sae.W_dec, sae.b_dec, prefixes, penalty, lam)
    got = grads_of(loss, sae)
    out = sae(x)
    ref = naive_matryoshka(sae, out, prefixes, penalty, lam)
    want = grads_of(ref, sae)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-5)
    for name, g, w in zip(PARAMS, got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5, msg=name)


def test_full_prefix_reconstruction_is_the_sae_reconstruction():
    sae, x = make_sae("topk")
    out = sae(x)
    prefixes = fixed_prefixes([6, 10, 32])
    for latents in (out.latents, out.latents.to_dense()):
        x_hat_PND = matryoshka_reconstructions(latents, sae.W_dec, sae.b_dec, prefixes)
        assert x_hat_PND.shape == (3, B * T, D)
        torch.testing.assert_close(x_hat_PND[-1], out.x_hat_n, rtol=1e-5, atol=1e-5)


def test_single_prefix_matryoshka_is_the_plain_reconstruction_loss():
    sae, x = make_sae("topk")
    out = sae(x)
    loss = matryoshka_loss(out.x_n, out.latents, sae.W_dec, sae.b_dec, [M])
    ref = (out.x_n - out.x_hat_n).pow(2).sum(-1).mean()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)


def test_prefixes_must_increase_and_end_at_d_sae():
    sae, x = make_sae("topk")
    out = sae(x)
    for bad in ([10, 10, M], [10, 20], [30, 20, M], []):
        with pytest.raises(ValueError, match="prefixes"):
            matryoshka_loss(out.x_n, out.latents, sae.W_dec, sae.b_dec, bad)


# ------------------------------------------------------------------------- prefix sampling


def test_single_sampled_prefix_follows_the_truncated_pareto_formula():
    """P − 1 = 1: each call draws one length, whose law is exactly the formula (chi-square)."""
    d_sae, m, a = 40, 4, 0.5
    g = torch.Generator().manual_seed(1234)
    n_draws = 100_000
    counts = torch.zeros(d_sae + 1, dtype=torch.long)
    for _ in range(n_draws):
        first, last = sample_prefixes(d_sae, 2, min_prefix=m, alpha=a, generator=g)
        assert last == d_sae
        counts[first] += 1
    assert counts[:m].sum() == 0 and counts[d_sae] == 0
    span = d_sae - m + 1
    weights = [((l - m + 1) / span) ** a - ((l - m) / span) ** a for l in range(m, d_sae)]
    expected = [n_draws * w / sum(weights) for w in weights]
    assert min(expected) > 5
    observed = counts[m:d_sae].tolist()
    p_value = stats.chisquare(observed, expected).pvalue
    assert p_value > 1e-3
    torch.testing.assert_close(
        prefix_length_probs(d_sae, m, a), torch.tensor(weights, dtype=torch.float64) / sum(weights)
    )


def test_sampled_prefixes_are_distinct_sorted_at_least_min_and_end_with_d_sae():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        prefixes = sample_prefixes(64, 10, min_prefix=3, generator=g)
        assert len(prefixes) == 10 and prefixes[-1] == 64
        assert all(a < b for a, b in itertools.pairwise(prefixes))
        assert prefixes[0] >= 3
    # as many lengths as there are: every length from m to M − 1, then M
    assert sample_prefixes(8, 6, min_prefix=3, generator=g) == [3, 4, 5, 6, 7, 8]
    assert sample_prefixes(8, 1) == [8]


def test_fixed_prefixes_are_cumulative_group_sizes():
    assert fixed_prefixes([4, 8, 16]) == [4, 12, 28]
    with pytest.raises(ValueError):
        fixed_prefixes([4, 0])


# ------------------------------------------------------------------------- latent permutation


def train_steps(sae, opt, x, n):
    for _ in range(n):
        opt.zero_grad()
        out = sae(x)
        norms = sae.W_dec.norm(dim=-1)
        l1 = (out.latents.abs() * norms).sum(-1).mean()
        loss = (out.x_n - out.x_hat_n).pow(2).sum(-1).mean() + 0.1 * l1
        loss.backward()
        opt.step()


def model_and_optimizer_state(sae, opt):
    tensors = {k: v.detach().clone() for k, v in sae.state_dict().items()}
    for i, p in enumerate(p for g in opt.param_groups for p in g["params"]):
        for key, value in opt.state[p].items():
            tensors[f"opt{i}.{key}"] = value.detach().clone()
    return tensors


@pytest.mark.parametrize("activation", ["jumprelu", "prolu"])
def test_permuting_latents_and_adam_moments_commutes_with_an_adam_step(activation):
    sae, x = (
        make_sae(activation, jumprelu_bandwidth=0.5)
        if activation == "jumprelu"
        else make_sae(activation)
    )
    params = [p for p in sae.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-2, amsgrad=True)  # amsgrad: a third moment tensor
    train_steps(sae, opt, x, 3)
    perm = torch.randperm(M, generator=torch.Generator().manual_seed(5))

    # A: permute, then step.   B: step, then permute.
    sae_b = copy.deepcopy(sae)
    opt_b = torch.optim.Adam(
        [p for p in sae_b.parameters() if p.requires_grad], lr=1e-2, amsgrad=True
    )
    opt_b.load_state_dict(copy.deepcopy(opt.state_dict()))  # Adam shares tensors otherwise
    sae_c, opt_c = copy.deepcopy(sae_b), None  # C: the trap, moments left in place
    opt_c = torch.optim.Adam(
        [p for p in sae_c.parameters() if p.requires_grad], lr=1e-2, amsgrad=True
    )
    opt_c.load_state_dict(copy.deepcopy(opt.state_dict()))

    permute_latents_(sae, opt, perm)
    train_steps(sae, opt, x, 1)
    train_steps(sae_b, opt_b, x, 1)
    permute_latents_(sae_b, opt_b, perm)
    permute_latents_(sae_c, None, perm)
    train_steps(sae_c, opt_c, x, 1)

    a, b = model_and_optimizer_state(sae, opt), model_and_optimizer_state(sae_b, opt_b)
    assert a.keys() == b.keys()
    assert any(k.endswith("exp_avg_sq") for k in a) and any(k.endswith("max_exp_avg_sq") for k in a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    per_latent = "activation.log_threshold" if activation == "jumprelu" else "activation.bias"
    assert not torch.equal(a[per_latent], a[per_latent][perm.argsort()])  # it was moved
    c = model_and_optimizer_state(sae_c, opt_c)
    assert (c["W_dec"] - a["W_dec"]).abs().max() > 1e-4  # forgetting the moments shows


def test_resort_by_usage_puts_the_most_used_latent_first_and_moves_counters():
    sae, _ = make_sae("topk")
    usage = torch.randperm(M, generator=torch.Generator().manual_seed(2)).float()
    counters = torch.arange(M, dtype=torch.float32) * 10
    W_dec_before = sae.W_dec.detach().clone()
    perm = resort_latents_by_usage(sae, None, usage, others=[counters])
    assert torch.equal(usage[perm], usage.sort(descending=True).values)
    torch.testing.assert_close(sae.W_dec.detach(), W_dec_before[perm])
    torch.testing.assert_close(counters, torch.arange(M, dtype=torch.float32)[perm] * 10)
    assert torch.equal(
        resort_latents_by_usage(sae, None, usage[perm], others=[counters]), torch.arange(M)
    )
