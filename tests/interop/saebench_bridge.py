"""Runs in the venv with sae-bench (``make interop-env``): SAEBench's own absorption
classification, k-sparse latent selection, feature-split rule and scikit-learn's logistic
regression on the inputs test_saebench.py wrote; writes what they return as JSON.

The model: the tiny Hugging Face GPT-2 the test saved, rebuilt as a TransformerLens
HookedTransformer offline (its config by hand, the weights through TransformerLens's own GPT-2
conversion, no processing: SAEBench loads models with ``from_pretrained_no_processing``), so
SAEBench's calculator runs its own prompts and hooks (``blocks.L.hook_resid_post``)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pandas as pd
import torch


def hooked_gpt2(model_dir: str):
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    c = hf.config
    cfg = HookedTransformerConfig(
        n_layers=c.n_layer, d_model=c.n_embd, n_ctx=c.n_positions, d_head=c.n_embd // c.n_head,
        n_heads=c.n_head, d_mlp=4 * c.n_embd, d_vocab=c.vocab_size, act_fn="gelu_new",
        normalization_type="LN", eps=c.layer_norm_epsilon, default_prepend_bos=True,
    )  # fmt: skip
    model = HookedTransformer(cfg, tokenizer=AutoTokenizer.from_pretrained(model_dir))
    missing, _ = model.load_state_dict(convert_gpt2_weights(hf, cfg), strict=False)
    assert not [k for k in missing if not k.endswith(("IGNORE", "mask", "b_U"))], missing
    return model.eval()


def absorption(job: dict) -> dict:
    from sae_bench.evals.absorption.feature_absorption_calculator import (
        FeatureAbsorptionCalculator,
    )
    from sae_lens import SAE

    model = hooked_gpt2(job["model"])
    sae = SAE.load_from_disk(job["sae"])
    calculator = FeatureAbsorptionCalculator(
        model=model, icl_word_list=job["words"], max_icl_examples=0,
        base_template="{word} has the first letter:", word_token_pos=-6,
    )  # fmt: skip
    result = calculator.calculate_absorption(
        sae, job["words"], torch.tensor(job["probe"]), job["main_ids"], layer=job["layer"],
        show_progress=False,
    )  # fmt: skip
    return {
        "words": [
            {
                "word": r.word,
                "tokens": model.to_tokens(r.prompt)[0].tolist(),
                "fraction": float(r.absorption_fraction),
                "full": bool(r.is_full_absorption),
                "top": r.top_projection_feature_scores[0].feature_id,
                "projection": r.probe_projection,
            }
            for r in result.word_results
        ]
    }


def selection(job: dict) -> dict:
    from sae_bench.evals.absorption.k_sparse_probing import add_feature_splits_to_metrics_df
    from sae_bench.evals.absorption.vocab import LETTERS
    from sae_bench.evals.sparse_probing.probe_training import get_top_k_mean_diff_mask
    from sklearn.linear_model import LogisticRegression

    z = torch.tensor(job["latents"], dtype=torch.float64)
    y = torch.tensor(job["labels"])
    mean_diff = {
        k: torch.nonzero(~get_top_k_mean_diff_mask(z, y, k))[:, 0].tolist() for k in job["ks"]
    }
    logistic = []
    for case in job["logistic"]:
        probe = LogisticRegression(
            C=case["C"], class_weight="balanced" if case["balanced"] else None,
            max_iter=10_000, tol=1e-10,
        ).fit(np.array(z), np.array(y))  # fmt: skip
        logistic.append({"coef": probe.coef_[0].tolist(), "intercept": float(probe.intercept_[0])})
    rows = []
    for letter in LETTERS:
        f1s, feats = job["splits"]["f1"], job["splits"]["feats"]
        row = {"letter": letter}
        for k, (f1, ids) in enumerate(zip(f1s, feats, strict=True), start=1):
            row[f"f1_sparse_sae_{k}"] = f1
            row[f"sparse_sae_k_{k}_feats"] = np.array(ids)
        rows.append(row)
    df = pd.DataFrame(rows)
    add_feature_splits_to_metrics_df(df, max_k_value=len(job["splits"]["f1"]))
    split = [int(i) for i in df["split_feats"].iloc[0]]
    return {"mean_diff": mean_diff, "logistic": logistic, "split": split}


if __name__ == "__main__":
    jobs = json.loads(open(sys.argv[1]).read())
    out = {"absorption": absorption(jobs["absorption"]), "selection": selection(jobs["selection"])}
    with open(jobs["out"], "w") as f:
        json.dump(out, f)
