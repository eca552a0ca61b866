"""saekit's circuit-tracer exports loaded by circuit-tracer itself (PyPI circuit-tracer 0.5.0 in
the interop venv, ``make interop-env``): its ``load_transcoder_set`` reads a set of saekit
per-layer transcoders (ReLU, JumpReLU, BatchTopK as JumpReLU; skip paths; both scales ≠ 1,
b_dec ≠ 0) and its ``encode``/``decode`` give saekit's latents and predictions on the same
input, 3-D per layer. ``make test-interop``; CI runs it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from harness import D_IN, assert_close, make_input, require_other_python, run_bridge, save_input
from safetensors.torch import load_file
from transcoders import random_transcoder

from saekit.interop import export_transcoder_set

pytestmark = pytest.mark.interop

BRIDGE = Path(__file__).with_name("circuit_tracer_bridge.py")
ERRORS: dict[str, float] = {}


def require_circuit_tracer() -> None:
    """Skip where the interop venv lacks circuit-tracer, except in CI (SAEKIT_CI=1)."""
    python = require_other_python()
    found = subprocess.run([str(python), "-c", "import circuit_tracer"], capture_output=True)
    if found.returncode != 0:
        message = "no circuit-tracer in the interop venv (make interop-env)"
        if os.environ.get("SAEKIT_CI") == "1":
            pytest.fail(message + "; CI must build it")
        pytest.skip(message)


def per_layer_input(n_layers: int) -> torch.Tensor:
    """[n_layers, 2, 7, d]: each layer's input 3-D, nonzero mean, norm far from sqrt(d)."""
    return torch.stack([make_input(seed=layer) for layer in range(n_layers)])


SETS = {  # case → each layer's (activation, skip)
    "skip": [({"kind": "relu"}, True), ({"kind": "jumprelu"}, True)]
    + [({"kind": "batchtopk", "k": 5}, True)],
    "plain": [({"kind": "jumprelu"}, False), ({"kind": "relu"}, False)],
}


def test_circuit_tracer_loads_saekit_transcoder_sets(tmp_path):
    require_circuit_tracer()
    jobs, expected = [], {}
    for case, layers in SETS.items():
        tcs = [
            random_transcoder(activation, skip, d_out=D_IN, seed=10 + n, layer=n)
            for n, (activation, skip) in enumerate(layers)
        ]
        out, missing = export_transcoder_set([(tc, None) for tc in tcs], tmp_path / case)
        assert missing == []
        x = per_layer_input(len(tcs))
        with torch.no_grad():
            z = torch.stack([tc.encode(x[n]) for n, tc in enumerate(tcs)])
            y = torch.stack([tc(x[n]).x_hat for n, tc in enumerate(tcs)])
        x_path = save_input(x, tmp_path / f"{case}.x.safetensors")
        result = str(tmp_path / f"{case}.out.safetensors")
        jobs.append({"kind": "set", "dir": str(out), "x": x_path, "out": result})
        expected[case] = (z, y, result)
    run_bridge(jobs, tmp_path, BRIDGE)
    for case, (z, y, result) in expected.items():
        found = load_file(result)
        for n in range(z.shape[0]):
            assert 0 < float((z[n] != 0).float().mean()) < 1, f"{case}: layer {n} all or none"
        ERRORS[f"set {case} z"] = assert_close(found["z"], z, f"{case}: latents")
        ERRORS[f"set {case} y"] = assert_close(found["y"], y, f"{case}: predictions")
    print("\n".join(f"{k}: {v:.3g}" for k, v in ERRORS.items()))
