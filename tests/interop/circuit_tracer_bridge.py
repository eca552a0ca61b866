"""Runs in the interop venv (.benchenv, circuit-tracer from PyPI): loads what saekit wrote with
circuit-tracer's own loaders and writes its encode and decode of the same input.

``python circuit_tracer_bridge.py JOBS.json``; each job names ``x`` (safetensors ``x``: one
input per layer, [n_layers, n_pos, d_model], circuit-tracer's layout) and ``out`` (safetensors
z [n_layers, n_pos, d_transcoder], y [n_layers, n_pos, d_model], and more per kind):

- ``clt``: ``load_clt(dir)``, eager and lazy (decoder rows read from the files on demand);
- ``gemma_scope_2_clt``: ``load_gemma_scope_2_clt({layer: params_layer_{layer}.safetensors})``;
- ``set``: ``load_transcoder_set`` on ``dir/layer_{i}.safetensors`` with the hooks of
  ``dir/config.yaml``.

Nothing here imports saekit.
"""

import json
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

CPU = torch.device("cpu")


def clt_outputs(job, x):
    from circuit_tracer.transcoder.cross_layer_transcoder import load_clt

    config = yaml.safe_load((Path(job["dir"]) / "config.yaml").read_text())
    assert config["model_kind"] == "cross_layer_transcoder", config
    outputs = {}
    for lazy in (False, True):
        clt = load_clt(
            job["dir"],
            feature_input_hook=config["feature_input_hook"],
            feature_output_hook=config["feature_output_hook"],
            device=CPU,
            dtype=torch.float32,
            lazy_decoder=lazy,
            lazy_encoder=lazy,
        )
        with torch.no_grad():
            z = clt.encode(x)
            name = "_lazy" if lazy else ""
            outputs |= {f"z{name}": z, f"y{name}": clt.decode(z), f"forward{name}": clt(x)}
    return outputs


def gemma_scope_2_clt_outputs(job, x):
    from circuit_tracer.transcoder.cross_layer_transcoder import load_gemma_scope_2_clt

    paths = {i: str(p) for i, p in enumerate(job["files"])}
    # circuit-tracer 0.5.0 (and its main branch) reads range(max(paths)), one layer short of
    # the config's list (resolve_transcoder_paths numbers it from 0): one more key, never read
    # past, gives it every layer
    paths[len(paths)] = paths[0]
    clt = load_gemma_scope_2_clt(paths, device=CPU, dtype=torch.float32)
    assert clt.n_layers == len(job["files"]), clt.n_layers
    with torch.no_grad():
        z = clt.encode(x)
        return {"z": z, "y": clt.decode(z)}


def set_outputs(job, x):
    from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set

    here = Path(job["dir"])
    config = yaml.safe_load((here / "config.yaml").read_text())
    assert config["model_kind"] == "transcoder_set", config
    paths = {i: str(here / f"layer_{i}.safetensors") for i in range(x.shape[0])}
    tset = load_transcoder_set(
        paths,
        scan="saekit-export",
        feature_input_hook=config["feature_input_hook"],
        feature_output_hook=config["feature_output_hook"],
        device=CPU,
        dtype=torch.float32,
        lazy_encoder=False,
        lazy_decoder=False,
    )
    with torch.no_grad():
        z = tset.encode(x)
        return {"z": z, "y": tset.decode(z, x)}


KINDS = {"clt": clt_outputs, "gemma_scope_2_clt": gemma_scope_2_clt_outputs, "set": set_outputs}


def main():
    jobs = json.loads(Path(sys.argv[1]).read_text())
    for job in jobs:
        x = load_file(job["x"])["x"]
        outputs = KINDS[job["kind"]](job, x)
        save_file({k: v.contiguous() for k, v in outputs.items()}, job["out"])
    print(f"circuit-tracer bridge: {len(jobs)} jobs done")


if __name__ == "__main__":
    main()
