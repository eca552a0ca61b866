"""Property-based fuzz of the config loader: every input either trains or gives a one-line
error naming a field; never a traceback, never a value the docs call invalid accepted.

A valid base run (four SAEs covering the activations, penalties, revivals and Matryoshka) gets
one to three of its fields (or a new field) replaced by values from a pool of edge cases; the
loader must refuse with a one-line ``ValueError`` naming a changed field, or accept a config
without NaN/inf or negative numbers that then builds every SAE, its objective and optimizer,
and takes one finite training step. "Trains" means that one step, not a full run. Sizes stop
at 1e4: a valid size too large for memory is out of scope.
"""

from __future__ import annotations

import copy
import math
import re
from collections import Counter
from typing import Any

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from saekit.core.configs import to_dict  # noqa: E402
from saekit.data.synthetic.generator import SyntheticData  # noqa: E402
from saekit.train.config import build_run_config  # noqa: E402
from saekit.train.config_files import apply_overrides  # noqa: E402
from saekit.train.member import Member  # noqa: E402

BASE: dict[str, Any] = {
    "data": {
        "source": "synthetic",
        "synthetic": {"d": 16, "n_features": 32, "mean_l0": 2.0, "kind": "independent"},
    },
    "saes": [
        {"sae": {"d_sae": 32, "activation": {"kind": "topk", "k": 2}}},
        {
            "sae": {"d_sae": 32, "activation": {"kind": "batchtopk", "k": 2}},
            "revival": {"kind": "preact"},
            "matryoshka": {"kind": "random", "n_prefixes": 3, "min_prefix": 4},
        },
        {
            "sae": {"d_sae": 32, "activation": {"kind": "jumprelu"}},
            "penalty": {"kind": "l0", "coefficient": 0.3, "target_l0": 2.0},
        },
        {
            "sae": {"d_sae": 32, "activation": "relu"},
            "penalty": {"kind": "l1", "coefficient": 0.1},
            "matryoshka": {"kind": "fixed", "groups": [8, 24]},
        },
    ],
    "batch_size": 64,
    "steps": 4,
    "eval_tokens": 64,
    "out_dir": "unused",
    "progress": False,
}

VALUES: list[Any] = [
    *[-3, -1, 0, 1, 2, 3, 7, 40],
    *[math.nan, math.inf, -math.inf, -0.5, 0.0, 0.5, 0.999, 1.0, 1.5, 1e4],
    *["", "x", "../outside", "/abs/path", "checkpoint", "cuda:99", "l1", "auxk", "none"],
    *["preact", "topk", "relu", "jumprelu", "random", "hierarchical", "nan", "-inf", "1e-3"],
    None,
    True,
    [],
    {},
    [1, 2],
    [0.9, 1.5],
    {"kind": "l1"},
    {"kind": "auxk", "k_aux": 0},
]


def _leaves(node: Any, path: tuple = ()) -> list[tuple]:
    if isinstance(node, dict):
        out = [path] if path else []
        for key, value in node.items():
            out += _leaves(value, (*path, key))
        return out
    if isinstance(node, list) and node and isinstance(node[0], dict):
        out = [path]
        for i, value in enumerate(node):
            out += _leaves(value, (*path, i))
        return out
    return [path]


# Every field of the resolved base config (defaults included), plus kind fields a user may add.
PATHS = sorted(
    set(_leaves(to_dict(build_run_config(BASE))))
    | {
        ("saes", 0, "revival", "k_aux"),
        ("saes", 0, "revival", "normalizer"),
        ("saes", 0, "penalty"),
        ("saes", 3, "penalty", "eps"),
        ("saes", 3, "penalty", "target_l0"),
        ("saes", 3, "penalty", "controller_rate"),
        ("saes", 2, "sae", "activation", "bandwidth"),
        ("saes", 0, "bogus_field"),
        ("bogus",),
    },
    key=str,
)


def _set(data: dict, path: tuple, value: Any) -> None:
    node: Any = data
    for part in path[:-1]:
        child = node[part] if isinstance(node, list) else node.get(part)
        if isinstance(child, str):
            node[part] = child = {"kind": child}
        if not isinstance(child, (dict, list)):  # an earlier mutation replaced a section
            node[part] = child = {}
        node = child
    node[path[-1]] = value


def _numbers(node: Any) -> list[float]:
    if isinstance(node, dict):
        return [x for v in node.values() for x in _numbers(v)]
    if isinstance(node, (list, tuple)):
        return [x for v in node for x in _numbers(v)]
    if isinstance(node, (int, float)) and not isinstance(node, bool):
        return [node]
    return []


def _one_step(cfg) -> None:
    """Build every SAE with its objective and optimizer; one step on a small batch."""
    data = SyntheticData(cfg.data.synthetic)
    n = min(cfg.batch_size, 64)
    sample = data.batch(10**9, 256).x
    x = data.batch(0, n).x
    for s in cfg.saes:
        member = Member(s, cfg.steps, "cpu")
        member.init_from_data(sample)
        metrics = member.train_step(x, 0)
        assert math.isfinite(float(metrics.loss)), (s.name, float(metrics.loss))


def classify(data: dict, changed: list[tuple]) -> str:
    """ "error" (clean, names a changed field), "trained", or raise AssertionError."""
    try:
        cfg = build_run_config(data)
    except ValueError as exc:
        message = str(exc)
        assert "\n" not in message, message
        names = {str(p) for path in changed for p in path if not isinstance(p, int)}
        assert any(re.search(rf"\b{re.escape(n)}\b", message) for n in names), (changed, message)
        return "error"
    numbers = _numbers(to_dict(cfg))
    assert all(math.isfinite(x) for x in numbers), f"non-finite value accepted: {changed}"
    assert all(x >= 0 for x in numbers), f"negative value accepted: {changed}"
    _one_step(cfg)
    return "trained"


COUNTS: Counter = Counter()


@settings(
    max_examples=250,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
    database=None,
)
@given(
    st.lists(
        st.tuples(st.sampled_from(PATHS), st.sampled_from(VALUES)),
        min_size=1,
        max_size=3,
    )
)
def _fuzz_fields(mutations: list[tuple[tuple, Any]]) -> None:
    data = copy.deepcopy(BASE)
    for path, value in mutations:
        _set(data, path, copy.deepcopy(value))
    try:
        outcome = classify(data, [p for p, _ in mutations])
    except AssertionError:
        raise
    except Exception as exc:  # a traceback: the finding this test exists for
        COUNTS["traceback"] += 1
        raise AssertionError(f"traceback for {mutations}: {type(exc).__name__}: {exc}") from exc
    COUNTS[outcome] += 1


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(
    st.text(alphabet="saeb.0123=[]{}:,-kx ", min_size=0, max_size=14),
)
def _fuzz_overrides(text: str) -> None:
    data = copy.deepcopy(BASE)
    try:
        build_run_config(apply_overrides(data, [text]))
        COUNTS["override accepted"] += 1
    except ValueError as exc:
        assert "\n" not in str(exc), str(exc)
        COUNTS["override error"] += 1
    except Exception as exc:
        COUNTS["traceback"] += 1
        raise AssertionError(f"traceback for --set {text!r}: {type(exc).__name__}: {exc}") from exc


def test_config_fuzz(capsys):
    torch.manual_seed(0)
    COUNTS.clear()
    _fuzz_fields()
    _fuzz_overrides()
    assert COUNTS["traceback"] == 0
    assert COUNTS["error"] > 0 and COUNTS["trained"] > 0
    with capsys.disabled():
        print(f"\nconfig fuzz: {dict(sorted(COUNTS.items()))}")
