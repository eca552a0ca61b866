"""Runs in the other libraries' venv (.benchenv: sae-lens, eai-sparsify, dictionary-learning).

``python bridge.py JOBS.json``: each job either loads an SAE saekit exported (``load``) or makes
one with the library's own classes and saves it (``make``), then writes the library's encode and
decode of the same input to ``out`` (safetensors: z, x_hat). Nothing here imports saekit.
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def randomise(module, seed, positive=()):
    """Every parameter random (non-unit decoder norms, nonzero biases); ``positive`` ones > 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            value = torch.randn(p.shape, generator=g, dtype=torch.float64)
            if name in positive:
                value = value.abs() * 0.5
            elif p.ndim == 2:
                value = value * (0.5 + torch.rand(p.shape[0], 1, generator=g, dtype=torch.float64))
            p.copy_(value.to(p.dtype) * (0.3 if p.ndim == 1 else 1.0))


def saelens_outputs(sae, x):
    with torch.no_grad():
        z = sae.encode(x)
        if hasattr(sae.cfg, "d_out"):  # a transcoder: forward adds the skip path x W_skipᵀ
            return {"z": z, "x_hat": sae(x)}
        return {"z": z, "x_hat": sae.decode(z)}


def sparsify_outputs(sae, x):
    with torch.no_grad():
        enc = sae.encode(x)
        z = torch.zeros(*x.shape[:-1], sae.num_latents).scatter(-1, enc.top_indices, enc.top_acts)
        flat = sae.decode(enc.top_acts.flatten(0, -2), enc.top_indices.flatten(0, -2))
        return {"z": z, "x_hat": flat.reshape(x.shape)}


def load(job, x):
    if job["lib"] == "saelens":
        from sae_lens import SAE

        return saelens_outputs(SAE.load_from_disk(job["dir"]), x)
    from sparsify import SparseCoder

    return sparsify_outputs(SparseCoder.load_from_disk(job["dir"]), x)


def make_saelens(job, x):
    from sae_lens import SAE

    d_in, d_sae = x.shape[-1], job["d_sae"]
    cfg = {"architecture": job["arch"], "d_in": d_in, "d_sae": d_sae, **job.get("cfg", {})}
    cfg["metadata"] = {"model_name": "gpt2", "hook_name": "blocks.3.hook_resid_pre"}
    if "d_out" in cfg:  # a transcoder: MLP in → MLP out
        cfg["metadata"].update(hook_name="blocks.3.ln2.hook_normalized")
        cfg["metadata"]["hook_name_out"] = "blocks.3.hook_mlp_out"
    sae = SAE.from_dict(cfg)
    randomise(sae, job["seed"], positive=("threshold",))
    sae.save_model(job["dir"])
    return saelens_outputs(SAE.load_from_disk(job["dir"]), x)


def make_sparsify(job, x):
    from sparsify import SparseCoder, SparseCoderConfig

    cfg = SparseCoderConfig(k=job["k"], num_latents=job["d_sae"])
    sae = SparseCoder(x.shape[-1], cfg)
    randomise(sae, job["seed"])
    sae.save_to_disk(Path(job["dir"]) / "layers.3")
    return sparsify_outputs(SparseCoder.load_from_disk(Path(job["dir"]) / "layers.3"), x)


def make_dictionary_learning(job, x):
    from dictionary_learning.dictionary import AutoEncoder, GatedAutoEncoder, JumpReluAutoEncoder
    from dictionary_learning.trainers.batch_top_k import BatchTopKSAE
    from dictionary_learning.trainers.top_k import AutoEncoderTopK

    d_in, d_sae, cls = x.shape[-1], job["d_sae"], job["dict_class"]
    if cls == "AutoEncoder":
        ae = AutoEncoder(d_in, d_sae)
    elif cls == "JumpReluAutoEncoder":
        ae = JumpReluAutoEncoder(d_in, d_sae)
    elif cls == "GatedAutoEncoder":
        ae = GatedAutoEncoder(d_in, d_sae)
    else:
        ae = {"AutoEncoderTopK": AutoEncoderTopK, "BatchTopKSAE": BatchTopKSAE}[cls](
            d_in, d_sae, job["k"]
        )
        ae.threshold.fill_(job["threshold"])  # a threshold TopK saves but does not encode by
    randomise(ae, job["seed"], positive=("threshold",))
    out = Path(job["dir"])
    out.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.cpu() for k, v in ae.state_dict().items()}, out / "ae.pt")
    trainer = {"dict_class": cls, "activation_dim": d_in, "dict_size": d_sae, "lm_name": "gpt2"}
    trainer.update(layer=3, submodule_name="resid_post_layer_3", k=job.get("k"))
    (out / "config.json").write_text(json.dumps({"trainer": trainer}))
    with torch.no_grad():
        z = ae.encode(x)
        return {"z": z, "x_hat": ae.decode(z)}


def make_gemma_scope_2(job, x):
    """A raw Gemma Scope 2 affine transcoder (params.safetensors, config.json) loaded by sae-lens'
    own ``gemma_3_sae_huggingface_loader``, its hub downloads answered from the local folder."""
    from sae_lens import SAE
    from sae_lens.loading import pretrained_sae_loaders as loaders
    from safetensors import safe_open

    d, d_sae, root, folder = x.shape[-1], job["d_sae"], job["dir"], "transcoder/layer_3_affine"
    g = torch.Generator().manual_seed(job["seed"])
    raw = {
        "w_enc": torch.randn(d, d_sae, generator=g) * 0.3,
        "b_enc": torch.randn(d_sae, generator=g) * 0.3,
    }
    raw.update(w_dec=torch.randn(d_sae, d, generator=g), b_dec=torch.randn(d, generator=g))
    raw.update(threshold=torch.rand(d_sae, generator=g) * 0.5)
    raw["affine_skip_connection"] = torch.randn(d, d, generator=g) * 0.3  # [d_in, d_out]
    here = Path(root) / folder
    here.mkdir(parents=True, exist_ok=True)
    save_file(raw, str(here / "params.safetensors"))
    hooks = {"hf_hook_point_in": "model.layers.3.pre_feedforward_layernorm.output"}
    hooks["hf_hook_point_out"] = "model.layers.3.post_feedforward_layernorm.output"
    config = {"architecture": "jump_relu", "model_name": "gemma-3-1b-pt", **hooks}
    (here / "config.json").write_text(json.dumps({**config, "affine_connection": True}))

    def download(repo_id, filename=None, subfolder=None, **_):
        return str(Path(repo_id) / (subfolder or "") / filename)

    def shapes(repo_id, filename):
        with safe_open(str(Path(repo_id) / filename), framework="pt") as f:
            return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118

    loaders.hf_hub_download, loaders.get_safetensors_tensor_shapes = download, shapes
    cfg, state, _ = loaders.gemma_3_sae_huggingface_loader(root, folder)
    sae = SAE.from_dict(loaders.handle_config_defaulting(cfg))
    sae.process_state_dict_for_loading(state)
    sae.load_state_dict(state)
    return saelens_outputs(sae.eval(), x)


MAKERS = {
    "gemma_scope_2": make_gemma_scope_2,
    "saelens": make_saelens,
    "sparsify": make_sparsify,
    "dictionary_learning": make_dictionary_learning,
}


def main():
    jobs = json.loads(Path(sys.argv[1]).read_text())
    for job in jobs:
        x = load_file(job["x"])["x"]
        outputs = load(job, x) if job["op"] == "load" else MAKERS[job["lib"]](job, x)
        save_file({k: v.contiguous() for k, v in outputs.items()}, job["out"])
    print(f"bridge: {len(jobs)} jobs done")


if __name__ == "__main__":
    main()
