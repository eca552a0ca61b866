"""Run directories: refusing to overwrite another run, what --resume keeps, metrics.jsonl equal to
the uninterrupted run's after a crash and resume, leftovers of killed processes removed, a run
killed before its first checkpoint resumed from scratch, a corrupt cache shard named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from saekit.cli import main
from saekit.data.cache.reading import ActivationCache, CacheError
from saekit.data.cache.writing import write_cache
from saekit.data.sources.synthetic import SyntheticSource
from saekit.data.synthetic.generator import SyntheticData
from saekit.train.config import build_run_config
from saekit.train.trainer import Trainer

TINY = [
    "--steps", "6", "--batch-size", "256", "--no-progress",
    "--set", "saes.0.sae.d_sae=64", "--set", "eval_tokens=512", "--set", "log_every=2",
    "--set", "checkpoint_every=3",
]  # fmt: skip


def _train(out: Path, *extra: str) -> int:
    return main(["train", "--out", str(out), *TINY, *extra])


def test_out_holding_another_run_is_refused_unless_force(tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(out) == 0
    before = (out / "config.yaml").read_text()
    capsys.readouterr()
    assert _train(out, "--set", "saes.0.lr=0.001") == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err and "--force" in err
    assert (out / "config.yaml").read_text() == before  # nothing rewritten
    # a start that fails validation does not touch the old run either
    assert _train(out, "--set", "saes.0.lr=-1") == 2
    assert (out / "config.yaml").read_text() == before
    assert _train(out, "--force", "--set", "saes.0.lr=0.001") == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["saes"][0]["lr"] == 0.001
    steps = [json.loads(x)["step"] for x in (out / "topk-k6-M64" / "metrics.jsonl").open()]
    assert steps == [2, 4, 6]  # replaced, not appended to


def test_resume_says_what_it_keeps_and_refuses_fewer_steps(tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(out) == 0
    capsys.readouterr()
    code = main(
        ["train", "--resume", str(out), "--set", "saes.0.lr=0.5", "--out", str(tmp_path / "x")]
        + ["--steps", "8", "--no-progress"]
    )
    assert code == 0
    err = capsys.readouterr().err
    assert "--resume keeps the config saved in" in err
    assert "--set saes.0.lr=0.5" in err and f"--out {tmp_path / 'x'}" in err
    assert not (tmp_path / "x").exists()
    assert "lr" not in yaml.safe_load((out / "config.yaml").read_text())["saes"][0] or (
        yaml.safe_load((out / "config.yaml").read_text())["saes"][0]["lr"] != 0.5
    )
    assert main(["train", "--resume", str(out), "--steps", "3", "--no-progress"]) == 2
    assert "below the checkpoint's step 8" in capsys.readouterr().err
    assert yaml.safe_load((out / "config.yaml").read_text())["steps"] == 8


def _cfg(out: Path) -> dict:
    return {
        "data": {"synthetic": {"d": 16, "n_features": 48, "mean_l0": 3.0}},
        "saes": [
            {"sae": {"d_sae": 32, "activation": {"kind": "topk", "k": 3}}, "dead_tokens": 300},
            {"sae": {"d_sae": 32, "activation": "relu"}, "penalty": {"kind": "l1", "coefficient": 0.1}},  # noqa: E501
        ],
        "batch_size": 64,
        "steps": 14,
        "log_every": 3,
        "checkpoint_every": 5,  # not a multiple of log_every: the interval sums are checkpointed
        "eval_tokens": 128,
        "progress": False,
        "out_dir": str(out),
    }  # fmt: skip


class _Crash(Exception):
    pass


class _CrashingSource(SyntheticSource):
    def __init__(self, data, batch_size, crash_at):
        super().__init__(data, batch_size)
        self.crash_at = crash_at

    def batches(self, start=0):
        for i, x in enumerate(super().batches(start), start):
            if i == self.crash_at:
                raise _Crash
            yield x


def _trainer(out: Path, crash_at: int | None = None) -> Trainer:
    cfg = build_run_config(_cfg(out))
    data = SyntheticData(cfg.data.synthetic)
    source = _CrashingSource(data, cfg.batch_size, crash_at if crash_at is not None else -1)
    return Trainer(cfg, source)


def test_metrics_after_crashes_and_resumes_equal_the_uninterrupted_run(tmp_path):
    full = _trainer(tmp_path / "full")
    full.fit(progress=False)
    crashed = tmp_path / "crashed"
    for crash_at in (7, 13):  # after the checkpoint at 5 and logs at 6; then after 10 and 12
        t = _trainer(crashed, crash_at)
        if (crashed / "checkpoint").exists():
            t.load_checkpoint()
        with pytest.raises(_Crash):
            t.fit(progress=False)
    t = _trainer(crashed)
    t.load_checkpoint()
    t.fit(progress=False)
    for m in full.members:
        name = m.cfg.name
        a = (tmp_path / "full" / name / "metrics.jsonl").read_text()
        b = (crashed / name / "metrics.jsonl").read_text()
        assert a == b
    for m, r in zip(full.members, t.members, strict=True):
        for (k, v), w in zip(m.sae.state_dict().items(), r.sae.state_dict().values(), strict=True):
            assert torch.equal(v, w), k


def test_leftovers_of_a_killed_process_are_removed_by_resume_and_new_runs(tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(out) == 0
    dead = 2**22 + 12345  # above the default pid_max: no such process
    leftovers = [
        out / f".checkpoint.tmp-{dead}",
        out / "topk-k6-M64" / f".cfg.json.tmp-{dead}",
        out / "topk-k6-M64" / f".sae.safetensors.tmp-{dead}",
        out / f".config.yaml.tmp-{dead}",
    ]
    leftovers[0].mkdir()
    (leftovers[0] / "state.json").write_text("{}")
    for p in leftovers[1:]:
        p.write_text("partial")
    assert main(["train", "--resume", str(out), "--no-progress"]) == 0
    assert not any(p.exists() for p in leftovers)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / f".config.yaml.tmp-{dead}").write_text("partial")
    assert _train(fresh) == 0
    assert not (fresh / f".config.yaml.tmp-{dead}").exists()


def test_a_run_killed_before_its_first_checkpoint_resumes_from_scratch(tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(out) == 0
    reference = (out / "topk-k6-M64" / "metrics.jsonl").read_text()
    import shutil

    shutil.rmtree(out / "checkpoint")
    shutil.rmtree(out / "topk-k6-M64" / "sae.safetensors", ignore_errors=True)
    (out / "summary.json").unlink()
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--no-progress"]) == 0
    assert "no checkpoint yet" in capsys.readouterr().err
    assert (out / "topk-k6-M64" / "metrics.jsonl").read_text() == reference


def test_a_changed_value_in_a_cache_shard_is_named_when_training_reads_it(tmp_path, capsys):
    cache = tmp_path / "cache"
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(100, 16, generator=g) for _ in range(4)]
    write_cache(cache, batches, "h", "m", shard_tokens=128)
    shard = cache / "shard_000001.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-5] ^= 0x01  # one value changed; size and header intact
    shard.write_bytes(bytes(raw))
    with pytest.raises(CacheError, match="shard_000001.safetensors.*sha256"):
        list(ActivationCache(cache).iter_batches(64))
    code = main(["train", "--cache", str(cache), "--out", str(tmp_path / "r"), *TINY[:4]])
    assert code == 2
    err = capsys.readouterr().err
    assert "shard_000001.safetensors" in err and "sha256" in err
