"""AbsTopK (arXiv 2510.00404): keep each token's k pre-activations of largest |pre|, signed.

    z_ni = pre_ni · 1[i ∈ top-k_j |pre_nj|]          (no ReLU: a kept negative value stays)

A latent can therefore carry a feature and its opposite in one direction. Every count in
saekit (L0, density, dead latents) is of z ≠ 0, so a latent that only fires negative is live.
Training paths as for TopK (``kernel``); the gradient of a kept entry is the identity, so the
sparse path only attaches the encoder's sparse backward to the kept values.

Revival: the pre-activation revival ("preact") pushes a dead latent's pre up toward the token's
smallest kept |pre|, which makes it fire. AuxK is refused: its candidates are ranked by
ReLU(pre) (:func:`saekit.kernels.auxk_select`), which is TopK's selection, not this one's.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from saekit.activations.base import Activation, ExportForm
from saekit.activations.topk import TopK, TopKConfig, grouped_select, per_group_threshold
from saekit.core.encoding import Encoding
from saekit.kernels.select import topk_select


@dataclass
class AbsTopKConfig(TopKConfig):
    kind = "abstopk"


def abs_topk_select(pre_NM: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Each token's k entries of largest |pre|: (signed values [N, k], latent [N, k])."""
    _, latent_Nk = topk_select(pre_NM.detach().abs(), k)
    return pre_NM.gather(1, latent_Nk), latent_Nk


class AbsTopK(TopK):
    config_class = AbsTopKConfig
    revival_signals = frozenset({"preact"})

    # TopK's sharded selection ranks candidates by signed value and keeps ReLU: not AbsTopK's,
    # so a latent-parallel run refuses AbsTopK (Activation.overrides) rather than train a TopK
    encode_sharded = Activation.encode_sharded
    encode_preacts_sharded = Activation.encode_preacts_sharded
    firing_threshold_sharded = Activation.firing_threshold_sharded

    def select(self, pre_NM: Tensor, k: int, groups: int | None = None) -> tuple[Tensor, Tensor]:
        groups = self.groups if groups is None else groups
        return grouped_select(pre_NM, k, groups, abs_topk_select)

    def kept(self, values: Tensor) -> Tensor:
        return values  # signed: no ReLU

    def export_form(self) -> ExportForm:
        return ExportForm("abstopk", k=self.cfg.k)

    def firing_threshold(self, enc: Encoding) -> Tensor:
        """Each token's (and group's) smallest kept |pre|: [N, 1] (a CLT's: [N, M])."""
        values_Nk, _ = self.select(enc.preacts.detached, self.cfg.k)
        min_NG = values_Nk.abs().reshape(values_Nk.shape[0], self.groups, -1).min(-1).values
        return per_group_threshold(min_NG, self.d_sae)
