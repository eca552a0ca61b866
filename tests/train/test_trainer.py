"""The trainer: exact resume, sweeps equal solo runs, state survives checkpoints, config errors."""

from __future__ import annotations

import copy
import json
import os
import re
import signal

import pytest
import torch

from saekit.cli import main as cli_main
from saekit.data.sources.synthetic import SyntheticSource
from saekit.data.synthetic.generator import SyntheticData
from saekit.kernels import select as kernel_select
from saekit.objective.config import L1Penalty
from saekit.objective.losses import sparsity_penalty
from saekit.objective.matryoshka import matryoshka_reconstruction_loss
from saekit.train.checkpoint import read_checkpoint_meta
from saekit.train.config import build_run_config
from saekit.train.config_files import apply_overrides, load_config_file
from saekit.train.member import Member, StepMetrics, lr_factor
from saekit.train.trainer import Trainer, TrainingInterrupted

SYNTH = {"d": 16, "n_features": 48, "mean_l0": 3.0, "seed": 3}


def sae_entry(activation: str, **extra) -> dict:
    kind = {"kind": activation, "k": 3} if activation in ("topk", "batchtopk") else activation
    sae = {"d_sae": 64, "activation": kind}
    entry = {"sae": sae, "lr": 3e-3, "warmup_steps": 3, "dead_tokens": 256, **extra}
    if "name" not in entry:
        entry["name"] = activation + ("-" + extra["penalty"]["kind"] if "penalty" in extra else "")
    return entry


RELU_L1 = {"kind": "l1", "coefficient": 0.01, "target_l0": 4.0}  # with the λ controller
THREE = [
    sae_entry("topk"),
    sae_entry("batchtopk"),
    sae_entry("relu", penalty=RELU_L1, revival="none"),
]


def run_config(tmp_path, saes, steps=12, **extra):
    data = {
        "data": {"source": "synthetic", "synthetic": SYNTH},
        "saes": saes,
        "batch_size": 128,
        "steps": steps,
        "log_every": 4,
        "checkpoint_every": 0,
        "eval_tokens": 512,
        "progress": False,
        "out_dir": str(tmp_path),
        **extra,
    }
    return build_run_config(data)


def make_trainer(cfg):
    return Trainer(cfg, SyntheticSource(SyntheticData(cfg.data.synthetic), cfg.batch_size))


def params(member: Member) -> dict[str, torch.Tensor]:
    state = {k: v.clone() for k, v in member.sae.state_dict().items()}
    for i, s in member.optimizer.state_dict()["state"].items():
        for key, value in s.items():
            state[f"opt.{i}.{key}"] = torch.as_tensor(value).clone()
    state["tokens_since_fired"] = member.tokens_since_fired.clone()
    return state


def losses_logged(run_dir, name):
    lines = (run_dir / name / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"], r["l0"]) for r in map(json.loads, lines)]


def assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ----------------------------------------------------------------------------- resume


def interrupt_at(trainer: Trainer, step: int):
    def callback(member, record):
        if record.step == step and member is trainer.members[0]:
            os.kill(os.getpid(), signal.SIGINT)

    trainer.log_callbacks.append(callback)


def test_a_resumed_run_reproduces_the_uninterrupted_run_exactly(tmp_path):
    full = make_trainer(run_config(tmp_path / "full", THREE))
    full.fit()

    cfg = run_config(tmp_path / "cut", THREE)
    first = make_trainer(cfg)
    interrupt_at(first, 8)  # SIGINT: checkpoint at step 8, then stop
    with pytest.raises(TrainingInterrupted, match="resume with"):
        first.fit()
    assert read_checkpoint_meta(tmp_path / "cut")["step"] == 8

    resumed = make_trainer(cfg)
    resumed.load_checkpoint()
    assert resumed.step == 8
    resumed.fit()
    for a, b in zip(full.members, resumed.members, strict=True):
        assert_same_state(params(a), params(b))
        assert losses_logged(tmp_path / "full", a.cfg.name) == losses_logged(
            tmp_path / "cut", b.cfg.name
        )


def test_a_crash_loses_only_the_steps_since_the_last_checkpoint(tmp_path):
    full = make_trainer(run_config(tmp_path / "full", THREE[:1], log_every=1))
    full.fit()

    cfg = run_config(tmp_path / "crash", THREE[:1], checkpoint_every=4, log_every=1)
    crashing = make_trainer(cfg)

    def crash(member, record):
        if record.step == 7:
            raise RuntimeError("power cut")

    crashing.log_callbacks.append(crash)
    with pytest.raises(RuntimeError, match="power cut"):
        crashing.fit()
    # Steps 5-7 are lost; the checkpoint of step 4 is intact.
    assert read_checkpoint_meta(tmp_path / "crash")["step"] == 4

    resumed = make_trainer(cfg)
    resumed.load_checkpoint()
    assert resumed.step == 4
    resumed.fit()
    assert_same_state(params(resumed.members[0]), params(full.members[0]))


def test_thresholds_counters_and_controller_survive_a_checkpoint(tmp_path):
    cfg = run_config(tmp_path, THREE, steps=10)
    trainer = make_trainer(cfg)
    trainer.fit()
    batchtopk = trainer.members[1].sae.activation
    assert bool(batchtopk.threshold_initialized) and float(batchtopk.threshold) > 0
    assert trainer.members[0].tokens_since_fired.max() > 0  # some latent has not fired lately

    again = make_trainer(cfg)
    again.load_checkpoint()
    for a, b in zip(trainer.members, again.members, strict=True):
        assert_same_state(params(a), params(b))
    assert torch.equal(again.members[1].sae.activation.threshold, batchtopk.threshold)
    lam_a = trainer.members[2].controller.lam
    lam_b = again.members[2].controller.lam
    assert float(lam_a) != 0.01 and torch.equal(lam_a, lam_b)


# ----------------------------------------------------------------------------- sweeps


def test_each_sae_of_a_sweep_trains_as_if_alone(tmp_path):
    sweep = make_trainer(run_config(tmp_path / "sweep", THREE))
    sweep.fit()
    for i, entry in enumerate(THREE):
        alone = make_trainer(run_config(tmp_path / f"alone{i}", [entry]))
        alone.fit()
        assert_same_state(params(sweep.members[i]), params(alone.members[0]))


# ----------------------------------------------------------------------------- step details


@pytest.mark.parametrize(
    "entry",
    [
        sae_entry("topk"),  # AuxK
        sae_entry("topk", revival="preact", name="topk-preact"),
        sae_entry("batchtopk"),  # AuxK, threshold EMA
        sae_entry("batchtopk", matryoshka={"kind": "fixed", "groups": [16, 16, 32]}, name="mat"),
        sae_entry(
            "jumprelu",
            penalty={"kind": "l0", "coefficient": 0.1, "target_l0": 3.0},
            revival="preact",
        ),
        THREE[2],  # ReLU + L1 with the λ controller
        sae_entry("prolu", penalty={"kind": "tanh", "coefficient": 0.01}, revival="none"),
    ],
    ids=[
        "topk-auxk",
        "topk-preact",
        "batchtopk-auxk",
        "matryoshka-fixed",
        "jumprelu-l0",
        "relu-l1",
        "prolu-tanh",
    ],
)
def test_a_training_step_never_syncs_with_the_host(entry, tmp_path, request, monkeypatch):
    # the path a GPU takes: BatchTopK reads its exactness flag on the host only for CPU tensors
    monkeypatch.setattr(kernel_select, "reads_free", lambda tensor: False)
    cfg = run_config(tmp_path, [entry], steps=4)
    member = make_trainer(cfg).members[0]
    data = SyntheticData(cfg.data.synthetic)
    member.init_from_data(data.batch(10**6, 512).x)
    member.tokens_since_fired[::2] = 10**6  # half the latents dead: revival losses active
    batches = [data.batch(i, 128).x for i in range(4)]
    # the first step refreshes AuxK's dead-column set: its one host transfer per 25 steps
    member.train_step(batches[0], 0)
    request.getfixturevalue("host_sync_raises")
    for step, x in enumerate(batches[1:], start=1):
        metrics = member.train_step(x, step)
    assert isinstance(metrics, StepMetrics)
    assert {
        "loss",
        "reconstruction",
        "l0",
        "fvu",
        "dead_fraction",
        "lam",
    } <= metrics.as_dict().keys()
    assert (metrics.penalty is None) == (entry.get("penalty") is None)
    assert (metrics.revival is None) == (entry.get("revival") == "none")


def test_dead_mask_is_taken_before_the_batch_is_counted(tmp_path):
    cfg = run_config(tmp_path, [sae_entry("topk", dead_tokens=128)], steps=1)
    member = make_trainer(cfg).members[0]
    member.tokens_since_fired[:5] = 128  # dead now; they may fire in this batch
    seen = {}

    class Spy:
        """The member's objective, recording the dead mask its terms read."""

        def __init__(self, objective):
            self.objective = objective

        def __call__(self, inputs):
            seen["dead"] = inputs.dead_mask.clone()
            return self.objective(inputs)

    member.objective = Spy(member.objective)
    x = SyntheticData(cfg.data.synthetic).batch(0, 128).x
    member.init_from_data(x)
    member.train_step(x, 0)
    assert seen["dead"][:5].all() and not seen["dead"][5:].any()


def test_step_metrics_are_the_contributions_of_the_terms(tmp_path):
    """penalty is λ·S with the λ the step used; Matryoshka's reconstruction is the mean over
    prefixes; the loss is the sum of the terms."""
    relu = sae_entry("relu", penalty={"kind": "l1", "coefficient": 0.5})
    mat = sae_entry("topk", matryoshka={"kind": "fixed", "groups": [16, 48]}, name="mat")
    cfg = run_config(tmp_path, [relu, mat], steps=1)
    x = SyntheticData(cfg.data.synthetic).batch(0, 128).x
    for member in make_trainer(cfg).members:
        member.init_from_data(x)
        sae = copy.deepcopy(member.sae).train()
        out = sae(x)
        metrics = member.train_step(x, 0)
        assert isinstance(metrics, StepMetrics)
        terms = [metrics.reconstruction, metrics.penalty, metrics.revival]
        total = sum(t for t in terms if t is not None)
        assert metrics.loss.item() == pytest.approx(total.item(), rel=1e-6)
        if member.cfg.penalty is not None:
            S = sparsity_penalty(out.latents, sae.W_dec.norm(dim=-1), L1Penalty(coefficient=1.0))
            assert metrics.revival is None
            assert metrics.penalty.item() == pytest.approx(0.5 * S.item(), rel=1e-5)
            assert metrics.lam.item() == pytest.approx(0.5)
        else:
            rec = matryoshka_reconstruction_loss(
                out.x_n, out.latents, sae.W_dec, sae.b_dec, [16, 64]
            )
            assert metrics.penalty is None and metrics.lam.item() == 0.0
            assert metrics.reconstruction.item() == pytest.approx(rec.item(), rel=1e-5)
            assert metrics.revival is not None  # AuxK, the TopK default


def test_metrics_jsonl_holds_every_logged_term_and_the_loss_is_their_sum(tmp_path):
    mat = sae_entry("batchtopk", matryoshka={"kind": "random", "n_prefixes": 4}, name="mat")
    cfg = run_config(tmp_path, [*THREE, mat], steps=8)
    make_trainer(cfg).fit()
    common = {"step", "tokens", "lr", "loss", "reconstruction", "l0", "fvu", "dead_fraction", "lam"}
    expected = {
        "topk": common | {"revival"},
        "batchtopk": common | {"revival"},
        "relu-l1": common | {"penalty"},
        "mat": common | {"revival"},
    }
    for name, keys in expected.items():
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        assert [r["step"] for r in records] == [4, 8]
        for r in records:
            assert set(r) == keys, name
            parts = r["reconstruction"] + r.get("penalty", 0.0) + r.get("revival", 0.0)
            assert r["loss"] == pytest.approx(parts, rel=1e-6)


def test_counters_reset_on_firing_and_grow_by_the_batch_otherwise(tmp_path):
    cfg = run_config(tmp_path, [sae_entry("topk")], steps=1)
    member = make_trainer(cfg).members[0]
    member.tokens_since_fired = torch.tensor([0, 5, 100] + [7] * 61)
    fired = torch.zeros(64, dtype=torch.bool)
    fired[1] = True
    member.update_counters(fired, 128)
    expected = torch.tensor([128, 0, 228] + [135] * 61)
    assert torch.equal(member.tokens_since_fired, expected)


def test_topk_decoder_rows_stay_unit_norm_and_penalty_decoders_are_free(tmp_path):
    cfg = run_config(tmp_path, THREE, steps=6)
    trainer = make_trainer(cfg)
    trainer.fit()
    norms_topk = trainer.members[0].sae.W_dec.norm(dim=-1)
    torch.testing.assert_close(norms_topk, torch.ones_like(norms_topk))
    norms_relu = trainer.members[2].sae.W_dec.norm(dim=-1)
    assert (norms_relu - 1).abs().max() > 1e-4


def test_learning_rate_schedule_warms_up_and_decays_linearly():
    total, warm = 100, 10
    assert lr_factor(0, total, warm, 0.8) == pytest.approx(0.1)
    assert lr_factor(9, total, warm, 0.8) == pytest.approx(1.0)
    assert lr_factor(50, total, warm, 0.8) == pytest.approx(1.0)
    assert lr_factor(90, total, warm, 0.8) == pytest.approx(0.5)
    assert lr_factor(99, total, warm, 0.8) == pytest.approx(0.05)


def test_default_learning_rate_scales_with_width(tmp_path):
    entry = sae_entry("topk")
    entry.pop("lr")
    entry["sae"]["d_sae"] = 2**16
    cfg = run_config(tmp_path, [entry])
    assert cfg.saes[0].learning_rate == pytest.approx(2e-4 / 2)


def test_a_run_writes_a_loadable_sae_metrics_and_the_resolved_config(tmp_path):
    code = cli_main(
        [
            "train",
            "--out",
            str(tmp_path),
            "--steps",
            "6",
            "--no-progress",
            "--set",
            "batch_size=256",
            "--set",
            "eval_tokens=512",
            "--set",
            "data.synthetic.n_features=64",
            "--set",
            "saes.0.sae.d_sae=128",
        ]
    )
    assert code == 0
    from saekit.model.sae import SAE

    name = json.loads((tmp_path / "summary.json").read_text())[0]["name"]
    sae = SAE.load(tmp_path / name)
    assert sae.cfg.d_sae == 128 and float(sae.scale) == 1.0
    report = json.loads((tmp_path / name / "eval.json").read_text())
    for key in ("fvu", "l0", "dead_fraction", "mean_max_cos", "recovered_share", "mcc"):
        assert key in report
    assert report["l0"] == pytest.approx(6.0)  # TopK k = 6 on every token
    resolved = load_config_file(tmp_path / "config.yaml")
    assert resolved["steps"] == 6 and resolved["saes"][0]["sae"]["d_sae"] == 128


# ----------------------------------------------------------------------------- bad input


RELU = ["saes.0.sae.activation=relu", "saes.0.penalty.kind=l1", "saes.0.penalty.coefficient=0.1"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["saes.0.sae.activation.k=5000"], "saes.0.sae: activation.k = 5000 exceeds d_sae = 1024"),
        (
            ["saes.0.sae.activation=gelu"],
            r"saes.0.sae.activation.kind: unknown activation 'gelu'",
        ),
        (["saes.0.sae.activation.kind=gelu"], r"activation.kind: unknown activation 'gelu'"),
        (
            ["saes.0.sae.activation.threshold_beta=0.9"],
            r"saes.0.sae.activation: \['threshold_beta'\] do\(es\) not apply to activation 'topk'",
        ),
        (["saes.0.lr=-0.1"], "lr must be a finite number > 0"),
        (["saes.0.penalty=l7"], "penalty.*'l7'"),
        # Refused combinations name both fields.
        (["saes.0.sae.activation=relu"], r"saes.0: sae.activation.kind 'relu' .* set penalty"),
        (["saes.0.sae.activation=prolu"], r"sae.activation.kind 'prolu' .* set penalty"),
        (
            [*RELU, "saes.0.revival=auxk"],
            r"saes.0: revival.kind 'auxk' does not apply to sae.activation.kind 'relu'",
        ),
        (
            [*RELU, "saes.0.revival=preact"],
            r"revival.kind 'preact' does not apply to sae.activation.kind 'relu'",
        ),
        (
            [
                "saes.0.sae.activation=jumprelu",
                "saes.0.penalty.kind=l0",
                "saes.0.penalty.coefficient=0.1",
                "saes.0.revival=auxk",
            ],
            r"revival.kind 'auxk' does not apply to sae.activation.kind 'jumprelu'",
        ),
        (
            ["saes.0.penalty.kind=l0", "saes.0.penalty.coefficient=0.1"],
            r"penalty.kind 'l0' needs thresholds; sae.activation.kind 'topk'",
        ),
        (
            ["saes.0.matryoshka.kind=fixed", "saes.0.matryoshka.groups=[512, 256]"],
            r"matryoshka.groups sum to 768, not sae.d_sae = 1024",
        ),
        pytest.param(
            ["saes.0.penalty=l7"],
            r"saes.0.penalty.kind: unknown penalty 'l7'; choose one of",
        ),
        pytest.param(
            ["saes.0.penalty=l1"],
            r"saes.0.penalty.*coefficient must be a finite number > 0",
        ),
        pytest.param(
            ["saes.0.revival.kind=auxk", "saes.0.revival.k_aux=0"],
            r"saes.0.revival.*k_aux must be a positive integer",
        ),
        (["steps=0"], "steps must be positive"),
        (["saes.0.bogus=1"], r"unknown field\(s\) \['bogus'\]"),
        (["batch_size=many"], "batch_size: expected int"),
    ],
)
def test_configuration_errors_name_the_offending_field(overrides, message, capsys, tmp_path):
    sets = [arg for override in overrides for arg in ("--set", override)]
    code = cli_main(["train", "--no-progress", "--out", str(tmp_path), *sets])
    assert code == 2
    assert re.search(message, capsys.readouterr().err)


def test_a_missing_config_file_is_named(tmp_path, capsys):
    assert cli_main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err


def test_overrides_parse_values_and_extend_lists():
    data = {"saes": [{"sae": {"activation": {"kind": "topk", "k": 1}}}]}
    data = apply_overrides(data, ["saes.0.sae.activation.k=8", "saes.1.lr=1e-3"])
    assert data["saes"][0]["sae"]["activation"] == {"kind": "topk", "k": 8}
    assert data["saes"][1]["lr"] == "1e-3"  # YAML 1.1; the float field accepts it
    # A kind given as a bare string becomes a mapping when one of its fields is set.
    data = {"saes": [{"sae": {"activation": "topk"}, "penalty": "l1"}]}
    overrides = ["saes.0.sae.activation.k=8", "saes.0.penalty.coefficient=0.1"]
    data = apply_overrides(data, overrides)
    assert data["saes"][0]["sae"]["activation"] == {"kind": "topk", "k": 8}
    assert data["saes"][0]["penalty"] == {"kind": "l1", "coefficient": 0.1}
    entry = sae_entry("topk")
    entry["lr"] = "1e-3"
    assert build_run_config({"saes": [entry]}).saes[0].lr == pytest.approx(1e-3)


def test_nan_activations_stop_the_run_with_a_clear_error(tmp_path):
    cfg = run_config(tmp_path, [sae_entry("topk")], steps=4)
    trainer = make_trainer(cfg)
    source = trainer.source
    clean = source.batches

    def poisoned(start=0):
        for i, x in enumerate(clean(start)):
            if i == 2:
                x = x.clone()
                x[0, 0] = float("nan")
            yield x

    source.batches = poisoned
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        trainer.fit()


def test_wandb_logging_sends_every_sae_metric_when_asked(tmp_path, monkeypatch):
    import sys
    import types

    from saekit.train.run import run_training

    calls = []
    fake = types.ModuleType("wandb")

    class Run:
        def log(self, data, step=None):
            calls.append((step, data))

    fake.init = lambda **kwargs: calls.append(("init", kwargs["project"])) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = run_config(tmp_path, THREE[:2], steps=8, wandb_project="saekit-test")
    run_training(cfg)
    assert calls[0] == ("init", "saekit-test")
    steps = sorted({step for step, data in calls[1:]})
    assert steps == [4, 8]
    logged = set().union(*(data for _, data in calls[1:]))
    assert {"topk/loss", "batchtopk/l0", "topk/fvu", "tokens"} <= logged


def test_bf16_autocast_keeps_fp32_master_weights_and_thresholds(tmp_path):
    entry = sae_entry("batchtopk", autocast_bf16=True)
    trainer = make_trainer(run_config(tmp_path, [entry], steps=6))
    trainer.fit()
    sae = trainer.members[0].sae
    assert all(p.dtype == torch.float32 for p in sae.parameters())
    assert sae.activation.threshold.dtype == torch.float32
    assert float(sae.activation.threshold) > 0
    assert all(torch.isfinite(p).all() for p in sae.parameters())
