"""Transcoders between saekit and sae-lens, both ways, on 3-D input. Export: saekit transcoders
(both scales ≠ 1, b_dec ≠ 0, d_out ≠ d_in) load in sae-lens (Transcoder, SkipTranscoder,
JumpReLUTranscoder, JumpReLUSkipTranscoder) with the same latents and predictions. Import:
transcoders sae-lens makes and saves, and a raw Gemma Scope 2 affine transcoder read by sae-lens'
own loader (W_skip stored transposed, d_in = d_out), give saekit the same outputs.
``make test-interop``."""

from __future__ import annotations

import pytest
import torch
from harness import D_IN, assert_close, make_input, run_bridge, save_input
from safetensors.torch import load_file
from transcoders import random_transcoder

from saekit.interop import export_sae, import_sae

pytestmark = pytest.mark.interop

CASES = {  # case → (activation, skip)
    "relu": ({"kind": "relu"}, False),
    "relu-skip": ({"kind": "relu"}, True),
    "jumprelu": ({"kind": "jumprelu"}, False),
    "jumprelu-skip": ({"kind": "jumprelu"}, True),
    "batchtopk-skip": ({"kind": "batchtopk", "k": 5}, True),
}
MADE = {  # case → (lib, SAELens architecture)
    "transcoder": ("saelens", "transcoder"),
    "skip_transcoder": ("saelens", "skip_transcoder"),
    "jumprelu_transcoder": ("saelens", "jumprelu_transcoder"),
    "jumprelu_skip_transcoder": ("saelens", "jumprelu_skip_transcoder"),
    "gemma_scope_2": ("gemma_scope_2", None),
}
ERRORS: dict[str, float] = {}


def test_transcoders_both_ways_give_the_same_outputs(tmp_path):
    x = make_input()
    x_path = save_input(x, tmp_path / "x.safetensors")
    jobs, exported = [], {}
    for case, (activation, skip) in CASES.items():
        tc = random_transcoder(activation, skip)
        written = export_sae(tc, "saelens", tmp_path / case)
        out = str(tmp_path / f"{case}.out.safetensors")
        jobs.append({"op": "load", "lib": "saelens", "dir": str(written), "x": x_path, "out": out})
        with torch.no_grad():
            exported[case] = (tc.encode(x), tc(x).x_hat, out)
    for case, (lib, arch) in MADE.items():
        job = {"op": "make", "lib": lib, "dir": str(tmp_path / "made" / case), "x": x_path}
        job.update(arch=arch, d_sae=24, seed=7, out=str(tmp_path / f"made-{case}.safetensors"))
        job["cfg"] = {"d_out": D_IN + 3, "apply_b_dec_to_input": False}
        jobs.append(job)
    run_bridge(jobs, tmp_path)
    for case, (z, y_hat, out) in exported.items():
        found = load_file(out)
        assert 0 < float((z != 0).float().mean()) < 1, f"{case}: no latent fires, or all do"
        ERRORS[f"export {case} z"] = assert_close(found["z"], z, f"{case}: latents")
        ERRORS[f"export {case} y"] = assert_close(found["x_hat"], y_hat, f"{case}: prediction")
    for case, (lib, _) in MADE.items():
        expected = load_file(str(tmp_path / f"made-{case}.safetensors"))
        where = tmp_path / "made" / case
        if lib == "gemma_scope_2":  # the hub folder the bridge laid out
            where = where / "transcoder" / "layer_3_affine"
        tc = import_sae(where, lib)
        with torch.no_grad():
            z, y_hat = tc.encode(x), tc(x).x_hat
        assert 0 < float((z != 0).float().mean()) < 1, f"{case}: no latent fires, or all do"
        ERRORS[f"import {case} z"] = assert_close(z, expected["z"], f"{case}: latents")
        ERRORS[f"import {case} y"] = assert_close(y_hat, expected["x_hat"], f"{case}: prediction")
    print("\n".join(f"{k}: {v:.3g}" for k, v in ERRORS.items()))
