"""ReLU: z = ReLU(pre). Sparse only through a penalty (docs/design.md, "Activations")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from saekit.activations.base import Activation, ActivationConfig, ExportForm
from saekit.core.encoding import EncoderView, Encoding, Preacts

if TYPE_CHECKING:
    from saekit.core.shard import LatentShard


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

    def encode_sharded(self, view: EncoderView, x_n_ND: Tensor, shard: LatentShard) -> Encoding:
        return self.encode(view, x_n_ND)  # per latent: each part encodes its own

    def encode_preacts_sharded(self, pre: Preacts, shard: LatentShard) -> Encoding:
        return self.encode_preacts(pre)  # per latent: each part encodes its own

    def encode_group(self, pre: Preacts, group: int) -> Encoding:
        return self.encode_preacts(pre)  # per latent

    def export_form(self) -> ExportForm:
        return ExportForm("relu")
