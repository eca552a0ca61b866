"""Sharded training checkpoints: written by parts, resumed on another mesh (threads, as in
test_latent_member.py), exactly where the uninterrupted run would be."""

from __future__ import annotations

import json

import pytest
import torch
from test_latent_member import (
    BATCHTOPK,
    JUMPRELU_L0,
    MATRYOSHKA,
    TOPK_AUXK,
    assert_same,
    one_process,
    run_config,
    run_mesh,
    whole_states,
)

from saekit.data.sources.synthetic import SyntheticSource
from saekit.data.synthetic.generator import SyntheticData
from saekit.model.format import CheckpointError
from saekit.model.sae import SAE
from saekit.train.checkpoint import checkpoint_dir, read_training_checkpoint
from saekit.train.latent_checkpoint import gathered_state
from saekit.train.trainer import Trainer

SAES = [TOPK_AUXK, BATCHTOPK, JUMPRELU_L0, MATRYOSHKA]
STOP = 10  # of 20 steps


@pytest.fixture(scope="module")
def expected(tmp_path_factory) -> dict[str, torch.Tensor]:
    """One process, 20 steps without a stop."""
    return one_process(run_config(tmp_path_factory.mktemp("one"), SAES))


def stop_at(step: int):
    """fit until ``step`` (the trainer checkpoints there, as at a signal), then stop."""

    def fit(trainer):
        trainer.cfg.steps = step
        trainer.fit(progress=False)

    return fit


def resume(trainer):
    trainer.load_checkpoint()
    assert trainer.step == STOP
    trainer.fit(progress=False)


@pytest.mark.parametrize(("first", "then"), [((2, 2), (1, 4)), ((1, 4), (1, 1)), ((1, 1), (2, 1))])
def test_a_resume_on_another_mesh_continues_the_run_exactly(tmp_path, expected, first, then):
    """Stopped at step 10 on one (D, T), resumed on another: after 20 steps the same states as
    one process that never stopped (weights, Adam moments, dead counters, θ, λ)."""
    run_dir = tmp_path / "run"
    run_mesh(
        run_config(run_dir, SAES, {"data": first[0], "latent": first[1]}), *first, stop_at(STOP)
    )
    meta = json.loads((checkpoint_dir(run_dir) / "state.json").read_text())
    assert meta["step"] == STOP and meta["latent"]["parts"] == first[1]
    assert sorted(p.name for p in checkpoint_dir(run_dir).iterdir()) == sorted(
        ["state.json", "state.json.sha256", "state.safetensors"] + meta["latent"]["files"]
    )
    cfg = run_config(run_dir, SAES, {"data": then[0], "latent": then[1]})
    assert_same(expected, whole_states(run_mesh(cfg, *then, resume)))


def test_an_ordinary_checkpoint_resumes_latent_sharded(tmp_path, expected):
    """A one-process run's checkpoint is the case T = 1: it resumes on two parts."""
    cfg = run_config(tmp_path / "run", SAES, steps=20)
    cfg.steps = STOP
    Trainer(cfg, SyntheticSource(SyntheticData(cfg.data.synthetic), 64)).fit(progress=False)
    states = whole_states(run_mesh(run_config(tmp_path / "run", SAES, {"latent": 2}), 1, 2, resume))
    assert_same(expected, states)


def test_the_last_sharded_checkpoint_is_an_sae_and_refused_by_an_ordinary_resume(tmp_path):
    run_dir = tmp_path / "run"
    trainers = run_mesh(run_config(run_dir, [TOPK_AUXK], {"latent": 4}), 1, 4, stop_at(STOP))
    state = gathered_state(run_dir, 0)
    sae = SAE(trainers[0].members[0].cfg.sae)
    sae.load_state_dict(state)  # every tensor, whole
    parts = [tr.members[0].sae.W_enc for tr in trainers]
    assert torch.equal(sae.W_enc, torch.cat(parts).detach())
    with pytest.raises(CheckpointError, match="latent-sharded checkpoint: resume it with"):
        read_training_checkpoint(run_dir)


def test_a_damaged_part_file_is_refused_naming_it(tmp_path):
    run_dir = tmp_path / "run"
    run_mesh(run_config(run_dir, [TOPK_AUXK], {"latent": 2}), 1, 2, stop_at(STOP))
    part = checkpoint_dir(run_dir) / "latent-1-of-2.safetensors"
    data = bytearray(part.read_bytes())
    data[-1] ^= 1
    part.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="latent-1-of-2.safetensors: missing, or sha256"):
        run_mesh(run_config(run_dir, [TOPK_AUXK], {"latent": 2}), 1, 2, resume)
