"""saekit's circuit-tracer exports loaded by circuit-tracer itself (PyPI circuit-tracer 0.5.0 in
the interop venv, ``make interop-env``), its ``encode`` and ``decode`` (and ``forward``) against
saekit's on the same input:

- ``load_transcoder_set`` on a set of saekit per-layer transcoders (ReLU, JumpReLU, BatchTopK as
  JumpReLU; skip paths; both scales ≠ 1, b_dec ≠ 0), each layer's input 3-D;
- ``load_clt`` (eager, and lazy: rows read from the files) on saekit CLTs (ReLU, JumpReLU,
  BatchTopK as JumpReLU; per-layer scales ≠ 1 and input ≠ target scale; nonzero biases);
- ``load_gemma_scope_2_clt`` on a Gemma Scope 2 CLT folder against saekit's import of it.

Relative error ≤ 1e-5 in float32. ``make test-interop``; CI runs it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from clts import L, M, clt_input, from_per_layer, gemma_scope_2_clt, per_layer, random_clt
from harness import D_IN, assert_close, make_input, require_other_python, run_bridge, save_input
from safetensors.torch import load_file, save_file
from transcoders import random_transcoder

from saekit.interop import export_clt, export_transcoder_set, import_dictionary

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


CLTS = {
    "relu": {"kind": "relu"},
    "jumprelu": {"kind": "jumprelu"},
    "batchtopk": {"kind": "batchtopk", "k": 4},
}


def test_circuit_tracer_loads_saekit_clts_and_gemma_scope_2(tmp_path):
    """circuit-tracer's CLT takes [L, n_pos, d] (one input per layer, positions flat): saekit's
    [2, 7, L·d] is reshaped for it and its outputs back."""
    require_circuit_tracer()
    x = clt_input()
    lead = x.shape[:-1]
    x_path = save_input(per_layer(x, D_IN), tmp_path / "x.safetensors")
    jobs, expected = [], {}
    for case, activation in CLTS.items():
        clt = random_clt(activation, seed=20)
        out = export_clt(clt, "circuit-tracer", tmp_path / case)
        with torch.no_grad():
            expected[case] = (clt.encode(x), clt(x).x_hat)
        result = str(tmp_path / f"{case}.out.safetensors")
        jobs.append({"kind": "clt", "dir": str(out), "x": x_path, "out": result})
    # θ ≥ 0: circuit-tracer's JumpReLU is pre·1[pre > θ], without Gemma Scope's ReLU, so for
    # θ < 0 it keeps negative latents Gemma Scope's own formula zeroes (saekit follows Gemma
    # Scope: tests/interop/test_interop_clt.py)
    gemma_scope_2_clt(tmp_path / "gs", theta_low=0.02)
    for n in range(L):  # circuit-tracer's loader reads float32 here; saekit reads the float64
        path = tmp_path / "gs" / f"params_layer_{n}.safetensors"
        save_file({k: v.float() for k, v in load_file(path).items()}, str(path))
    imported = import_dictionary(tmp_path / "gs", "gemma_scope_2")
    with torch.no_grad():
        expected["gemma_scope_2"] = (imported.encode(x), imported(x).x_hat)
    files = [str(tmp_path / "gs" / f"params_layer_{n}.safetensors") for n in range(L)]
    result = str(tmp_path / "gemma_scope_2.out.safetensors")
    jobs.append({"kind": "gemma_scope_2_clt", "files": files, "x": x_path, "out": result})
    run_bridge(jobs, tmp_path, BRIDGE)
    for case, (z, y) in expected.items():
        found = load_file(str(tmp_path / f"{case}.out.safetensors"))
        per = z.reshape(-1, L, M)
        assert all(0 < float((per[:, n] != 0).float().mean()) < 1 for n in range(L)), case
        for name in [k for k in found if k.startswith("z")]:
            z_found = from_per_layer(found[name], lead)
            ERRORS[f"clt {case} {name}"] = assert_close(z_found, z, f"{case}: {name}")
        for name in [k for k in found if not k.startswith("z")]:
            y_found = from_per_layer(found[name], lead)
            ERRORS[f"clt {case} {name}"] = assert_close(y_found, y, f"{case}: {name}")
    print("\n".join(f"{k}: {v:.3g}" for k, v in ERRORS.items() if k.startswith("clt")))
