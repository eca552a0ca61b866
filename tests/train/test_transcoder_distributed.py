"""Transcoders under data parallelism: 2 gloo processes equal one process on the concatenated
batches (the paired [x | y] stream splits by rank like any other)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_distributed import (
    BATCH,
    TOPK,
    WORLD,
    ConcatenatedSource,
    join_all,
    join_group_env,
    member_states,
    spawn,
)

from saekit.data.synthetic.generator import SyntheticData
from saekit.train.config import build_run_config
from saekit.train.trainer import Trainer

SKIP_TOPK = copy.deepcopy(TOPK)
SKIP_TOPK["sae"]["skip"] = True


def transcoder_config(out_dir: Path):
    return build_run_config(
        {
            "data": {"source": "synthetic", "synthetic": {"d": 16, "n_features": 48, "d_out": 8}},
            "saes": [SKIP_TOPK],
            "batch_size": BATCH,
            "steps": 4,
            "log_every": 2,
            "checkpoint_every": 0,
            "eval_tokens": 128,
            "out_dir": str(out_dir),
            "progress": False,
            "parallel": "data",
        }
    )


def _transcoder_worker(rank: int, port: int, out_dir: str) -> None:
    from saekit.train.run_distributed import run_distributed

    join_group_env(rank, port, timeout_s=30)
    trainer, _ = run_distributed(transcoder_config(Path(out_dir)))
    save_file(member_states(trainer), str(Path(out_dir) / f"rank{rank}.safetensors"))


@pytest.mark.slow
def test_data_parallel_transcoder_equals_one_process(tmp_path):
    out = tmp_path / "parallel"
    assert join_all(spawn(_transcoder_worker, str(out)), 180) == [0] * WORLD
    cfg = transcoder_config(tmp_path / "single")
    single = Trainer(cfg, ConcatenatedSource(SyntheticData(cfg.data.synthetic), BATCH))
    single.fit(progress=False)
    expected = member_states(single)
    ranks = [load_file(str(out / f"rank{r}.safetensors")) for r in range(WORLD)]
    name = cfg.saes[0].name
    assert {f"{name}.sae.W_skip", f"{name}.sae.target_scale"} <= set(expected)
    for key, value in expected.items():
        assert torch.equal(ranks[0][key], ranks[1][key]), f"ranks disagree on {key}"
        torch.testing.assert_close(ranks[0][key], value, rtol=1e-4, atol=1e-6, msg=key)
