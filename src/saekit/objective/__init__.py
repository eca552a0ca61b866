"""One SAE's training objective: a checked list of terms (``terms``: ``build_objective``,
``TermInputs``), the term configs (``config``: penalty, revival and Matryoshka kinds), and the
formulas they compute (``losses``: reconstruction, sparsity penalties, the λ controller;
``revival``: AuxK and the pre-activation revival loss; ``matryoshka``: prefixes and the prefix
loss).

The public face is below; saekit's own modules import each name from the module that defines it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from saekit.objective.terms import Objective, TermInputs, build_objective

_LAZY = {
    "Objective": "saekit.objective.terms",
    "TermInputs": "saekit.objective.terms",
    "build_objective": "saekit.objective.terms",
}
__all__ = ["Objective", "TermInputs", "build_objective"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'saekit.objective' has no attribute {name!r}")
