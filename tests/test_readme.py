"""The README's examples run as written (shortened: fewer steps and tokens)."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from saekit.cli import main

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


@pytest.mark.slow  # five SAEs of 4096 latents, ~10 s; CI runs it (make test-slow)
def test_the_run_yaml_example_trains(tmp_path, capsys):
    (block,) = [b for b in _blocks("yaml") if b.startswith("# run.yaml")]
    config = tmp_path / "run.yaml"
    config.write_text(block)
    short = ["--steps", "3", "--batch-size", "256", "--set", "eval_tokens=512", "--no-progress"]
    # the README's own command line on it (--steps 5000 shortened to 3)
    args = ["--set", "saes.0.sae.activation.k=16", "--out", str(tmp_path / "r2"), *short]
    assert main(["train", "--config", str(config), *args]) == 0


def test_the_python_example_runs(tmp_path, monkeypatch):
    (block,) = [b for b in _blocks("python") if "SAE.load" in b]
    monkeypatch.chdir(tmp_path)
    sample_activations = torch.randn(512, 768)
    exec(block, {"sample_activations": sample_activations, "x": torch.randn(4, 768)})
    assert (tmp_path / "my_sae" / "cfg.json").is_file()


def test_the_help_answers_without_torch_in_well_under_a_second():
    code = "import sys, saekit.cli; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "saekit", "--help"], check=True, capture_output=True, text=True
    ).stdout
    assert time.perf_counter() - start < 1.0
    listed = re.search(r"\{([a-z,]+)\}", out).group(1).split(",")
    assert sorted(listed) == sorted(
        [
            "train",
            "sweep",
            "bench",
            "cache",
            "eval",
            "hooks",
            "convert",
            "finetune",
            "report",
            "pipeline",
            "export",
            "import",
        ]
    )


def test_the_benchmark_configs_train(tmp_path):
    """Every run config kept in benchmarks/ still loads and trains (3 short steps), and each SAE
    it names is saved."""
    configs = sorted((Path(__file__).resolve().parents[1] / "benchmarks").glob("*.yaml"))
    assert configs
    for config in configs:
        out = tmp_path / config.stem
        short = ["--steps", "3", "--batch-size", "256", "--set", "eval_tokens=512"]
        assert main(["train", "--config", str(config), "--out", str(out), *short,
                     "--no-progress"]) == 0  # fmt: skip
        names = re.findall(r'name: "([^"]+)"', config.read_text())
        assert names and all((out / name / "cfg.json").is_file() for name in names)


@pytest.mark.slow  # a real torchrun launch of 2 processes, ~30 s; CI runs it (make test-slow)
def test_the_wide_sae_command_trains_on_two_cpu_processes(tmp_path):
    """The README's CPU command for an SAE split over processes, shortened (2 steps)."""
    import shlex

    (line,) = [ln for b in _blocks("sh") for ln in b.splitlines() if "parallel={latent: 2}" in ln]
    args = shlex.split(line.split("saekit", 1)[1])  # as the shell splits it
    assert args[:3] == ["train", "--nproc", "2"]
    out = tmp_path / "wide"
    args[args.index("--out") + 1] = str(out)
    cmd = [sys.executable, "-m", "saekit", *args, "--steps", "2", "--no-progress"]
    done = subprocess.run(cmd + ["--set", "eval_tokens=256"], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "checkpoint" / "latent-1-of-2.safetensors").is_file()
    assert (out / "topk-k6-M4096" / "cfg.json").is_file()
