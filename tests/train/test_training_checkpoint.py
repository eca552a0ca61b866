"""Training checkpoints are plain data: written and read without a Trainer, crash-safe."""

from __future__ import annotations

import os

import pytest
import torch

from saekit.core.atomic import temporary_name
from saekit.model.format import CheckpointError
from saekit.train.checkpoint import (
    STATE_TENSORS,
    MemberState,
    checkpoint_dir,
    read_checkpoint_meta,
    read_training_checkpoint,
    write_training_checkpoint,
)

CONFIG = {"steps": 10, "saes": [{"name": "a"}, {"name": "b"}]}


def states(seed: int) -> list[MemberState]:
    g = torch.Generator().manual_seed(seed)
    return [
        MemberState(
            name,
            {"sae.W_dec": torch.randn(4, 3, generator=g), "counts": torch.arange(4)},
            {"initialised": True, "param_groups": [{"lr": 0.1 * seed}]},
        )
        for name in ("a", "b")
    ]


def test_a_checkpoint_round_trips_its_plain_data(tmp_path):
    rng = torch.get_rng_state()
    written = states(1)
    write_training_checkpoint(tmp_path, 7, CONFIG, written, rng)
    step, config, members, torch_rng = read_training_checkpoint(tmp_path, ["a", "b"])
    assert (step, config) == (7, CONFIG)
    assert torch.equal(torch_rng, rng)
    for got, want in zip(members, written, strict=True):
        assert (got.name, got.meta, sorted(got.tensors)) == (
            want.name,
            want.meta,
            sorted(want.tensors),
        )
        for key, value in want.tensors.items():
            assert torch.equal(got.tensors[key], value)


def test_a_checkpoint_of_other_saes_is_refused_by_name(tmp_path):
    write_training_checkpoint(tmp_path, 7, CONFIG, states(1), torch.get_rng_state())
    with pytest.raises(CheckpointError, match=r"holds SAEs \['a', 'b'\], the run has \['a'\]"):
        read_training_checkpoint(tmp_path, ["a"])


def test_a_corrupt_tensor_file_is_refused(tmp_path):
    write_training_checkpoint(tmp_path, 7, CONFIG, states(1), torch.get_rng_state())
    path = checkpoint_dir(tmp_path) / STATE_TENSORS
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        read_training_checkpoint(tmp_path)


def test_a_crash_between_the_renames_resumes_from_the_previous_checkpoint(tmp_path, dead_pid):
    write_training_checkpoint(tmp_path, 4, CONFIG, states(1), torch.get_rng_state())
    # a writer killed after renaming checkpoint away, before renaming the new one in
    old = tmp_path / temporary_name("checkpoint", "old", dead_pid)
    os.replace(checkpoint_dir(tmp_path), old)
    with pytest.raises(FileNotFoundError):
        (checkpoint_dir(tmp_path) / STATE_TENSORS).stat()
    assert read_checkpoint_meta(tmp_path)["step"] == 4
    assert read_training_checkpoint(tmp_path).step == 4
    write_training_checkpoint(tmp_path, 8, CONFIG, states(2), torch.get_rng_state())
    assert read_training_checkpoint(tmp_path).step == 8
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]


def test_no_checkpoint_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="no training checkpoint"):
        read_checkpoint_meta(tmp_path)
