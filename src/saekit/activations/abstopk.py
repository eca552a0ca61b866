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

import torch
from torch import Tensor

from saekit.activations.base import ExportForm
from saekit.activations.topk import TopK, TopKConfig, fast_preacts
from saekit.core.encoding import EncoderView, Encoding, SparseCode
from saekit.kernels.layout import CodeLayout
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

    def encode(self, view: EncoderView, x_n_ND: Tensor) -> Encoding:
        k = self.cfg.k
        if self.cfg.kernel == "reference":
            pre = self.preacts(view, x_n_ND)
            values_Nk, latent_Nk = abs_topk_select(pre.dense(), k)
            z_NM = torch.zeros_like(pre.dense()).scatter(1, latent_Nk, values_Nk)
            return Encoding(z_NM, pre)
        pre = fast_preacts(view, x_n_ND, self)
        n_tokens, d_sae = pre.detached.shape
        values_Nk, latent_Nk = abs_topk_select(pre.detached, k)
        layout = CodeLayout.fixed_k(latent_Nk, d_sae, self.cfg.kernel)
        values_E = pre.attach(values_Nk.reshape(-1), layout)
        code = SparseCode(values_E, layout.latent, layout.token, n_tokens, d_sae, layout)
        return Encoding(code, pre)

    def export_form(self) -> ExportForm:
        return ExportForm("abstopk", k=self.cfg.k)

    def firing_threshold(self, enc: Encoding) -> Tensor:
        """Each token's smallest kept |pre|: [N, 1]."""
        values_Nk, _ = abs_topk_select(enc.preacts.detached, self.cfg.k)
        return values_Nk.abs().min(-1, keepdim=True).values
