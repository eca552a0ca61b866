"""`SAE`: parameters, encode, decode, forward, scale folding, save and load (config: sae_config).

Layout (docs/design.md): ``W_enc [M, d]``, ``b_enc [M]``, ``W_dec [M, d]``, ``b_dec [d]``; a
latent's encoder and decoder vectors are rows. The SAE works in a normalised space
``x_n = x / s`` (``s`` the dataset scale, E‖x_n‖² = d); ``save`` folds ``s`` into the weights so a
saved SAE takes raw activations. The activation module (``cfg.activation``) is the architecture:
it encodes; the SAE holds the shared parameters and decodes.

A transcoder (``cfg.d_out`` set) is the same class with a target y of its own width d_out and
its own scale s_y: ``W_dec [M, d_out]``, ``b_dec [d_out]``, optional ``W_skip [d_out, d_in]``,
ŷ_n = z W_dec + x_n W_skipᵀ + b_dec against y_n = y / s_y. Its encoder reads x_n uncentred
(b_dec lives in the target's space). An SAE is the case y = x, s_y = s, no skip.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from saekit.activations import make_activation
from saekit.core.atomic import recover_directory
from saekit.core.configs import to_dict
from saekit.core.encoding import EncoderView, Encoding, ForwardOutput, SparseCode, as_dense
from saekit.kernels.sparse import sparse_decode
from saekit.model import normalisation
from saekit.model.config import SAEConfig
from saekit.model.format import (
    CONFIG_FILE,
    CheckpointError,
    read_config,
    read_weights,
    write_dictionary,
)
from saekit.model.lista import encode_steps
from saekit.model.normalisation import Whitening, estimate_scale
from saekit.model.stats import check_activations, check_scale, geometric_median


@torch.no_grad()
def remove_parallel_rows_(W_MD: Tensor, G_MD: Tensor) -> None:
    """G −= (G·w / ‖w‖²) w for every row w of W (in place on G; a crosscoder's and a CLT's
    concatenated decoders call it too): two reductions and one in-place pass, no [M, d]
    temporary. The row coefficients in float32 at least: ‖w‖² of a small fp16 row underflows
    to 0."""
    work = torch.promote_types(W_MD.dtype, torch.float32)
    W_w, G_w = W_MD.to(work), G_MD.to(work)
    sq_norms_M = torch.linalg.vector_norm(W_w, dim=-1).square().clamp_min(1e-24)
    coef_M = torch.einsum("md,md->m", G_w, W_w) / sq_norms_M
    G_MD.addcmul_(W_MD, coef_M.to(G_MD.dtype).unsqueeze(-1), value=-1.0)


@torch.no_grad()
def normalize_rows_(W_MD: Tensor) -> None:
    """Every row of W to unit norm, in place."""
    W_MD /= W_MD.norm(dim=-1, keepdim=True).clamp_min(1e-12)


class SAE(nn.Module):
    """A sparse autoencoder: parameters and decode; the activation module encodes."""

    def __init__(self, cfg: SAEConfig, device: torch.device | str | None = None):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        d, M, d_out = cfg.d_in, cfg.d_sae, cfg.target_width
        dtype = getattr(torch, cfg.dtype)
        self.W_enc = nn.Parameter(torch.empty(M, d, dtype=dtype, device=device))
        self.b_enc = nn.Parameter(torch.zeros(M, dtype=dtype, device=device))
        self.W_dec = nn.Parameter(torch.empty(M, d_out, dtype=dtype, device=device))
        self.b_dec = nn.Parameter(torch.zeros(d_out, dtype=dtype, device=device))
        # Scale and the activation's thresholds stay at least fp32 whatever the parameter dtype.
        aux_dtype = torch.promote_types(dtype, torch.float32)
        self.register_buffer("scale", torch.ones((), dtype=aux_dtype, device=device))
        if cfg.transcoder:
            self.register_buffer("target_scale", torch.ones((), dtype=aux_dtype, device=device))
            # what the encoder subtracts from x_n: nothing (b_dec is in the target's space)
            self.register_buffer("no_center", torch.zeros(d, dtype=dtype), persistent=False)
        if cfg.skip:  # zero at the start: the dictionary alone explains y at first
            self.W_skip = nn.Parameter(torch.zeros(d_out, d, dtype=dtype, device=device))
        if cfg.whitening is not None:  # μ, M, M⁻¹ of x / s, estimated once, float64
            f64 = {"dtype": torch.float64, "device": device}
            self.register_buffer("whiten_mean", torch.zeros(d, **f64))
            self.register_buffer("whiten_matrix", torch.eye(d, **f64))
            self.register_buffer("unwhiten_matrix", torch.eye(d, **f64))
        self.activation = make_activation(cfg.activation, M).to(device=device, dtype=aux_dtype)
        if cfg.transcoder and not self.activation.uses_encoder_weights:
            raise ValueError(
                f"sae.activation.kind {cfg.activation.kind!r} encodes with its decoder (tied), so "
                "it cannot read one hook and predict another (d_out is set)"
            )
        if not self.activation.uses_encoder_bias:
            self.b_enc.requires_grad_(False)  # the activation owns its bias; b_enc stays 0
        if not self.activation.uses_encoder_weights:
            self.W_enc.requires_grad_(False)  # tied: the decoder rows encode
        self.reset_parameters()

    # ---------------------------------------------------------------- initialisation

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Tied initialisation: random unit decoder rows, W_enc = W_dec, zero biases (a
        transcoder whose widths differ: W_enc's unit rows drawn on their own; W_skip = 0)."""
        W = torch.randn(self.W_dec.shape, generator=generator, dtype=torch.float32)
        W /= W.norm(dim=-1, keepdim=True)
        self.W_dec.copy_(W)
        if self.W_enc.shape != W.shape:
            W = torch.randn(self.W_enc.shape, generator=generator, dtype=torch.float32)
            W /= W.norm(dim=-1, keepdim=True)
        self.W_enc.copy_(W)
        self.b_enc.zero_()
        self.b_dec.zero_()
        if self.cfg.skip:
            self.W_skip.zero_()

    @torch.no_grad()
    def init_from_data(
        self,
        x: Tensor,
        scale: float | None = None,
        method: str = "mean",
        target: Tensor | None = None,
    ) -> None:
        """Set the dataset scale s (estimated from ``x`` unless given) and b_dec from ``x``.

        ``method``: "mean" or "geometric_median" (Weiszfeld iterations) of x / s. A transcoder
        also takes ``target`` (y): its scale s_y is estimated from y and b_dec set from y / s_y.
        """
        check_activations(x, self.cfg.d_in)  # before the reshape, which hides a wrong width
        x = x.reshape(-1, self.cfg.d_in)
        x64 = x.double()
        if scale is None:
            scale = estimate_scale(x64)
        check_scale(scale)
        self.scale.fill_(scale)
        x_n = x64 / scale
        if self.cfg.whitening is not None:
            w = normalisation.estimate_whitening(x_n, self.cfg.whitening)
            for buffer, value in zip(self._whitening_buffers(), w, strict=True):
                buffer.copy_(value)
            x_n = normalisation.whiten(x_n, w)
        if self.cfg.transcoder:  # b_dec lives in the target's space, with its own scale
            if target is None:
                raise ValueError("a transcoder's init_from_data needs the target activations")
            check_activations(target, self.cfg.target_width, "d_out")
            y = target.reshape(-1, self.cfg.target_width)
            target_scale = estimate_scale(y)
            check_scale(target_scale)
            self.target_scale.fill_(target_scale)
            x_n = y.double() / target_scale
        if method == "mean":
            center = x_n.mean(0)
        elif method == "geometric_median":
            center = geometric_median(x_n)
        else:
            raise ValueError(
                f"b_dec init method must be 'mean' or 'geometric_median', got {method!r}"
            )
        self.b_dec.copy_(center.to(self.b_dec.dtype))

    # ---------------------------------------------------------------- forward

    @property
    def whitening(self) -> Whitening | None:
        """μ, M, M⁻¹ of the input whitening, or None."""
        return None if self.cfg.whitening is None else Whitening(*self._whitening_buffers())

    def _whitening_buffers(self) -> list[Tensor]:
        return [self.whiten_mean, self.whiten_matrix, self.unwhiten_matrix]

    def normalise(self, x: Tensor) -> Tensor:
        """Raw activations [..., d] -> [N, d] in the normalised space x / s (whitened if set)."""
        if x.shape[-1:] != (self.cfg.d_in,):
            check_activations(x, self.cfg.d_in)
        x_n = x.reshape(-1, self.cfg.d_in).to(self.W_enc.dtype) / self.scale
        w = self.whitening
        return x_n if w is None else normalisation.whiten(x_n, w)

    def denormalise(self, x_hat_n: Tensor) -> Tensor:
        """[N, d_out] normalised -> the target's space: s_y·ŷ_n (an SAE: s·x̂_n, or
        s·(x̂_n M⁻¹ + μ) when whitened)."""
        w = self.whitening
        return (x_hat_n if w is None else normalisation.unwhiten(x_hat_n, w)) * self.output_scale

    @property
    def output_scale(self) -> Tensor:
        """s_y, the target's scale: ``target_scale`` for a transcoder, ``scale`` for an SAE."""
        return self.target_scale if self.cfg.transcoder else self.scale

    @property
    def input_center(self) -> Tensor:
        """What the encoder subtracts from x_n: b_dec for an SAE, zeros for a transcoder."""
        return self.no_center if self.cfg.transcoder else self.b_dec

    def normalise_target(self, y: Tensor) -> Tensor:
        """Raw targets [..., d_out] -> [N, d_out] in the normalised space y / s_y."""
        width = self.cfg.target_width
        if y.shape[-1:] != (width,):
            check_activations(y, width, "d_out")
        return y.reshape(-1, width).to(self.W_dec.dtype) / self.output_scale

    def split_stream(self, batch: Tensor) -> tuple[Tensor, Tensor | None]:
        """A training batch -> (input, target): a transcoder's stream carries the input's d_in
        columns, then the target's d_out (one tensor, so buffers, caches and ranks move pairs
        as they move single activations); an SAE's is the input alone (target None)."""
        if batch.shape[-1] != self.cfg.stream_width:
            check_activations(batch, self.cfg.stream_width, "d_in + d_out")
        if not self.cfg.transcoder:
            return batch, None
        return batch[..., : self.cfg.d_in], batch[..., self.cfg.d_in :]

    def encoder_view(self) -> EncoderView:
        """What the activation sees of this SAE: W_enc, b_enc, the encoder's input centre,
        W_dec, b_dec and a skip transcoder's W_skip (the parameters themselves, not copies)."""
        W_skip = self.W_skip if self.cfg.skip else None
        return EncoderView(
            self.W_enc, self.b_enc, self.input_center, self.W_dec, self.b_dec, W_skip
        )

    def decoder_offset_n(self, x_n: Tensor) -> Tensor:
        """What the latents' sum is added to: b_dec, plus x_n W_skipᵀ [N, d_out] with a skip."""
        return self.encoder_view().decoder_offset_n(x_n)

    def pre_acts(self, x_n: Tensor) -> Tensor:
        """[N, d] normalised input -> [N, M] differentiable pre-activations (encoder_steps > 1:
        the last step's, saekit.model.lista)."""
        if self.cfg.encoder_steps > 1:
            return self.encode_n(x_n).preacts.dense()
        return self.activation.preacts(self.encoder_view(), x_n).dense()

    def encode_n(self, x_n: Tensor) -> Encoding:
        """[N, d] normalised input -> the encoding: the activation's encode, then
        ``cfg.encoder_steps`` − 1 LISTA steps (saekit.model.lista)."""
        steps = self.cfg.encoder_steps
        return encode_steps(self.activation, self.encoder_view(), x_n, steps, self.decode_n)

    def decode_n(self, latents: Tensor | SparseCode, x_n: Tensor | None = None) -> Tensor:
        """Latents -> [N, d_out] reconstruction in the normalised space (b_dec included; the
        skip path x_n W_skipᵀ too when ``x_n`` is given)."""
        offset = self.b_dec if x_n is None else self.decoder_offset_n(x_n)
        if isinstance(latents, SparseCode):
            return (
                sparse_decode(
                    latents.values,
                    latents.latent,
                    latents.token,
                    self.W_dec,
                    latents.n_tokens,
                    latents.layout,
                )
                + offset
            )
        return torch.addmm(offset, latents, self.W_dec)

    def forward(self, x: Tensor, target: Tensor | None = None) -> ForwardOutput:
        """Encode x [..., d_in] and predict the target [..., d_out] (an SAE: x itself; a
        transcoder: ``target`` if given, which the losses then read as ``target_n``)."""
        if not self.training:  # inference refuses NaN/inf input (training: the loss check)
            check_activations(x, self.cfg.d_in)
        lead = x.shape[:-1]
        x_n = self.normalise(x)
        encoding = self.encode_n(x_n)
        x_hat_n = self.decode_n(encoding.latents, x_n)
        x_hat = self.denormalise(x_hat_n).reshape(*lead, self.cfg.target_width)
        if self.cfg.transcoder:
            target_n = None if target is None else self.normalise_target(target)
        elif target is not None:
            raise ValueError("an SAE's target is its input: pass no target (or set d_out)")
        else:
            target_n = x_n
        return ForwardOutput(x_hat, encoding.latents, x_n, x_hat_n, encoding, target_n)

    def encode(self, x: Tensor) -> Tensor:
        """Raw activations [..., d] -> dense latents [..., M]."""
        check_activations(x, self.cfg.d_in)
        z = as_dense(self.encode_n(self.normalise(x)).latents)
        return z.reshape(*x.shape[:-1], self.cfg.d_sae)

    def decode(self, z: Tensor) -> Tensor:
        """Dense latents [..., M] -> z W_dec + b_dec [..., d_out] in the target's space (a skip
        transcoder's prediction adds x W_skipᵀ: use ``forward``)."""
        if z.shape[-1] != self.cfg.d_sae:
            raise ValueError(f"latents have width {z.shape[-1]}, but d_sae = {self.cfg.d_sae}")
        lead = z.shape[:-1]
        x_hat_n = self.decode_n(z.reshape(-1, self.cfg.d_sae).to(self.W_dec.dtype))
        return self.denormalise(x_hat_n).reshape(*lead, self.cfg.target_width)

    # ---------------------------------------------------------------- decoder norms

    @torch.no_grad()
    def remove_parallel_grad_(self) -> None:
        """Drop the component of each decoder row's gradient parallel to the row."""
        if self.W_dec.grad is None:
            return
        remove_parallel_rows_(self.W_dec.detach(), self.W_dec.grad)

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Renormalise decoder rows to unit norm."""
        normalize_rows_(self.W_dec)

    # ---------------------------------------------------------------- folding, save, load

    @torch.no_grad()
    def fold_scale_(self) -> None:
        """Fold the scales into the weights exactly: W_enc/s, s_y·W_dec, s_y·b_dec,
        (s_y/s)·W_skip; then s = s_y = 1 (an SAE: s_y = s). The pre-activations are unchanged,
        so b_enc and every threshold stay as they are. A whitened SAE folds into a copy
        (``folded_copy``): its config changes too."""
        if self.cfg.whitening is not None:
            raise ValueError("fold_scale_: a whitened SAE is folded by save(), into a copy")
        s, s_y = self.scale.to(self.W_enc.dtype), self.output_scale.to(self.W_enc.dtype)
        self.W_enc /= s
        self.W_dec *= s_y
        self.b_dec *= s_y
        if self.cfg.skip:
            self.W_skip *= s_y / s
        self.scale.fill_(1.0)
        self.output_scale.fill_(1.0)

    def folded_copy(self) -> SAE:
        """The SAE that takes raw activations: whitening folded first (normalisation.py), then
        s. Its config has no whitening; metadata records the one folded in."""
        w, cfg = self.whitening, self.cfg
        if float(self.scale) == 1.0 and float(self.output_scale) == 1.0 and w is None:
            return self
        if w is not None:
            folded = {"whitening_folded": to_dict(cfg.whitening)}
            cfg = dataclasses.replace(cfg, whitening=None, metadata={**cfg.metadata, **folded})
        copy = SAE(cfg, device="cpu")
        state = {k: v.cpu() for k, v in self.state_dict().items() if k in copy.state_dict()}
        copy.load_state_dict(state)
        if w is not None:
            w = Whitening(*(t.cpu() for t in w))
            weights = (copy.W_enc, copy.W_dec, copy.b_dec)
            for param, value in zip(
                weights, normalisation.fold_whitening(*weights, w), strict=True
            ):
                param.data.copy_(value)
        copy.fold_scale_()
        return copy

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``sae.safetensors`` and ``cfg.json`` into the directory ``path``.

        The scale (and whitening) is folded into the saved weights (:meth:`folded_copy`); this
        SAE is left unchanged. The directory is
        rebuilt beside the old one and swapped in (:func:`saekit.core.atomic.replace_directory`), so
        the two files always agree (cfg.json holds the weights' sha256); other files already in
        the directory (a run's metrics.jsonl, eval.json) are carried over.
        """
        path = Path(path)
        recover_directory(path)  # a save killed mid-swap left the old directory aside
        folded = self.folded_copy()
        return write_dictionary(path, folded.state_dict(), folded.cfg.to_dict())

    @classmethod
    def load(
        cls, path: str | os.PathLike, device: str | torch.device = "cpu", verify: bool = True
    ) -> SAE:
        """Load a checkpoint written by :meth:`save` (either format), in eval mode; refuse a
        mismatched one with a one-line CheckpointError."""
        path = Path(path)
        recover_directory(path)
        data = read_config(path, verify)
        kind = data.get("kind") if isinstance(data, dict) else None
        if isinstance(kind, str) and kind != "sae":  # a CLT or crosscoder: not an SAEConfig
            raise CheckpointError(
                f"checkpoint {path} holds a {kind!r}, not an SAE or transcoder: load it with"
                " saekit.model.dictionary.load_dictionary"
            )
        try:
            cfg = SAEConfig.from_dict(data)
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {path}: bad config in {CONFIG_FILE}: {exc}") from exc
        sae = cls(cfg, device="cpu")
        sae.load_state_dict(read_weights(path, data, sae))
        return sae.to(device).eval()
