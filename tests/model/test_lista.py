"""LISTA encoder steps (saekit.model.lista, ``sae.encoder_steps``) against a plain float64 loop.

The reference is the formula as written, dense, no saekit code: with x_n = x / s, c_0 = 0,
c_{t+1} = σ(c_t + (x_n − c_t W_dec − b_dec) W_encᵀ + b_enc), x̂ = s·(c_n W_dec + b_dec), σ each
activation's rule written out. Trap inputs: a data mean far from 0 (b_dec ≠ 0 after
init_from_data, then perturbed), a dataset scale far from 1, 3-D input [B, T, d].
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from saekit.core.encoding import as_dense
from saekit.interop.portable import InteropError, to_portable
from saekit.model.clt import CLTConfig
from saekit.model.config import SAEConfig
from saekit.model.sae import SAE

D, M, K = 6, 20, 3
STEPS = 3


def reference_act(kind: str, pre, threshold=None):
    """σ written plainly on dense float64 pre [N, M]."""
    if kind == "relu":
        return torch.relu(pre)
    if kind in ("topk", "abstopk"):
        score = pre.abs() if kind == "abstopk" else pre
        idx = score.topk(K, dim=1).indices
        keep = torch.zeros_like(pre).scatter(1, idx, 1.0)
        return pre * keep if kind == "abstopk" else torch.relu(pre) * keep
    if kind == "batchtopk_train":  # the K·N largest of the whole batch, at every step
        idx = pre.reshape(-1).topk(K * pre.shape[0]).indices
        keep = torch.zeros(pre.numel(), dtype=pre.dtype).scatter(0, idx, 1.0).view_as(pre)
        return torch.relu(pre) * keep
    # batchtopk at inference, jumprelu: pre·1[pre > θ] (θ per latent or one)
    return pre * (pre > threshold).to(pre.dtype)


def reference_loop(x, params, scale, steps, kind, threshold=None):
    """(x̂ [..., d], c [N, M]) of the LISTA encoder, float64, the formula as written."""
    W_enc, b_enc, W_dec, b_dec = params
    x_n = x.reshape(-1, x.shape[-1]).double() / scale
    c = torch.zeros(x_n.shape[0], W_enc.shape[0], dtype=torch.float64)
    for _ in range(steps):
        residual = x_n - (c @ W_dec + b_dec)
        c = reference_act(kind, c + residual @ W_enc.T + b_enc, threshold)
    x_hat = scale * (c @ W_dec + b_dec)
    return x_hat.reshape(x.shape), c


def trap_inputs(seed=0, scale=7.0):
    """[B, T, d] activations with mean ≠ 0 and a scale far from 1."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 5, D, generator=g, dtype=torch.float64) + 2.0
    return scale * x


def make_sae(activation, steps, seed=0, **extra):
    torch.manual_seed(seed)
    cfg = SAEConfig(d_in=D, d_sae=M, activation=activation, dtype="float64", **extra)
    sae = SAE(dataclasses.replace(cfg, encoder_steps=steps))
    x = trap_inputs(seed)
    sae.init_from_data(x)  # s ≈ 7·‖x‖-ish, b_dec = the mean of x / s ≠ 0
    with torch.no_grad():  # untie and move off the init, so no term hides behind symmetry
        sae.W_enc.add_(0.2 * torch.randn_like(sae.W_enc))
        sae.b_enc.add_(0.1 * torch.randn_like(sae.b_enc))
        sae.b_dec.add_(0.1 * torch.randn_like(sae.b_dec))
    return sae, x


ACTIVATIONS = [
    ("topk", {"kind": "topk", "k": K}),
    ("topk", {"kind": "topk", "k": K, "kernel": "reference"}),
    ("abstopk", {"kind": "abstopk", "k": K}),
    ("relu", "relu"),
    ("batchtopk_train", {"kind": "batchtopk", "k": K}),
    ("batchtopk_train", {"kind": "batchtopk", "k": K, "kernel": "reference"}),
    ("jumprelu", {"kind": "jumprelu", "init_threshold": 0.05}),
]


@pytest.mark.parametrize("steps", [1, 2, STEPS])
@pytest.mark.parametrize(("kind", "activation"), ACTIVATIONS)
def test_forward_and_gradients_match_the_plain_float64_loop(kind, activation, steps):
    sae, x = make_sae(activation, steps)
    assert float(sae.scale) > 3 and sae.b_dec.abs().max() > 0.1  # the traps are set
    sae.train()
    threshold = sae.activation.theta().detach() if kind == "jumprelu" else None
    params = [p.detach().clone().requires_grad_(True) for p in _affine(sae)]
    x_hat_ref, c_ref = reference_loop(x, params, float(sae.scale), steps, kind, threshold)
    out = sae(x)
    assert out.x_hat.shape == x.shape
    torch.testing.assert_close(out.x_hat, x_hat_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(as_dense(out.latents), c_ref, rtol=1e-10, atol=1e-10)
    # a loss through the reconstruction and the code itself (weights so no term cancels)
    w = torch.randn(c_ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    loss_ref = (x_hat_ref - x).square().sum() + (w * c_ref).sum()
    loss = (out.x_hat - x).square().sum() + (w * as_dense(out.latents)).sum()
    loss_ref.backward()
    loss.backward()
    for ref, param in zip(params, _affine(sae), strict=True):
        torch.testing.assert_close(param.grad, ref.grad, rtol=1e-9, atol=1e-9)


def _affine(sae):
    return [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]


@pytest.mark.parametrize(
    ("kind", "activation"),
    [("batchtopk_eval", {"kind": "batchtopk", "k": K}), ("topk", {"kind": "topk", "k": K})],
)
def test_inference_encode_matches_the_loop_with_one_threshold_at_every_step(kind, activation):
    """BatchTopK outside training: pre·1[pre > θ] with the same θ at each step; ``encode``
    (saved-SAE use, eval) runs the same steps as ``forward``."""
    sae, x = make_sae(activation, STEPS)
    sae.eval()
    theta = None
    if kind == "batchtopk_eval":
        sae.activation.threshold.fill_(0.3)
        theta = 0.3
    params = [p.detach() for p in _affine(sae)]
    _, c_ref = reference_loop(x, params, float(sae.scale), STEPS, kind, theta)
    z = sae.encode(x)
    assert z.shape == (*x.shape[:-1], M)
    torch.testing.assert_close(z.reshape(-1, M), c_ref, rtol=1e-10, atol=1e-10)
    with torch.no_grad():  # the pre-activations calibration reads are the last step's
        last_pre = sae.encode_n(sae.normalise(x)).preacts.dense()
        torch.testing.assert_close(sae.pre_acts(sae.normalise(x)), last_pre)
        assert not torch.allclose(
            last_pre, sae.activation.preacts(sae.encoder_view(), sae.normalise(x)).dense()
        )


def test_the_steps_change_the_code():
    """More steps give another code (the option is visibly active), one step the affine one."""
    one, x = make_sae({"kind": "topk", "k": K}, 1)
    three = SAE(dataclasses.replace(one.cfg, encoder_steps=STEPS))
    three.load_state_dict(one.state_dict())
    assert not torch.allclose(one.encode(x), three.encode(x))


@pytest.mark.parametrize("activation", [{"kind": "topk", "k": K}, {"kind": "batchtopk", "k": K}])
def test_one_step_is_todays_encoder_exactly(activation):
    """encoder_steps = 1 (the default) is the activation's one encode, bit for bit."""
    sae, x = make_sae(activation, 1)
    assert SAEConfig(d_in=D, d_sae=M, activation=activation).encoder_steps == 1
    sae.train()
    out = sae(x)
    x_n = sae.normalise(x)
    enc = sae.activation.encode(sae.encoder_view(), x_n)
    torch.testing.assert_close(out.x_hat_n, sae.decode_n(enc.latents, x_n), rtol=0, atol=0)
    torch.testing.assert_close(out.encoding.preacts.dense(), enc.preacts.dense(), rtol=0, atol=0)
    data = sae.cfg.to_dict()
    del data["encoder_steps"]  # a cfg.json written before the field: one step
    assert SAEConfig.from_dict(data).encoder_steps == 1


@pytest.mark.parametrize(
    ("activation", "extra"),
    [({"kind": "batchtopk", "k": K}, {}), ("relu", {"whitening": {"kind": "zca", "eps": 0.01}})],
)
def test_save_and_load_keep_the_steps_and_the_latents(tmp_path, activation, extra):
    """Save folds s (and the whitening) into the weights; the n-step code is unchanged by the
    fold (the residual's scale cancels against W_enc / s) and reloads with encoder_steps."""
    sae, x = make_sae(activation, STEPS, **extra)
    sae.eval()
    sae.save(tmp_path / "sae")
    loaded = SAE.load(tmp_path / "sae")
    assert loaded.cfg.encoder_steps == STEPS and float(loaded.scale) == 1.0
    torch.testing.assert_close(loaded.encode(x), sae.encode(x), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(loaded(x).x_hat, sae(x).x_hat, rtol=1e-9, atol=1e-9)


def test_no_export_format_expresses_the_steps():
    sae, _ = make_sae({"kind": "topk", "k": K}, 2)
    with pytest.raises(InteropError, match="encoder_steps = 2.*one step"):
        to_portable(sae)
    to_portable(make_sae({"kind": "topk", "k": K}, 1)[0])  # one step exports as before


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"activation": "gated"}, "'gated' does not apply to encoder_steps"),
        ({"activation": {"kind": "matching_pursuit", "k": 2}}, "'matching_pursuit' does not"),
        ({"activation": "prolu"}, "'prolu' does not apply to encoder_steps"),
        ({"activation": {"kind": "hierarchical_topk", "k": 2}}, "'hierarchical_topk' does not"),
        ({"d_out": 5}, "encoder_steps > 1 applies to SAEs, not transcoders"),
        ({"d_out": 5, "skip": True}, "encoder_steps > 1 applies to SAEs, not transcoders"),
        ({"encoder_steps": 0}, "encoder_steps must be a positive integer"),
        ({"encoder_steps": True}, "encoder_steps: expected int"),
        ({"encoder_steps": 1.5}, "encoder_steps: expected int"),
    ],
)
def test_combinations_it_does_not_fit_are_refused_in_one_line(fields, match):
    data = {"d_in": D, "d_sae": M, "activation": {"kind": "topk", "k": 2}, "encoder_steps": 2}
    with pytest.raises(ValueError, match=match) as info:
        SAEConfig.from_dict({**data, **fields})
    assert "\n" not in str(info.value)


def test_a_dictionary_over_hooks_has_no_encoder_steps():
    data = {"n_layers": 2, "d_in": D, "d_sae": M, "activation": {"kind": "topk", "k": 2}}
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['encoder_steps'\]"):
        CLTConfig.from_dict({**data, "encoder_steps": 2})
