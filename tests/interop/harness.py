"""Shared by the interop tests: random saekit SAEs with every trap set, the common input, the
other libraries' venv and the comparison."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from saekit.model.config import SAEConfig
from saekit.model.sae import SAE

ROOT = Path(__file__).resolve().parents[2]
BRIDGE = Path(__file__).with_name("bridge.py")
D_IN, D_SAE, K = 16, 48, 5
SCALE = 2.5
RTOL = 1e-5


def other_python() -> Path | None:
    """The python of the venv holding sae-lens, sparsify and dictionary_learning
    (``make interop-env``), or None. SAEKIT_INTEROP_PYTHON names another."""
    named = os.environ.get("SAEKIT_INTEROP_PYTHON")
    candidate = Path(named) if named else ROOT / ".benchenv" / "bin" / "python"
    return candidate if candidate.is_file() else None


def require_other_python() -> Path:
    """Skip without the venv, except in CI (SAEKIT_CI=1), where its absence fails the test."""
    python = other_python()
    if python is None:
        message = "no .benchenv with sae-lens/sparsify/dictionary-learning (make interop-env)"
        if os.environ.get("SAEKIT_CI") == "1":
            pytest.fail(message + "; CI must build it")
        pytest.skip(message)
    return python


def run_bridge(jobs: list[dict], work: Path, bridge: Path = BRIDGE) -> None:
    python = require_other_python()
    path = work / "jobs.json"
    path.write_text(json.dumps(jobs))
    env = {**os.environ, "SPARSIFY_DISABLE_TRITON": "1", "TQDM_DISABLE": "1"}
    result = subprocess.run(
        [str(python), str(bridge), str(path)], capture_output=True, text=True, env=env
    )
    if result.returncode != 0:
        raise AssertionError(f"bridge failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")


def make_input(seed: int = 0) -> torch.Tensor:
    """3-D activations with a nonzero mean and a norm far from sqrt(d)."""
    g = torch.Generator().manual_seed(seed)
    return 3.0 * torch.randn(2, 7, D_IN, generator=g) + torch.linspace(-2, 2, D_IN)


def save_input(x: torch.Tensor, path: Path) -> str:
    save_file({"x": x.contiguous()}, str(path))
    return str(path)


@torch.no_grad()
def random_sae(
    activation: dict, seed: int = 1, hook: str = "transformer.h.3:input", whitening=None
) -> SAE:
    """Random W_enc; W_dec rows of norms in [0.5, 1.5]; b_enc, b_dec ≠ 0; s = SCALE; random
    thresholds (JumpReLU), θ (BatchTopK), ProLU biases of both signs, gated r_mag and b_mag;
    ``whitening`` (a config) estimated on other data than the tests encode."""
    g = torch.Generator().manual_seed(seed)
    cfg = SAEConfig(D_IN, D_SAE, activation, hook=hook, model_name="gpt2", whitening=whitening)
    sae = SAE(cfg)
    if whitening is not None:
        sae.init_from_data(make_input(seed + 1000) @ torch.randn(D_IN, D_IN, generator=g))
    sae.W_enc.copy_(torch.randn(D_SAE, D_IN, generator=g) / math.sqrt(D_IN))
    directions = torch.randn(D_SAE, D_IN, generator=g)
    norms = 0.5 + torch.rand(D_SAE, 1, generator=g)
    sae.W_dec.copy_(directions / directions.norm(dim=-1, keepdim=True) * norms)
    if sae.activation.uses_encoder_bias:
        sae.b_enc.copy_(0.3 * torch.randn(D_SAE, generator=g))
    sae.b_dec.copy_(0.5 * torch.randn(D_IN, generator=g))
    sae.scale.fill_(SCALE)
    kind = activation["kind"]
    if kind == "jumprelu":
        theta = 0.4 * torch.rand(D_SAE, generator=g) + 0.05
        if sae.activation.cfg.threshold_param == "log":
            sae.activation.log_threshold.copy_(theta.log())
        else:
            sae.activation.threshold.copy_(theta)
    if kind == "batchtopk":
        sae.activation.threshold.fill_(0.35)
        sae.activation.threshold_initialized.fill_(True)
    if kind == "prolu":
        sae.activation.bias.copy_(0.4 * torch.randn(D_SAE, generator=g))
    if kind == "gated":
        sae.activation.r_mag.copy_(0.3 * torch.randn(D_SAE, generator=g))
        sae.activation.b_mag.copy_(0.3 * torch.randn(D_SAE, generator=g))
    return sae.eval()


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ over the whole tensor, in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def assert_close(found: torch.Tensor, expected: torch.Tensor, what: str) -> float:
    assert found.shape == expected.shape, f"{what}: shape {found.shape} vs {expected.shape}"
    error = rel_error(found, expected)
    assert error <= RTOL, f"{what}: relative error {error:.3g} > {RTOL}"
    return error
