"""Every bad value the hostile-user report listed is refused at load with one line naming the
field, or is justified here (the docs say what it means)."""

from __future__ import annotations

import pytest

from saekit.cli import main
from saekit.train import presets
from saekit.train.config import build_run_config
from saekit.train.config_files import apply_overrides

REFUSED = [
    # (override, words the one-line error must contain)
    ("saes.0.penalty={kind: l1, coefficient: .nan}", ["coefficient", "nan"]),
    ("saes.0.penalty={kind: l1, coefficient: .inf}", ["coefficient", "inf"]),
    ("saes.0.penalty={kind: l1, coefficient: 0.1, target_l0: .nan}", ["target_l0"]),
    ("saes.0.penalty={kind: l1, coefficient: 0.1, target_l0: .inf}", ["target_l0"]),
    ("saes.0.penalty={kind: l1, coefficient: 0.1, controller_rate: .nan}", ["controller_rate"]),
    ("saes.0.penalty={kind: l1, coefficient: 0.1, controller_rate: .inf}", ["controller_rate"]),
    ("saes.0.revival={kind: auxk, coefficient: .nan}", ["coefficient", "nan"]),
    ("saes.0.revival={kind: auxk, coefficient: .inf}", ["coefficient", "inf"]),
    ("saes.0.revival={kind: auxk, coefficient: -5}", ["coefficient", "-5"]),
    ("saes.0.revival={kind: auxk, k_aux: 0}", ["k_aux", "0"]),
    ("saes.0.revival={kind: auxk, k_aux: -3}", ["k_aux", "-3"]),
    ("saes.0.grad_clip=.nan", ["grad_clip", "nan"]),
    ("saes.0.grad_clip=-1", ["grad_clip", "-1"]),
    ("saes.0.adam_betas=[1.5, 0.9]", ["adam_betas", "1.5"]),
    ("saes.0.decay_start=2", ["decay_start"]),
    ("saes.0.warmup_steps=-1", ["warmup_steps"]),
    ("saes.0.dead_tokens=0", ["dead_tokens"]),
    ("saes.0.seed=-1", ["seed"]),
    ("saes.0.name=../outside", ["name", "../outside"]),
    ("saes.0.name=/tmp/abs", ["name", "/tmp/abs"]),
    ("saes.0.name=checkpoint", ["name", "checkpoint"]),
    ("saes.0.sae.dtype=int64", ["dtype", "int64"]),
    ("data.synthetic.kind=correlated", None),  # valid: the control case
    ("data.synthetic.correlation_rank=-1", ["correlation_rank", "-1"]),
    ("data.synthetic.noise_std=-1", ["noise_std"]),
    ("data.synthetic.magnitude_mean=.inf", ["magnitude_mean"]),
    ("data.synthetic.zipf_exponent=.nan", ["zipf_exponent"]),
    ("data.synthetic.parent_probability=2", ["parent_probability"]),
    ("data.synthetic.seed=-1", ["seed"]),
    ("batch_size=1", ["batch_size"]),
    ("steps=0", ["steps"]),
    ("log_every=0", ["log_every"]),
    ("checkpoint_every=-1", ["checkpoint_every"]),
    ("threads=-2", ["threads"]),
    ("seed=-1", ["seed"]),
    ("device=nonsense", ["device", "nonsense"]),
    ("steps=[1", ["steps=[1"]),
    ("steps.x=1", ["steps", "x"]),
    ("saes=3", ["saes"]),
    ("saes.0.sae=3", ["saes.0.sae"]),
]


@pytest.mark.parametrize("override,words", REFUSED, ids=[o for o, _ in REFUSED])
def test_bad_values_are_refused_naming_the_field(override, words):
    data = presets.train_config()
    if words is None:
        build_run_config(apply_overrides(data, [override]))
        return
    with pytest.raises(ValueError) as info:
        build_run_config(apply_overrides(data, [override]))
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, (word, message)


def test_checkpoint_every_zero_is_documented_and_accepted():
    """Justified: 0 means "only at the end and on a signal" (RunConfig.checkpoint_every)."""
    cfg = build_run_config(apply_overrides(presets.train_config(), ["checkpoint_every=0"]))
    assert cfg.checkpoint_every == 0


def test_float16_is_a_valid_parameter_dtype():
    cfg = build_run_config(apply_overrides(presets.train_config(), ["saes.0.sae.dtype=float16"]))
    assert cfg.saes[0].sae.dtype == "float16"


def test_cli_prints_one_line_for_bad_config(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1\nsaes: {")
    assert main(["train", "--config", str(bad), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("saekit: error: config file") and "\n" not in err
    for override in ("steps=[1", "steps.x=1", "saes.0.revival.k_aux=0"):
        assert main(["train", "--set", override, "--out", str(tmp_path / "r")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("saekit: error:") and "\n" not in err, err


def test_run_seed_changes_the_synthetic_batches_not_the_true_features():
    import torch

    from saekit.train.config import make_source

    def source(seed):
        return make_source(build_run_config(apply_overrides(presets.train_config(), [seed])))

    a, b, c = source("seed=0"), source("seed=1"), source("seed=0")
    assert torch.equal(a.data.directions, b.data.directions)
    assert not torch.equal(next(a.batches()), next(b.batches()))
    assert torch.equal(next(a.batches()), next(c.batches()))
