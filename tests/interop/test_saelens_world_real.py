"""saekit reads a world the real SAELens built and saved (``SyntheticModel.save``), and samples
it: SAELens's draws exactly (sampler ``saelens``), and SAELens's distribution (saekit's sparse
sampler, which cannot make the same draws: saekit.data.synthetic.saelens_sampler says why).

The world is made by tests/interop/saelens_world_bridge.py in the interop venv (make
interop-env), which also writes what SAELens holds after loading it and its own samples.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from harness import require_other_python
from safetensors.torch import load_file

from saekit.data.synthetic.generator import batch_seed
from saekit.data.synthetic.saelens_sampler import saelens_batch
from saekit.data.synthetic.saelens_world import load_saelens_world
from saekit.data.synthetic.synthbench_sampler import SynthBenchData
from saekit.data.synthetic.synthbench_world import SynthBenchConfig

pytestmark = pytest.mark.interop
BRIDGE = Path(__file__).with_name("saelens_world_bridge.py")


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor], dict]:
    python = require_other_python()
    out = tmp_path_factory.mktemp("saelens_world")
    env = {**os.environ, "TQDM_DISABLE": "1"}
    result = subprocess.run(
        [str(python), str(BRIDGE), str(out)], capture_output=True, text=True, env=env
    )
    if result.returncode != 0:
        raise AssertionError(f"bridge failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    meta = json.loads((out / "meta.json").read_text())
    return out / "world", load_file(str(out / "expected.safetensors")), meta


def test_feature_vectors_hierarchy_and_probabilities_are_identical(saved):
    path, theirs, _ = saved
    world = load_saelens_world(SynthBenchConfig(world_path=str(path)))
    same = {
        "directions": "feature_vectors",
        "bias": "bias",
        "thresholds": "thresholds",
        "magnitude_mean": "mean",
        "magnitude_std": "std",
        "parent": "parent",
        "exclusive": "exclusive",
        "scales_children": "scales",
    }
    for ours, name in same.items():
        assert torch.equal(getattr(world, ours), theirs[name]), ours
    assert torch.equal(world.probabilities.float(), theirs["firing_probabilities"])
    assert torch.equal(world.directions, theirs["built_feature_vectors"])  # as built, not redrawn
    # the bridge's world has both kinds of parent, so the flags are read, not assumed
    parents = world.first_child >= 0
    assert world.exclusive[parents].any() and not world.exclusive[parents].all()
    assert (world.cfg.n_roots, world.cfg.branching, world.cfg.depth) == (6, 3, 2)


def test_the_saelens_sampler_makes_saelens_draws_exactly(saved):
    path, theirs, meta = saved
    world = load_saelens_world(SynthBenchConfig(world_path=str(path)))
    for s in meta["seeds"]:
        n = theirs[f"x_{s}"].shape[0]
        x, acts = saelens_batch(world, n, torch.Generator().manual_seed(s))
        assert torch.equal(acts, theirs[f"acts_{s}"]), s
        assert torch.equal(x, theirs[f"x_{s}"]), s
        assert (acts > 0).any() and (acts == 0).any()


def test_the_sparse_sampler_fires_every_feature_at_saelens_rates(saved):
    path, theirs, meta = saved
    data = SynthBenchData(SynthBenchConfig(world_path=str(path)))
    F, n = data.cfg.n_features, 0
    counts = torch.zeros(F, dtype=torch.float64)
    for i in range(10):
        batch = data.batch(i, 4000)
        n += 4000
        counts += torch.bincount(batch.firings.feature, minlength=F)
    ours, ref, m = counts / n, theirs["rates"], meta["n_rates"]
    p = (ours + ref) / 2
    tol = 5 * torch.sqrt(p * (1 - p) * (1 / n + 1 / m)) + 1e-4  # 5 sigma, two samples
    bad = torch.nonzero((ours - ref).abs() > tol).flatten().tolist()
    assert not bad, [(i, float(ours[i]), float(ref[i])) for i in bad[:5]]


def test_a_run_config_trains_on_the_read_world(saved):
    path, theirs, _ = saved
    data = SynthBenchData(SynthBenchConfig(world_path=str(path), sampler="saelens"))
    batch = data.batch(0, 64)
    assert batch.x.shape == (64, 24)
    assert torch.equal(batch.x, saelens_batch(data.world, 64, _batch_generator(data, 0))[0])
    with pytest.raises(ValueError, match="synthbench.d = 32 but the world"):
        load_saelens_world(SynthBenchConfig(world_path=str(path), d=32))


def _batch_generator(data: SynthBenchData, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(
        batch_seed(data.cfg.seed ^ (data.stream_seed << 32), index)
    )
