"""Transcoders in runs: the synthetic ground truth with a target, every activation and objective
training on a paired stream, evaluation of the target, checkpoints and resume."""

from __future__ import annotations

import pytest
import torch

from saekit.data.sources.synthetic import SyntheticSource
from saekit.data.synthetic.generator import SyntheticConfig, SyntheticData
from saekit.eval import ground_truth
from saekit.model.sae import SAE
from saekit.train.config import build_run_config
from saekit.train.member import Member
from saekit.train.run import run_training

SYNTH = {"d": 16, "n_features": 48, "mean_l0": 3.0, "seed": 3, "d_out": 12}


def test_synthetic_target_is_the_known_sparse_map_of_the_input_features():
    """Input columns as without a target; y = c G + ν + x Aᵀ exactly (no noise)."""
    base = {"d": 8, "n_features": 20, "mean_l0": 3.0, "noise_std": 0.0, "seed": 5}
    plain = SyntheticData(SyntheticConfig(**base))
    paired = SyntheticData(SyntheticConfig(**base, d_out=6, skip_strength=0.5))
    batch, reference = paired.batch(7, 300), plain.batch(7, 300)
    x, y = batch.x[:, :8], batch.x[:, 8:]
    assert torch.equal(x, reference.x)
    assert torch.equal(batch.coefficients, reference.coefficients)
    expected = batch.coefficients @ paired.directions + paired.target_mean + x @ paired.skip_map.T
    torch.testing.assert_close(y, expected)
    assert paired.directions.shape == (20, 6)
    torch.testing.assert_close(paired.directions.norm(dim=-1), torch.ones(20))
    assert paired.skip_map.abs().sum() > 0


def test_skip_strength_needs_a_target():
    with pytest.raises(ValueError, match="skip_strength needs d_out"):
        SyntheticConfig(skip_strength=1.0)


def run_config(tmp_path, saes, steps=12, synthetic=SYNTH):
    return build_run_config(
        {
            "data": {"source": "synthetic", "synthetic": synthetic},
            "saes": saes,
            "batch_size": 128,
            "steps": steps,
            "log_every": 4,
            "checkpoint_every": 0,
            "eval_tokens": 512,
            "progress": False,
            "out_dir": str(tmp_path),
        }
    )


def entry(name, activation, **extra):
    sae = {"d_sae": 64, "activation": activation, **extra.pop("sae", {})}
    return {"name": name, "sae": sae, "lr": 3e-3, "warmup_steps": 3, "dead_tokens": 256, **extra}


EVERY_KIND = [
    entry("topk", {"kind": "topk", "k": 3}, sae={"skip": True}),
    entry("topk-preact", {"kind": "topk", "k": 3, "kernel": "reference"}, revival="preact"),
    entry("batchtopk", {"kind": "batchtopk", "k": 3}, sae={"skip": True}),
    entry(
        "jumprelu",
        "jumprelu",
        penalty={"kind": "l0", "coefficient": 0.1, "target_l0": 3.0},
        revival="preact",
    ),
    entry("relu", "relu", penalty={"kind": "l1", "coefficient": 0.01}, sae={"skip": True}),
    entry("prolu", "prolu", penalty={"kind": "l1", "coefficient": 0.01}),
    entry("abstopk", {"kind": "abstopk", "k": 3}, sae={"skip": True}, revival="preact"),
    entry("gated", "gated", penalty={"kind": "l1", "coefficient": 0.01}, revival="none"),
    entry("htopk", {"kind": "hierarchical_topk", "k": 3}, sae={"skip": True}),
    entry(
        "matryoshka",
        {"kind": "batchtopk", "k": 3},
        matryoshka={"kind": "fixed", "groups": [16, 48]},
        sae={"skip": True},
    ),
]


def test_every_activation_and_objective_trains_a_transcoder(tmp_path, one_thread):
    """One paired stream feeds every kind; each is filled in as a transcoder (d_out from the
    data), saved with its scales folded, and evaluated on the target: the report's FVU is
    Σ‖y − ŷ‖² / Σ‖y − ȳ‖² over the held-out batches (BatchTopK: those after the first half,
    which calibrated its θ), recomputed here in float64."""
    cfg = run_config(tmp_path, EVERY_KIND)
    assert {s.sae.d_out for s in cfg.saes} == {12}
    trainer, reports = run_training(cfg)
    source = SyntheticSource(SyntheticData(cfg.data.synthetic, cfg.seed), cfg.batch_size)
    held_out = torch.cat([b for b, _ in source.eval_batches(cfg.eval_tokens, 128)]).double()
    for member, report in zip(trainer.members, reports, strict=True):
        skip = 0 if report.threshold is None else report.threshold.calibration_tokens
        evaluated = held_out[skip:]
        x, y = evaluated[:, :16], evaluated[:, 16:]
        loaded = SAE.load(tmp_path / member.cfg.name)  # BatchTopK: with its calibrated θ
        assert loaded.cfg.d_out == 12 and float(loaded.target_scale) == 1.0
        with torch.no_grad():
            y_hat = loaded(x.float()).x_hat.double()
        fvu = (y - y_hat).pow(2).sum() / (y - y.mean(0)).pow(2).sum()
        assert report.metrics.fvu == pytest.approx(float(fvu), rel=1e-4), member.cfg.name
        if loaded.cfg.skip:
            assert member.sae.W_skip.abs().sum() > 0, member.cfg.name


def test_sae_entries_on_a_paired_stream_and_transcoders_on_a_plain_one_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"saes.0.sae.d_out is set but the data has no target"):
        run_config(
            tmp_path,
            [entry("t", {"kind": "topk", "k": 3}, sae={"d_out": 12})],
            synthetic={"d": 16, "n_features": 48, "mean_l0": 3.0},
        )


@pytest.mark.slow
def test_a_topk_transcoder_recovers_the_true_map(tmp_path, one_thread):
    """Decoder rows match the known output directions g (Hungarian MCC), far above the random
    decoder it started from."""
    synthetic = {"d": 16, "n_features": 20, "mean_l0": 2.0, "d_out": 16, "seed": 1}
    sae = entry("topk", {"kind": "topk", "k": 2}, sae={"d_sae": 32}, lr=1e-2)
    cfg = run_config(tmp_path, [sae], 600, synthetic)
    data = SyntheticData(cfg.data.synthetic, cfg.seed)
    start = ground_truth.recovery(data.directions, Member(cfg.saes[0], 1, "cpu").sae.W_dec)
    trainer, (report,) = run_training(cfg)
    rec = ground_truth.recovery(data.directions, trainer.members[0].sae.W_dec)
    assert report.ground_truth.mcc == pytest.approx(rec.mcc)
    assert rec.mcc > 0.8 and rec.mcc > start.mcc + 0.25, (start, rec)
