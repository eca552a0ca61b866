"""LISTA-style encoder steps: the SAE's one-step encoder refined by learned ISTA steps.

``sae.encoder_steps: n`` (default 1, the one-step encoder). With c_0 = 0 and the SAE's own
reconstruction x̂(c) = c W_dec + b_dec, in the normalised space x_n (docs/design.md, "Forward"):

    c_{t+1} = σ( c_t + (x_n − x̂(c_t)) W_encᵀ + b_enc ),   t = 0 .. n−1

Step 1 (x̂(0) = b_dec) is today's encoder σ((x_n − b_dec) W_encᵀ + b_enc), computed by the
activation's own ``encode`` (its fast path included). Each further step is one proximal-gradient
(ISTA) step on ½‖x_n − x̂(c)‖² whose gradient map is the learned W_enc instead of W_decᵀ (untied,
hence LISTA: Gregor & LeCun 2010, "Learning Fast Approximations of Sparse Coding", ICML; ISTA:
Daubechies, Defrise & De Mol 2004), with the activation σ as the proximal operator and b_enc as
its (learned) shift. Gradients flow through every step. The code is the last step's; the
encoding's pre-activations are the last step's too (what the last σ read), so the losses that
read them (AuxK, pre-activation revival, a JumpReLU's L0 step) see the code they explain.

The activation is applied as it is at each step: TopK keeps k per token, BatchTopK the k·N largest
of the batch in training (each step's own batch-level selection) and ``pre·1[pre > θ]`` outside
it, with ONE θ at every step; its EMA reads the last step's code (``after_step``), so θ is the
last step's smallest kept value. Calibration (saekit.eval.calibrate) sorts the last step's
pre-activations, computed with the intermediate steps at the SAE's θ at the time: exact for the
last step given those, approximate when the calibrated θ then replaces it at every step.

Cost: steps ≥ 2 compute their [N, M] pre-activations with dense autograd (one decode, one
encoder matmul and its dense backward each); step 1 keeps the activation's fast path.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from saekit.activations.base import Activation
from saekit.core.encoding import (
    EncoderView,
    Encoding,
    Preacts,
    SparseCode,
    as_dense,
    encoder_preacts,
)


def encode_steps(
    activation: Activation,
    view: EncoderView,
    x_n_ND: Tensor,
    steps: int,
    reconstruct: Callable[[Tensor | SparseCode], Tensor],
) -> Encoding:
    """The ``steps``-step encoder of x_n [N, d] (module docstring); ``reconstruct``: c ->
    x̂(c) = c W_dec + b_dec [N, d] (``SAE.decode_n``). steps = 1: ``activation.encode``."""
    enc = activation.encode(view, x_n_ND)
    for _ in range(steps - 1):
        c = enc.latents
        # the encoder's input centred on the current reconstruction x̂(c_t) instead of on b_dec
        # (= x̂(0)): (x_n − x̂(c_t)) W_encᵀ + b_enc, the one home of the affine encoder
        pre_NM = as_dense(c) + encoder_preacts(x_n_ND, view.W_enc, view.b_enc, reconstruct(c))
        enc = activation.encode_preacts(Preacts(pre_NM))
    return enc
