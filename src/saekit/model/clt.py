"""`CrossLayerTranscoder` (CLT): one dictionary over L layers whose layer-l latents read layer l's
input and write into the targets of layer l and of every later layer (Ameisen et al. 2025,
"Circuit Tracing: Revealing Computational Graphs in Language Models", transformer-circuits.pub;
the CLTs circuit-tracer loads).

Layout (circuit-tracer's)::

    W_enc [L, M, d_in], b_enc [L, M]
    W_dec  ParameterList, W_dec[l] [M, L − l, d_out]: layer l's latents into targets l..L−1
    b_dec [L, d_out];  buffers scale [L], target_scale [L]

Latents are flat: latent j = l·M + i is latent i of layer l. The activation, its parameters
(JumpReLU's θ), the dead-latent counters and every code are over these L·M latents.

Per layer, the transcoder's normalised space: x_n^l = x^l / s_l, y_n^l = y^l / t_l, and

    pre^l = x_n^l W_enc[l]ᵀ + b_enc[l]                      (uncentred, as a transcoder's)
    z = σ(pre)  over all L·M latents                        (TopK: k per layer)
    ŷ_n^{l'} = Σ_{l ≤ l'} z^l W_dec[l][:, l' − l] + b_dec[l']
    loss = Σ_{l'} mean_n ‖y_n^{l'} − ŷ_n^{l'}‖²  + λ·penalty on |z_i|·‖latent i's concatenated
           decoders‖ (the paper's decoder-norm weighting)

A training batch is [x^0 | … | x^{L−1} | y^0 | … | y^{L−1}] (saekit.data.hook_columns), so
``split_stream`` cuts two column blocks, ``forward`` returns the concatenated target and
prediction [N, L·d_out] and the objective's reconstruction, mean_n ‖y_n − ŷ_n‖² over the
concatenation, is the sum over targets above. With L = 1 it is a transcoder (an SAE with d_out
and no skip) parameter for parameter, and takes the same operations. The kernels
(saekit.kernels.layered): L encoder GEMMs with the SAE's sparse backward, and a decode whose cost
is the active (latent, target) pairs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from saekit.activations import make_activation
from saekit.activations.base import ActivationConfig
from saekit.core.encoding import EncoderView, ForwardOutput, SparseCode, as_dense
from saekit.kernels.layered import LayerPreacts, layered_decode
from saekit.kernels.layout import CodeLayout
from saekit.model.config import (
    DictionaryConfig,
    check_dtype,
    check_hook_list,
    check_per_layer_activation,
    check_positive,
)
from saekit.model.format import FoldedSave
from saekit.model.normalisation import estimate_scale
from saekit.model.sae import normalize_rows_, remove_parallel_rows_
from saekit.model.stats import check_activations, check_scale, geometric_median


@dataclass
class CLTConfig(DictionaryConfig):
    """A cross-layer transcoder's architecture (``sae: {kind: clt, ...}``); saved in cfg.json."""

    KIND = "clt"
    prefixes_apply = False  # prefixes over flat L·M latents would drop whole later layers
    count_field, reads_targets = "n_layers", True  # filled from the data's hooks

    d_in: int
    """Width of each layer's input (every input hook has this width)."""
    d_sae: int
    """M: latents per layer (L·M in all)."""
    n_layers: int
    """L: layers, each with an input hook and a target hook."""
    activation: ActivationConfig
    """As an SAE's (saekit.activations): topk keeps k per token and layer; batchtopk keeps k·N
    of the batch's latents across all layers (k: per token, summed over layers); jumprelu,
    relu and abstopk act per latent."""
    d_out: int | None = None
    """Width of each target (default d_in)."""
    hooks: list[str] | None = None
    """The L input hooks, layer by layer (a model's MLP inputs; set from the data)."""
    target_hooks: list[str] | None = None
    """The L target hooks, layer by layer (the MLP outputs the splice replaces)."""
    model_name: str | None = None
    """Model the activations came from (informational)."""
    dtype: str = "float32"
    """Parameter dtype."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Free-form extra information carried in cfg.json."""
    kind: str = "clt"
    """Always ``clt`` (what cfg.json and a run config name this architecture by)."""

    def __post_init__(self) -> None:
        self.activation = ActivationConfig.parse(self.activation, "activation")
        if self.d_out is None:
            self.d_out = self.d_in
        self.validate()

    @property
    def n_latents(self) -> int:
        return self.n_layers * self.d_sae

    @property
    def target_width(self) -> int:
        """Width of the prediction: the L targets side by side, L·d_out."""
        return self.n_layers * self.d_out

    @property
    def stream_width(self) -> int:
        """Width of a training batch: L inputs, then L targets."""
        return self.n_layers * (self.d_in + self.d_out)

    transcoder = True
    whitening = None

    def validate(self) -> None:
        if self.kind != "clt":
            raise ValueError(f"kind must be 'clt' for a cross-layer transcoder, got {self.kind!r}")
        check_positive(self, ("d_in", "d_sae", "n_layers", "d_out"))
        check_hook_list(self, "hooks", self.n_layers, "one input per layer")
        check_hook_list(self, "target_hooks", self.n_layers, "one target per layer")
        self.activation.check_d_sae(self.d_sae)  # TopK's k is per layer
        check_per_layer_activation(self.activation, "a cross-layer transcoder")
        check_dtype(self.dtype)


class CrossLayerTranscoder(FoldedSave, nn.Module):
    """A cross-layer transcoder: parameters, forward, decoder norms, save and load (module doc).
    It presents an SAE's surface (split_stream, forward -> ForwardOutput, init_from_data,
    encoder_view, the decoder-row hooks, save/load), so training takes it as it takes an SAE."""

    config_class = CLTConfig
    scale_buffers = ("scale", "target_scale")

    def __init__(self, cfg: CLTConfig, device: torch.device | str | None = None):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        L, M, d_in, d_out = cfg.n_layers, cfg.d_sae, cfg.d_in, cfg.d_out
        dtype = getattr(torch, cfg.dtype)
        f = {"dtype": dtype, "device": device}
        self.W_enc = nn.Parameter(torch.empty(L, M, d_in, **f))
        self.b_enc = nn.Parameter(torch.zeros(L, M, **f))
        self.W_dec = nn.ParameterList(
            [nn.Parameter(torch.empty(M, L - layer, d_out, **f)) for layer in range(L)]
        )
        self.b_dec = nn.Parameter(torch.zeros(L, d_out, **f))
        aux_dtype = torch.promote_types(dtype, torch.float32)  # as the SAE's
        self.register_buffer("scale", torch.ones(L, dtype=aux_dtype, device=device))
        self.register_buffer("target_scale", torch.ones(L, dtype=aux_dtype, device=device))
        self.activation = make_activation(cfg.activation, L * M, groups=L).to(
            device=device, dtype=aux_dtype
        )
        self.reset_parameters()

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate=True):
        """In an SAE's order, W_enc, b_enc, W_dec.*, b_dec, the activation's (a submodule's
        parameters would come after b_dec): gradient clipping then sums the global norm in the
        transcoder's order, so a 1-layer CLT trains as one bit for bit."""
        named = list(super().named_parameters(prefix, recurse, remove_duplicate))
        rank = {"W_enc": 0, "b_enc": 1, "W_dec": 2, "b_dec": 3}
        head = len(prefix) + 1 if prefix else 0
        return iter(sorted(named, key=lambda item: rank.get(item[0][head:].split(".")[0], 4)))

    # ---------------------------------------------------------------- initialisation

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Each latent's concatenated decoders a random unit vector (drawn layer by layer);
        W_enc[l] the unit rows of layer l's own-layer decoder when d_in = d_out (the tied
        initialisation of an SAE), else drawn on their own; zero biases. L = 1: a transcoder's
        initialisation from the same generator, draw for draw."""
        M, d_in, d_out = self.cfg.d_sae, self.cfg.d_in, self.cfg.d_out
        for layer, W in enumerate(self.W_dec):
            raw = torch.randn(W.shape, generator=generator, dtype=torch.float32)
            rows = raw.view(M, -1)
            W.copy_((rows / rows.norm(dim=-1, keepdim=True)).view_as(raw))
            if d_in == d_out:
                own = raw[:, 0, :]
                self.W_enc[layer].copy_(own / own.norm(dim=-1, keepdim=True))
        if d_in != d_out:
            W = torch.randn(self.W_enc.shape, generator=generator, dtype=torch.float32)
            self.W_enc.copy_(W / W.norm(dim=-1, keepdim=True))
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
        """Per layer: s_l from x^l, t_l from y^l (saekit.model.normalisation.estimate_scale),
        b_dec[l] the mean (or geometric median) of y^l / t_l, as a transcoder's."""
        L, d_in, d_out = self.cfg.n_layers, self.cfg.d_in, self.cfg.d_out
        if scale is not None:
            raise ValueError("a cross-layer transcoder estimates one scale per layer: scale=None")
        if target is None:
            raise ValueError("a cross-layer transcoder's init_from_data needs the targets")
        if method not in ("mean", "geometric_median"):
            raise ValueError(
                f"b_dec init method must be 'mean' or 'geometric_median', got {method!r}"
            )
        check_activations(x, L * d_in, "n_layers·d_in")
        check_activations(target, L * d_out, "n_layers·d_out")
        x, y = x.reshape(-1, L * d_in), target.reshape(-1, L * d_out)
        for layer in range(L):
            s = estimate_scale(x[:, layer * d_in : (layer + 1) * d_in].double())
            check_scale(s)
            self.scale[layer] = s
            y_l = y[:, layer * d_out : (layer + 1) * d_out]
            t = estimate_scale(y_l)
            check_scale(t)
            self.target_scale[layer] = t
            y_n = y_l.double() / t
            center = y_n.mean(0) if method == "mean" else geometric_median(y_n)
            self.b_dec[layer] = center.to(self.b_dec.dtype)

    # ---------------------------------------------------------------- forward

    def _per_layer(self, x: Tensor, width: int, name: str, scale: Tensor, div: bool) -> Tensor:
        L = scale.numel()  # every layer, or one (encode_layer, LayerByLayer)
        if x.shape[-1:] != (L * width,):
            check_activations(x, L * width, name)
        dtype = self.W_enc.dtype
        x_NLD = x.reshape(-1, L, width).to(dtype)
        s = scale.view(L, 1)
        return (x_NLD / s if div else x_NLD * s).to(dtype).reshape(-1, L * width)

    def normalise(self, x: Tensor) -> Tensor:
        """Raw inputs [..., L·d_in] -> [N, L·d_in], layer l divided by s_l."""
        return self._per_layer(x, self.cfg.d_in, "n_layers·d_in", self.scale, True)

    def normalise_target(self, y: Tensor) -> Tensor:
        """Raw targets [..., L·d_out] -> [N, L·d_out], target l divided by t_l."""
        return self._per_layer(y, self.cfg.d_out, "n_layers·d_out", self.target_scale, True)

    def denormalise(self, x_hat_n: Tensor) -> Tensor:
        """[N, L·d_out] normalised -> the targets' space: target l times t_l."""
        return self._per_layer(x_hat_n, self.cfg.d_out, "n_layers·d_out", self.target_scale, False)

    def split_stream(self, batch: Tensor) -> tuple[Tensor, Tensor]:
        """A training batch [..., L·(d_in + d_out)] -> (inputs [..., L·d_in], targets)."""
        if batch.shape[-1] != self.cfg.stream_width:
            check_activations(batch, self.cfg.stream_width, "n_layers·(d_in + d_out)")
        cut = self.cfg.n_layers * self.cfg.d_in
        return batch[..., :cut], batch[..., cut:]

    def encoder_view(self) -> EncoderView:
        """W_enc as [L·M, d_in] rows, b_enc [L·M], no centre, b_dec [L·d_out]; no single W_dec
        (None): the penalty's norms and AuxK's decode are :meth:`decoder_norms` and
        :meth:`decode_code`."""
        L, M, d_in = self.cfg.n_layers, self.cfg.d_sae, self.cfg.d_in
        return EncoderView(
            self.W_enc.view(L * M, d_in),
            self.b_enc.view(L * M),
            self.b_enc.new_zeros(d_in),
            None,  # type: ignore[arg-type]
            self.b_dec.view(-1),
            None,
            decoder_norms_fn=self.decoder_norms,
            decode_code=self.decode_code,
        )

    def preacts(self, x_n: Tensor) -> LayerPreacts:
        """The L encoders' pre-activations [N, L·M] (saekit.kernels.layered), computed into
        this CLT's reused buffer where nothing holds the last one (saekit.kernels.workspace)."""
        return LayerPreacts(x_n, self.W_enc, self.b_enc, owner=self)

    def pre_acts(self, x_n: Tensor) -> Tensor:
        """[N, L·d_in] normalised inputs -> [N, L·M] differentiable pre-activations."""
        return self.preacts(x_n).dense()

    def decode_code(self, values_E: Tensor, layout: CodeLayout) -> Tensor:
        """A sparse code's Σ z W_dec into every target [N, L·d_out], no b_dec (AuxK's ê)."""
        W_dec = list(self.W_dec)
        return layered_decode(values_E, layout.latent, layout.token, W_dec, layout.n_tokens, layout)

    def decode_n(self, latents: Tensor | SparseCode) -> Tensor:
        """Latents [N, L·M] -> [N, L·d_out] in the normalised space, b_dec included."""
        return self._decode(latents, self.b_dec.view(-1))

    def latent_sum_n(self, latents: Tensor | SparseCode) -> Tensor:
        """Σ z W_dec into every target [N, L·d_out], WITHOUT b_dec: a latent-sharded part's
        share of the prediction (saekit.objective.sharded sums the parts')."""
        return self._decode(latents, None)

    def _decode(self, latents: Tensor | SparseCode, b_dec: Tensor | None) -> Tensor:
        L, M, d_out = self.cfg.n_layers, self.cfg.d_sae, self.cfg.d_out
        if isinstance(latents, SparseCode):
            c, W_dec = latents, list(self.W_dec)
            out = layered_decode(c.values, c.latent, c.token, W_dec, c.n_tokens, c.layout)
            return out if b_dec is None else out + b_dec
        # dense latents: layer 0 writes every target (with b_dec, one addmm, as a transcoder
        # does: a 1-layer CLT equals it bit for bit), later layers add into targets l..L−1
        z_0, W_0 = latents[:, :M], self.W_dec[0].view(M, -1)
        out = z_0 @ W_0 if b_dec is None else torch.addmm(b_dec, z_0, W_0)
        for layer in range(1, L):
            z_l = latents[:, layer * M : (layer + 1) * M]
            out[:, layer * d_out :] += z_l @ self.W_dec[layer].view(M, -1)
        return out

    def forward(self, x: Tensor, target: Tensor | None = None) -> ForwardOutput:
        """Encode the inputs [..., L·d_in] and predict the targets [..., L·d_out] (``target``
        given: the losses read it as ``target_n``)."""
        if not self.training:  # inference refuses NaN/inf input (training: the loss check)
            check_activations(x, self.cfg.n_layers * self.cfg.d_in, "n_layers·d_in")
        lead = x.shape[:-1]
        x_n = self.normalise(x)
        encoding = self.activation.encode_preacts(self.preacts(x_n))
        x_hat_n = self.decode_n(encoding.latents)
        x_hat = self.denormalise(x_hat_n).reshape(*lead, self.cfg.target_width)
        target_n = None if target is None else self.normalise_target(target)
        return ForwardOutput(x_hat, encoding.latents, x_n, x_hat_n, encoding, target_n)

    def encode(self, x: Tensor) -> Tensor:
        """Raw inputs [..., L·d_in] -> dense latents [..., L·M]."""
        check_activations(x, self.cfg.n_layers * self.cfg.d_in, "n_layers·d_in")
        enc = self.activation.encode_preacts(self.preacts(self.normalise(x)))
        return as_dense(enc.latents).reshape(*x.shape[:-1], self.cfg.n_latents)

    def decode(self, z: Tensor) -> Tensor:
        """Dense latents [..., L·M] -> the targets [..., L·d_out] (their space, with b_dec)."""
        if z.shape[-1] != self.cfg.n_latents:
            raise ValueError(
                f"latents have width {z.shape[-1]}, but n_layers·d_sae = {self.cfg.n_latents}"
            )
        x_hat_n = self.decode_n(z.reshape(-1, self.cfg.n_latents).to(self.b_dec.dtype))
        return self.denormalise(x_hat_n).reshape(*z.shape[:-1], self.cfg.target_width)

    # ------------------------------------------- one layer at a time (saekit.model.clt_layers)

    def check_layer(self, layer: int) -> None:
        """ValueError unless ``layer`` is one of this CLT's layers."""
        if not isinstance(layer, int) or not 0 <= layer < self.cfg.n_layers:
            raise ValueError(f"layer must be in [0, {self.cfg.n_layers}), got {layer!r}")

    def normalise_layer(self, layer: int, x: Tensor) -> Tensor:
        """Layer ``layer``'s raw input [n, d_in] -> x^l / s_l (as :meth:`normalise` does)."""
        self.check_layer(layer)
        return self._per_layer(x, self.cfg.d_in, "d_in", self.scale[layer : layer + 1], True)

    def denormalise_target(self, target: int, y_n: Tensor) -> Tensor:
        """Target ``target``'s normalised prediction [n, d_out] -> its units (times t_target)."""
        self.check_layer(target)
        scale = self.target_scale[target : target + 1]
        return self._per_layer(y_n, self.cfg.d_out, "d_out", scale, False)

    # ---------------------------------------------------------------- decoder norms

    def decoder_norms(self) -> Tensor:
        """[L·M]: each latent's concatenated decoders' norm ‖W_dec[l][i]‖ over its L − l
        targets, the penalty's weight (Ameisen et al. 2025); differentiable."""
        M = self.cfg.d_sae
        norms = [W.reshape(M, -1).norm(dim=-1) for W in self.W_dec]
        return norms[0] if len(norms) == 1 else torch.cat(norms)

    @torch.no_grad()
    def decoder_norms_by_target(self) -> Tensor:
        """[L·M, L]: ‖W_dec^{l→l'}_i‖ for latent l·M + i and target l'; 0 where l' < l (a
        latent never writes into an earlier layer)."""
        L, M = self.cfg.n_layers, self.cfg.d_sae
        out = self.b_dec.new_zeros(L * M, L)
        for layer, W in enumerate(self.W_dec):
            out[layer * M : (layer + 1) * M, layer:] = W.norm(dim=-1)
        return out

    @torch.no_grad()
    def remove_parallel_grad_(self) -> None:
        """Drop the component of each latent's concatenated-decoder gradient parallel to it."""
        M = self.cfg.d_sae
        for W in self.W_dec:
            if W.grad is None:
                continue
            if not W.grad.is_contiguous():
                W.grad = W.grad.contiguous()
            remove_parallel_rows_(W.detach().view(M, -1), W.grad.view(M, -1))

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Each latent's concatenated decoders to unit norm."""
        for W in self.W_dec:
            normalize_rows_(W.view(self.cfg.d_sae, -1))

    # ---------------------------------------------------------------- folding, save, load

    @torch.no_grad()
    def fold_scale_(self) -> None:
        """Fold the scales into the weights exactly: W_enc[l]/s_l, W_dec[l][:, j]·t_{l+j},
        b_dec[l]·t_l; then s = t = 1. Pre-activations (so thresholds) are unchanged."""
        L = self.cfg.n_layers
        s = self.scale.to(self.W_enc.dtype)
        t = self.target_scale.to(self.W_enc.dtype)
        self.W_enc /= s.view(L, 1, 1)
        for layer, W in enumerate(self.W_dec):
            W *= t[layer:].view(1, L - layer, 1)
        self.b_dec *= t.view(L, 1)
        self.scale.fill_(1.0)
        self.target_scale.fill_(1.0)
