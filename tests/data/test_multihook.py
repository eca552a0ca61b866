"""Specification of the multi-hook ground truth (saekit.data.synthetic.multihook) and its data
source (``data.source: multihook``).

The references are written here from the module's docstring, in float64 plain loops over
tokens and features: which feature writes which hook, with which vector, is rebuilt from the
plan's primitives (read directions, write vectors, layers, spans, owners), never from the
generator's assembled per-hook matrices.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import SMALL_RUN_ARGS

from saekit.cli import main
from saekit.data.sources.registry import source_config
from saekit.data.synthetic.multihook import (
    CLTWorldConfig,
    CrosscoderWorldConfig,
    HookSelection,
    MultiHookConfig,
    MultiHookData,
)
from saekit.train.config import build_run_config, stream_settings

SIGMAS = 5.0
SAE_8 = {"d_sae": 8, "activation": {"kind": "topk", "k": 2}}


def clt(**overrides) -> CLTWorldConfig:
    fields = dict(n_layers=3, d=6, d_out=5, n_features=12, mean_l0=4.0, seed=3, noise_std=0.0)
    return CLTWorldConfig(**{**fields, **overrides})


def crosscoder(**overrides) -> CrosscoderWorldConfig:
    fields = dict(n_sources=3, d=5, n_features=20, mean_l0=5.0, seed=4, noise_std=0.0)
    return CrosscoderWorldConfig(**{**fields, **overrides})


def assert_matches(x_ND: torch.Tensor, expected: list[list[float]]) -> None:
    """float32 output against a float64 reference: 1e-5 absolute (entries are O(1))."""
    got = x_ND.double().tolist()
    for n, row in enumerate(expected):
        for j, value in enumerate(row):
            assert got[n][j] == pytest.approx(value, abs=1e-5), (n, j)


# ------------------------------------------------------------------------- the CLT world
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("max_span", [None, 2])
def test_clt_hooks_hold_exactly_the_planted_cross_layer_map(residual, max_span):
    cfg = clt(residual=residual, max_span=max_span)
    data = MultiHookData(cfg)
    plan = data.plan
    L, F = cfg.n_layers, cfg.n_features
    assert [name for name, _ in data.hooks] == [f"layers.{l}.mlp:input" for l in range(L)] + [
        f"layers.{l}.mlp" for l in range(L)
    ]
    assert [w for _, w in data.hooks] == [6] * L + [5] * L
    # the plan itself: layers dealt in turn, spans inside the allowed range, unit vectors
    longest = L if max_span is None else max_span
    for i in range(F):
        layer, span = int(plan.layer_of[i]), int(plan.span[i])
        assert layer == i % L
        assert 1 <= span <= min(longest, L - layer)
    assert torch.allclose(plan.read.norm(dim=-1), torch.ones(F, dtype=torch.float64))
    assert torch.allclose(plan.write.norm(dim=-1), torch.ones(F, L, dtype=torch.float64))
    for name, _ in data.hooks:
        assert data.means[name].double().norm() == pytest.approx(cfg.mean_norm, rel=1e-6)

    batch = data.batch(2, 40)
    c = batch.coefficients.double().tolist()
    read, write = plan.read.tolist(), plan.write.tolist()
    expected = []
    for n in range(40):
        inputs, targets = [], []  # a CLT's stream: every input, then every target
        for l in range(L):
            x = data.means[f"layers.{l}.mlp:input"].double().tolist()
            y = data.means[f"layers.{l}.mlp"].double().tolist()
            for i in range(F):
                own, span = int(plan.layer_of[i]), int(plan.span[i])
                if l == own or (residual and l > own):  # its read direction, in this input
                    x = [a + c[n][i] * b for a, b in zip(x, read[i], strict=True)]
                if own <= l < own + span:  # its write vector for this layer, in this target
                    y = [a + c[n][i] * b for a, b in zip(y, write[i][l], strict=True)]
            inputs, targets = inputs + x, targets + y
        expected.append(inputs + targets)
    assert_matches(batch.x, expected)
    assert (batch.coefficients > 0).any(dim=0).sum() > F // 2  # the batch exercised the map


def test_clt_spans_are_uniform_over_the_layers_a_feature_can_reach():
    cfg = CLTWorldConfig(n_layers=4, d=4, n_features=8000, mean_l0=4.0)
    plan = MultiHookData(cfg).plan
    for layer in range(4):
        spans = plan.span[plan.layer_of == layer]
        n, reach = spans.numel(), 4 - layer
        for s in range(1, reach + 1):
            p = 1 / reach
            count = int((spans == s).sum())
            assert abs(count - n * p) <= SIGMAS * math.sqrt(n * p * (1 - p)) + 1, (layer, s)


def test_the_noise_is_isotropic_gaussian_of_the_configured_std_on_every_hook():
    cfg = clt(noise_std=0.1, n_features=30, d=8, d_out=8)
    data = MultiHookData(cfg)
    batch = data.batch(0, 20_000)
    c = batch.coefficients.double()
    planted = torch.cat([data.directions[h].double() for h, _ in data.hooks], dim=1)
    mean = torch.cat([data.means[h].double() for h, _ in data.hooks])
    residual = batch.x.double() - c @ planted - mean
    assert residual.mean(0).abs().max() < SIGMAS * 0.1 / math.sqrt(20_000)
    std = residual.std(0)
    assert torch.allclose(std, torch.full_like(std, 0.1), rtol=0.05)


def test_features_fire_at_their_probabilities_with_the_generators_magnitudes():
    cfg = CLTWorldConfig(n_features=40, mean_l0=5.0, magnitude_mean=2.0, magnitude_std=0.3)
    data = MultiHookData(cfg)
    assert data.true_l0 == pytest.approx(5.0, rel=1e-5)
    coefficients = data.batch(1, 20_000).coefficients
    active = coefficients > 0
    n = active.shape[0]
    for i, p in enumerate(data.probabilities.double().tolist()):
        count = int(active[:, i].sum())
        assert abs(count - n * p) <= SIGMAS * math.sqrt(n * p * (1 - p)) + 1, i
    values = coefficients[active].double()
    assert float(values.mean()) == pytest.approx(2.0, abs=0.01)
    assert float(values.std()) == pytest.approx(0.3, rel=0.03)


# ------------------------------------------------------------------- the crosscoder world
def test_crosscoder_sources_hold_exactly_the_shared_and_exclusive_features():
    cfg = crosscoder(exclusive_fraction=0.45)
    data = MultiHookData(cfg)
    owner = data.plan.owner.tolist()
    assert [name for name, _ in data.hooks] == ["a", "b", "c"]
    # round(0.45 * 20) = 9 exclusive features, dealt 3 to each source; the rest shared
    assert [owner.count(s) for s in (-1, 0, 1, 2)] == [11, 3, 3, 3]
    batch = data.batch(0, 30)
    c = batch.coefficients.double().tolist()
    directions = data.plan.directions.tolist()
    expected = []
    for n in range(30):
        row = []
        for s, name in enumerate("abc"):
            x = data.means[name].double().tolist()
            for i in range(cfg.n_features):
                if owner[i] in (-1, s):
                    x = [a + c[n][i] * b for a, b in zip(x, directions[i][s], strict=True)]
            row += x
        expected.append(row)
    assert_matches(batch.x, expected)
    for name in "abc":  # an exclusive feature writes nothing into another source
        s = "abc".index(name)
        assert data.writes(name).tolist() == [o in (-1, s) for o in owner]


def test_structure_and_batches_are_pure_functions_of_seed_stream_seed_and_index():
    a, b = MultiHookData(clt(seed=9), stream_seed=2), MultiHookData(clt(seed=9), stream_seed=2)
    for field in ("read", "write", "span"):
        assert torch.equal(getattr(a.plan, field), getattr(b.plan, field))
    assert torch.equal(a.batch(5, 16).x, b.batch(5, 16).x)
    assert not torch.equal(a.batch(5, 16).x, a.batch(6, 16).x)
    other_stream = MultiHookData(clt(seed=9), stream_seed=3)
    assert torch.equal(other_stream.plan.read, a.plan.read)  # the world does not move
    assert not torch.equal(other_stream.batch(5, 16).x, a.batch(5, 16).x)
    assert not torch.equal(MultiHookData(clt(seed=10)).plan.read, a.plan.read)
    stream = a.stream(16, start=5)
    assert torch.equal(next(stream), a.batch(5, 16).x) and torch.equal(
        next(stream), a.batch(6, 16).x
    )


# ------------------------------------------------------------------------ the source
WORLD = {"kind": "clt", "n_layers": 3, "d": 6, "d_out": 5, "n_features": 12, "mean_l0": 3.0}


def test_a_per_layer_transcoder_run_reads_its_two_hooks_and_is_scored_on_the_target():
    data = {"source": "multihook", "multihook": {**WORLD, "noise_std": 0.0},
            "hook": "layers.1.mlp:input", "target_hook": "layers.1.mlp"}  # fmt: skip
    cfg = build_run_config({"data": data, "saes": [{"sae": SAE_8}], "batch_size": 16,
                            "seed": 5})  # fmt: skip
    assert (cfg.saes[0].sae.d_in, cfg.saes[0].sae.d_out) == (6, 5)
    source = cfg.data.build(stream_settings(cfg))
    world = MultiHookData(cfg.data.multihook, stream_seed=5)
    full = world.batch(3, 16).x
    layer_1 = torch.cat([full[:, 6:12], full[:, 23:28]], dim=1)  # widths 6, 6, 6, 5, 5, 5
    assert torch.equal(next(source.batches(start=3)), layer_1)
    truth = source.known_features()
    writers = [i for i in range(12) if 0 <= 1 - i % 3 < int(world.plan.span[i])]
    assert truth.features.tolist() == writers
    assert torch.equal(truth.directions, world.plan.write[writers, 1].float())
    assert truth.true_l0 == pytest.approx(float(world.probabilities[writers].sum()))
    x, coefficients = next(source.eval_batches(10, 10))
    target = x[:, 6:].double()
    rebuilt = coefficients.double() @ truth.directions.double() + world.means["layers.1.mlp"]
    assert torch.allclose(target, rebuilt, atol=1e-5)  # the truth explains the target exactly


def test_an_sae_run_on_one_source_of_a_crosscoder_world():
    data = {"source": "multihook", "multihook": {"kind": "crosscoder", "d": 7}, "hook": "b"}
    cfg = build_run_config({"data": data, "saes": [{"sae": SAE_8}], "batch_size": 16})
    assert cfg.saes[0].sae.d_in == 7 and cfg.saes[0].sae.d_out is None
    truth = cfg.data.ground_truth()
    assert isinstance(truth, HookSelection)
    owner = MultiHookData(cfg.data.multihook).plan.owner
    assert truth.features.tolist() == torch.nonzero(owner != 0).flatten().tolist()


CLT_HOOKS = {
    "multihook": {"n_layers": 3, "n_features": 12},
    "input_hooks": ["layers.0.mlp:input", "layers.1.mlp:input"],
    "target_hooks": ["layers.0.mlp", "layers.1.mlp"],
}
ORDER = "input i and target i must be one layer's, the layers in increasing order"


def test_a_clt_over_some_layers_of_the_world_in_order_is_accepted():
    skip = {"input_hooks": ["layers.0.mlp:input", "layers.2.mlp:input"],
            "target_hooks": ["layers.0.mlp", "layers.2.mlp"]}  # fmt: skip
    assert source_config({"source": "multihook", **CLT_HOOKS | skip}).hook_groups() == (
        skip["input_hooks"],
        skip["target_hooks"],
    )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"multihook": WORLD}, "holds 6 hooks (layers.0.mlp:input, "),
        ({"multihook": WORLD, "hook": "layers.9.mlp"}, "data.hook 'layers.9.mlp' is not one of"),
        ({"multihook": WORLD, "target_hook": "a"}, "data.target_hook needs data.hook"),
        ({"multihook": {"n_sources": 3}}, "['n_sources'] do(es) not apply to multi-hook world"),
        ({"multihook": {"kind": "crosscoder", "residual": False}}, "['residual'] do(es) not"),
        ({"multihook": {"kind": "nope"}}, "unknown multi-hook world 'nope'"),
        ({"multihook": {"n_layers": 0}}, "CLTWorldConfig.n_layers must be a positive integer"),
        (
            {"multihook": {"n_layers": 5, "n_features": 4, "mean_l0": 1}},
            "n_features = 4 gives some",
        ),
        ({"multihook": {"max_span": -1}}, "CLTWorldConfig.max_span must be a positive integer"),
        ({"multihook": {"kind": "crosscoder", "exclusive_fraction": 1.5}}, "exclusive_fraction"),
        ({"multihook": {"kind": "crosscoder", "n_sources": 27}}, "n_sources must be <= 26"),
        ({"multihook": {"mean_l0": 0}}, "CLTWorldConfig.mean_l0 must be in (0, n_features"),
        ({"multihook": {"noise_std": -1.0}}, "CLTWorldConfig.noise_std must be a finite"),
        ({"model": "gpt2"}, "data.model means nothing for data.source 'multihook'"),
        # a CLT's layers out of order, or input i and target i of different layers: its
        # latents would write into earlier layers of the world
        (CLT_HOOKS | {"input_hooks": ["layers.1.mlp:input", "layers.0.mlp:input"]}, ORDER),
        (CLT_HOOKS | {"target_hooks": ["layers.1.mlp", "layers.0.mlp"]}, ORDER),
        (CLT_HOOKS | {"target_hooks": ["layers.0.mlp", "layers.2.mlp"]}, ORDER),
    ],
)
def test_bad_settings_are_refused_in_one_line_naming_the_field(data, message):
    with pytest.raises(ValueError) as info:
        source_config({"source": "multihook", **data})
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_world_section_without_kind_is_a_clt_world():
    world = MultiHookConfig.parse({"n_layers": 2}, "data.multihook")
    assert isinstance(world, CLTWorldConfig) and world.n_layers == 2


def test_saekit_train_a_per_layer_transcoder_on_the_multihook_source(tmp_path):
    out = tmp_path / "run"
    sets = {"data.source": "multihook", "data.multihook.n_layers": 2, "data.multihook.d": 8,
            "data.multihook.n_features": 16, "data.multihook.mean_l0": 2,
            "data.hook": "layers.1.mlp:input", "data.target_hook": "layers.1.mlp",
            "saes.0.sae.d_sae": 16, "saes.0.sae.activation.k": 2}  # fmt: skip
    argv = ["train", *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]]
    assert main([*argv, *SMALL_RUN_ARGS, "--out", str(out)]) == 0
    report = json.loads((out / "topk-k2-M16" / "eval.json").read_text())
    assert report["n_tokens"] > 0 and 0 < report["mcc"] <= 1  # scored on the target's truth
    assert "multihook:" in (out / "config.yaml").read_text()


def test_a_clt_run_takes_every_input_then_every_target_and_its_layers_from_the_world():
    inputs = [f"layers.{l}.mlp:input" for l in range(3)]
    targets = [f"layers.{l}.mlp" for l in range(3)]
    data = {"source": "multihook", "multihook": WORLD, "input_hooks": inputs,
            "target_hooks": targets}  # fmt: skip
    sae = {"kind": "clt", "d_sae": 8, "activation": {"kind": "topk", "k": 2}}
    cfg = build_run_config({"data": data, "saes": [{"sae": sae}], "batch_size": 16})
    clt_cfg = cfg.saes[0].sae
    assert (clt_cfg.n_layers, clt_cfg.d_in, clt_cfg.d_out) == (3, 6, 5)
    assert (clt_cfg.hooks, clt_cfg.target_hooks) == (inputs, targets)
    source = cfg.data.build(stream_settings(cfg))
    world = MultiHookData(cfg.data.multihook, stream_seed=cfg.seed)
    assert torch.equal(next(source.batches(start=2)), world.batch(2, 16).x)  # the whole stream
    assert source.known_features() is None and cfg.data.ground_truth() is None


def test_a_crosscoder_run_reads_the_sources_it_names_in_that_order():
    data = {"source": "multihook", "multihook": {"kind": "crosscoder", "n_sources": 3, "d": 4},
            "input_hooks": ["c", "a"]}  # fmt: skip
    sae = {"kind": "crosscoder", "d_sae": 8, "activation": {"kind": "topk", "k": 2}}
    cfg = build_run_config({"data": data, "saes": [{"sae": sae}], "batch_size": 16})
    assert (cfg.saes[0].sae.n_sources, cfg.saes[0].sae.d_in) == (2, 4)
    source = cfg.data.build(stream_settings(cfg))
    full = MultiHookData(cfg.data.multihook, stream_seed=cfg.seed).batch(0, 16).x
    assert torch.equal(next(source.batches()), torch.cat([full[:, 8:12], full[:, 0:4]], dim=1))
