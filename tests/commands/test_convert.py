"""BatchTopK → JumpReLU conversion with calibration (issue 14, item 7; `saekit convert`).

The converted SAE computes the BatchTopK inference z = pre·1[pre > θ] with every θ_i = θ, so its
L0 and FVU equal the BatchTopK SAE's on any data; θ calibrated on the cache's held-out shard puts
the mean L0 there at k. The reference is written from the formula in float64 with plain loops,
on raw 3-D activations with a nonzero mean, s ≠ 1, nonzero b_dec and b_enc.
"""

from __future__ import annotations

import json

import pytest
import torch

from saekit.cli import main
from saekit.data.cache.writing import write_cache
from saekit.eval.calibrate import calibrate_batchtopk, to_jumprelu
from saekit.eval.metrics import MetricAccumulator
from saekit.model.config import SAEConfig
from saekit.model.sae import SAE

F64 = torch.float64
D, M, K = 6, 16, 3


def activations(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g) * 4 + torch.linspace(-2.0, 3.0, D)


def batchtopk_sae() -> SAE:
    """Trained-looking weights, s ≠ 1, b_dec ≠ 0, b_enc ≠ 0 and an EMA θ far from calibrated."""
    g = torch.Generator().manual_seed(0)
    sae = SAE(SAEConfig(D, M, {"kind": "batchtopk", "k": K}, hook="blocks.0"))
    sae.reset_parameters(generator=g)
    sae.init_from_data(activations(256, seed=1))
    with torch.no_grad():
        sae.W_enc.add_(0.4 * torch.randn(M, D, generator=g))
        sae.b_enc.copy_(0.2 * torch.randn(M, generator=g))
        sae.b_dec.add_(0.3 * torch.randn(D, generator=g))
        sae.activation.update_threshold(torch.tensor(5.0))
    assert float(sae.scale) != 1.0
    return sae.eval()


def reference_latents(sae: SAE, x: torch.Tensor, theta: float) -> list[list[float]]:
    """pre·1[pre > θ], pre = (x/s − b_dec)·W_encᵀ + b_enc, token by token (float64)."""
    s = float(sae.scale)
    W, b_enc, b_dec = sae.W_enc.double().tolist(), sae.b_enc.tolist(), sae.b_dec.tolist()
    out = []
    for row in x.reshape(-1, D).double().tolist():
        pre = [
            sum((row[d] / s - b_dec[d]) * W[i][d] for d in range(D)) + b_enc[i] for i in range(M)
        ]
        out.append([p if p > theta else 0.0 for p in pre])
    return out


def fvu_and_l0(sae: SAE, x: torch.Tensor) -> tuple[float, float]:
    acc = MetricAccumulator(D, M)
    with torch.no_grad():
        out = sae(x)
        acc.add(x.reshape(-1, D), out.x_hat.reshape(-1, D), out.latents)
    report = acc.result()
    return report.fvu, report.l0


def test_saekit_convert_calibrates_theta_on_the_cache_and_matches_batchtopk_inference(tmp_path):
    sae = batchtopk_sae()
    sae.save(tmp_path / "btk")
    shards = [activations(300, seed=2), activations(300, seed=3)]  # the second is held out
    write_cache(tmp_path / "cache", shards, "blocks.0", "toy", shard_tokens=300)
    argv = ["convert", str(tmp_path / "btk"), "--to", "jumprelu", "--out", str(tmp_path / "jr")]
    assert main([*argv, "--data", str(tmp_path / "cache"), "--batch-size", "128"]) == 0

    jr = SAE.load(tmp_path / "jr")
    meta = jr.cfg.metadata
    theta = meta["converted_from"]["threshold"]
    assert jr.cfg.activation.kind == "jumprelu" and meta["target_l0"] == K
    assert torch.equal(jr.activation.threshold, torch.full((M,), theta))
    # calibrated: on the held-out shard, exactly k·N pre-activations exceed θ (no ties)
    pre = jr.pre_acts(jr.normalise(shards[1])).double()
    assert int((pre > theta).sum()) == K * 300
    assert theta != pytest.approx(5.0)  # the EMA's θ was replaced

    # the JumpReLU computes the BatchTopK inference at that θ, on other raw 3-D data too
    btk = SAE.load(tmp_path / "btk")
    btk.activation.threshold.fill_(theta)
    x = activations(40, seed=9).reshape(2, 20, D)
    z = jr.encode(x)
    torch.testing.assert_close(
        z.reshape(-1, M).double(),
        torch.tensor(reference_latents(jr, x, theta), dtype=F64),
        rtol=1e-5,
        atol=1e-5,
    )
    assert torch.equal(z, btk.encode(x)) and (z != 0).any() and (z == 0).any()
    assert fvu_and_l0(jr, x) == fvu_and_l0(btk, x)
    assert fvu_and_l0(jr, shards[1])[1] == pytest.approx(K)  # L0 = k where calibrated

    # a second conversion is refused unless --force; without --data the saved θ is used
    assert main(argv) == 2
    assert main([*argv, "--force"]) == 0
    again = SAE.load(tmp_path / "jr")
    assert float(again.activation.threshold[0].detach()) == float(sae.activation.threshold) == 5.0


def test_per_latent_thresholds_on_the_calibration_tokens_select_what_the_global_theta_does():
    """The design choice (saekit/eval/calibrate.py): θ_i = the (c_i + 1)-th largest pre of
    latent i, c_i its share of the kN largest entries, fires on exactly the same entries."""
    sae = batchtopk_sae()
    x = activations(200, seed=4)
    cal = calibrate_batchtopk(sae, iter([x[:100], x[100:]]), max_tokens=200)
    pre = sae.pre_acts(sae.normalise(x)).double()
    flat = sorted(((pre[n, i].item(), n, i) for n in range(200) for i in range(M)), reverse=True)
    top = flat[: K * 200]
    per_latent = []
    for i in range(M):
        column = sorted((pre[n, i].item() for n in range(200)), reverse=True)
        c_i = sum(1 for _, _, j in top if j == i)
        per_latent.append(column[c_i] if c_i < 200 else float("-inf"))
    fired_per_latent = pre > torch.tensor(per_latent, dtype=F64)
    fired_global = pre > cal.threshold
    assert torch.equal(fired_per_latent, fired_global)
    assert int(fired_global.sum()) == K * 200 and len(set(per_latent)) > 1


def test_convert_refuses_what_it_cannot_convert(tmp_path, capsys):
    relu = SAE(SAEConfig(D, M, "relu"))
    relu.save(tmp_path / "relu")
    assert main(["convert", str(tmp_path / "relu"), "--to", "jumprelu", "--out", "x"]) == 2
    assert "only batchtopk converts" in capsys.readouterr().err
    with pytest.raises(ValueError, match="only a batchtopk SAE"):
        to_jumprelu(relu)
    batchtopk_sae().save(tmp_path / "btk")
    write_cache(tmp_path / "wide", [torch.randn(50, D + 1)], "blocks.0", "toy", shard_tokens=50)
    argv = ["convert", str(tmp_path / "btk"), "--to", "jumprelu", "--out", str(tmp_path / "o")]
    assert main([*argv, "--data", str(tmp_path / "wide")]) == 2
    assert "has width 7" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["convert", str(tmp_path / "btk"), "--to", "topk", "--out", str(tmp_path / "o")])


def test_the_converted_sae_round_trips_and_records_its_source(tmp_path):
    sae = batchtopk_sae()
    jr = to_jumprelu(sae)
    jr.save(tmp_path / "jr")
    loaded = SAE.load(tmp_path / "jr")
    cfg = json.loads((tmp_path / "jr" / "cfg.json").read_text())["config"]
    assert cfg["metadata"]["converted_from"] == {"kind": "batchtopk", "k": K, "threshold": 5.0}
    x = activations(12, seed=5).reshape(3, 4, D)
    assert torch.equal(loaded.encode(x), sae.encode(x))
    torch.testing.assert_close(loaded(x).x_hat, sae(x).x_hat)
