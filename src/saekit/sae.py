"""`SAEConfig` and `SAE`: parameters, encode, decode, forward, scale folding, save and load.

Layout (docs/design.md): ``W_enc [M, d]``, ``b_enc [M]``, ``W_dec [M, d]``, ``b_dec [d]``; a
latent's encoder and decoder vectors are rows. The SAE works in a normalised space
``x_n = x / s`` (``s`` the dataset scale, E‖x_n‖² = d); ``save`` folds ``s`` into the weights so a
saved SAE takes raw activations. The activation module (``cfg.activation``) is the architecture:
it encodes; the SAE holds the shared parameters and decodes.
"""

from __future__ import annotations

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

from saekit._version import __version__
from saekit.activations import ActivationConfig, make_activation
from saekit.atomic import recover_directory, replace_directory, sha256_file
from saekit.configs import from_dict, to_dict
from saekit.encoding import Encoding, SparseCode, as_dense
from saekit.kernels import sparse_decode
from saekit.sae_format import (
    CHECKPOINT_FORMAT,
    CONFIG_FILE,
    FORMATS_READ,
    WEIGHTS_FILE,
    CheckpointError,
    check_state_matches,
    upgrade_v1_config,
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
    metadata: dict[str, Any] = field(default_factory=dict)
    """Free-form extra information carried in cfg.json."""

    def __post_init__(self) -> None:
        self.activation = ActivationConfig.parse(self.activation, "activation")
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
        self.activation = make_activation(cfg.activation, M).to(device=device, dtype=aux_dtype)
        if not self.activation.uses_encoder_bias:
            self.b_enc.requires_grad_(False)  # the activation owns its bias; b_enc stays 0
        if not self.activation.uses_encoder_weights:
            self.W_enc.requires_grad_(False)  # tied: the decoder rows encode
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

    def normalise(self, x: Tensor) -> Tensor:
        """Raw activations [..., d] -> [N, d] in the normalised space x / s."""
        if x.shape[-1:] != (self.cfg.d_in,):
            check_activations(x, self.cfg.d_in)
        return x.reshape(-1, self.cfg.d_in).to(self.W_enc.dtype) / self.scale

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
        x_hat = (x_hat_n * self.scale).reshape(*lead, d)
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
        return (x_hat_n * self.scale).reshape(*lead, self.cfg.d_in)

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
        pre-activations are unchanged, so b_enc and every threshold stay as they are."""
        s = self.scale.to(self.W_enc.dtype)
        self.W_enc /= s
        self.W_dec *= s
        self.b_dec *= s
        self.scale.fill_(1.0)

    def tensors_for_save(self) -> dict[str, Tensor]:
        """Every parameter and buffer, scale folded, contiguous and on the CPU."""
        folded = self._folded_copy()
        return {k: v.detach().contiguous().cpu() for k, v in folded.state_dict().items()}

    def _folded_copy(self) -> SAE:
        if float(self.scale) == 1.0:
            return self
        copy = SAE(self.cfg, device="cpu")
        copy.load_state_dict({k: v.cpu() for k, v in self.state_dict().items()})
        copy.fold_scale_()
        return copy

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``sae.safetensors`` and ``cfg.json`` into the directory ``path``.

        The scale is folded into the saved weights; this SAE is left unchanged. The directory is
        rebuilt beside the old one and swapped in (:func:`saekit.atomic.replace_directory`), so
        the two files always agree (cfg.json holds the weights' sha256); other files already in
        the directory (a run's metrics.jsonl, eval.json) are carried over.
        """
        path = Path(path)
        recover_directory(path)  # a save killed mid-swap left the old directory aside
        kept = _files_to_carry_over(path)
        tensors = self.tensors_for_save()

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
                "config": self.cfg.to_dict(),
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
        cfg_path, weights = path / CONFIG_FILE, path / WEIGHTS_FILE
        for p in (cfg_path, weights):
            if not p.is_file():
                raise CheckpointError(f"checkpoint {path}: missing {p.name}")
        try:
            meta = json.loads(cfg_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(
                f"checkpoint {path}: {CONFIG_FILE} is not valid JSON ({exc})"
            ) from exc
        if not isinstance(meta, dict):
            raise CheckpointError(f"checkpoint {path}: {CONFIG_FILE} does not hold a JSON object")
        if meta.get("format") not in FORMATS_READ:
            raise CheckpointError(
                f"checkpoint {path}: format {meta.get('format')!r}, expected one of {FORMATS_READ}"
            )
        if verify and meta.get("sha256") != sha256_file(weights):
            raise CheckpointError(
                f"checkpoint {path}: {WEIGHTS_FILE} does not match the sha256 in {CONFIG_FILE} "
                "(corrupt, truncated or from another save)"
            )
        try:
            data = meta["config"]
            if meta["format"] == "saekit.sae/1":
                data = upgrade_v1_config(data)
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
        check_state_matches(expected, found, where=f"checkpoint {path}")
        sae.load_state_dict(found)
        return sae.to(device).eval()


# -------------------------------------------------------------------- helpers


def _files_to_carry_over(path: Path) -> list[Path]:
    """The other files of an SAE directory (metrics.jsonl, eval.json); refuse a path that is
    not a directory, or one with subdirectories (a run directory, not an SAE's)."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"SAE.save: {path} exists and is not a directory")
    if not path.is_dir():
        return []
    entries = sorted(path.iterdir())
    subdirs = [e.name for e in entries if e.is_dir()]
    if subdirs:
        raise ValueError(
            f"SAE.save: {path} holds directories {subdirs}; save an SAE into a directory of its "
            "own (saving swaps the whole directory)"
        )
    return [e for e in entries if e.name not in (WEIGHTS_FILE, CONFIG_FILE)]


def estimate_scale(x: Tensor) -> float:
    """s = sqrt(E‖x‖² / d), so that E‖x / s‖² = d: the one home of the dataset scale."""
    x = x.reshape(-1, x.shape[-1]).double()
    return float((x.pow(2).sum(-1).mean() / x.shape[-1]).sqrt())


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
