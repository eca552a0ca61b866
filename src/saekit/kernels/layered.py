"""A cross-layer transcoder's encoder and decoder as sparse kernels (saekit.model.clt).

Latents are flat: latent j = l·M + i is latent i of layer l (L layers of M latents).

Encoder: ``pre[n, l·M + i] = x_n^l · W_enc[l, i] + b_enc[l, i]``, L encoders each reading its
own layer (block-diagonal, never an [L·M, L·d] matrix). :class:`LayerPreacts` computes it with
one GEMM per layer and answers the questions every :class:`~saekit.core.encoding.Preacts`
answers. Its sparse backward is the SAE's (:func:`saekit.kernels.sparse.attach_encoder_grad`)
on (token, layer) rows: x_n [N, L·d] viewed as [N·L, d] has row n·L + l = x_n^l, so the entry
(n, l·M + i) is the SAE entry (row n·L + l, latent l·M + i) of W_enc viewed as [L·M, d].

Decoder: ``ŷ^{l'} = Σ_{l ≤ l'} z^l W_dec^{l→l'}``. W_dec[l] [M, L − l, d_out] viewed as
[M, (L − l)·d_out] is one decoder from layer l's latents into targets l..L−1 side by side, so
:func:`layered_decode` sorts a code's entries by layer (stable: tokens stay in order), reads the
L counts on the host (the one transfer of a CLT step; on a CPU it costs nothing), and runs one
sparse decode per layer that has entries, into its targets' columns. Its cost is
Σ_e (L − l_e)·d_out: the active (latent, target) pairs, never L·M dense products.
"""

from __future__ import annotations

import torch
from torch import Tensor

from saekit.core.encoding import Preacts
from saekit.kernels.layout import CodeLayout
from saekit.kernels.sparse import attach_encoder_grad, sparse_decode


def layer_encoders(x_n_ND: Tensor, W_enc_LMD: Tensor, b_enc_LM: Tensor) -> Tensor:
    """pre [N, L·M]: per layer l, x_n^l W_enc[l]ᵀ + b_enc[l] (one GEMM each; differentiable
    where the inputs are). ``x_n_ND``: [N, L·d], layer l's input in columns l·d..(l+1)·d."""
    n_layers, _, d_in = W_enc_LMD.shape
    x_NLD = x_n_ND.view(x_n_ND.shape[0], n_layers, d_in)
    parts = [torch.addmm(b_enc_LM[l], x_NLD[:, l], W_enc_LMD[l].T) for l in range(n_layers)]
    return parts[0] if n_layers == 1 else torch.cat(parts, dim=1)


class LayerPreacts(Preacts):
    """A cross-layer transcoder's pre-activations [N, L·M] (module doc).

    ``detached`` runs the L GEMMs without autograd (the fast path selects from it); ``dense()``
    runs them with autograd, once, when a loss or a dense activation differentiates all of pre
    (then ``detached`` is its detached value); ``selected``/``at`` give values at coordinates
    with the sparse backward (or, after ``dense()``, through its graph).
    """

    def __init__(self, x_n_ND: Tensor, W_enc_LMD: Tensor, b_enc_LM: Tensor):
        self.x_n_ND, self.W_enc_LMD, self.b_enc_LM = x_n_ND, W_enc_LMD, b_enc_LM
        self._dense: Tensor | None = None
        self._detached: Tensor | None = None

    @property
    def detached(self) -> Tensor:
        if self._dense is not None:
            return self._dense.detach()
        if self._detached is None:
            with torch.no_grad():
                self._detached = layer_encoders(self.x_n_ND, self.W_enc_LMD, self.b_enc_LM)
        return self._detached

    def dense(self) -> Tensor:
        if self._dense is None:
            self._dense = layer_encoders(self.x_n_ND, self.W_enc_LMD, self.b_enc_LM)
        return self._dense

    def at(self, token: Tensor, latent: Tensor) -> Tensor:
        shape = latent.shape
        token_E, latent_E = token.reshape(-1), latent.reshape(-1)
        n_tokens, d_sae = self.detached.shape
        values_E = self.detached.reshape(-1)[token_E * d_sae + latent_E]
        layout = CodeLayout(token_E, latent_E, n_tokens, d_sae)
        return self.selected(values_E, layout).reshape(shape)

    def selected(self, values_E: Tensor, layout: CodeLayout) -> Tensor:
        if not torch.is_grad_enabled():
            return values_E
        if self._dense is not None:  # the dense graph exists: one gradient path, not two
            return self._dense[layout.token, layout.latent]
        n_layers, d_sae, d_in = self.W_enc_LMD.shape
        rows_E = layout.token * n_layers + torch.div(layout.latent, d_sae, rounding_mode="floor")
        n_rows = layout.n_tokens * n_layers
        rows = CodeLayout(rows_E, layout.latent, n_rows, n_layers * d_sae, backend=layout.backend)
        x_rows = self.x_n_ND.reshape(n_rows, d_in)  # row n·L + l = x_n^l (a view)
        W_enc = self.W_enc_LMD.reshape(n_layers * d_sae, d_in)
        return attach_encoder_grad(values_E, x_rows, None, W_enc, self.b_enc_LM.reshape(-1), rows)


def layered_decode(
    values_E: Tensor,
    latent_E: Tensor,
    token_E: Tensor,
    W_dec: list[Tensor],
    n_tokens: int,
    layout: CodeLayout | None = None,
) -> Tensor:
    """[N, L·d_out]: Σ values·W_dec^{l→l'} by token into every target l' ≥ l (no b_dec; module
    doc). ``W_dec[l]``: [M, L − l, d_out]; tokens non-decreasing; ``layout``: the code's own
    (reused when L = 1, where there is nothing to sort)."""
    n_layers = len(W_dec)
    d_sae, _, d_out = W_dec[0].shape
    if n_layers == 1:
        W = W_dec[0].view(d_sae, d_out)
        return sparse_decode(values_E, latent_E, token_E, W, n_tokens, layout)
    backend = "torch" if layout is None else layout.backend
    layer_E = torch.div(latent_E, d_sae, rounding_mode="floor")
    order = torch.sort(layer_E, stable=True).indices
    counts = torch.bincount(layer_E, minlength=n_layers).tolist()  # the one host read
    dtype = torch.promote_types(values_E.dtype, W_dec[0].dtype)
    out = W_dec[0].new_zeros(n_tokens, n_layers * d_out, dtype=dtype)
    start = 0
    for layer, count in enumerate(counts):
        if count == 0:
            continue
        take = order[start : start + count]
        start += count
        token_S = token_E.index_select(0, take)
        latent_S = latent_E.index_select(0, take) - layer * d_sae
        segment = CodeLayout(token_S, latent_S, n_tokens, d_sae, backend=backend)
        W = W_dec[layer].reshape(d_sae, -1)  # [M, (L − l)·d_out], a view
        part = sparse_decode(
            values_E.index_select(0, take), latent_S, token_S, W, n_tokens, segment
        )
        out[:, layer * d_out :] += part.to(dtype)
    return out
