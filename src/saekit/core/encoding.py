"""What an encoder produces: latents (dense or sparse) and the pre-activations losses need.

Every activation's ``encode`` returns an :class:`Encoding`. Losses never reach into a kernel:
they ask the encoding's :class:`Preacts` for what they need (a detached [N, M] matrix to select
from, a differentiable one, or differentiable values at chosen (token, latent) pairs), and the
activation decides how that is computed (dense autograd, or the sparse fast path of
:mod:`saekit.kernels`). :class:`ForwardOutput` is what ``SAE.forward`` returns around it.

This module imports nothing from saekit: kernels, activations and losses all build on it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor


def encoder_preacts(
    x_n_ND: Tensor,
    W_enc_MD: Tensor,
    b_enc_M: Tensor | None,
    b_dec_D: Tensor,
    out: Tensor | None = None,
):
    """pre = (x_n − b_dec) W_encᵀ + b_enc: the one home of the affine encoder ([N, M]).

    ``b_enc_M`` None: no encoder bias (ProLU owns its bias). Differentiable where its inputs are;
    the fast path calls it under ``torch.no_grad``, with ``out`` a buffer to write into.
    """
    x_c_ND = x_n_ND - b_dec_D
    if b_enc_M is None:
        return torch.mm(x_c_ND, W_enc_MD.T, out=out)
    return torch.addmm(b_enc_M, x_c_ND, W_enc_MD.T, out=out)


class EncoderView(NamedTuple):
    """What an activation sees of its SAE (``SAE.encoder_view``): the encoder and the decoder's
    parameters, never the SAE itself, so an activation cannot depend on how the SAE normalises
    (whitening and the dataset scale are applied before x_n reaches it) or what it predicts."""

    W_enc: Tensor
    """[M, d] encoder rows."""
    b_enc: Tensor
    """[M] encoder bias (stays 0 where the activation owns its bias)."""
    input_center: Tensor
    """[d] what the encoder subtracts from x_n: b_dec for an SAE, zeros for a transcoder (its
    b_dec lives in the target's space)."""
    W_dec: Tensor
    """[M, d_out] decoder rows."""
    b_dec: Tensor
    """[d_out] decoder bias."""
    W_skip: Tensor | None = None
    """[d_out, d] a skip transcoder's linear path, else None."""
    decoder_norms_fn: Callable[[], Tensor] | None = None
    """A dictionary whose penalty weight is not ‖W_dec,i‖ computes its own [M] (differentiable,
    on demand): a crosscoder's Σ_s ‖W_dec^s_i‖, a cross-layer transcoder's norm of a latent's
    concatenated decoders (saekit.model.crosscoder, saekit.model.clt). None: ‖W_dec,i‖."""
    decode_code: Callable[[Tensor, Any], Tensor] | None = None
    """A dictionary whose decoder is not one [M, d_out] matrix (a cross-layer transcoder, whose
    ``W_dec`` here is None) decodes a sparse code itself: (values [nnz], layout, a
    saekit.kernels.CodeLayout) -> [N, d_out], without b_dec. None: Σ values·W_dec[latent]."""

    def decoder_norms(self) -> Tensor:
        """[M] what the sparsity penalty weights each latent by: ‖W_dec,i‖ unless the
        dictionary says otherwise (``decoder_norms_fn``)."""
        if self.decoder_norms_fn is not None:
            return self.decoder_norms_fn()
        return self.W_dec.norm(dim=-1)

    def decoder_offset_n(self, x_n: Tensor) -> Tensor:
        """What the latents' sum is added to: b_dec, plus x_n W_skipᵀ [N, d_out] with a skip."""
        if self.W_skip is not None:
            return torch.addmm(self.b_dec, x_n, self.W_skip.T)
        return self.b_dec


class SparseCode(NamedTuple):
    """Latents in coordinate form, sorted by token. Entries may hold an exact 0 (a kept ReLU 0).

    The shape is fixed by the activation (N·k entries for TopK and BatchTopK), so building it needs
    no host sync.
    """

    values: Tensor
    """[nnz] latent activations (differentiable)."""
    latent: Tensor
    """[nnz] int64 latent index in [0, d_sae)."""
    token: Tensor
    """[nnz] int64 token index in [0, n_tokens), non-decreasing."""
    n_tokens: int
    """N, the number of tokens the code describes."""
    d_sae: int
    """M, the number of latents."""
    layout: Any = None
    """Optional :class:`saekit.kernels.CodeLayout` of this code, built by the encoder and reused
    by the decode (one argsort per code, not two)."""

    def to_dense(self) -> Tensor:
        """The dense latents [N, M]; differentiable with respect to ``values``."""
        dense_NM = self.values.new_zeros(self.n_tokens, self.d_sae)
        return dense_NM.index_put((self.token, self.latent), self.values, accumulate=True)


def as_dense(latents: Tensor | SparseCode) -> Tensor:
    """Dense [N, M] latents from either form."""
    return latents.to_dense() if isinstance(latents, SparseCode) else latents


class Preacts:
    """Pre-activations [N, M] computed with dense autograd (the reference path).

    ``detached``: for selections and thresholds. ``dense()``: differentiable [N, M].
    ``at(token, latent)``: differentiable values at coordinates of any (equal) shape.
    The fast path (:class:`saekit.kernels.SparsePreacts`) answers the same three questions
    with sparse backward passes.
    """

    def __init__(self, pre_NM: Tensor):
        self._pre_NM = pre_NM

    @property
    def detached(self) -> Tensor:
        return self._pre_NM.detach()

    def dense(self) -> Tensor:
        return self._pre_NM

    def at(self, token: Tensor, latent: Tensor) -> Tensor:
        return self._pre_NM[token, latent]

    def selected(self, values_E: Tensor, layout: Any) -> Tensor:
        """Differentiable values at the coordinates of ``layout`` (a CodeLayout), whose detached
        values ``values_E`` were already read off :attr:`detached`. Here: ``at``; the fast path
        attaches its sparse backward to the values it was given (no second read of pre)."""
        return self.at(layout.token, layout.latent)

    def encoder_inputs(self) -> EncoderInputs | None:
        """The affine encoder's inputs where a loss may recompute columns of pre itself (the
        fast path's), else None."""
        return None


class EncoderInputs(NamedTuple):
    """What pre = (x_n − center) W_encᵀ + b_enc was computed from (b_enc None: no bias)."""

    x_n_ND: Tensor
    input_center_D: Tensor
    W_enc_MD: Tensor
    b_enc_M: Tensor | None


class Encoding(NamedTuple):
    """What ``Activation.encode`` returns."""

    latents: Tensor | SparseCode
    """Dense [N, M] latents, or a SparseCode (TopK family)."""
    preacts: Preacts
    """The pre-activations the latents were selected from (normalised space)."""


class ForwardOutput(NamedTuple):
    """What ``SAE.forward`` returns. Tensors with a leading N are flattened over tokens."""

    x_hat: Tensor
    """Reconstruction (a transcoder's prediction) in the target's space, shape [..., d_out]."""
    latents: Tensor | SparseCode
    """Latents: dense [N, M] or a SparseCode (TopK family on the fast path)."""
    x_n: Tensor
    """[N, d] normalised input x / s."""
    x_hat_n: Tensor
    """[N, d] normalised reconstruction."""
    encoding: Encoding
    """The activation's encoding: latents and the pre-activations losses read."""
    target_n: Tensor | None = None
    """[N, d_out] normalised target y / s_y that x_hat_n predicts: x_n for an SAE; for a
    transcoder the target passed to ``forward`` (None without one)."""

    def target(self) -> Tensor:
        """What the dictionary predicts, normalised: x_n for an SAE, y_n for a transcoder."""
        if self.target_n is None:
            raise ValueError("a transcoder's loss needs its target: call sae(x, target)")
        return self.target_n

    @property
    def pre(self) -> Tensor:
        """[N, M] differentiable pre-activations (dense backward; AuxK uses
        ``encoding.preacts.at`` instead)."""
        return self.encoding.preacts.dense()
