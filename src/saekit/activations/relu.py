"""ReLU: z = ReLU(pre). Sparse only through a penalty (docs/design.md, "Activations")."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from saekit.activations.base import Activation, ActivationConfig, ExportForm
from saekit.core.encoding import EncoderView, Encoding, Preacts


@dataclass
class ReLUConfig(ActivationConfig):
    kind = "relu"


class ReLU(Activation):
    config_class = ReLUConfig
    needs_penalty = True

    def encode(self, view: EncoderView, x_n_ND: Tensor) -> Encoding:
        return self.encode_preacts(self.preacts(view, x_n_ND))

    def encode_preacts(self, pre: Preacts) -> Encoding:
        return Encoding(torch.relu(pre.dense()), pre)

    def encode_group(self, pre: Preacts, group: int) -> Encoding:
        return self.encode_preacts(pre)  # per latent

    def export_form(self) -> ExportForm:
        return ExportForm("relu")
