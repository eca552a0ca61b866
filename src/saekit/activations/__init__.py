"""The activations: each module owns one kind's config, encode, flags and hooks.

Adding an activation = one module here (a config dataclass with ``kind`` and an
:class:`~saekit.activations.base.Activation` subclass) plus one line in :data:`ACTIVATIONS`.
"""

from __future__ import annotations

from saekit.activations.abstopk import AbsTopK, AbsTopKConfig
from saekit.activations.base import Activation, ActivationConfig
from saekit.activations.batchtopk import BatchTopK, BatchTopKConfig
from saekit.activations.gated import Gated, GatedConfig
from saekit.activations.hierarchical_topk import HierarchicalTopK, HierarchicalTopKConfig
from saekit.activations.jumprelu import JumpReLU, JumpReLUConfig
from saekit.activations.matching_pursuit import MatchingPursuit, MatchingPursuitConfig
from saekit.activations.prolu import ProLU, ProLUConfig
from saekit.activations.relu import ReLU, ReLUConfig
from saekit.activations.topk import TopK, TopKConfig

ACTIVATIONS: dict[str, type[Activation]] = {
    cls.config_class.kind: cls
    for cls in (
        ReLU,
        TopK,
        BatchTopK,
        JumpReLU,
        ProLU,
        AbsTopK,
        Gated,
        MatchingPursuit,
        HierarchicalTopK,
    )
}
"""kind → activation class: the only registry."""


def make_activation(cfg: ActivationConfig, d_sae: int, groups: int = 1) -> Activation:
    """The activation of ``cfg`` over ``d_sae`` latents in ``groups`` equal groups (a cross-layer
    transcoder's layers; Activation.groups)."""
    return ACTIVATIONS[cfg.kind](cfg, d_sae, groups)


__all__ = [
    "ACTIVATIONS",
    "AbsTopK",
    "AbsTopKConfig",
    "Activation",
    "ActivationConfig",
    "BatchTopK",
    "BatchTopKConfig",
    "Gated",
    "GatedConfig",
    "HierarchicalTopK",
    "HierarchicalTopKConfig",
    "JumpReLU",
    "JumpReLUConfig",
    "MatchingPursuit",
    "MatchingPursuitConfig",
    "ProLU",
    "ProLUConfig",
    "ReLU",
    "ReLUConfig",
    "TopK",
    "TopKConfig",
    "make_activation",
]
