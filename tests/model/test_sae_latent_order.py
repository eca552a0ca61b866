"""saekit.model.latent_order.permute_latents_: a reorder of the latents moves every per-latent
tensor and leaves the function unchanged, for every activation (float64, arch_helpers' traps:
s ≠ 1, b_dec ≠ 0, data mean ≠ 0, perturbed thresholds and biases, 3-D input)."""

from __future__ import annotations

import pytest
import torch
from arch_helpers import M, data
from test_activation_contract import KINDS, example_member

from saekit.core.encoding import as_dense
from saekit.model.config import SAEConfig
from saekit.model.latent_order import latent_state_keys, permute_latents_
from saekit.model.sae import SAE
from saekit.objective.losses import reconstruction_loss
from saekit.train.latent_parts import latent_axes


def a_permutation(seed: int = 5) -> torch.Tensor:
    perm = torch.randperm(M, generator=torch.Generator().manual_seed(seed))
    assert not perm.equal(torch.arange(M))
    return perm


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("training", [True, False])
def test_a_permutation_keeps_the_function_and_moves_the_latents(kind, training):
    sae = example_member(kind).sae
    _, x = data()  # [B, T, D], mean 3, spread 7
    sae.train(training)
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    with torch.no_grad():
        out = sae(x)
    perm = a_permutation()
    permute_latents_(sae, perm)
    with torch.no_grad():
        after = sae(x)
    torch.testing.assert_close(after.x_hat, out.x_hat, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        as_dense(after.latents), as_dense(out.latents)[:, perm], rtol=1e-12, atol=1e-12
    )
    loss_before = reconstruction_loss(out.target_n, out.x_hat_n)
    loss_after = reconstruction_loss(after.target_n, after.x_hat_n)
    torch.testing.assert_close(loss_after, loss_before, rtol=1e-13, atol=0)
    keys = latent_state_keys(sae)
    for key, value in sae.state_dict().items():  # moved exactly, or untouched exactly
        expected = before[key][perm] if key in keys else before[key]
        assert torch.equal(value, expected), key


@pytest.mark.parametrize("kind", KINDS)
def test_the_per_latent_keys_are_those_a_latent_sharded_split_cuts(kind):
    sae = example_member(kind).sae
    axes = latent_axes(sae)
    assert sorted(latent_state_keys(sae)) == sorted(axes)
    assert all(axis == (0, 1) for axis in axes.values())


def test_a_skip_transcoder_permutes_its_latents_and_keeps_its_prediction():
    cfg = SAEConfig(d_in=5, d_sae=M, d_out=3, skip=True, activation="relu", dtype="float64")
    sae = SAE(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    x = torch.randn(7, 5, generator=g, dtype=torch.float64) * 4 + 2
    out = sae(x)
    permute_latents_(sae, a_permutation())
    torch.testing.assert_close(sae(x).x_hat, out.x_hat, rtol=1e-12, atol=1e-12)


def test_a_permutation_of_the_wrong_shape_or_dtype_is_refused():
    sae = example_member("relu").sae
    with pytest.raises(ValueError, match="int64 permutation"):
        permute_latents_(sae, torch.arange(M - 1))
    with pytest.raises(ValueError, match="int64 permutation"):
        permute_latents_(sae, torch.arange(M, dtype=torch.int32))
