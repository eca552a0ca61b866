"""Runs in the interop venv (.benchenv, real sae-lens); nothing here imports saekit.

``python saelens_world_bridge.py OUT_DIR`` builds a SynthSAEBench-style world with SAELens's
``SyntheticModel`` (hierarchy with mutual exclusion on half the parents and children scaled by
their parent, low-rank copula, orthogonalised dictionary, folded-normal stds, linear means),
saves it with ``SyntheticModel.save`` to OUT_DIR/world, and writes to OUT_DIR/expected.safetensors
what SAELens itself holds after ``SyntheticModel.load_from_disk``: the dictionary, bias,
probabilities, magnitudes, each feature's parent and its parent's flags, the samples of
``torch.manual_seed(s); sample_with_features(N)`` for a few s, and a large sample for rates.
"""

import json
import sys
from pathlib import Path

import torch
from sae_lens.synthetic import (
    FoldedNormalMagnitudeConfig,
    HierarchyConfig,
    LinearMagnitudeConfig,
    LowRankCorrelationConfig,
    OrthogonalizationConfig,
    SyntheticModel,
    SyntheticModelConfig,
    ZipfianFiringProbabilityConfig,
)
from safetensors.torch import save_file

SEEDS = (0, 1, 2)
N_EXACT, N_RATES = 512, 40_000


def main(out: Path) -> None:
    cfg = SyntheticModelConfig(
        num_features=300,
        hidden_dim=24,
        firing_probability=ZipfianFiringProbabilityConfig(
            exponent=0.5, max_prob=0.4, min_prob=0.02
        ),
        hierarchy=HierarchyConfig(
            total_root_nodes=6,
            branching_factor=3,
            max_depth=2,
            mutually_exclusive_portion=0.5,
            compensate_probabilities=True,
            scale_children_by_parent=True,
        ),
        orthogonalization=OrthogonalizationConfig(num_steps=5, lr=0.01, chunk_size=128),
        correlation=LowRankCorrelationConfig(rank=4, correlation_scale=0.2),
        std_firing_magnitudes=FoldedNormalMagnitudeConfig(mean=0.5, std=0.5),
        mean_firing_magnitudes=LinearMagnitudeConfig(start=5.0, end=4.0),
        bias=0.5,
        seed=7,
    )
    built = SyntheticModel(cfg)
    built.save(out / "world")
    model = SyntheticModel.load_from_disk(out / "world")
    gen = model.activation_generator
    F = cfg.num_features
    parent = torch.full((F,), -1, dtype=torch.long)
    exclusive = torch.zeros(F, dtype=torch.bool)
    scales = torch.zeros(F, dtype=torch.bool)
    stack = list(model.hierarchy.roots)
    while stack:
        node = stack.pop()
        exclusive[node.feature_index] = node.mutually_exclusive_children
        scales[node.feature_index] = node.scale_children_by_parent
        for child in node.children:
            parent[child.feature_index] = node.feature_index
            stack.append(child)
    tensors = {
        "feature_vectors": model.feature_dict.feature_vectors.data,
        "bias": model.feature_dict.bias.data,
        "firing_probabilities": gen.firing_probabilities,
        "thresholds": gen.correlation_thresholds,
        "mean": gen.mean_firing_magnitudes,
        "std": gen.std_firing_magnitudes,
        "parent": parent,
        "exclusive": exclusive,
        "scales": scales,
        "built_feature_vectors": built.feature_dict.feature_vectors.data,
    }
    for s in SEEDS:
        torch.manual_seed(s)
        x, acts = model.sample_with_features(N_EXACT)
        tensors[f"x_{s}"], tensors[f"acts_{s}"] = x, acts
    torch.manual_seed(1234)
    tensors["rates"] = (model.sample_with_features(N_RATES)[1] > 0).double().mean(0)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "expected.safetensors"))
    (out / "meta.json").write_text(json.dumps({"seeds": SEEDS, "n_rates": N_RATES}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
