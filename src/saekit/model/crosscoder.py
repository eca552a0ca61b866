"""`Crosscoder`: one latent space read from S sources and decoded into all S (Lindsey et al.
2024, "Sparse Crosscoders for Cross-Layer Features and Model Diffing", transformer-circuits.pub;
acausal). Sources are hooks of one model (layers), or the same hook of several models on the
same tokens (model diffing).

Layout::

    W_enc [S, M, d], b_enc [M], W_dec [S, M, d], b_dec [S, d];  buffer scale [S]

Each source has its own normalised space x_n^s = x^s / s_s (its own dataset scale), and

    pre = Σ_s (x_n^s − b_dec^s) W_enc^sᵀ + b_enc           (centred, as an SAE's)
    z = σ(pre);   x̂_n^s = z W_dec^s + b_dec^s  for every s
    loss = Σ_s mean_n ‖x_n^s − x̂_n^s‖² + λ·penalty on |z_i|·Σ_s ‖W_dec^s_i‖ (Lindsey et al.:
           the sum of the per-source decoder norms, not the norm of their concatenation)

That is an SAE on the concatenation x_n = [x_n^0 | … | x_n^{S−1}] with W_enc and W_dec read as
[M, S·d] (``encoder_view``: a view when S = 1, a copy otherwise) whose penalty weight is
Σ_s ‖W_dec^s_i‖: every activation, revival and Matryoshka prefix applies unchanged, and with
S = 1 it is the SAE, operation for operation. Unit-norm decoders (the TopK family) keep each
latent's concatenated decoder at unit norm. ``decoder_norms_by_target`` [M, S] gives each
latent's decoder norm per source: shared latents have comparable norms, source-specific ones
a norm near 0 elsewhere (the model-diffing ratios).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from saekit.activations import make_activation
from saekit.activations.base import ActivationConfig
from saekit.core.encoding import EncoderView, ForwardOutput, SparseCode, as_dense
from saekit.kernels.sparse import sparse_decode
from saekit.model.config import DictionaryConfig, check_dtype, check_hook_list, check_positive
from saekit.model.format import FoldedSave
from saekit.model.normalisation import estimate_scale
from saekit.model.sae import normalize_rows_, remove_parallel_rows_
from saekit.model.stats import check_activations, check_scale, geometric_median


@dataclass
class CrosscoderConfig(DictionaryConfig):
    """A crosscoder's architecture (``sae: {kind: crosscoder, ...}``); saved in cfg.json."""

    KIND = "crosscoder"
    count_field, reads_targets = "n_sources", False  # filled from the data's hooks

    d_in: int
    """d: width of each source (every source hook has this width)."""
    d_sae: int
    """M: number of latents (shared by all sources)."""
    n_sources: int
    """S: sources read and decoded into."""
    activation: ActivationConfig
    """As an SAE's (saekit.activations)."""
    hooks: list[str] | None = None
    """The S source hooks (set from the data)."""
    model_name: str | None = None
    """Model the activations came from (informational)."""
    dtype: str = "float32"
    """Parameter dtype."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Free-form extra information carried in cfg.json."""
    kind: str = "crosscoder"
    """Always ``crosscoder``."""

    def __post_init__(self) -> None:
        self.activation = ActivationConfig.parse(self.activation, "activation")
        self.validate()

    @property
    def n_latents(self) -> int:
        return self.d_sae

    @property
    def target_width(self) -> int:
        """Width of the reconstruction: the S sources side by side, S·d."""
        return self.n_sources * self.d_in

    @property
    def stream_width(self) -> int:
        return self.n_sources * self.d_in

    transcoder = False
    whitening = None

    def validate(self) -> None:
        if self.kind != "crosscoder":
            raise ValueError(f"kind must be 'crosscoder' for a crosscoder, got {self.kind!r}")
        check_positive(self, ("d_in", "d_sae", "n_sources"))
        check_hook_list(self, "hooks", self.n_sources, "one per source")
        self.activation.check_d_sae(self.d_sae)
        check_dtype(self.dtype)


class Crosscoder(FoldedSave, nn.Module):
    """A crosscoder: parameters, forward, decoder norms, save and load (module doc); an SAE's
    surface, so training takes it as it takes an SAE."""

    config_class = CrosscoderConfig
    scale_buffers = ("scale",)

    def __init__(self, cfg: CrosscoderConfig, device: torch.device | str | None = None):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        S, M, d = cfg.n_sources, cfg.d_sae, cfg.d_in
        dtype = getattr(torch, cfg.dtype)
        f = {"dtype": dtype, "device": device}
        self.W_enc = nn.Parameter(torch.empty(S, M, d, **f))
        self.b_enc = nn.Parameter(torch.zeros(M, **f))
        self.W_dec = nn.Parameter(torch.empty(S, M, d, **f))
        self.b_dec = nn.Parameter(torch.zeros(S, d, **f))
        aux_dtype = torch.promote_types(dtype, torch.float32)
        self.register_buffer("scale", torch.ones(S, dtype=aux_dtype, device=device))
        self.activation = make_activation(cfg.activation, M).to(device=device, dtype=aux_dtype)
        if not self.activation.uses_encoder_bias:
            self.b_enc.requires_grad_(False)  # the activation owns its bias (as an SAE's)
        if not self.activation.uses_encoder_weights:
            self.W_enc.requires_grad_(False)  # tied: the decoder rows encode
        self.reset_parameters()

    # ---------------------------------------------------------------- the concatenation

    def _rows(self, W_SMD: Tensor) -> Tensor:
        """[S, M, d] -> each latent's concatenated rows [M, S·d] (a view when S = 1)."""
        S, M, d = W_SMD.shape
        return W_SMD.permute(1, 0, 2).reshape(M, S * d)

    def _set_rows_(self, W_SMD: Tensor, rows_MD: Tensor) -> None:
        """Write concatenated rows back into [S, M, d] (nothing to do when they are a view)."""
        if rows_MD.data_ptr() != W_SMD.data_ptr():
            S, M, d = W_SMD.shape
            W_SMD.copy_(rows_MD.view(M, S, d).permute(1, 0, 2))

    # ---------------------------------------------------------------- initialisation

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """An SAE's on the concatenation: random unit concatenated decoder rows, W_enc = W_dec,
        zero biases (S = 1: the SAE's draw)."""
        S, M, d = self.W_dec.shape
        W = torch.randn(M, S * d, generator=generator, dtype=torch.float32)
        W /= W.norm(dim=-1, keepdim=True)
        self._set_rows_(self.W_dec, W)
        self._set_rows_(self.W_enc, W)
        self.b_enc.zero_()
        self.b_dec.zero_()

    @torch.no_grad()
    def init_from_data(
        self,
        x: Tensor,
        scale: float | None = None,
        method: str = "mean",
        target: Tensor | None = None,
    ) -> None:
        """Per source: its scale s_s (saekit.model.normalisation.estimate_scale) and b_dec^s
        the mean (or geometric median) of x^s / s_s."""
        S, d = self.cfg.n_sources, self.cfg.d_in
        if scale is not None:
            raise ValueError("a crosscoder estimates one scale per source: scale=None")
        if target is not None:
            raise ValueError("a crosscoder's target is its input: pass no target")
        if method not in ("mean", "geometric_median"):
            raise ValueError(
                f"b_dec init method must be 'mean' or 'geometric_median', got {method!r}"
            )
        check_activations(x, S * d, "n_sources·d_in")
        x = x.reshape(-1, S * d)
        for s in range(S):
            x64 = x[:, s * d : (s + 1) * d].double()
            value = estimate_scale(x64)
            check_scale(value)
            self.scale[s] = value
            x_n = x64 / value
            center = x_n.mean(0) if method == "mean" else geometric_median(x_n)
            self.b_dec[s] = center.to(self.b_dec.dtype)

    # ---------------------------------------------------------------- forward

    def _scaled(self, x: Tensor, div: bool) -> Tensor:
        S, d = self.cfg.n_sources, self.cfg.d_in
        if x.shape[-1:] != (S * d,):
            check_activations(x, S * d, "n_sources·d_in")
        dtype = self.W_enc.dtype
        x_NSD = x.reshape(-1, S, d).to(dtype)
        s = self.scale.view(S, 1)
        return (x_NSD / s if div else x_NSD * s).to(dtype).reshape(-1, S * d)

    def normalise(self, x: Tensor) -> Tensor:
        """Raw sources [..., S·d] -> [N, S·d], source s divided by its scale."""
        return self._scaled(x, True)

    def denormalise(self, x_hat_n: Tensor) -> Tensor:
        return self._scaled(x_hat_n, False)

    def split_stream(self, batch: Tensor) -> tuple[Tensor, None]:
        """A training batch is the S sources side by side; the target is the input."""
        if batch.shape[-1] != self.cfg.stream_width:
            check_activations(batch, self.cfg.stream_width, "n_sources·d_in")
        return batch, None

    def encoder_view(self) -> EncoderView:
        """The SAE on the concatenation (module doc): W_enc, W_dec as [M, S·d], centre and b_dec
        as [S·d], and the penalty's weight Σ_s ‖W_dec^s_i‖."""
        b_dec = self.b_dec.view(-1)
        return EncoderView(
            self._rows(self.W_enc),
            self.b_enc,
            b_dec,
            self._rows(self.W_dec),
            b_dec,
            None,
            decoder_norms_fn=self.decoder_norms,
        )

    def pre_acts(self, x_n: Tensor) -> Tensor:
        """[N, S·d] normalised sources -> [N, M] differentiable pre-activations."""
        return self.activation.preacts(self.encoder_view(), x_n).dense()

    def decode_n(self, latents: Tensor | SparseCode, view: EncoderView | None = None) -> Tensor:
        """Latents -> [N, S·d], every source's reconstruction, b_dec included."""
        view = self.encoder_view() if view is None else view
        if isinstance(latents, SparseCode):
            code = latents
            out = sparse_decode(
                code.values, code.latent, code.token, view.W_dec, code.n_tokens, code.layout
            )
            return out + view.b_dec
        return torch.addmm(view.b_dec, latents, view.W_dec)

    def forward(self, x: Tensor, target: Tensor | None = None) -> ForwardOutput:
        """Encode the sources [..., S·d] and reconstruct all of them."""
        if target is not None:
            raise ValueError("a crosscoder's target is its input: pass no target")
        if not self.training:
            check_activations(x, self.cfg.stream_width, "n_sources·d_in")
        lead = x.shape[:-1]
        x_n = self.normalise(x)
        view = self.encoder_view()
        encoding = self.activation.encode(view, x_n)
        x_hat_n = self.decode_n(encoding.latents, view)
        x_hat = self.denormalise(x_hat_n).reshape(*lead, self.cfg.target_width)
        return ForwardOutput(x_hat, encoding.latents, x_n, x_hat_n, encoding, x_n)

    def encode(self, x: Tensor) -> Tensor:
        """Raw sources [..., S·d] -> dense latents [..., M]."""
        check_activations(x, self.cfg.stream_width, "n_sources·d_in")
        enc = self.activation.encode(self.encoder_view(), self.normalise(x))
        return as_dense(enc.latents).reshape(*x.shape[:-1], self.cfg.d_sae)

    def decode(self, z: Tensor) -> Tensor:
        """Dense latents [..., M] -> the sources [..., S·d] in their space."""
        if z.shape[-1] != self.cfg.d_sae:
            raise ValueError(f"latents have width {z.shape[-1]}, but d_sae = {self.cfg.d_sae}")
        x_hat_n = self.decode_n(z.reshape(-1, self.cfg.d_sae).to(self.W_dec.dtype))
        return self.denormalise(x_hat_n).reshape(*z.shape[:-1], self.cfg.target_width)

    # ---------------------------------------------------------------- decoder norms

    def decoder_norms(self) -> Tensor:
        """[M]: Σ_s ‖W_dec^s_i‖, the penalty's weight (Lindsey et al. 2024); differentiable."""
        return self.W_dec.norm(dim=-1).sum(0)

    @torch.no_grad()
    def decoder_norms_by_target(self) -> Tensor:
        """[M, S]: ‖W_dec^s_i‖ per latent and source."""
        return self.W_dec.norm(dim=-1).T.contiguous()

    @torch.no_grad()
    def remove_parallel_grad_(self) -> None:
        """Drop the component of each latent's concatenated-decoder gradient parallel to it."""
        if self.W_dec.grad is None:
            return
        G = self.W_dec.grad
        rows_G = self._rows(G)
        remove_parallel_rows_(self._rows(self.W_dec.detach()), rows_G)
        self._set_rows_(G, rows_G)

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Each latent's concatenated decoder to unit norm."""
        rows = self._rows(self.W_dec.data)
        normalize_rows_(rows)
        self._set_rows_(self.W_dec.data, rows)

    # ---------------------------------------------------------------- folding, save, load

    @torch.no_grad()
    def fold_scale_(self) -> None:
        """W_enc^s / s_s, s_s·W_dec^s, s_s·b_dec^s; then every scale 1. Pre-activations are
        unchanged (Σ_s (x^s − s_s b_dec^s)(W_enc^s / s_s)ᵀ), so thresholds stay."""
        S = self.cfg.n_sources
        s = self.scale.to(self.W_enc.dtype)
        self.W_enc /= s.view(S, 1, 1)
        self.W_dec *= s.view(S, 1, 1)
        self.b_dec *= s.view(S, 1)
        self.scale.fill_(1.0)
