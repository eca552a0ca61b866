"""Worlds read from SAELens's format (saekit.data.synthetic.saelens_world) and SAELens's own
sampling (saelens_sampler), without SAELens: per-parent mutual exclusion, the dense sampler's
rates against the hierarchy's closed form, and the loader's refusals. Bit-for-bit agreement
with the real SAELens is tests/interop/test_saelens_world_real.py."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from test_synthbench import assert_rates, draw, exact_hierarchy_rates, tree_cfg

from saekit.data.synthetic.saelens_sampler import saelens_features
from saekit.data.synthetic.saelens_world import load_saelens_world
from saekit.data.synthetic.synthbench_sampler import SynthBenchData
from saekit.data.synthetic.synthbench_world import SynthBenchConfig


def cofiring_siblings(data: SynthBenchData, dense: torch.Tensor) -> dict[int, int]:
    """parent → tokens on which two or more of its children fire."""
    world, out = data.world, {}
    for par in torch.nonzero(world.first_child >= 0).flatten().tolist():
        kids = torch.nonzero(world.parent == par).flatten()
        out[par] = int(((dense[:, kids] > 0).sum(1) > 1).sum())
    return out


def test_only_exclusive_parents_keep_one_child():
    data = SynthBenchData(tree_cfg(p_min=0.2, p_max=0.6))
    world = data.world
    parents = torch.nonzero(world.first_child >= 0).flatten()
    world.exclusive[parents[::2]] = False  # half the parents let their children co-fire
    batches, _, _ = draw(data, 2, 3000)
    dense = torch.cat([b.firings.dense(data.cfg.n_features) for b in batches])
    both = cofiring_siblings(data, dense)
    assert all(both[p] == 0 for p in parents[1::2].tolist())
    assert sum(both[p] for p in parents[::2].tolist()) > 100


def test_the_dense_saelens_sampler_fires_at_the_hierarchy_closed_form():
    data = SynthBenchData(tree_cfg())
    g = torch.Generator().manual_seed(0)
    acts = torch.cat([saelens_features(data.world, 4000, g) for _ in range(5)])
    counts = (acts > 0).sum(0)
    assert_rates(counts, acts.shape[0], exact_hierarchy_rates(data.world), range(300))
    assert ((acts > 0).sum(0) > 0).sum() > 250


def write_world(path, roots: list[dict], n_features: int = 10, **fields) -> None:
    path.mkdir()
    raw = {"num_features": n_features, "hidden_dim": 4, "seed": 3, "dtype": "float32",
           "mean_firing_magnitudes": 1.0, "std_firing_magnitudes": 0.0, "bias": False}  # fmt: skip
    raw.update(fields)
    (path / "synthetic_model_config.json").write_text(json.dumps(raw))
    tensors = {"feature_vectors": torch.randn(n_features, 4), "bias": torch.zeros(4),
               "firing_probabilities": torch.full((n_features,), 0.1)}  # fmt: skip
    save_file(tensors, str(path / "synthetic_model.safetensors"))
    (path / "hierarchy.json").write_text(json.dumps({"roots": roots}))


def node(index: int, *children: dict) -> dict:
    return {"feature_index": index, "children": list(children),
            "mutually_exclusive_children": True, "scale_children_by_parent": False}  # fmt: skip


def test_a_breadth_first_forest_is_read_with_its_flags(tmp_path):
    write_world(tmp_path / "w", [node(0, node(2), node(3)), node(1, node(4), node(5))])
    world = load_saelens_world(SynthBenchConfig(world_path=str(tmp_path / "w")))
    assert world.parent.tolist() == [-1, -1, 0, 0, 1, 1, -1, -1, -1, -1]
    assert (world.cfg.n_roots, world.cfg.branching, world.cfg.depth) == (2, 2, 1)
    assert world.exclusive.tolist() == [True, True] + [False] * 8
    assert world.magnitude_mean.eq(1).all() and world.factor is None


def test_unreadable_worlds_are_refused_with_the_reason(tmp_path):
    with pytest.raises(ValueError, match="lacks synthetic_model_config.json"):
        load_saelens_world(SynthBenchConfig(world_path=str(tmp_path)))
    write_world(tmp_path / "mixed", [node(0, node(2), node(3)), node(1, node(4), node(5), node(6))])
    with pytest.raises(ValueError, match=r"branching factors \[2, 3\]"):
        load_saelens_world(SynthBenchConfig(world_path=str(tmp_path / "mixed")))
    write_world(tmp_path / "depth_first", [node(0, node(1), node(2)), node(3, node(4), node(5))])
    with pytest.raises(ValueError, match="not complete trees numbered breadth first"):
        load_saelens_world(SynthBenchConfig(world_path=str(tmp_path / "depth_first")))
    with pytest.raises(ValueError, match="sampler must be sparse or saelens"):
        SynthBenchConfig(sampler="dense")


def test_magnitudes_are_redrawn_as_saelens_load_from_disk_draws_them(tmp_path):
    """The file has no magnitudes: SAELens's SyntheticModel draws the stds from seed + 1 and the
    means from seed + 2 (synthetic_model.py, _create_activation_generator); |mean + std·z|."""
    folded = {"generator_name": "folded_normal", "mean": 0.5, "std": 0.5}
    write_world(tmp_path / "w", [], mean_firing_magnitudes=folded, std_firing_magnitudes=folded)
    world = load_saelens_world(SynthBenchConfig(world_path=str(tmp_path / "w")))
    for got, seed in ((world.magnitude_std, 3 + 1), (world.magnitude_mean, 3 + 2)):
        z = torch.randn(10, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(got, (0.5 + z * 0.5).abs())
    assert not torch.equal(world.magnitude_std, world.magnitude_mean)
