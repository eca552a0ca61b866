"""`SAEConfig` and `SAE`: parameters, encode, decode, forward, scale folding, save and load.

Layout (docs/design.md): ``W_enc [M, d]``, ``b_enc [M]``, ``W_dec [M, d]``, ``b_dec [d]``; a
latent's encoder and decoder vectors are rows. The SAE works in a normalised space
``x_n = x / s`` (``s`` the dataset scale, E‖x_n‖² = d); ``save`` folds ``s`` into the weights so a
saved SAE takes raw activations. The activation module (``cfg.activation``) is the architecture:
it encodes; the SAE holds the shared parameters and decodes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from saekit import normalisation
from saekit._version import __version__
from saekit.activations import ActivationConfig, make_activation
from saekit.atomic import recover_directory, replace_directory, sha256_file
from saekit.configs import from_dict, to_dict
from saekit.encoding import Encoding, SparseCode, as_dense
from saekit.kernels import sparse_decode
from saekit.normalisation import Whitening, WhiteningConfig, estimate_scale
from saekit.sae_format import (
    CHECKPOINT_FORMAT,
    CONFIG_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    check_state_matches,
    files_to_carry_over,
    read_config,
    upgrade_tensors,
)


@dataclass
class SAEConfig:
    """An SAE's architecture. Every field is saved in cfg.json."""

    d_in: int
    """d: width of the activations the SAE reads."""
    d_sae: int
    """M: number of latents."""
    activation: ActivationConfig
    """The architecture: a kind and its fields, e.g. ``{kind: topk, k: 32}`` or ``relu``
    (saekit.activations lists the kinds; each module documents its fields)."""
    hook: str | None = None
    """Hook point the activations came from (informational)."""
    model_name: str | None = None
    """Model the activations came from (informational)."""
    dtype: str = "float32"
    """Parameter dtype."""
    whitening: WhiteningConfig | None = None
    """Train on whitened inputs (x/s − μ)·M, e.g. ``{kind: zca, eps: 0.001}``
    (saekit.normalisation); folded into the weights on save, where it becomes None."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Free-form extra information carried in cfg.json."""

    def __post_init__(self) -> None:
        self.activation = ActivationConfig.parse(self.activation, "activation")
        if self.whitening is not None:
            self.whitening = WhiteningConfig.parse(self.whitening, "whitening")
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the offending field."""
        for name in ("d_in", "d_sae"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.activation.check_d_sae(self.d_sae)
        if self.dtype not in ("float32", "float64", "bfloat16", "float16"):
            raise ValueError(
                f"dtype must be a floating torch dtype (float32, float64, bfloat16, float16), got"
                f" {self.dtype!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SAEConfig:
        return from_dict(cls, data)


class ForwardOutput(NamedTuple):
    """What ``SAE.forward`` returns. Tensors with a leading N are flattened over tokens."""

    x_hat: Tensor
    """Reconstruction in the input's space and shape [..., d]."""
    latents: Tensor | SparseCode
    """Latents: dense [N, M] or a SparseCode (TopK family on the fast path)."""
    x_n: Tensor
    """[N, d] normalised input x / s."""
    x_hat_n: Tensor
    """[N, d] normalised reconstruction."""
    encoding: Encoding
    """The activation's encoding: latents and the pre-activations losses read."""

    @property
    def pre(self) -> Tensor:
        """[N, M] differentiable pre-activations (dense backward; AuxK uses
        ``encoding.preacts.at`` instead)."""
        return self.encoding.preacts.dense()


def check_activations(x: Tensor, d_in: int) -> None:
    """Clear errors for wrong width and non-finite values."""
    if x.ndim == 0 or x.shape[-1] != d_in:
        raise ValueError(
            f"activations have trailing dimension {tuple(x.shape)[-1:] or '()'} (shape "
            f"{tuple(x.shape)}), but this SAE has d_in = {d_in}"
        )
    if not torch.isfinite(x).all():
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        raise ValueError(f"activations contain {n_nan} NaN and {n_inf} inf values")


class SAE(nn.Module):
    """A sparse autoencoder: parameters and decode; the activation module encodes."""

    def __init__(self, cfg: SAEConfig, device: torch.device | str | None = None):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        d, M = cfg.d_in, cfg.d_sae
        dtype = getattr(torch, cfg.dtype)
        self.W_enc = nn.Parameter(torch.empty(M, d, dtype=dtype, device=device))
        self.b_enc = nn.Parameter(torch.zeros(M, dtype=dtype, device=device))
        self.W_dec = nn.Parameter(torch.empty(M, d, dtype=dtype, device=device))
        self.b_dec = nn.Parameter(torch.zeros(d, dtype=dtype, device=device))
        # Scale and the activation's thresholds stay at least fp32 whatever the parameter dtype.
        aux_dtype = torch.promote_types(dtype, torch.float32)
        self.register_buffer("scale", torch.ones((), dtype=aux_dtype, device=device))
        if cfg.whitening is not None:  # μ, M, M⁻¹ of x / s, estimated once, float64
            f64 = {"dtype": torch.float64, "device": device}
            self.register_buffer("whiten_mean", torch.zeros(d, **f64))
            self.register_buffer("whiten_matrix", torch.eye(d, **f64))
            self.register_buffer("unwhiten_matrix", torch.eye(d, **f64))
        self.activation = make_activation(cfg.activation, M).to(device=device, dtype=aux_dtype)
        if not self.activation.uses_encoder_bias:
            self.b_enc.requires_grad_(False)  # the activation owns its bias; b_enc stays 0
        self.reset_parameters()

    # ---------------------------------------------------------------- initialisation

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Tied initialisation: random unit decoder rows, W_enc = W_dec, zero biases."""
        W = torch.randn(self.W_dec.shape, generator=generator, dtype=torch.float32)
        W /= W.norm(dim=-1, keepdim=True)
        self.W_dec.copy_(W)
        self.W_enc.copy_(W)
        self.b_enc.zero_()
        self.b_dec.zero_()

    @torch.no_grad()
    def init_from_data(self, x: Tensor, scale: float | None = None, method: str = "mean") -> None:
        """Set the dataset scale s (estimated from ``x`` unless given) and b_dec from ``x``.

        ``method``: "mean" or "geometric_median" (Weiszfeld iterations) of x / s.
        """
        x = x.reshape(-1, self.cfg.d_in)
        check_activations(x, self.cfg.d_in)
        x64 = x.double()
        if scale is None:
            scale = estimate_scale(x64)
        if not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"dataset scale must be positive and finite, got {scale}")
        self.scale.fill_(scale)
        x_n = x64 / scale
        if self.cfg.whitening is not None:
            w = normalisation.estimate_whitening(x_n, self.cfg.whitening)
            for buffer, value in zip(self._whitening_buffers(), w, strict=True):
                buffer.copy_(value)
            x_n = normalisation.whiten(x_n, w)
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
        """[N, d] normalised -> the input's space: s·x̂_n, or s·(x̂_n M⁻¹ + μ) when whitened."""
        w = self.whitening
        return (x_hat_n if w is None else normalisation.unwhiten(x_hat_n, w)) * self.scale

    def pre_acts(self, x_n: Tensor) -> Tensor:
        """[N, d] normalised input -> [N, M] differentiable pre-activations."""
        return self.activation.preacts(self, x_n).dense()

    def decode_n(self, latents: Tensor | SparseCode) -> Tensor:
        """Latents -> [N, d] reconstruction in the normalised space (b_dec included)."""
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
                + self.b_dec
            )
        return torch.addmm(self.b_dec, latents, self.W_dec)

    def forward(self, x: Tensor) -> ForwardOutput:
        lead, d = x.shape[:-1], self.cfg.d_in
        x_n = self.normalise(x)
        encoding = self.activation.encode(self, x_n)
        x_hat_n = self.decode_n(encoding.latents)
        x_hat = self.denormalise(x_hat_n).reshape(*lead, d)
        return ForwardOutput(x_hat, encoding.latents, x_n, x_hat_n, encoding)

    def encode(self, x: Tensor) -> Tensor:
        """Raw activations [..., d] -> dense latents [..., M]."""
        check_activations(x, self.cfg.d_in)
        z = as_dense(self.activation.encode(self, self.normalise(x)).latents)
        return z.reshape(*x.shape[:-1], self.cfg.d_sae)

    def decode(self, z: Tensor) -> Tensor:
        """Dense latents [..., M] -> reconstruction [..., d] in the input's space."""
        if z.shape[-1] != self.cfg.d_sae:
            raise ValueError(f"latents have width {z.shape[-1]}, but d_sae = {self.cfg.d_sae}")
        lead = z.shape[:-1]
        x_hat_n = self.decode_n(z.reshape(-1, self.cfg.d_sae).to(self.W_dec.dtype))
        return self.denormalise(x_hat_n).reshape(*lead, self.cfg.d_in)

    # ---------------------------------------------------------------- decoder norms

    @torch.no_grad()
    def remove_parallel_grad_(self) -> None:
        """Drop the component of each decoder row's gradient parallel to the row."""
        if self.W_dec.grad is None:
            return
        W, G = self.W_dec, self.W_dec.grad
        unit = W / W.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        G -= (G * unit).sum(-1, keepdim=True) * unit

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Renormalise decoder rows to unit norm."""
        self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    # ---------------------------------------------------------------- folding, save, load

    @torch.no_grad()
    def fold_scale_(self) -> None:
        """Fold s into the weights exactly: W_enc/s, s·W_dec, s·b_dec; then s = 1. The
        pre-activations are unchanged, so b_enc and every threshold stay as they are. A
        whitened SAE folds into a copy (``tensors_for_save``): its config changes too."""
        if self.cfg.whitening is not None:
            raise ValueError("fold_scale_: a whitened SAE is folded by save(), into a copy")
        s = self.scale.to(self.W_enc.dtype)
        self.W_enc /= s
        self.W_dec *= s
        self.b_dec *= s
        self.scale.fill_(1.0)

    def folded_copy(self) -> SAE:
        """The SAE that takes raw activations: whitening folded first (normalisation.py), then
        s. Its config has no whitening; metadata records the one folded in."""
        w, cfg = self.whitening, self.cfg
        if float(self.scale) == 1.0 and w is None:
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
        rebuilt beside the old one and swapped in (:func:`saekit.atomic.replace_directory`), so
        the two files always agree (cfg.json holds the weights' sha256); other files already in
        the directory (a run's metrics.jsonl, eval.json) are carried over.
        """
        path = Path(path)
        recover_directory(path)  # a save killed mid-swap left the old directory aside
        kept = files_to_carry_over(path)
        folded = self.folded_copy()
        tensors = {k: v.detach().contiguous().cpu() for k, v in folded.state_dict().items()}

        def fill(tmp: Path) -> None:
            for entry in kept:
                try:  # a hard link costs nothing, however long the run's metrics.jsonl
                    os.link(entry, tmp / entry.name)
                except OSError:
                    shutil.copy2(entry, tmp / entry.name)
            save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": CHECKPOINT_FORMAT})
            meta = {
                "format": CHECKPOINT_FORMAT,
                "saekit_version": __version__,
                "config": folded.cfg.to_dict(),
                "scale_folded": True,
                "tensors": {
                    k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in tensors.items()
                },
                "sha256": sha256_file(tmp / WEIGHTS_FILE),
            }
            (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2))

        replace_directory(path, fill)
        return path

    @classmethod
    def load(
        cls, path: str | os.PathLike, device: str | torch.device = "cpu", verify: bool = True
    ) -> SAE:
        """Load a checkpoint written by :meth:`save` (either format), in eval mode; refuse a
        mismatched one with a one-line CheckpointError."""
        path = Path(path)
        recover_directory(path)
        data = read_config(path, verify)
        weights = path / WEIGHTS_FILE
        try:
            cfg = SAEConfig.from_dict(data)
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {path}: bad config in {CONFIG_FILE}: {exc}") from exc
        sae = cls(cfg, device="cpu")
        expected = sae.state_dict()
        try:
            with safe_open(str(weights), framework="pt") as f:
                found = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"checkpoint {path}: cannot read {WEIGHTS_FILE}: {exc}") from exc
        found = upgrade_tensors(data, found)
        check_state_matches(expected, found, where=f"checkpoint {path}")
        sae.load_state_dict(found)
        return sae.to(device).eval()


# -------------------------------------------------------------------- helpers


def geometric_median(x: Tensor, iters: int = 100, tol: float = 1e-7) -> Tensor:
    """Weiszfeld's algorithm for the point minimising Σ_n ‖x_n − c‖."""
    c = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - c).norm(dim=-1).clamp_min(1e-12)
        c_new = (w.unsqueeze(1) * x).sum(0) / w.sum()
        if (c_new - c).norm() <= tol * c.norm().clamp_min(1.0):
            return c_new
        c = c_new
    return c
