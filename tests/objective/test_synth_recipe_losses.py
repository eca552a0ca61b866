"""The SynthSAEBench recipes' formulas (saekit.train.presets.SYNTHSAEBENCH_RECIPES): the
experiments' autotuner (losses.Autotuner), the coefficient warm-up (losses.warmup_factor) and
the per-level Matryoshka AuxK (revival.matryoshka_auxk_loss), each against a float64
reference written plainly here (autotuner: from the description of
decoderesearch/synth-sae-bench-experiments saes/components/coefficient_autotuner.py; AuxK per
level: from SAELens's MatryoshkaBatchTopKTrainingSAE.calculate_matryoshka_aux_loss)."""

from __future__ import annotations

import math

import pytest
import torch
from test_losses import D, all_grads, auxk_reference, float64_twin, make_sae, plain_pre

from saekit.core.encoding import as_dense
from saekit.objective.config import MatryoshkaAuxKRevival
from saekit.objective.losses import Autotuner, warmup_factor
from saekit.objective.terms import MatryoshkaAuxK, TermInputs


def autotune_reference(l0s, coefficient, target, gain, start):
    """λ after each step, the algorithm written out in float64."""
    m, s, r, out = 1.0, None, 0.0, []
    for step, l0 in enumerate(l0s):
        if s is None:
            s = l0
        else:
            prev = s
            s = 0.99 * s + 0.01 * l0
            r = 0.95 * r + 0.05 * (s - prev)
        e = s - target
        if step >= start and e != 0:
            g = 0.01 if e * r < 0 else 1.0
            a = gain * g * math.tanh(abs(e) / target * 10)
            m = min(100.0, max(0.01, m * (1 + a) if e > 0 else m * (1 - a)))
        out.append(coefficient * m)
    return out


# rising above the target, falling toward it (damped), exactly at it, L0 = 0, and long runs
# that hit both clamps
TRAPS = [
    [30.0, 40.0, 50.0, 45.0, 30.0, 20.0, 10.0, 10.0, 0.0, 0.0, 10.0],
    [50.0] * 400,
    [0.0] * 400,
]


@pytest.mark.parametrize("l0s", TRAPS)
@pytest.mark.parametrize("start", [0, 3])
def test_autotuner_follows_the_float64_reference(l0s, start):
    tuner = Autotuner(0.2, 10.0, 0.05, start=start, dtype=torch.float64)
    got = [tuner.step(torch.tensor(v)).item() for v in l0s]
    ref = autotune_reference(l0s, 0.2, 10.0, 0.05, start)
    assert got == pytest.approx(ref, rel=1e-12)
    assert len(set(got)) > 1  # λ moved


def test_autotuner_hits_its_clamps_and_does_not_move_before_start():
    up, down = Autotuner(1.0, 10.0, 0.5), Autotuner(1.0, 10.0, 0.5)
    for _ in range(400):
        up.step(torch.tensor(50.0))
        down.step(torch.tensor(0.0))
    assert up.multiplier == 100.0 and down.multiplier == 0.01
    late = Autotuner(1.0, 10.0, 0.5, start=5)
    assert [late.step(torch.tensor(50.0)).item() for _ in range(5)] == [1.0] * 5


def test_autotuner_state_round_trips():
    tuner = Autotuner(0.2, 10.0, 0.05, start=2)
    for v in (30.0, 20.0, 5.0):
        tuner.step(torch.tensor(v))
    again = Autotuner(1.0, 1.0, 1.0)
    again.load_state_dict(tuner.state_dict())
    assert again.step(torch.tensor(12.0)).item() == tuner.step(torch.tensor(12.0)).item()
    assert again.steps == tuner.steps == 4


def test_warmup_factor_is_linear_then_one():
    assert [warmup_factor(s, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_factor(0, 0) == 1.0


# ------------------------------------------------------------------ Matryoshka AuxK per level

PREFIXES = [8, 20, 40]  # levels [0, 8), [8, 20), [20, 40)


def matryoshka_auxk_case(dead, alpha=0.5):
    sae, x = make_sae("batchtopk")  # s ≠ 1, b_dec ≠ 0, 3-D input
    out = sae(x)
    inputs = TermInputs(sae, out, dead, torch.tensor(0.0), PREFIXES)
    loss = MatryoshkaAuxK(MatryoshkaAuxKRevival(coefficient=alpha))(inputs)
    loss.backward()
    twin = float64_twin(sae)
    o64 = twin(x.double())
    z = as_dense(o64.latents).detach()
    z = z.reshape(-1, z.shape[-1])
    pre = plain_pre(twin, x)
    x_n = o64.x_n.reshape(-1, D).detach()
    ref, start = torch.zeros((), dtype=torch.float64), 0
    for end in PREFIXES:
        level_dead = torch.zeros_like(dead)
        level_dead[start:end] = dead[start:end]
        residual = (x_n - twin.b_dec - z[:, :end] @ twin.W_dec[:end]).detach()
        if level_dead.any():
            ref = ref + auxk_reference(pre, residual, twin.W_dec, level_dead, D // 2, alpha,
                                       normalizer="none")  # fmt: skip
        start = end
    if ref.requires_grad:
        ref.backward()
    names = ("W_enc", "b_enc", "W_dec")
    return (
        loss,
        all_grads(*(getattr(sae, n) for n in names)),
        ref,
        all_grads(*(getattr(twin, n) for n in names)),
    )


@pytest.mark.parametrize("which", ["all", "one level", "scattered"])
def test_matryoshka_auxk_is_auxk_per_level_on_that_prefix_residual(which):
    dead = torch.zeros(40, dtype=torch.bool)
    if which == "all":
        dead[:] = True
    elif which == "one level":
        dead[8:20] = True
    else:
        dead[[1, 3, 9, 25, 26, 39]] = True
    loss, grads, ref, ref_grads = matryoshka_auxk_case(dead)
    assert loss.item() > 0
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    for g, g_ref in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g.double(), g_ref, rtol=1e-4, atol=1e-6)


def test_matryoshka_auxk_with_no_dead_latent_is_exactly_zero():
    loss, *_ = matryoshka_auxk_case(torch.zeros(40, dtype=torch.bool))
    assert loss.item() == 0.0


def test_matryoshka_auxk_refuses_random_prefixes_and_token_sampling():
    from saekit.train.member_config import SAETrainConfig

    with pytest.raises(ValueError, match="token_fraction"):
        MatryoshkaAuxKRevival(token_fraction=0.5)
    sae = {"d_in": D, "d_sae": 40, "activation": {"kind": "batchtopk", "k": 4}}
    entry = {"name": "m", "sae": sae,
             "revival": {"kind": "matryoshka_auxk"},
             "matryoshka": {"kind": "random", "n_prefixes": 3}}  # fmt: skip
    with pytest.raises(ValueError, match="needs matryoshka.kind 'fixed'"):
        SAETrainConfig(**entry).validate()
