"""Round trips with the real libraries (sae-lens, eai-sparsify, dictionary-learning from PyPI, in
the venv ``make interop-env`` builds): saekit exports, the library loads and encodes/decodes;
the library makes and saves an SAE, saekit imports it. Same 3-D input, s ≠ 1, b_dec ≠ 0,
decoder rows of norms 0.5–1.5; relative error ≤ 1e-5 in float32. One subprocess runs every
library job (importing sae_lens alone takes ~15 s). ``make test-interop``; CI runs it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from harness import (
    D_SAE,
    K,
    assert_close,
    make_input,
    random_sae,
    run_bridge,
    save_input,
)
from safetensors.torch import load_file

from saekit.interop import export_sae, import_sae

pytestmark = pytest.mark.interop

EXPORTS = {  # case → (saekit activation, format)
    "relu-saelens": ({"kind": "relu"}, "saelens"),
    "topk-saelens": ({"kind": "topk", "k": K}, "saelens"),
    "jumprelu-saelens": ({"kind": "jumprelu"}, "saelens"),
    "batchtopk-saelens": ({"kind": "batchtopk", "k": K}, "saelens"),
    "prolu-saelens": ({"kind": "prolu"}, "saelens"),
    "topk-sparsify": ({"kind": "topk", "k": K}, "sparsify"),
    "jumprelu-log-saelens": ({"kind": "jumprelu", "threshold_param": "log"}, "saelens"),
    "topk-whitened-saelens": ({"kind": "topk", "k": K}, "saelens"),
    "abstopk-saelens": ({"kind": "abstopk", "k": K}, "saelens"),
    "gated-saelens": ({"kind": "gated"}, "saelens"),
    "hierarchical_topk-saelens": (
        {"kind": "hierarchical_topk", "k": K + 3, "inference_k": K},
        "saelens",
    ),
    "hierarchical_topk-sparsify": (
        {"kind": "hierarchical_topk", "k": K + 3, "inference_k": K},
        "sparsify",
    ),
}
WHITENED = {"topk-whitened-saelens": {"kind": "zca", "eps": 0.001}}
MAKES = {  # case → (library, its job fields)
    "saelens-standard": ("saelens", {"arch": "standard"}),
    "saelens-standard-no-b_dec-input": (
        "saelens",
        {"arch": "standard", "cfg": {"apply_b_dec_to_input": False}},
    ),
    "saelens-topk": ("saelens", {"arch": "topk", "cfg": {"k": K}}),
    "saelens-topk-rescaled": (
        "saelens",
        {"arch": "topk", "cfg": {"k": K, "rescale_acts_by_decoder_norm": True}},
    ),
    "saelens-jumprelu": ("saelens", {"arch": "jumprelu"}),
    "saelens-abstopk-rescaled": (
        "saelens",
        {"arch": "abstopk", "cfg": {"k": K, "rescale_acts_by_decoder_norm": True}},
    ),
    "saelens-gated": ("saelens", {"arch": "gated"}),
    "saelens-gated-no-b_dec-input": (
        "saelens",
        {"arch": "gated", "cfg": {"apply_b_dec_to_input": False}},
    ),
    "sparsify-topk": ("sparsify", {"k": K}),
    "dl-AutoEncoder": ("dictionary_learning", {"dict_class": "AutoEncoder"}),
    "dl-JumpReluAutoEncoder": ("dictionary_learning", {"dict_class": "JumpReluAutoEncoder"}),
    "dl-GatedAutoEncoder": ("dictionary_learning", {"dict_class": "GatedAutoEncoder"}),
    "dl-AutoEncoderTopK": (
        "dictionary_learning",
        {"dict_class": "AutoEncoderTopK", "k": K, "threshold": 0.8},
    ),
    "dl-BatchTopKSAE": (
        "dictionary_learning",
        {"dict_class": "BatchTopKSAE", "k": K, "threshold": 0.3},
    ),
}
IMPORT_FORMAT = {
    "saelens": "saelens",
    "sparsify": "sparsify",
    "dictionary_learning": "dictionary_learning",
}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """Every export written, every library SAE made, one bridge run over all of them."""
    work = tmp_path_factory.mktemp("interop")
    x_path = save_input(make_input(), work / "x.safetensors")
    jobs = []
    for i, (case, (activation, fmt)) in enumerate(EXPORTS.items()):
        sae = random_sae(activation, seed=10 + i, whitening=WHITENED.get(case))
        written = export_sae(sae, fmt, work / "export" / case)
        torch.save(sae.state_dict(), work / f"{case}.state.pt")
        jobs.append({"op": "load", "lib": fmt, "dir": str(written), "x": x_path})
        jobs[-1]["out"] = str(work / f"{case}.out.safetensors")
    for i, (case, (lib, fields)) in enumerate(MAKES.items()):
        job = {"op": "make", "lib": lib, "dir": str(work / "made" / case), "x": x_path}
        job.update(fields, d_sae=D_SAE, seed=100 + i, out=str(work / f"{case}.out.safetensors"))
        jobs.append(job)
    run_bridge(jobs, work)
    return work


@pytest.mark.parametrize("case", list(EXPORTS))
def test_export_loads_in_the_library_with_the_same_outputs(work, case):
    activation, _ = EXPORTS[case]
    sae = random_sae(activation, seed=10 + list(EXPORTS).index(case), whitening=WHITENED.get(case))
    sae.load_state_dict(torch.load(work / f"{case}.state.pt", weights_only=True))
    x = make_input()
    theirs = load_file(str(work / f"{case}.out.safetensors"))
    with torch.no_grad():
        z = sae.encode(x)
        x_hat = sae(x).x_hat
    ez = assert_close(theirs["z"], z, f"{case} latents")
    ex = assert_close(theirs["x_hat"], x_hat, f"{case} reconstruction")
    assert (z != 0).any() and (z == 0).any()  # the activation selects: not all on, not all off
    print(f"\n{case}: latents rel err {ez:.2e}, reconstruction {ex:.2e}")


@pytest.mark.parametrize("case", list(MAKES))
def test_library_sae_imports_with_the_same_outputs(work, case):
    lib, fields = MAKES[case]
    sae = import_sae(work / "made" / case, IMPORT_FORMAT[lib])
    x = make_input()
    theirs = load_file(str(work / f"{case}.out.safetensors"))
    with torch.no_grad():
        z = sae.encode(x)
        x_hat = sae.decode(z)
    ez = assert_close(z, theirs["z"], f"{case} latents")
    ex = assert_close(x_hat, theirs["x_hat"], f"{case} reconstruction")
    assert (z != 0).any() and (z == 0).any()
    print(f"\n{case} → saekit {sae.cfg.activation.kind}: latents {ez:.2e}, recon {ex:.2e}")


def test_imported_metadata_names_the_hook_in_both_conventions(work):
    sae = import_sae(work / "made" / "saelens-standard", "saelens")
    assert sae.cfg.model_name == "gpt2"
    assert sae.cfg.hook == "transformer.h.3:input"
    assert sae.cfg.metadata["hook_transformer_lens"] == "blocks.3.hook_resid_pre"
