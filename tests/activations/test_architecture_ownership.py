"""The activation owns its architecture: outside ``saekit/activations/`` no code switches on an
activation's kind name or type-checks an activation (issue 23). What used to do so asks the
activation through a hook instead (``saekit.activations.base``: export form, calibration,
inference-L0 target, JumpReLU form, plot bias, tensor upgrades).

The scan reads every module under src/saekit except activations/ with ``ast`` and refuses:

- a comparison (==, !=, in, not in, is) with a string literal that is a registered kind name
  (a key of ACTIVATIONS), alone or inside a tuple, list or set literal, and a ``match`` case on
  one;
- a comparison involving ``<...>.activation.kind`` (``cfg.activation.kind == ...``);
- ``isinstance``/``issubclass`` with an activation class or activation config class (any class
  defined in saekit.activations), and a comparison with one (``type(a) is TopK``);
- ``hasattr(<...>.activation, ...)``: duck-typing an activation.

Printing a kind name in a message is fine (an f-string is no comparison), and so is looking a
name up in ACTIVATIONS. Tables of another library's architecture names (saekit.interop's
formats) are that format's vocabulary, looked up by name rather than compared as literals.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

import saekit
import saekit.activations
from saekit.activations import ACTIVATIONS
from saekit.activations.base import Activation, ActivationConfig

SRC = Path(saekit.__file__).resolve().parent  # the package under test (a mutated copy too)
OWNER = SRC / "activations"


def activation_class_names() -> set[str]:
    """Every Activation or ActivationConfig class defined in saekit.activations."""
    names = set()
    for info in pkgutil.iter_modules(saekit.activations.__path__):
        module = importlib.import_module(f"saekit.activations.{info.name}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, (Activation, ActivationConfig)):
                names.add(cls.__name__)
    return names


KIND_NAMES = frozenset(ACTIVATIONS)
CLASS_NAMES = frozenset(activation_class_names())


def _name(node: ast.AST) -> str | None:
    """The last identifier of a Name or Attribute (``a.b.TopK`` → "TopK")."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def _is_kind_literal(node: ast.AST) -> bool:
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str) and node.value in KIND_NAMES
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return any(_is_kind_literal(e) for e in node.elts)
    return False


def _is_activation_kind(node: ast.AST) -> bool:
    """``<...>.activation.kind``."""
    return (
        isinstance(node, ast.Attribute)
        and node.attr == "kind"
        and _name(node.value) == "activation"
    )


def _is_class_ref(node: ast.AST) -> bool:
    if isinstance(node, ast.Tuple):
        return any(_is_class_ref(e) for e in node.elts)
    return _name(node) in CLASS_NAMES


def violations(source: str, where: str = "<string>") -> list[str]:
    """Every place in ``source`` that switches on an activation's kind or class."""
    found = []
    for node in ast.walk(ast.parse(source)):
        line = f"{where}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            if any(_is_kind_literal(o) for o in operands):
                found.append(f"{line}: comparison with an activation kind name")
            if any(_is_activation_kind(o) for o in operands):
                found.append(f"{line}: comparison of an activation's kind")
            if any(_name(o) in CLASS_NAMES for o in operands):
                found.append(f"{line}: comparison with an activation class")
        elif isinstance(node, ast.MatchValue) and _is_kind_literal(node.value):
            found.append(f"{line}: match case on an activation kind name")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            func, args = node.func.id, node.args
            if func in ("isinstance", "issubclass") and len(args) == 2 and _is_class_ref(args[1]):
                found.append(f"{line}: {func} on an activation class")
            if func == "hasattr" and args and _name(args[0]) == "activation":
                found.append(f"{line}: hasattr on an activation (duck typing)")
    return found


def test_the_scan_knows_every_registered_activation():
    assert len(KIND_NAMES) == len(ACTIVATIONS) >= 9
    for cls in ACTIVATIONS.values():
        assert {cls.__name__, cls.config_class.__name__} <= CLASS_NAMES


@pytest.mark.parametrize(
    "source",
    [
        'if kind == "topk": pass',
        'if "batchtopk" != cfg.activation_kind: pass',
        'ok = arch in ("relu", "something_else")',
        'ok = arch not in ["jumprelu"]',
        "ok = sae.cfg.activation.kind is not None",
        "if isinstance(sae.activation, BatchTopK): pass",
        "if isinstance(a, (int, act.ProLU)): pass",
        "ok = issubclass(cls, TopKConfig)",
        "ok = type(sae.activation) is Gated",
        'ok = hasattr(sae.activation, "bias")',
        'match kind:\n    case "matching_pursuit":\n        pass',
    ],
)
def test_a_planted_switch_on_an_activation_is_caught(source):
    assert violations(source)


@pytest.mark.parametrize(
    "source",
    [
        'raise ValueError(f"only a batchtopk SAE converts, this one is {kind!r}")',
        'cfg = {"kind": "topk", "k": 32}',
        "cls = ACTIVATIONS[cfg.activation.kind]",
        "ok = name in ACTIVATIONS",
        'ok = arch == "standard"',
        "if sae.activation.calibrated_threshold: pass",
        "ok = isinstance(penalty, L0Penalty)",
    ],
)
def test_what_the_scan_allows(source):
    assert violations(source) == []


def test_nothing_outside_activations_switches_on_an_activation():
    found = []
    for path in sorted(SRC.rglob("*.py")):
        if OWNER in path.parents:
            continue
        found += violations(path.read_text(), str(path.relative_to(SRC.parent)))
    assert not found, "the activation owns its architecture; use a hook:\n" + "\n".join(found)
