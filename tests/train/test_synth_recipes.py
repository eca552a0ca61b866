"""The SynthSAEBench recipes (saekit.train.presets.SYNTHSAEBENCH_RECIPES) build what their
docstrings claim: the paper's numbers (decoderesearch/synth-sae-bench-experiments,
experiments/sweeps/common.py) in the config, and in a short run the terms, controllers and
schedules they name."""

from __future__ import annotations

import pytest
import torch
from test_trainer import make_trainer

from saekit.objective.losses import Autotuner, LambdaController
from saekit.objective.terms import AuxK, MatryoshkaAuxK, Penalty
from saekit.train import presets
from saekit.train.config import build_run_config

D_IN, WIDTH, K, STEPS, BATCH, LR = 16, 64, 4, 9, 128, 3e-3


def entries() -> dict[str, dict]:
    return {arch: {**recipe(WIDTH, K, STEPS, BATCH, LR), "name": arch.replace(" ", "_")}
            for arch, recipe in presets.SYNTHSAEBENCH_RECIPES.items()}  # fmt: skip


def test_the_recipes_carry_the_papers_numbers():
    e = entries()
    assert list(e) == ["BatchTopK", "Matryoshka", "Matching Pursuit", "Standard L1", "JumpReLU"]
    for entry in e.values():  # SyntheticSAERunner: constant lr, 1000-step dead window
        assert (entry["warmup_steps"], entry["decay_start"], entry["lr"]) == (0, 1.0, LR)
        assert entry["dead_tokens"] == 1000 * BATCH
    assert presets.matryoshka_groups(4096) == [128, 384, 1536, 2048]  # ends 128, 512, 2048, 4096
    assert presets.matryoshka_groups(512) == [128, 384]  # widths ≥ d_sae dropped
    assert e["Matryoshka"]["revival"] == {"kind": "matryoshka_auxk", "coefficient": 1.0}
    assert "sort_every" not in e["Matryoshka"]["matryoshka"]  # the paper's: off, key unset
    sorted_levels = presets.recipe_matryoshka(WIDTH, K, STEPS, BATCH, LR, sort_every=50)
    assert sorted_levels["matryoshka"] == {**e["Matryoshka"]["matryoshka"], "sort_every": 50}
    assert e["BatchTopK"]["revival"]["coefficient"] == 1.0
    l1 = e["Standard L1"]["penalty"]
    assert (l1["coefficient"], l1["warmup_steps"], l1["controller_start"]) == (2.0, 3, 3)
    assert (l1["controller"], l1["controller_rate"], l1["target_l0"]) == ("autotune", 3e-4, K)
    jump = e["JumpReLU"]
    assert (jump["penalty"]["kind"], jump["penalty"]["c"], jump["penalty"]["coefficient"]) == (
        "tanh", 4.0, 0.2)  # fmt: skip
    assert jump["sae"]["activation"] == {"kind": "jumprelu", "init_threshold": 0.5,
                                         "bandwidth": 2.0}  # fmt: skip
    assert e["Matching Pursuit"]["sae"]["activation"]["residual_threshold"] == 0.0


def test_a_short_run_of_every_recipe_uses_the_terms_and_controllers_it_names(tmp_path):
    cfg = build_run_config({"data": {"synthetic": {"d": D_IN, "n_features": 96, "mean_l0": 4.0}},
                            "saes": list(entries().values()), "batch_size": BATCH,
                            "steps": STEPS, "out_dir": str(tmp_path / "run"), "progress": False,
                            "checkpoint_every": 0})  # fmt: skip
    trainer = make_trainer(cfg)
    members = {m.cfg.name: m for m in trainer.members}
    lams = {name: [] for name in members}
    for name, m in members.items():
        step = m.train_step

        def logged(batch, i, step=step, name=name):
            out = step(batch, i)
            lams[name].append(float(out.lam))
            return out

        m.train_step = logged
    trainer.fit()
    terms = {name: [type(t) for t in m.objective.terms] for name, m in members.items()}
    assert MatryoshkaAuxK in terms["Matryoshka"] and AuxK in terms["BatchTopK"]
    assert Penalty not in terms["BatchTopK"] and Penalty in terms["JumpReLU"]
    assert isinstance(members["Standard_L1"].controller, Autotuner)
    assert isinstance(members["JumpReLU"].controller, Autotuner)
    assert not isinstance(members["JumpReLU"].controller, LambdaController)
    # L1: λ warmed up over the first third (steps 0, 1, 2: 2/3, 4/3, 2), the tuner idle till 3
    assert lams["Standard_L1"][:3] == pytest.approx([2.0 / 3, 4.0 / 3, 2.0])
    assert members["Standard_L1"].controller.start == 3
    assert lams["JumpReLU"][0] == pytest.approx(0.2) and lams["JumpReLU"][-1] != 0.2
    for m in members.values():  # constant lr: no warm-up, no decay
        assert [g["lr"] for g in m.optimizer.param_groups] == [LR] * len(m.optimizer.param_groups)
    assert torch.isfinite(members["Matryoshka"].sae.W_dec).all()


def test_encoder_steps_reach_the_sae_entry_and_the_default_is_the_papers():
    assert "encoder_steps" not in presets.recipe_batchtopk(WIDTH, K, STEPS, BATCH, LR)["sae"]
    for recipe in (presets.recipe_batchtopk, presets.recipe_matryoshka, presets.recipe_l1,
                   presets.recipe_jumprelu):  # fmt: skip
        assert recipe(WIDTH, K, STEPS, BATCH, LR, encoder_steps=3)["sae"]["encoder_steps"] == 3


def test_a_short_lista_matryoshka_run_trains_and_differs_from_one_step(tmp_path):
    """Matryoshka-BatchTopK with 2 encoder steps: finite losses, the end-of-run calibration,
    evaluation and save run through the steps, the saved SAE reloads with them, and the weights
    differ from the one-step run on the same data (the option is active)."""
    from saekit.model.sae import SAE
    from saekit.train.outputs import evaluate_member, save_outputs

    runs = {}
    for steps in (1, 2):
        entry = presets.recipe_matryoshka(
            WIDTH, K, STEPS, BATCH, LR, widths=(16,), encoder_steps=steps
        )
        out_dir = tmp_path / f"s{steps}"
        cfg = build_run_config({"data": {"synthetic": {"d": D_IN, "n_features": 96,
                                                       "mean_l0": 4.0}},
                                "saes": [{**entry, "name": "m"}], "batch_size": BATCH,
                                "steps": STEPS, "out_dir": str(out_dir), "progress": False,
                                "checkpoint_every": 0, "log_every": 1})  # fmt: skip
        trainer = make_trainer(cfg)
        losses: list[float] = []
        trainer.log_callbacks.append(
            lambda m, record, out=losses: out.append(record.values["loss"])
        )
        trainer.fit()
        assert len(losses) == STEPS and all(torch.isfinite(torch.tensor(losses)))
        member = trainer.members[0]
        report = evaluate_member(member, trainer.source, 512, BATCH)
        assert report.threshold is not None and report.metrics.l0 > 0
        save_outputs(out_dir, {"m": member.sae}, [report])
        runs[steps] = member.sae
        assert SAE.load(out_dir / "m").cfg.encoder_steps == steps
    assert not torch.allclose(runs[1].W_enc, runs[2].W_enc)
