"""Issue 28: a run's BatchTopK θ is calibrated on the first half of the held-out tokens and the
held-out metrics are measured on the rest, so the reported L0 is not k by construction."""

from __future__ import annotations

import itertools

import pytest
import torch
from test_calibrate import short_batchtopk_run

from saekit.eval.calibrate import tokens_after
from saekit.model.sae import SAE
from saekit.train.config import make_source


def test_run_calibrates_theta_on_the_first_half_and_reports_l0_on_the_second(tmp_path):
    cfg, _, report, _ = short_batchtopk_run(tmp_path)
    k, n = cfg.saes[0].sae.activation.k, cfg.eval_tokens
    sae = SAE.load(tmp_path / cfg.saes[0].name)
    held_out = torch.cat([x for x, _ in make_source(cfg).eval_batches(n, cfg.batch_size)])
    assert len(held_out) == n
    with torch.no_grad():  # float64 reference of the pre-activations θ is compared with
        x = held_out.double() / sae.scale.double()
        pre = (x - sae.b_dec.double()) @ sae.W_enc.double().T + sae.b_enc.double()
    calibrate, evaluate = pre[: n // 2], pre[n // 2 :]
    theta = float(calibrate.flatten().sort(descending=True).values[k * (n // 2)])
    assert report.threshold.calibration_tokens == n // 2
    assert report.threshold.threshold == pytest.approx(theta, rel=1e-4)
    assert float(sae.activation.threshold) == pytest.approx(theta, rel=1e-4)
    l0_evaluated = float((evaluate > report.threshold.threshold).sum(-1).double().mean())
    assert report.metrics.l0 == pytest.approx(l0_evaluated, abs=1e-3)
    assert report.metrics.l0 != pytest.approx(k, abs=1e-3)  # not k by construction any more


def test_tokens_after_drops_the_first_rows_across_batches():
    rows = torch.arange(10.0)[:, None]
    extra = torch.arange(10)
    batches = [(rows[:3], extra[:3]), (rows[3:7], None), (rows[7:], extra[7:])]
    kept = list(tokens_after(iter(batches), 4))
    assert [x[:, 0].tolist() for x, _ in kept] == [[4.0, 5.0, 6.0], [7.0, 8.0, 9.0]]
    assert kept[0][1] is None and kept[1][1].tolist() == [7, 8, 9]
    assert list(itertools.chain(tokens_after(iter(batches), 10))) == []
