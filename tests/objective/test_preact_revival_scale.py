"""The pre-activation revival is normalised per dead latent and has its own coefficient: the
sweep's BatchTopK with ``revival: preact`` at its default coefficient (and at the sweep's AuxK
value 1.0, which made the unnormalised loss diverge) trains on the built-in data."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from saekit.core.encoding import Preacts
from saekit.data.synthetic.generator import SyntheticData
from saekit.objective.config import PreactRevival
from saekit.objective.revival import dead_preact_loss
from saekit.train import presets
from saekit.train.config import build_run_config
from saekit.train.member import Member


def test_the_loss_is_a_mean_over_dead_latents():
    pre = torch.zeros(4, 6)
    theta = torch.ones(4, 1)
    norms = torch.ones(6)
    one = torch.zeros(6, dtype=torch.bool)
    one[0] = True
    many = torch.ones(6, dtype=torch.bool)
    a = dead_preact_loss(Preacts(pre), one, theta, norms)
    b = dead_preact_loss(Preacts(pre), many, theta, norms)
    assert float(a) == pytest.approx(1.0) and float(b) == pytest.approx(1.0)
    none = torch.zeros(6, dtype=torch.bool)
    assert float(dead_preact_loss(Preacts(pre), none, theta, norms)) == 0


@pytest.mark.slow  # two 160-step runs, ~10 s; CI runs it (make test-slow)
@pytest.mark.parametrize("coefficient", [None, 1.0])
def test_batchtopk_with_preact_revival_does_not_diverge(coefficient):
    torch.manual_seed(0)
    d = presets.sweep_config()
    batchtopk = copy.deepcopy(d["saes"][1])
    batchtopk["revival"] = {"kind": "preact"}
    if coefficient is not None:
        batchtopk["revival"]["coefficient"] = coefficient
    d["saes"], d["steps"] = [batchtopk], 160
    cfg = build_run_config(d)
    assert coefficient is not None or cfg.saes[0].revival == PreactRevival()
    data = SyntheticData(cfg.data.synthetic)
    member = Member(cfg.saes[0], cfg.steps, "cpu")
    member.init_from_data(data.batch(10**9, 8192).x)
    fvus = []
    for i in range(cfg.steps):
        m = member.train_step(data.batch(i, 1024).x, i)
        fvus.append(float(m.fvu))
        assert math.isfinite(float(m.loss))
        if m.revival is not None:
            assert float(m.revival) < float(m.reconstruction) + 5
    assert sum(fvus[-10:]) / 10 < 0.6, fvus[-10:]
