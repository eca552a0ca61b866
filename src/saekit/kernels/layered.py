"""A cross-layer transcoder's encoder and decoder as sparse kernels (saekit.model.clt).

Latents are flat: latent j = l·M + i is latent i of layer l (L layers of M latents).

Encoder: ``pre[n, l·M + i] = x_n^l · W_enc[l, i] + b_enc[l, i]``, L encoders each reading its
own layer (block-diagonal, never an [L·M, L·d] matrix). :class:`LayerPreacts` computes it with
one GEMM per layer, each written into its own column block of one [N, L·M] buffer (reused from
step to step on a CPU, as the SAE's: saekit.kernels.workspace; no join), and answers the
questions every :class:`~saekit.core.encoding.Preacts` answers. Its sparse backward is the
SAE's (:func:`saekit.kernels.sparse.attach_encoder_grad`) on (token, layer) rows: x_n [N, L·d]
viewed as [N·L, d] has row n·L + l = x_n^l, so the entry (n, l·M + i) is the SAE entry
(row n·L + l, latent l·M + i) of W_enc viewed as [L·M, d].

Decoder: ``ŷ^{l'} = Σ_{l ≤ l'} z^l W_dec^{l→l'}``. W_dec[l] [M, L − l, d_out] viewed as
[M, (L − l)·d_out] is one decoder from layer l's latents into targets l..L−1 side by side, so
:func:`layered_decode` cuts a code's entries by layer (tokens stay in order) and runs one
sparse decode per layer that has entries, into its targets' columns, all in one autograd node.
Its cost is Σ_e (L − l_e)·d_out: the active (latent, target) pairs, never L·M dense products.
Host reads: none for TopK per layer (each layer's N·k entries sit at known positions); for any
other code (BatchTopK, JumpReLU, ReLU, AuxK's) the entries are sorted by layer and the L counts
read on the host, a device sync on a GPU (:func:`_segments` says why).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from saekit.core.encoding import Preacts
from saekit.kernels.layout import CodeLayout
from saekit.kernels.sparse import attach_encoder_grad, sparse_decode, sparse_decode_backward
from saekit.kernels.workspace import free_buffer


def layer_encoders(
    x_n_ND: Tensor, W_enc_LMD: Tensor, b_enc_LM: Tensor, out: Tensor | None = None
) -> Tensor:
    """pre [N, L·M]: per layer l, x_n^l W_enc[l]ᵀ + b_enc[l], one GEMM each, written into
    ``out``'s columns l·M..(l+1)·M (BLAS writes a column block in place: no join, no copy;
    ``out`` None: a new tensor). Not differentiable (:class:`LayerPreacts` attaches the
    backward). ``x_n_ND``: [N, L·d], layer l's input in columns l·d..(l+1)·d."""
    n_layers, d_sae, d_in = W_enc_LMD.shape
    x_NLD = x_n_ND.view(x_n_ND.shape[0], n_layers, d_in)
    if out is None:
        dtype = torch.promote_types(x_n_ND.dtype, W_enc_LMD.dtype)
        out = W_enc_LMD.new_empty(x_n_ND.shape[0], n_layers * d_sae, dtype=dtype)
    with torch.no_grad():
        for l in range(n_layers):
            block = out[:, l * d_sae : (l + 1) * d_sae]
            torch.addmm(b_enc_LM[l], x_NLD[:, l], W_enc_LMD[l].T, out=block)
    return out


class _LayerDenseFn(torch.autograd.Function):
    """pre [N, L·M] already computed (detached), made differentiable the dense way, layer by
    layer: for a loss or activation that differentiates all of pre (ReLU, JumpReLU). The
    gradient of layer l's block g_l [N, M]: dW_enc[l] = g_lᵀ x_n^l, db_enc[l] = Σ_n g_l,
    dx_n^l = g_l W_enc[l]; each written into its block (no join)."""

    @staticmethod
    def forward(ctx, pre_NM, x_n_ND, W_enc_LMD, b_enc_LM):
        ctx.save_for_backward(x_n_ND, W_enc_LMD)
        return pre_NM.view_as(pre_NM)  # an alias: no [N, L·M] copy

    @staticmethod
    def backward(ctx, grad_NM: Tensor):
        x_n_ND, W_enc_LMD = ctx.saved_tensors
        need_x, need_W, need_b = ctx.needs_input_grad[1:4]
        n_layers, d_sae, d_in = W_enc_LMD.shape
        grad_NLM = grad_NM.to(W_enc_LMD.dtype).view(grad_NM.shape[0], n_layers, d_sae)
        x_NLD = x_n_ND.detach().view(x_n_ND.shape[0], n_layers, d_in)
        grad_x = torch.empty_like(x_n_ND) if need_x else None
        grad_W = torch.empty_like(W_enc_LMD) if need_W else None
        grad_b = grad_NLM.sum(0) if need_b else None
        for l in range(n_layers):
            if need_W:
                torch.mm(grad_NLM[:, l].T, x_NLD[:, l].to(W_enc_LMD.dtype), out=grad_W[l])
            if need_x:
                torch.mm(grad_NLM[:, l], W_enc_LMD[l].detach(), out=grad_x.view_as(x_NLD)[:, l])
        return None, grad_x, grad_W, grad_b


class LayerPreacts(Preacts):
    """A cross-layer transcoder's pre-activations [N, L·M] (module doc).

    ``detached``: the L GEMMs without autograd, once, into ``owner``'s reused buffer on a CPU
    (saekit.kernels.workspace: a fresh [N, L·M] is faulted in page by page every step), else a
    new tensor. ``dense()``: the same values with the dense backward (:class:`_LayerDenseFn`;
    L = 1: the transcoder's own autograd GEMM, so a 1-layer CLT is a transcoder bit for bit),
    for a loss or an activation that differentiates all of pre; ``selected``/``at`` give
    values at coordinates with the sparse backward (or, after ``dense()``, through its graph).
    """

    def __init__(
        self, x_n_ND: Tensor, W_enc_LMD: Tensor, b_enc_LM: Tensor, owner: object | None = None
    ):
        self.x_n_ND, self.W_enc_LMD, self.b_enc_LM = x_n_ND, W_enc_LMD, b_enc_LM
        self.owner = owner
        self._dense: Tensor | None = None
        self._detached: Tensor | None = None

    @property
    def detached(self) -> Tensor:
        if self._dense is not None:
            return self._dense.detach()
        if self._detached is None:
            self._detached = layer_encoders(
                self.x_n_ND, self.W_enc_LMD, self.b_enc_LM, out=self._buffer()
            )
        return self._detached

    def _buffer(self) -> Tensor | None:
        x, W = self.x_n_ND, self.W_enc_LMD
        if self.owner is None or x.device.type != "cpu" or x.dtype != W.dtype:
            return None
        n_layers, d_sae, _ = W.shape
        return free_buffer(self.owner, x.shape[0], n_layers * d_sae, W.dtype)

    def dense(self) -> Tensor:
        if self._dense is None:
            x, W, b = self.x_n_ND, self.W_enc_LMD, self.b_enc_LM
            if W.shape[0] == 1:
                self._dense = torch.addmm(b[0], x, W[0].T)
            else:
                self._dense = _LayerDenseFn.apply(self.detached, x, W, b)
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


class _Segment(NamedTuple):
    """Layer ``layer``'s entries of a code: their positions ``take`` [S] in the code and their
    own layout (latents i within the layer, tokens as the code's)."""

    layer: int
    take: Tensor
    layout: CodeLayout


def _segments(latent_E: Tensor, token_E: Tensor, n_layers: int, d_sae: int, n_tokens: int,
              layout: CodeLayout | None) -> list[_Segment]:  # fmt: skip
    """The code's entries cut by layer, in layer order (tokens stay in order within each).

    TopK per layer (``layout.per_group``: each token's entries are L runs of k, run l from
    layer l): entry n·L·k + l·k + j is layer l's, known without reading the code, so nothing
    here waits for the device. Any other code (BatchTopK, JumpReLU, ReLU, AuxK): a stable sort
    by layer and the L counts read on the host (``tolist``, a device sync on a GPU), because
    each layer's decode is one bag sum over its own entries and their number is data."""
    backend = "torch" if layout is None else layout.backend
    device = latent_E.device
    if layout is not None and layout.per_group is not None and layout.groups == n_layers:
        k = layout.per_group
        first_N1 = (torch.arange(n_tokens, device=device) * (n_layers * k)).unsqueeze(1)
        segments = []
        for layer in range(n_layers):
            take = (first_N1 + (layer * k + torch.arange(k, device=device))).reshape(-1)
            latent_Nk = (latent_E.index_select(0, take) - layer * d_sae).view(n_tokens, k)
            segments.append(_Segment(layer, take, CodeLayout.fixed_k(latent_Nk, d_sae, backend)))
        return segments
    layer_E = torch.div(latent_E, d_sae, rounding_mode="floor")
    order = torch.sort(layer_E, stable=True).indices
    counts = torch.bincount(layer_E, minlength=n_layers).tolist()  # the host read (docstring)
    segments, start = [], 0
    for layer, count in enumerate(counts):
        if count == 0:
            continue
        take = order[start : start + count]
        start += count
        token_S = token_E.index_select(0, take)
        latent_S = latent_E.index_select(0, take) - layer * d_sae
        segments.append(_Segment(layer, take, CodeLayout(token_S, latent_S, n_tokens, d_sae,
                                                         backend=backend)))  # fmt: skip
    return segments


class _LayeredDecodeFn(torch.autograd.Function):
    """out [N, L·d_out]: each segment's sparse decode by W_dec[l] viewed as [M, (L − l)·d_out],
    added into columns l·d_out.. (targets l..L−1). One autograd node: the backward reads each
    layer's column block of the output's gradient as a view, where per-layer nodes joined by
    in-place slice updates made autograd copy and zero-fill the whole gradient per layer."""

    @staticmethod
    def forward(ctx, values_E, segments, n_tokens, d_out, dtype, *W_dec):
        out = W_dec[0].new_zeros(n_tokens, len(W_dec) * d_out, dtype=dtype)
        values_S = []
        for layer, take, layout in segments:
            values = values_E.index_select(0, take)
            W = W_dec[layer].reshape(layout.d_sae, -1)  # [M, (L − l)·d_out], a view
            part = sparse_decode(values, layout.latent, layout.token, W, n_tokens, layout)
            out[:, layer * d_out :] += part.to(dtype)
            values_S.append(values)
        ctx.save_for_backward(*W_dec)
        ctx.segments, ctx.values_S, ctx.d_out = segments, values_S, d_out
        ctx.values_shape, ctx.values_dtype = values_E.shape, values_E.dtype
        return out

    @staticmethod
    def backward(ctx, grad_ND: Tensor):
        W_dec = ctx.saved_tensors
        need_values, need_W = ctx.needs_input_grad[0], ctx.needs_input_grad[5:]
        grad_W: list[Tensor | None] = [None] * len(W_dec)
        takes, grads = [], []
        for (layer, take, layout), values in zip(ctx.segments, ctx.values_S, strict=True):
            W = W_dec[layer].reshape(layout.d_sae, -1)
            grad_S, grad_W_l = sparse_decode_backward(
                grad_ND[:, layer * ctx.d_out :], values, W, layout, need_values, need_W[layer]
            )
            if grad_W_l is not None:
                grad_W[layer] = grad_W_l.to(W.dtype).view_as(W_dec[layer])
            if grad_S is not None:
                takes.append(take)
                grads.append(grad_S)
        grad_values = None
        if need_values:
            grad_values = grad_ND.new_zeros(ctx.values_shape, dtype=ctx.values_dtype)
            if takes:
                grad_values.index_copy_(0, torch.cat(takes), torch.cat(grads))
        return grad_values, None, None, None, None, *grad_W


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
    (reused when L = 1, where there is nothing to cut; its ``per_group``, TopK per layer, makes
    the cut sync-free: :func:`_segments`)."""
    n_layers = len(W_dec)
    d_sae, _, d_out = W_dec[0].shape
    if n_layers == 1:
        W = W_dec[0].view(d_sae, d_out)
        return sparse_decode(values_E, latent_E, token_E, W, n_tokens, layout)
    segments = _segments(latent_E, token_E, n_layers, d_sae, n_tokens, layout)
    dtype = torch.promote_types(values_E.dtype, W_dec[0].dtype)
    return _LayeredDecodeFn.apply(values_E, segments, n_tokens, d_out, dtype, *W_dec)
