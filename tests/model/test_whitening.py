"""Covariance whitening as an input transform (issue 14, item 6; saekit/normalisation.py).

The SAE trains on x_n = (x/s − μ)·M, M = E(Λ + ε)^(-1/2)Eᵀ (ZCA) from the covariance of x/s;
save folds it into the weights so the saved SAE takes raw x and gives the same latents. The
statistics are estimated once at the start (with the dataset scale) and survive a resume.
References: float64, written from the formulas with plain loops, on correlated data with a
nonzero mean, s ≠ 1, nonzero b_dec and b_enc, 3-D input.
"""

from __future__ import annotations

import pytest
import torch
from test_trainer import interrupt_at, make_trainer, params

import saekit.model.normalisation as normalisation
from saekit.model.config import SAEConfig
from saekit.model.normalisation import ZCAWhitening, estimate_whitening
from saekit.model.sae import SAE
from saekit.train.config import build_run_config
from saekit.train.trainer import Trainer, TrainingInterrupted

F64 = torch.float64
D, M, B, T = 5, 12, 3, 4
EPS = 0.05


def correlated(n: int, seed: int, lead: tuple[int, ...] = ()) -> torch.Tensor:
    """x = 6·(u A) + c: strongly correlated dimensions, mean c ≠ 0, E‖x‖² far from d."""
    g = torch.Generator().manual_seed(seed)
    A = torch.tensor(
        [
            [1.0, 0.9, 0.0, 0.2, 0.0],
            [0.0, 0.3, 0.5, 0.0, 0.1],
            [0.0, 0.0, 0.2, 0.1, 0.0],
            [0.4, 0.0, 0.0, 1.5, 0.3],
            [0.0, 0.0, 0.0, 0.0, 0.05],
        ],
        dtype=F64,
    )
    u = torch.randn(*lead, n, D, generator=g, dtype=F64)
    return 6 * (u @ A) + torch.tensor([3.0, -2.0, 1.0, 0.5, 4.0], dtype=F64)


def covariance_loop(x: torch.Tensor) -> list[list[float]]:
    rows = x.tolist()
    n = len(rows)
    mean = [sum(r[j] for r in rows) / n for j in range(D)]
    return [
        [sum((r[a] - mean[a]) * (r[b] - mean[b]) for r in rows) / (n - 1) for b in range(D)]
        for a in range(D)
    ]


def test_zca_matrix_is_the_symmetric_inverse_square_root_of_the_regularised_covariance():
    """The ZCA M is the unique symmetric positive-definite M with M (Σ + εI) M = I."""
    x_n = correlated(400, seed=1)
    w = estimate_whitening(x_n, ZCAWhitening(eps=EPS))
    cov = torch.tensor(covariance_loop(x_n), dtype=F64)
    eye = torch.eye(D, dtype=F64)
    torch.testing.assert_close(w.mean, x_n.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w.matrix, w.matrix.T, rtol=0, atol=1e-12)
    assert torch.linalg.eigvalsh(w.matrix).min() > 0
    torch.testing.assert_close(w.matrix @ (cov + EPS * eye) @ w.matrix, eye, rtol=0, atol=1e-10)
    torch.testing.assert_close(w.inverse @ w.matrix, eye, rtol=0, atol=1e-10)
    # the whitened sample: zero mean, covariance Λ/(Λ + ε) in the eigenbasis (≈ I)
    white = normalisation.whiten(x_n, w)
    torch.testing.assert_close(white.mean(0), torch.zeros(D, dtype=F64), rtol=0, atol=1e-10)
    lam = torch.linalg.eigvalsh(cov)
    got = torch.linalg.eigvalsh(torch.tensor(covariance_loop(white), dtype=F64))
    torch.testing.assert_close(got, (lam / (lam + EPS)).sort().values, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="eps must be"):
        ZCAWhitening(eps=0.0)


def whitened_sae(activation, dtype: str = "float64") -> tuple[SAE, torch.Tensor]:
    cfg = SAEConfig(D, M, activation, dtype=dtype, whitening={"kind": "zca", "eps": EPS})
    sae = SAE(cfg)
    g = torch.Generator().manual_seed(2)
    sae.reset_parameters(generator=g)
    sae.init_from_data(correlated(500, seed=3).to(getattr(torch, dtype)))
    with torch.no_grad():
        sae.W_enc.add_(0.3 * torch.randn(M, D, generator=g, dtype=F64))
        sae.W_dec.mul_(0.5 + torch.rand(M, 1, generator=g, dtype=F64))
        sae.b_enc.copy_(0.2 * torch.randn(M, generator=g, dtype=F64))
        sae.b_dec.add_(0.3 * torch.randn(D, generator=g, dtype=F64))
    assert abs(float(sae.scale) - 1) > 0.5 and sae.b_dec.abs().max() > 0.1
    return sae, correlated(B * T, seed=4, lead=()).reshape(B, T, D).to(getattr(torch, dtype))


def test_whitened_forward_and_gradients_match_the_float64_formula():
    """x_n = (x/s − μ)M; pre = (x_n − b_dec)W_encᵀ + b_enc; TopK; x̂ = s((zW_dec + b_dec)M⁻¹ + μ);
    the loss is mean_n ‖x_n − x̂_n‖² in the whitened space."""
    sae, x = whitened_sae({"kind": "topk", "k": 3, "kernel": "reference"})
    s = float(sae.scale)
    mu, Mw, Minv = (t.tolist() for t in sae.whitening)
    rows = x.reshape(-1, D).tolist()
    x_n = [[sum((r[a] / s - mu[a]) * Mw[a][b] for a in range(D)) for b in range(D)] for r in rows]

    P = {n: p.detach().clone().requires_grad_(True) for n, p in sae.named_parameters()}
    xn = torch.tensor(x_n, dtype=F64)
    pre = (xn - P["b_dec"]) @ P["W_enc"].T + P["b_enc"]
    top = pre.detach().argsort(dim=-1, descending=True)[:, :3]
    z = torch.relu(pre) * torch.zeros_like(pre).scatter(1, top, 1.0)
    x_hat_n = z @ P["W_dec"] + P["b_dec"]
    x_hat = s * (x_hat_n @ torch.tensor(Minv, dtype=F64) + torch.tensor(mu, dtype=F64))
    ref_loss = (xn - x_hat_n).pow(2).sum(-1).mean()
    ref_loss.backward()

    out = sae(x)
    loss = (out.x_n - out.x_hat_n).pow(2).sum(-1).mean()
    loss.backward()
    torch.testing.assert_close(out.x_n, xn, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.latents, z.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.x_hat, x_hat.detach().reshape(B, T, D), rtol=1e-12, atol=1e-11)
    for name, p in sae.named_parameters():
        torch.testing.assert_close(p.grad, P[name].grad, rtol=1e-10, atol=1e-12, msg=name)
    torch.testing.assert_close(sae.decode(out.latents.reshape(B, T, M)), out.x_hat)


@pytest.mark.parametrize(
    "activation",
    [{"kind": "topk", "k": 3}, {"kind": "jumprelu", "init_threshold": 0.2}, "relu"],
    ids=["topk", "jumprelu", "relu"],
)
def test_save_folds_whitening_so_the_saved_sae_takes_raw_activations(activation, tmp_path):
    sae, x = whitened_sae(activation, dtype="float32")
    sae.eval()
    sae.save(tmp_path / "sae")
    loaded = SAE.load(tmp_path / "sae")
    assert loaded.cfg.whitening is None and loaded.whitening is None
    assert loaded.cfg.metadata["whitening_folded"] == {"kind": "zca", "eps": EPS}
    assert float(loaded.scale) == 1.0 and sae.cfg.whitening is not None  # the original kept
    torch.testing.assert_close(loaded(x).pre, sae(x).pre, rtol=1e-4, atol=1e-4)
    z, z_loaded = sae.encode(x), loaded.encode(x)
    assert torch.equal(z != 0, z_loaded != 0)  # the same latents fire (TopK: the same k)
    torch.testing.assert_close(z_loaded, z, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loaded(x).x_hat, sae(x).x_hat, rtol=1e-4, atol=1e-3)
    # the folded decoder: s·W_dec·M⁻¹ (TopK's unit rows are a training-space constraint)
    s, (mu, _, Minv) = sae.scale.double(), sae.whitening
    expected = s * sae.W_dec.double() @ Minv
    torch.testing.assert_close(loaded.W_dec.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loaded.b_dec.double(), s * (sae.b_dec.double() @ Minv + mu))
    with pytest.raises(ValueError, match="folded by save"):
        sae.fold_scale_()


def test_whitening_is_estimated_once_and_not_again_on_resume(tmp_path, monkeypatch):
    entry = {
        "name": "white",
        "sae": {"d_sae": 32, "activation": {"kind": "topk", "k": 3}, "whitening": "zca"},
        "lr": 3e-3,
        "warmup_steps": 2,
    }
    synth = {"d": 8, "n_features": 24, "mean_l0": 3.0, "seed": 3, "kind": "correlated"}

    def config(out):
        return build_run_config(
            {
                "data": {"source": "synthetic", "synthetic": synth},
                "saes": [entry],
                "batch_size": 64,
                "steps": 8,
                "log_every": 2,
                "checkpoint_every": 0,
                "eval_tokens": 128,
                "progress": False,
                "out_dir": str(out),
            }
        )

    calls = []
    original = normalisation.estimate_whitening
    monkeypatch.setattr(
        normalisation, "estimate_whitening", lambda *a: calls.append(1) or original(*a)
    )
    full = make_trainer(config(tmp_path / "full"))
    full.fit()
    assert len(calls) == 1
    first = make_trainer(config(tmp_path / "cut"))
    interrupt_at(first, 4)
    with pytest.raises(TrainingInterrupted):
        first.fit()
    assert len(calls) == 2
    resumed: Trainer = make_trainer(config(tmp_path / "cut"))
    resumed.load_checkpoint()
    resumed.fit()
    assert len(calls) == 2  # the statistics came from the checkpoint
    a, b = params(full.members[0]), params(resumed.members[0])
    assert a.keys() == b.keys() and "whiten_matrix" in a
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert not torch.equal(a["whiten_matrix"], torch.eye(8, dtype=F64))
