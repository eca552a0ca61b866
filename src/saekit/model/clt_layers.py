"""A cross-layer transcoder run one layer at a time, in the order a model reaches its layers:
the spliced forward of saekit.eval.replacement, where layer l's input exists only once the model
has run the layers before it (with their MLPs already replaced).

Exact, because the CLT is layer-separable at inference (saekit.model.clt): z^l reads x^l alone
(TopK per layer, BatchTopK by its threshold, per-latent rules: Activation.encode_group), and
ŷ^t = Σ_{l ≤ t} z^l W_dec[l][:, t − l] + b_dec[t] reads only layers 0..t. Each layer is encoded
once, where running the whole CLT for each target would encode L layers L times.
"""

from __future__ import annotations

import torch
from torch import Tensor

from saekit.core.encoding import SparseCode
from saekit.kernels.layered import LayerPreacts
from saekit.kernels.sparse import sparse_decode
from saekit.model.clt import CrossLayerTranscoder
from saekit.model.stats import check_activations


@torch.no_grad()
def encode_layer(clt: CrossLayerTranscoder, layer: int, x: Tensor) -> Tensor | SparseCode:
    """Layer ``layer``'s raw input [n, d_in] -> its code over its own M latents (latent i is
    latent layer·M + i of the forward's code), for inference (BatchTopK: outside training)."""
    check_activations(x, clt.cfg.d_in, "d_in")
    x_n = clt.normalise_layer(layer, x)
    pre = LayerPreacts(x_n, clt.W_enc[layer : layer + 1], clt.b_enc[layer : layer + 1])
    return clt.activation.encode_group(pre, layer).latents


@torch.no_grad()
def decode_layer(clt: CrossLayerTranscoder, layer: int, code: Tensor | SparseCode) -> Tensor:
    """Layer ``layer``'s code [n, M] -> its part of the normalised predictions of targets
    layer..L−1 side by side [n, (L − layer)·d_out], no b_dec: z^l W_dec[l] (a sparse code: the
    active (latent, target) pairs only)."""
    clt.check_layer(layer)
    W = clt.W_dec[layer].view(clt.cfg.d_sae, -1)  # [M, (L − l)·d_out]
    if isinstance(code, SparseCode):
        return sparse_decode(code.values, code.latent, code.token, W, code.n_tokens, code.layout)
    return code.to(W.dtype) @ W


class LayerByLayer:
    """``read(l, x^l)`` encodes layer l once and adds its decode into the running sums of
    targets l..L−1; ``predict(t)``, once layers 0..t are read, is ŷ^t in the target's units:
    the layers' parts in layer order, then b_dec, then t_t, as the forward's sparse decode adds
    them (its dense decode starts from b_dec: equal up to rounding)."""

    def __init__(self, clt: CrossLayerTranscoder):
        self.clt = clt
        self.n_read = 0
        self._sums_n: Tensor | None = None  # [n, L·d_out]: Σ_{l read} z^l W_dec[l], normalised

    @torch.no_grad()
    def read(self, layer: int, x: Tensor) -> Tensor | SparseCode:
        """Encode layer ``layer`` (the next unread one) from its raw input [n, d_in]."""
        if layer != self.n_read:
            raise ValueError(f"layers are read in order: layer {self.n_read} next, not {layer}")
        code = encode_layer(self.clt, layer, x)
        part = decode_layer(self.clt, layer, code)
        if self._sums_n is None:
            self._sums_n = part.new_zeros(part.shape[0], self.clt.cfg.target_width)
        d_out = self.clt.cfg.d_out
        self._sums_n[:, layer * d_out :] += part
        self.n_read += 1
        return code

    @torch.no_grad()
    def predict(self, target: int) -> Tensor:
        """ŷ^target [n, d_out] from the layers read so far (0..target at least)."""
        if target >= self.n_read:
            raise ValueError(
                f"target {target} needs layers 0..{target} read, only {self.n_read} are"
            )
        d_out = self.clt.cfg.d_out
        y_n = self._sums_n[:, target * d_out : (target + 1) * d_out] + self.clt.b_dec[target]
        return self.clt.denormalise_target(target, y_n)
