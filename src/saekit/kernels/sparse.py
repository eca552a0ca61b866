"""Sparse fast paths for the TopK family, each with a plain reference beside it.

After the one dense encoder matmul, everything in a TopK step is O(nnz·d) (nnz = N·k):

- decode ``x̂[n] = Σ_{e: token_e = n} v_e · W_dec[latent_e]`` and its backward;
- the encoder backward: ``v_e = x_c[token_e]·W_enc[latent_e] + b_enc[latent_e]`` is computed
  once by the dense matmul WITHOUT autograd; the gradient ``g_e`` reaches W_enc, b_enc and the
  input through sparse products only, never through a dense [N, M] gradient.

No [N, M] gradient and no [nnz, d] buffer is built: every product is a bag sum or a row dot
(:mod:`saekit.kernels.primitives`). Bags by latent need the entries sorted by latent;
:class:`~saekit.kernels.layout.CodeLayout` builds that permutation once per code and shares it
between the decode and the encoder backward. Nothing here syncs with the host (no ``.item()``,
no boolean indexing), so a step can be captured in a CUDA graph.

:class:`SparsePreacts` is what a fast-path activation hands the losses: the detached [N, M]
pre-activations plus the encoder's sparse backward at any coordinates (AuxK) and, as a safety
net, a dense backward for losses that differentiate the whole matrix.
"""

from __future__ import annotations

import torch
from torch import Tensor

from saekit.core.encoding import EncoderInputs, Preacts, encoder_preacts
from saekit.kernels.layout import CodeLayout
from saekit.kernels.primitives import bag_sum, row_dot

# --------------------------------------------------------------------------------------------
# Sparse decode


class _SparseDecodeFn(torch.autograd.Function):
    """out = Σ_e v_e W_dec[latent_e] by token. grad v_e = g[token_e]·W_dec[latent_e];
    dW_dec[m] = Σ_{e: latent_e = m} v_e · g[token_e] (bags by latent)."""

    @staticmethod
    def forward(ctx, values_E: Tensor, W_dec_MD: Tensor, layout: CodeLayout) -> Tensor:
        ctx.save_for_backward(values_E, W_dec_MD)
        ctx.layout = layout
        return bag_sum(values_E, layout.latent, layout.token_offsets, W_dec_MD, layout.backend)

    @staticmethod
    def backward(ctx, grad_ND: Tensor):
        values_E, W_dec_MD = ctx.saved_tensors
        grad_values, grad_W = sparse_decode_backward(
            grad_ND, values_E, W_dec_MD, ctx.layout, *ctx.needs_input_grad[:2]
        )
        return grad_values, grad_W, None


def sparse_decode_backward(
    grad_ND: Tensor,
    values_E: Tensor,
    W_dec_MD: Tensor,
    layout: CodeLayout,
    need_values: bool = True,
    need_W: bool = True,
) -> tuple[Tensor | None, Tensor | None]:
    """The sparse decode's gradients (grad values_E, grad W_dec) from the output's ``grad_ND``:
    a row dot and a bag sum by latent (class above; saekit.kernels.layered runs it per layer)."""
    grad_ND = grad_ND.contiguous()
    grad_values = grad_W = None
    if need_values:
        grad_values = row_dot(
            grad_ND, W_dec_MD, layout.token, layout.latent, layout.token_offsets, layout.backend
        ).to(values_E.dtype)
    if need_W:
        order, token_by_latent, latent_offsets = layout.by_latent()
        grad_W = bag_sum(
            values_E.index_select(0, order),
            token_by_latent,
            latent_offsets,
            grad_ND,
            layout.backend,
        )
    return grad_values, grad_W


def sparse_decode(
    values_E: Tensor,
    latent_E: Tensor,
    token_E: Tensor,
    W_dec_MD: Tensor,
    n_tokens: int,
    layout: CodeLayout | None = None,
) -> Tensor:
    """[N, d] = Σ values·W_dec[latent] scattered by token (no b_dec). Token non-decreasing."""
    if layout is None:
        layout = CodeLayout(token_E, latent_E, n_tokens, W_dec_MD.shape[0])
    return _SparseDecodeFn.apply(values_E, W_dec_MD, layout)


def sparse_decode_reference(
    values_E: Tensor, latent_E: Tensor, token_E: Tensor, W_dec_MD: Tensor, n_tokens: int
) -> Tensor:
    """Plain torch: gather [nnz, d] rows, scale, index_add by token."""
    rows_ED = values_E.unsqueeze(1) * W_dec_MD[latent_E]
    out_ND = W_dec_MD.new_zeros(n_tokens, W_dec_MD.shape[1])
    return out_ND.index_add(0, token_E, rows_ED)


# --------------------------------------------------------------------------------------------
# Sparse encoder backward


class _PreactsFn(torch.autograd.Function):
    """Attaches the encoder's gradient to pre-activations already computed at (token, latent).

    v_e = (x_in − b_dec)[token_e]·W_enc[latent_e] + b_enc[latent_e]; with g_e its gradient:
    db_enc[m] = Σ_{latent_e = m} g_e; dW_enc[m] = Σ_{latent_e = m} g_e·x_c[token_e] (bags by
    latent); dx_in[n] = Σ_{token_e = n} g_e·W_enc[latent_e] (bags by token, only if asked);
    db_dec = −Σ_n dx_c[n] = −db_enc·W_enc (an [M]·[M, d] product: no [N, d] pass needed).
    """

    @staticmethod
    def forward(ctx, values_E, x_in_ND, b_dec_D, W_enc_MD, b_enc_M, layout):
        ctx.save_for_backward(x_in_ND, b_dec_D, W_enc_MD)
        ctx.has_b_dec = b_dec_D is not None
        ctx.b_enc_shape = None if b_enc_M is None else b_enc_M.shape
        ctx.layout = layout
        return values_E.clone()

    @staticmethod
    def backward(ctx, grad_E: Tensor):
        x_in_ND, b_dec_D, W_enc_MD = ctx.saved_tensors
        layout: CodeLayout = ctx.layout
        need_x, need_b_dec, need_W, need_b_enc = ctx.needs_input_grad[1:5]
        grad_E = grad_E.to(W_enc_MD.dtype)
        grad_x = grad_b_dec = grad_W = grad_b_enc = None
        if need_b_enc or need_b_dec:
            db_enc_M = W_enc_MD.new_zeros(layout.d_sae).index_add_(0, layout.latent, grad_E)
            grad_b_enc = db_enc_M if need_b_enc else None
            if need_b_dec:
                grad_b_dec = -(db_enc_M @ W_enc_MD)
        if need_W:
            order, token_by_latent, latent_offsets = layout.by_latent()
            x_c_ND = x_in_ND - b_dec_D if ctx.has_b_dec else x_in_ND
            grad_W = bag_sum(
                grad_E.index_select(0, order),
                token_by_latent,
                latent_offsets,
                x_c_ND.detach(),
                layout.backend,
            )
        if need_x:
            grad_x = bag_sum(grad_E, layout.latent, layout.token_offsets, W_enc_MD, layout.backend)
        return None, grad_x, grad_b_dec, grad_W, grad_b_enc, None


def attach_encoder_grad(
    values_E: Tensor,
    x_in_ND: Tensor,
    center_D: Tensor | None,
    W_enc_MD: Tensor,
    b_enc_M: Tensor | None,
    layout: CodeLayout,
) -> Tensor:
    """Values v_e = (x_in − center)[token_e]·W_enc[latent_e] + b_enc[latent_e] already computed
    (detached), made differentiable with the encoder's sparse backward (``center`` None: no
    centring; the layout's tokens index the rows of ``x_in``)."""
    return _PreactsFn.apply(values_E.detach(), x_in_ND, center_D, W_enc_MD, b_enc_M, layout)


class _DensePreFn(torch.autograd.Function):
    """The detached pre, made differentiable the dense way (a safety net, not the fast path).

    Costs nothing unless a loss differentiates through the whole [N, M] pre (e.g. the "preact"
    revival loss); then it is the reference's dense backward,
    so such a loss stays correct instead of silently losing its encoder gradient.
    """

    @staticmethod
    def forward(ctx, pre_NM, x_n_ND, b_dec_D, W_enc_MD, b_enc_M):
        ctx.save_for_backward(x_n_ND, b_dec_D, W_enc_MD)
        ctx.has_b_enc = b_enc_M is not None
        return pre_NM.view_as(pre_NM)  # an alias: no [N, M] copy

    @staticmethod
    def backward(ctx, grad_NM: Tensor):
        x_n_ND, b_dec_D, W_enc_MD = ctx.saved_tensors
        need_x, need_b_dec, need_W, need_b_enc = ctx.needs_input_grad[1:5]
        grad_NM = grad_NM.to(W_enc_MD.dtype)
        grad_x = grad_b_dec = grad_W = grad_b_enc = None
        if need_W:
            grad_W = grad_NM.T @ (x_n_ND - b_dec_D)  # [M, d]
        if need_b_enc and ctx.has_b_enc:
            grad_b_enc = grad_NM.sum(0)
        if need_x or need_b_dec:
            grad_x_c = grad_NM @ W_enc_MD  # [N, d]
            grad_x = grad_x_c if need_x else None
            grad_b_dec = -grad_x_c.sum(0) if need_b_dec else None
        return None, grad_x, grad_b_dec, grad_W, grad_b_enc


class SparsePreacts(Preacts):
    """Pre-activations from one encoder matmul run WITHOUT autograd, with sparse backwards.

    ``at(token, latent)`` gathers values from the detached matrix and attaches the encoder's
    sparse backward (:class:`_PreactsFn`); ``dense()`` attaches the dense backward
    (:class:`_DensePreFn`: only a loss that differentiates all of [N, M] pays for it). ``out``:
    a free [N, M] buffer to compute pre into (:mod:`saekit.kernels.workspace`).
    """

    def __init__(
        self,
        x_n_ND: Tensor,
        W_enc_MD: Tensor,
        b_enc_M: Tensor | None,
        b_dec_D: Tensor,
        out: Tensor | None = None,
    ):
        with torch.no_grad():
            pre_NM = encoder_preacts(x_n_ND, W_enc_MD, b_enc_M, b_dec_D, out=out)
        super().__init__(pre_NM)
        self.x_n_ND, self.W_enc_MD, self.b_enc_M, self.b_dec_D = x_n_ND, W_enc_MD, b_enc_M, b_dec_D

    def dense(self) -> Tensor:
        return _DensePreFn.apply(
            self._pre_NM, self.x_n_ND, self.b_dec_D, self.W_enc_MD, self.b_enc_M
        )

    def attach(self, values_E: Tensor, layout: CodeLayout) -> Tensor:
        """Values already read off the detached matrix, made differentiable (sparse backward)."""
        if not torch.is_grad_enabled():
            return values_E
        return attach_encoder_grad(
            values_E, self.x_n_ND, self.b_dec_D, self.W_enc_MD, self.b_enc_M, layout
        )

    def selected(self, values_E: Tensor, layout: CodeLayout) -> Tensor:
        return self.attach(values_E, layout)

    def encoder_inputs(self) -> EncoderInputs:
        return EncoderInputs(self.x_n_ND, self.b_dec_D, self.W_enc_MD, self.b_enc_M)

    def at(self, token: Tensor, latent: Tensor, layout: CodeLayout | None = None) -> Tensor:
        """Coordinates of any shape, token non-decreasing in row-major order."""
        shape = latent.shape
        token_E, latent_E = token.reshape(-1), latent.reshape(-1)
        n_tokens, d_sae = self._pre_NM.shape
        if layout is None:
            layout = CodeLayout(token_E, latent_E, n_tokens, d_sae)
        values_E = self._pre_NM.reshape(-1)[token_E * d_sae + latent_E]
        return self.attach(values_E, layout).reshape(shape)
