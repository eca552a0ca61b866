"""saekit: train, evaluate and inspect sparse autoencoders on neural-network activations.

The names a user needs most::

    from saekit import SAE, SAEConfig
    sae = SAE(SAEConfig(d_in=768, d_sae=24576, activation={"kind": "topk", "k": 32}))

They are imported on first use (PEP 562), so ``saekit --help`` answers without importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from saekit._version import __version__

if TYPE_CHECKING:
    from saekit.activations import ACTIVATIONS
    from saekit.core.encoding import ForwardOutput, SparseCode
    from saekit.model.config import SAEConfig
    from saekit.model.format import CheckpointError
    from saekit.model.sae import SAE

_LAZY = {
    "ACTIVATIONS": "saekit.activations",
    "SparseCode": "saekit.core.encoding",
    "SAE": "saekit.model.sae",
    "CheckpointError": "saekit.model.format",
    "ForwardOutput": "saekit.core.encoding",
    "SAEConfig": "saekit.model.config",
}

__all__ = [
    "ACTIVATIONS",
    "SAE",
    "CheckpointError",
    "ForwardOutput",
    "SAEConfig",
    "SparseCode",
    "__version__",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'saekit' has no attribute {name!r}")
