"""saekit: train, evaluate and inspect sparse autoencoders on neural-network activations.

The names a user needs most::

    from saekit import SAE, SAEConfig
    sae = SAE(SAEConfig(d_in=768, d_sae=24576, activation={"kind": "topk", "k": 32}))
"""

from saekit._version import __version__
from saekit.activations import ACTIVATIONS
from saekit.encoding import SparseCode
from saekit.sae import SAE, CheckpointError, ForwardOutput, SAEConfig

__all__ = [
    "ACTIVATIONS",
    "SAE",
    "CheckpointError",
    "ForwardOutput",
    "SAEConfig",
    "SparseCode",
    "__version__",
]
