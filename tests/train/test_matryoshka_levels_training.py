"""The fixed-level Matryoshka options in a run (recipe_matryoshka's ``detach_inner`` and
``level_k``): the recipe's entry is unchanged when they are off, a tiny run with them on
trains (finite, and the weights differ from the option off) and resumes exactly (they carry
no state, but the saved config must bring them back), and a latent-parallel run refuses them.
The formulas are tested in tests/objective/test_matryoshka_levels.py."""

from __future__ import annotations

import pytest
import torch
import yaml
from test_trainer import make_trainer

from saekit.train import presets
from saekit.train.config import build_run_config
from saekit.train.member_config import SAETrainConfig
from saekit.train.mesh import check_latent_saes
from saekit.train.outputs import write_run_config

D_IN, WIDTH, K, STEPS, BATCH, LR = 16, 64, 4, 6, 64, 3e-3
WIDTHS = (8, 24)  # levels [0, 8), [8, 24), [24, 64)
OPTIONS = {
    "off": {},
    "off_explicit": {"detach_inner": False, "level_k": None},
    "detach": {"detach_inner": True},
    "level_k": {"level_k": [1, 2, K]},
    "both": {"detach_inner": True, "level_k": [1, 2, K]},
}


def entry(name: str) -> dict:
    recipe = presets.recipe_matryoshka(WIDTH, K, STEPS, BATCH, LR, widths=WIDTHS, **OPTIONS[name])
    return {**recipe, "name": name}


def run_config(out_dir, names) -> dict:
    return {"data": {"synthetic": {"d": D_IN, "n_features": 96, "mean_l0": 4.0}},
            "saes": [entry(n) for n in names], "batch_size": BATCH, "steps": STEPS,
            "out_dir": str(out_dir), "progress": False, "checkpoint_every": 0}  # fmt: skip


def with_d_in(e: dict) -> dict:
    return {**e, "sae": {**e["sae"], "d_in": D_IN}}


def weights(trainer) -> dict[str, dict[str, torch.Tensor]]:
    return {m.cfg.name: {k: v.clone() for k, v in m.sae.state_dict().items()}
            for m in trainer.members}  # fmt: skip


def test_the_recipe_is_unchanged_with_the_options_off():
    plain = presets.recipe_matryoshka(WIDTH, K, STEPS, BATCH, LR, widths=WIDTHS)
    assert (
        presets.recipe_matryoshka(
            WIDTH, K, STEPS, BATCH, LR, widths=WIDTHS, detach_inner=False, level_k=None
        )
        == plain
    )
    assert plain["matryoshka"] == {"kind": "fixed", "groups": [8, 16, 40]}
    both = entry("both")["matryoshka"]
    assert (both["detach_inner"], both["level_k"]) == (True, [1, 2, K])


def test_a_tiny_run_with_each_option_trains_and_differs_from_the_option_off(tmp_path):
    trainer = make_trainer(build_run_config(run_config(tmp_path / "run", list(OPTIONS))))
    trainer.fit(progress=False)
    got = weights(trainer)
    for name, state in got.items():
        assert all(torch.isfinite(t).all() for t in state.values()), name
    # off, spelled out or not: the same run bit for bit (same seed, same batches)
    for key, value in got["off"].items():
        assert torch.equal(value, got["off_explicit"][key]), key
    for name in ("detach", "level_k", "both"):
        assert not torch.equal(got[name]["W_dec"], got["off"]["W_dec"]), name
    assert not torch.equal(got["both"]["W_dec"], got["level_k"]["W_dec"])


def test_a_run_with_both_options_resumes_exactly_from_its_saved_config(tmp_path):
    whole = make_trainer(build_run_config(run_config(tmp_path / "whole", ["both"])))
    whole.fit(progress=False)
    split = build_run_config(run_config(tmp_path / "split", ["both"]))
    write_run_config(split)  # what ``saekit train`` writes, and ``--resume`` reads back
    first = make_trainer(split)
    first.cfg.steps = STEPS // 2
    first.fit(progress=False)  # checkpoints at the stop
    saved = yaml.safe_load((tmp_path / "split" / "config.yaml").read_text())
    assert saved["saes"][0]["matryoshka"]["level_k"] == [1, 2, K]
    assert saved["saes"][0]["matryoshka"]["detach_inner"] is True
    then = make_trainer(build_run_config(saved))
    then.load_checkpoint()
    then.fit(progress=False)
    want, got = weights(whole)["both"], weights(then)["both"]
    for key, value in want.items():
        assert torch.equal(got[key], value), key


@pytest.mark.parametrize("name", ["detach", "level_k"])
def test_a_latent_parallel_run_refuses_the_options_in_one_line(name):
    cfg = SAETrainConfig(**with_d_in(entry(name)))
    with pytest.raises(ValueError, match="no latent-sharded form") as err:
        check_latent_saes([cfg], 2)
    assert "\n" not in str(err.value)
    check_latent_saes([SAETrainConfig(**with_d_in(entry("off")))], 2)  # off: accepted
