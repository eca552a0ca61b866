"""The SAE itself: parameters, forward, save and load (``sae``), its config (``config``), its
directory on disk (``format``), input checks and statistics (``stats``) and the input transform
of the normalised space (``normalisation``).

The public face is below; saekit's own modules import each name from the module that defines it
(tests/test_package_layout.py checks). Names load on first use, so importing a config does not
import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from saekit.model.config import SAEConfig
    from saekit.model.format import CheckpointError
    from saekit.model.sae import SAE

_LAZY = {
    "SAE": "saekit.model.sae",
    "SAEConfig": "saekit.model.config",
    "CheckpointError": "saekit.model.format",
}
__all__ = ["SAE", "CheckpointError", "SAEConfig"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'saekit.model' has no attribute {name!r}")
