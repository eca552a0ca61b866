"""BatchTopK's inference threshold calibrated on held-out data, and the L0-off-target warning
(issue 18: inference L0 about half of k, or far less, after short runs with the EMA θ)."""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import torch

from saekit.cli import main
from saekit.data.synthetic.generator import SyntheticData
from saekit.eval.calibrate import (
    calibrate_batchtopk,
    l0_target,
    off_target,
    pre_activations,
    threshold_set,
    to_jumprelu,
)
from saekit.model.config import SAEConfig
from saekit.model.sae import SAE
from saekit.train import presets
from saekit.train.config import build_run_config
from saekit.train.config_files import apply_overrides
from saekit.train.run import run_training


def batchtopk_sae(d=8, d_sae=32, k=3, seed=0) -> SAE:
    """Random weights, nonzero b_dec and b_enc, dataset scale 2.5: every term of pre matters."""
    g = torch.Generator().manual_seed(seed)
    sae = SAE(SAEConfig(d_in=d, d_sae=d_sae, activation={"kind": "batchtopk", "k": k}))
    with torch.no_grad():
        sae.reset_parameters(generator=g)
        sae.b_dec.copy_(torch.randn(d, generator=g))
        sae.b_enc.copy_(0.1 * torch.randn(d_sae, generator=g))
        sae.scale.fill_(2.5)
    return sae.eval()


def test_theta_is_the_kn_plus_first_largest_pre_activation_over_all_batches():
    sae = batchtopk_sae()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 8, generator=g) + 3.0
    x[:40] *= 10  # the first batch holds most of the top values: a per-batch rule fails here
    batches = [x[:40], x[40:45], x[45:200], x[200:]]
    result = calibrate_batchtopk(sae, iter(batches), max_tokens=250)
    with torch.no_grad():
        pre = (x[:250].double() / 2.5 - sae.b_dec.double()) @ sae.W_enc.double().T + sae.b_enc
    values = pre.flatten().sort(descending=True).values  # float64 reference
    assert result.threshold == pytest.approx(float(values[3 * 250]), rel=1e-5)
    assert float(sae.activation.threshold) == pytest.approx(result.threshold)
    assert result.n_tokens == 250 and result.l0 == 3.0
    z = sae(x[:250]).latents  # the SAE's own inference path fires exactly k per token
    assert int((z != 0).sum()) == 3 * 250
    torch.testing.assert_close(pre_activations(sae, x[:4]).double(), pre[:4], rtol=1e-5, atol=1e-5)


def test_theta_stays_at_zero_when_too_few_pre_activations_are_positive():
    sae = batchtopk_sae()
    with torch.no_grad():
        sae.b_enc.fill_(-1e3)  # every pre-activation negative
    result = calibrate_batchtopk(sae, iter([torch.randn(64, 8)]), max_tokens=64)
    assert result.threshold == 0.0 and result.l0 == 0.0


def test_with_encoder_steps_theta_is_the_fixed_point_that_gives_l0_k():
    """LISTA steps (saekit.model.lista) apply θ at every step: calibration iterates
    θ ← v_{kN+1}(last step's pre at θ) until it settles, where the inference L0 is k."""
    one = batchtopk_sae()
    sae = SAE(dataclasses.replace(one.cfg, encoder_steps=3))
    sae.load_state_dict(one.state_dict())
    with torch.no_grad():
        sae.W_enc.mul_(0.5)  # a stable step: ‖W_dec W_encᵀ‖ near 1
    sae.eval()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(400, 8, generator=g) + 3.0
    batches = [x[:150], x[150:]]
    with pytest.raises(ValueError, match="encoder_steps = 3 reads the tokens once per round"):
        calibrate_batchtopk(sae, iter(batches), max_tokens=400)
    result = calibrate_batchtopk(sae, batches, max_tokens=400, apply=False)
    with torch.no_grad(), threshold_set(sae, result.threshold):
        l0 = float((sae.encode(x) != 0).sum()) / 400
        again = calibrate_batchtopk(sae, batches, max_tokens=400, apply=False)
    assert l0 == pytest.approx(3.0, rel=0.01)
    assert again.threshold == pytest.approx(result.threshold, rel=2e-3)  # a fixed point
    assert result.threshold_ema == 0.0  # the EMA's θ as training left it, not a round's
    with torch.no_grad(), threshold_set(sae, pre_at_one_pass(sae, x)):
        assert abs(float((sae.encode(x) != 0).sum()) / 400 - 3.0) > 0.05  # one pass is off
    with threshold_set(sae, result.threshold):  # the JumpReLU of it keeps the steps
        converted = to_jumprelu(sae)
        assert converted.cfg.encoder_steps == 3
        torch.testing.assert_close(converted.encode(x), sae.encode(x))


def test_an_sae_in_training_mode_calibrates_as_at_inference_and_stays_in_training_mode():
    """A member's SAE is left in training mode, where BatchTopK keeps the k·N largest of the
    batch: with encoder steps, calibrating it so gave another θ (the intermediate steps were
    training's); calibration encodes as at inference, then restores the mode."""
    one = batchtopk_sae()
    sae = SAE(dataclasses.replace(one.cfg, encoder_steps=3))
    sae.load_state_dict(one.state_dict())
    with torch.no_grad():
        sae.W_enc.mul_(0.5)
        sae.activation.threshold.fill_(0.5)
    x = torch.randn(256, 8, generator=torch.Generator().manual_seed(3)) + 3.0
    batches = [x[:128], x[128:]]
    want = calibrate_batchtopk(sae.eval(), batches, max_tokens=256, apply=False)
    got = calibrate_batchtopk(sae.train(), batches, max_tokens=256, apply=False)
    assert sae.training
    assert got == want


def pre_at_one_pass(sae, x):
    """θ of a single calibration pass with the intermediate steps at θ = 0."""
    values = pre_activations(sae, x).flatten().sort(descending=True).values
    return float(values[3 * len(x)])


def short_batchtopk_run(tmp_path, steps=30):
    """The built-in benchmark (`saekit train` defaults) with a BatchTopK SAE, short."""
    data = presets.train_config()
    data = apply_overrides(data, ["saes.0.sae.activation.kind=batchtopk", f"steps={steps}"])
    data.update(out_dir=str(tmp_path), progress=False, eval_tokens=8192, checkpoint_every=0)
    cfg = build_run_config(data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, reports = run_training(cfg)
    return cfg, trainer, reports[0], [str(w.message) for w in caught]


def test_batchtopk_inference_l0_is_k_after_a_short_run_with_the_default_settings(tmp_path):
    cfg, trainer, report, messages = short_batchtopk_run(tmp_path)
    k = cfg.saes[0].sae.activation.k
    assert (
        cfg.saes[0].sae.activation.threshold_beta == 0.999
    )  # the default EMA, not the sweep's 0.99
    assert report.threshold.l0_ema < 0.5 * k  # the trap: the EMA θ still carries early training
    assert report.threshold.threshold < report.threshold.threshold_ema
    # fresh tokens, neither trained nor calibrated on, through the saved SAE
    sae = SAE.load(tmp_path / cfg.saes[0].name)
    x = SyntheticData(cfg.data.synthetic).batch(3 * 10**9, 8192).x
    l0 = float((sae.encode(x) != 0).sum(-1).double().mean())
    assert abs(l0 - k) <= 0.1 * k
    assert float(sae.activation.threshold) == pytest.approx(report.threshold.threshold)
    # the training state keeps the EMA (checkpoints and data-parallel ranks agree)
    assert float(trainer.members[0].sae.activation.threshold) == report.threshold.threshold_ema
    assert not [m for m in messages if "off its target" in m]
    summary = json.loads((tmp_path / "summary.json").read_text())[0]
    assert summary["threshold_ema"] == report.threshold.threshold_ema and summary["l0_target"] == k


def test_l0_off_target_warns_beyond_ten_percent():
    batchtopk = SAEConfig(d_in=4, d_sae=8, activation={"kind": "batchtopk", "k": 4})
    jumprelu = SAEConfig(d_in=4, d_sae=8, activation="jumprelu", metadata={"target_l0": 20})
    assert (l0_target(batchtopk), l0_target(jumprelu), l0_target(jumprelu, 5.0)) == (4, 20, 5)
    assert l0_target(SAEConfig(d_in=4, d_sae=8, activation={"kind": "topk", "k": 2})) is None
    assert off_target("a", 4.39, 4.0) is None and off_target("a", 3.61, 4.0) is None
    assert off_target("a", 4.41, 4.0) is not None
    assert off_target("a", 2.0, 4.0) == (
        "SAE a: inference L0 2.00 is 50% off its target 4 (more than 10%)"
    )


def test_eval_of_a_batchtopk_sae_whose_theta_is_off_warns(tmp_path, capsys):
    from saekit.data.cache.writing import write_cache

    sae = batchtopk_sae(k=4)
    acts = [torch.randn(200, 8, generator=torch.Generator().manual_seed(i)) + 3 for i in range(2)]
    write_cache(tmp_path / "cache", acts, "blocks.0", "toy", shard_tokens=200)
    calibrate_batchtopk(sae, iter(acts[1:]), max_tokens=200)  # the held-out shard: L0 = k
    sae.save(tmp_path / "ok")
    sae.activation.threshold.mul_(3.0)  # θ too high: L0 far below k
    sae.save(tmp_path / "off")
    argv = ["eval", "--cache", str(tmp_path / "cache"), "--hook", "blocks.0"]
    assert main([*argv, "--sae", str(tmp_path / "ok")]) == 0
    assert "warning" not in capsys.readouterr().err
    assert main([*argv, "--sae", str(tmp_path / "off")]) == 0
    err = capsys.readouterr().err
    assert "inference L0" in err and "off its target 4 (more than 10%)" in err


def test_a_jumprelu_far_from_its_target_l0_warns_in_the_run(tmp_path, capsys):
    data = presets.train_config()
    overrides = ["saes.0.sae.activation=jumprelu", "saes.0.penalty.kind=l0"]
    overrides += ["saes.0.penalty.target_l0=200", "saes.0.penalty.coefficient=0.1", "steps=4"]
    data = apply_overrides(data, overrides)
    data.update(out_dir=str(tmp_path), progress=False, eval_tokens=2048, batch_size=512)
    with pytest.warns(UserWarning, match=r"inference L0 .* off its target 200"):
        run_training(build_run_config(data))
    meta = json.loads((tmp_path / "jumprelu-l0-M1024" / "cfg.json").read_text())
    assert meta["config"]["metadata"]["target_l0"] == 200
