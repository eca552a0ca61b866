"""A SynthSAEBench world that SAELens built and saved, read into saekit's world.

SAELens (``sae_lens.synthetic.SyntheticModel.save``) writes a directory of three files:

- ``synthetic_model_config.json``: the ``SyntheticModelConfig`` (shape, generators, seed);
- ``synthetic_model.safetensors``: ``feature_vectors`` [F, d], ``bias`` [d],
  ``firing_probabilities`` [F] (already compensated for the hierarchy) and, with a copula,
  ``correlation_factor`` [F, r] and ``correlation_diag`` [F];
- ``hierarchy.json`` (when there is one): the trees, each node's feature index and its
  ``mutually_exclusive_children`` / ``scale_children_by_parent`` flags.

The file holds no magnitudes: SAELens's own ``load_from_disk`` redraws them from the config's
generators with seeds ``seed + 2`` (means) and ``seed + 1`` (stds), and so does this module,
with the same formulas (``firing_magnitudes.py``), so the loaded world is SAELens's to the bit.
Only safetensors and JSON are read: nothing is unpickled.

saekit's sampler walks complete trees numbered breadth first with one branching factor (what
SAELens's ``generate_hierarchy`` builds with an integer branching factor and enough
features); another hierarchy is refused with the reason.
"""

from __future__ import annotations

import json
import math
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from saekit.data.synthetic.synthbench_world import (
    SynthBenchConfig,
    SynthBenchWorld,
    hierarchy_parents,
    zipf_linear_probabilities,
)

CONFIG_FILE = "synthetic_model_config.json"
WEIGHTS_FILE = "synthetic_model.safetensors"
HIERARCHY_FILE = "hierarchy.json"
MEAN_SEED_OFFSET, STD_SEED_OFFSET = 2, 1
"""SyntheticModel._create_activation_generator: means from seed + 2, stds from seed + 1."""


def _magnitudes(spec: Any, n: int, seed: int | None, what: str) -> Tensor:
    """[n] float32 as SAELens's ``generate_magnitudes`` makes them (float, or a generator)."""
    if isinstance(spec, int | float):
        return torch.full((n,), float(spec), dtype=torch.float32)
    name = spec.get("generator_name")
    if name == "constant":
        return torch.full((n,), float(spec["value"]), dtype=torch.float32)
    if name in ("linear", "exponential") and n == 1:
        return torch.tensor([spec["start"]], dtype=torch.float32)
    if name == "linear":
        return torch.linspace(spec["start"], spec["end"], n)
    if name == "exponential":
        return spec["start"] * (spec["end"] / spec["start"]) ** torch.linspace(0, 1, n)
    if name == "folded_normal":
        if seed is None:
            raise ValueError(
                f"the world's {what} are folded-normal draws and its config has no seed: "
                "SAELens itself redraws them on every load, so there is no world to read"
            )
        g = torch.Generator().manual_seed(seed)
        out = (spec["mean"] + torch.randn(n, generator=g) * spec["std"]).abs()
        lo, hi = spec.get("min_value"), spec.get("max_value")
        return out.clamp(min=lo, max=hi) if lo is not None or hi is not None else out
    raise ValueError(f"the world's {what} use SAELens generator {name!r}, unknown to saekit")


def _hierarchy(roots: list[dict], n_features: int) -> tuple[dict[str, int], Tensor, Tensor, Tensor]:
    """(shape, [F] parent, [F] mutually exclusive parent, [F] scaling parent) of the trees."""
    parent = torch.full((n_features,), -1, dtype=torch.long)
    exclusive = torch.zeros(n_features, dtype=torch.bool)
    scales = torch.zeros(n_features, dtype=torch.bool)
    branching, depth = set(), 0
    stack = [(node, -1, 0) for node in roots]
    while stack:
        node, par, level = stack.pop()
        index = node.get("feature_index")
        if index is None or not 0 <= index < n_features:
            raise ValueError(f"hierarchy node with feature_index {index!r}: saekit needs a feature")
        parent[index], depth = par, max(depth, level)
        children = node.get("children", [])
        exclusive[index] = bool(node.get("mutually_exclusive_children")) and len(children) > 1
        scales[index] = bool(node.get("scale_children_by_parent")) and len(children) > 0
        if children:
            branching.add(len(children))
        stack.extend((child, index, level + 1) for child in children)
    if len(branching) > 1:
        raise ValueError(f"hierarchy with branching factors {sorted(branching)}: saekit needs one")
    shape = dict(n_roots=len(roots), branching=branching.pop() if branching else 2,
                 depth=depth if roots else 1)  # fmt: skip
    return shape, parent, exclusive, scales


def _settings(raw: dict, shape: dict[str, int], rank: int, scale: bool) -> dict[str, Any]:
    """The SynthBenchConfig fields SAELens's config maps onto."""
    out: dict[str, Any] = dict(n_features=raw["num_features"], d=raw["hidden_dim"], **shape)
    out.update(scale_children=scale, correlation_rank=max(rank, 1), seed=raw.get("seed") or 0)
    prob = raw.get("firing_probability", {})
    if prob.get("generator_name") == "zipfian":
        out.update(zipf_exponent=prob["exponent"], p_max=prob["max_prob"], p_min=prob["min_prob"])
    corr = raw.get("correlation")
    out["correlation_scale"] = corr["correlation_scale"] if corr else 0.0
    ortho = raw.get("orthogonalization")
    if ortho:
        out.update(ortho_steps=ortho["num_steps"], ortho_lr=ortho["lr"])
    else:
        out["ortho_steps"] = 0
    mean, std = raw.get("mean_firing_magnitudes"), raw.get("std_firing_magnitudes")
    if isinstance(mean, dict) and mean.get("generator_name") == "linear":
        out.update(magnitude_start=mean["start"], magnitude_end=mean["end"])
    if isinstance(std, dict) and std.get("generator_name") == "folded_normal":
        out.update(std_mean=std["mean"], std_std=std["std"])
    bias = raw.get("bias", 1.0)
    out["bias_norm"] = 0.0 if bias is False else 1.0 if bias is True else float(bias)
    return out


def _merge(cfg: SynthBenchConfig, read: dict[str, Any]) -> SynthBenchConfig:
    """The read settings; a field the user set to neither its default nor the file's is an error."""
    defaults = {f.name: f.default for f in fields(SynthBenchConfig)}
    for name, value in read.items():
        mine = getattr(cfg, name)
        if mine != defaults[name] and mine != value:
            raise ValueError(
                f"synthbench.{name} = {mine!r} but the world at {cfg.world_path} has {value!r}; "
                "leave it out (the world file sets it)"
            )
    return replace(cfg, **read)


def load_saelens_world(cfg: SynthBenchConfig) -> SynthBenchWorld:
    """The world saved in ``cfg.world_path``; ``cfg.bos_share`` is kept (SAELens has none)."""
    path = Path(str(cfg.world_path)).expanduser()
    if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise ValueError(
            f"synthbench.world_path: {path} lacks {CONFIG_FILE} or {WEIGHTS_FILE} (a directory "
            "written by SAELens's SyntheticModel.save)"
        )
    raw = json.loads((path / CONFIG_FILE).read_text())
    if raw.get("dtype", "float32") != "float32":
        raise ValueError(f"world at {path} has dtype {raw['dtype']}; saekit reads float32 worlds")
    t = load_file(str(path / WEIGHTS_FILE))
    F, d = int(raw["num_features"]), int(raw["hidden_dim"])
    want = {"feature_vectors": (F, d), "bias": (d,), "firing_probabilities": (F,)}
    for name, shape in want.items():
        if name not in t or tuple(t[name].shape) != shape:
            got = tuple(t[name].shape) if name in t else "missing"
            raise ValueError(f"{path / WEIGHTS_FILE}: {name} should be {shape}, is {got}")
    roots = []
    if (path / HIERARCHY_FILE).is_file():
        roots = json.loads((path / HIERARCHY_FILE).read_text())["roots"]
    shape, parent, exclusive, scales = _hierarchy(roots, F)
    factor = t.get("correlation_factor")
    settings = _settings(
        raw, shape, factor.shape[1] if factor is not None else 0, bool(scales.any())
    )
    world_cfg = _merge(cfg, settings)
    expected_parent, depth, first_child = hierarchy_parents(world_cfg)
    if not torch.equal(parent, expected_parent):
        raise ValueError(
            f"the hierarchy at {path} is not complete trees numbered breadth first (what "
            "SAELens's generate_hierarchy builds with an integer branching factor); saekit's "
            "sampler cannot walk it"
        )
    seed = raw.get("seed")
    probabilities = t["firing_probabilities"].float()
    own_std = t["correlation_diag"].float().sqrt() if factor is not None else torch.ones(F)
    base = probabilities.double()  # SAELens saves only the compensated rates
    if raw.get("firing_probability", {}).get("generator_name") == "zipfian":
        c = world_cfg
        base = zipf_linear_probabilities(F, c.zipf_exponent, c.p_max, c.p_min)
    return SynthBenchWorld.from_parts(
        world_cfg,
        directions=t["feature_vectors"].float(),
        bias=t["bias"].float(),
        parent=parent,
        depth=depth,
        first_child=first_child,
        top_level=torch.nonzero(depth <= 0).flatten(),
        exclusive=exclusive,
        scales_children=scales,
        base_probabilities=base,
        probabilities=probabilities.double(),
        magnitude_mean=_magnitudes(raw.get("mean_firing_magnitudes", 1.0), F,
                                   None if seed is None else seed + MEAN_SEED_OFFSET, "means"),
        magnitude_std=_magnitudes(raw.get("std_firing_magnitudes", 0.0), F,
                                  None if seed is None else seed + STD_SEED_OFFSET, "stds"),
        factor=factor.float() if factor is not None else None,
        own_std=own_std,
        # SAELens's thresholds: float32, from the float32 probabilities
        thresholds=math.sqrt(2) * torch.erfinv(1 - 2 * probabilities),
    )  # fmt: skip
