"""benchmarks/gpu.sh runs green on a machine without a GPU, its GPU parts reported as skipped
(a smoke run: the same code at tiny sizes). The GPU figures come from running it on a GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_script_runs_green_on_the_cpu_with_gpu_parts_skipped(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this is the CPU check; on a GPU run benchmarks/gpu.sh itself")
    report = tmp_path / "report.md"
    env = dict(os.environ, SAEKIT_GPU_SMOKE="1", PYTHON=sys.executable)
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu.sh"), str(report)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    text = report.read_text()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "0 section(s) failed" in text and "FAILED" not in text
    for section in ("Environment", "Correctness", "Training step", "Harvesting", "Two processes"):
        assert f"## {section}" in text, section
    assert "skipped (no CUDA)" in text  # the Triton kernels and pytest on CUDA
    assert "| topk | on |" in text and "| matryoshka-batchtopk | off |" in text
    assert "(ok)" in text and "TOO LARGE" not in text
    assert "## Latent-sharded step (several GPUs)\n\nskipped: one GPU" in text
    assert "## SynthSAEBench-16k" in text and "| BatchTopK | saekit | 25 (11) |" in text
