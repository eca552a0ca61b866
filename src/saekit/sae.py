"""`SAEConfig` and `SAE`: parameters, encode, decode, forward, scale folding, save and load.

Layout (../shared/DESIGN.md): ``W_enc [M, d]``, ``b_enc [M]``, ``W_dec [M, d]``, ``b_dec [d]``; a
latent's encoder and decoder vectors are rows. The SAE works in a normalised space
``x_n = x / s`` (``s`` the dataset scale, E‖x_n‖² = d); ``save`` folds ``s`` into the weights so a
saved SAE takes raw activations.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from saekit._version import __version__
from saekit.activations import ACTIVATIONS, Activation, SparseCode, as_dense, sparse_decode
from saekit.kernels import sparse as kernels

CHECKPOINT_FORMAT = "saekit.sae/1"
WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "cfg.json"


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt or disagrees with its config."""


@dataclass
class SAEConfig:
    """An SAE's architecture. Every field is saved in cfg.json."""

    d_in: int
    """d: width of the activations the SAE reads."""
    d_sae: int
    """M: number of latents."""
    activation: str = "topk"
    """Sparsifying nonlinearity: one of relu, topk, batchtopk, jumprelu, prolu."""
    k: int | None = None
    """Active latents per token (topk) or per token on average over a batch (batchtopk)."""
    threshold_beta: float = 0.999
    """batchtopk: EMA coefficient of the inference threshold θ."""
    jumprelu_init_threshold: float = 0.001
    """jumprelu: initial per-latent threshold θ (normalised space)."""
    jumprelu_bandwidth: float = 0.001
    """jumprelu: bandwidth ε of the straight-through rectangle kernel."""
    prolu_variant: str = "ste"
    """prolu: backward variant, "ste" or "relu"."""
    hook: str | None = None
    """Hook point the activations came from (informational)."""
    model_name: str | None = None
    """Model the activations came from (informational)."""
    dtype: str = "float32"
    """Parameter dtype."""
    kernel: str = "torch"
    """TopK family training path: "torch" (sparse fast path of saekit.kernels: one dense
    encoder matmul without autograd, everything after it O(N·k·d)), "triton" (the same with the
    Triton kernels, CUDA only) or "reference" (dense autograd through the encoder, as in
    DESIGN.md). Same numbers either way; other activations ignore it."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Free-form extra information carried in cfg.json."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the offending field."""
        for name in ("d_in", "d_sae"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"SAEConfig.{name} must be a positive integer, got {value!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"SAEConfig.activation: unknown activation {self.activation!r}; "
                f"choose one of {sorted(ACTIVATIONS)}"
            )
        if self.activation in ("topk", "batchtopk"):
            if self.k is None:
                raise ValueError(f"SAEConfig.k is required for activation {self.activation!r}")
            if not isinstance(self.k, int) or self.k <= 0:
                raise ValueError(f"SAEConfig.k must be a positive integer, got {self.k!r}")
            if self.k > self.d_sae:
                raise ValueError(f"SAEConfig.k = {self.k} exceeds d_sae = {self.d_sae}")
        if not 0.0 <= self.threshold_beta < 1.0:
            raise ValueError(
                f"SAEConfig.threshold_beta must be in [0, 1), got {self.threshold_beta}"
            )
        if self.jumprelu_init_threshold <= 0:
            raise ValueError("SAEConfig.jumprelu_init_threshold must be positive")
        if self.jumprelu_bandwidth <= 0:
            raise ValueError("SAEConfig.jumprelu_bandwidth must be positive")
        if self.prolu_variant not in ("ste", "relu"):
            raise ValueError(
                f"SAEConfig.prolu_variant must be 'ste' or 'relu', got {self.prolu_variant!r}"
            )
        if self.kernel not in ("torch", "triton", "reference"):
            raise ValueError(
                f"SAEConfig.kernel must be 'torch', 'triton' or 'reference', got {self.kernel!r}"
            )
        if not isinstance(getattr(torch, self.dtype, None), torch.dtype):
            raise ValueError(f"SAEConfig.dtype: unknown torch dtype {self.dtype!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SAEConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"SAEConfig: unknown fields {unknown}")
        return cls(**data)

    def make_activation(self) -> Activation:
        cls = ACTIVATIONS[self.activation]
        if self.activation == "topk":
            return cls(self.d_sae, self.k)
        if self.activation == "batchtopk":
            return cls(self.d_sae, self.k, self.threshold_beta)
        if self.activation == "jumprelu":
            return cls(self.d_sae, self.jumprelu_init_threshold, self.jumprelu_bandwidth)
        if self.activation == "prolu":
            return cls(self.d_sae, self.prolu_variant)
        return cls(self.d_sae)


class ForwardOutput(NamedTuple):
    """What ``SAE.forward`` returns. Tensors with a leading N are flattened over tokens."""

    x_hat: Tensor
    """Reconstruction in the input's space and shape [..., d]."""
    latents: Tensor | SparseCode
    """Latents: dense [N, M] or a SparseCode (TopK family in training)."""
    pre: Tensor
    """[N, M] pre-activations in the normalised space (encoder bias included unless ProLU)."""
    x_n: Tensor
    """[N, d] normalised input x / s."""
    x_hat_n: Tensor
    """[N, d] normalised reconstruction."""
    preacts_at: Callable[[Tensor, Tensor], Tensor] | None = None
    """Fast path only: ``preacts_at(token, latent)`` -> differentiable pre-activations at those
    coordinates with a sparse backward (pass it to ``losses.auxk_loss``). ``pre`` stays
    differentiable too, but through the dense [N, M] backward."""


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
    """A sparse autoencoder: parameters, encode and decode; an activation module supplies σ."""

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
        self.activation = cfg.make_activation().to(device=device, dtype=aux_dtype)
        if not self.activation.uses_encoder_bias:
            self.b_enc.requires_grad_(False)  # ProLU owns its bias; b_enc stays 0
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

    def pre_acts(self, x_n: Tensor) -> Tensor:
        """[N, d] normalised input -> [N, M] pre-activations."""
        bias = self.b_enc if self.activation.uses_encoder_bias else None
        x_c = x_n - self.b_dec
        if bias is None:
            return x_c @ self.W_enc.T
        return torch.addmm(bias, x_c, self.W_enc.T)

    def decode_n(self, latents: Tensor | SparseCode) -> Tensor:
        """Latents -> [N, d] reconstruction in the normalised space (b_dec included)."""
        if isinstance(latents, SparseCode):
            return sparse_decode(latents, self.W_dec) + self.b_dec
        return torch.addmm(self.b_dec, latents, self.W_dec)

    def uses_fast_path(self) -> bool:
        """TopK, or BatchTopK in training, with a non-reference kernel and autograd on."""
        kind = self.cfg.activation
        return (
            self.cfg.kernel != "reference"
            and torch.is_grad_enabled()
            and (kind == "topk" or (kind == "batchtopk" and self.activation.training))
        )

    def forward(self, x: Tensor) -> ForwardOutput:
        lead, d = x.shape[:-1], self.cfg.d_in
        if x.shape[-1:] != (d,):
            check_activations(x, d)
        if self.uses_fast_path():
            fast = kernels.fast_forward(self, x, backend=self.cfg.kernel)
            return ForwardOutput(
                fast.x_hat, fast.latents, fast.pre, fast.x_n, fast.x_hat_n, fast.preacts_at
            )
        x_n = x.reshape(-1, d).to(self.W_enc.dtype) / self.scale
        pre = self.pre_acts(x_n)
        latents = self.activation(pre)
        x_hat_n = self.decode_n(latents)
        x_hat = (x_hat_n * self.scale).reshape(*lead, d)
        return ForwardOutput(x_hat, latents, pre, x_n, x_hat_n)

    def encode(self, x: Tensor) -> Tensor:
        """Raw activations [..., d] -> dense latents [..., M]."""
        check_activations(x, self.cfg.d_in)
        lead = x.shape[:-1]
        x_n = x.reshape(-1, self.cfg.d_in).to(self.W_enc.dtype) / self.scale
        z = as_dense(self.activation(self.pre_acts(x_n)))
        return z.reshape(*lead, self.cfg.d_sae)

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
        """Fold s into the weights exactly: W_enc/s, s·W_dec, s·b_dec; then s = 1."""
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
        """Write ``sae.safetensors`` and ``cfg.json`` into ``path``.

        The scale is folded into the saved weights; this SAE is left unchanged. Both files are
        written completely under temporary names (and fsynced) before either replaces the
        previous checkpoint, so a save that fails leaves the previous one loadable.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = self.tensors_for_save()
        weights, cfg_file = path / WEIGHTS_FILE, path / CONFIG_FILE
        tmp_weights = path / f".{WEIGHTS_FILE}.tmp-{os.getpid()}"
        tmp_cfg = path / f".{CONFIG_FILE}.tmp-{os.getpid()}"
        try:
            save_file(tensors, str(tmp_weights), metadata={"format": CHECKPOINT_FORMAT})
            meta = {
                "format": CHECKPOINT_FORMAT,
                "saekit_version": __version__,
                "config": self.cfg.to_dict(),
                "scale_folded": True,
                "tensors": {
                    k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in tensors.items()
                },
                "sha256": sha256_file(tmp_weights),
            }
            tmp_cfg.write_text(json.dumps(meta, indent=2))
            fsync_file(tmp_weights)
            fsync_file(tmp_cfg)
        except BaseException:
            for tmp in (tmp_weights, tmp_cfg):
                tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp_weights, weights)
        os.replace(tmp_cfg, cfg_file)
        fsync_dir(path)
        return path

    @classmethod
    def load(
        cls, path: str | os.PathLike, device: str | torch.device = "cpu", verify: bool = True
    ) -> SAE:
        """Load a checkpoint written by :meth:`save`, in eval mode; refuse a mismatched one."""
        path = Path(path)
        cfg_path, weights = path / CONFIG_FILE, path / WEIGHTS_FILE
        for p in (cfg_path, weights):
            if not p.is_file():
                raise CheckpointError(f"checkpoint {path}: missing {p.name}")
        try:
            meta = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(
                f"checkpoint {path}: {CONFIG_FILE} is not valid JSON ({exc})"
            ) from exc
        if not isinstance(meta, dict):
            raise CheckpointError(f"checkpoint {path}: {CONFIG_FILE} does not hold a JSON object")
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(
                f"checkpoint {path}: format {meta.get('format')!r}, expected {CHECKPOINT_FORMAT!r}"
            )
        if verify and meta.get("sha256") != sha256_file(weights):
            raise CheckpointError(
                f"checkpoint {path}: {WEIGHTS_FILE} does not match the sha256 in {CONFIG_FILE} "
                "(corrupt, truncated or from another save)"
            )
        try:
            cfg = SAEConfig.from_dict(meta["config"])
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


def check_state_matches(expected: dict[str, Tensor], found: dict[str, Tensor], where: str) -> None:
    """Raise CheckpointError naming every missing, unexpected or mis-shaped tensor."""
    problems = []
    for name in sorted(set(expected) - set(found)):
        problems.append(f"missing tensor {name!r}")
    for name in sorted(set(found) - set(expected)):
        problems.append(f"unexpected tensor {name!r}")
    for name in sorted(set(expected) & set(found)):
        if tuple(expected[name].shape) != tuple(found[name].shape):
            problems.append(
                f"tensor {name!r} has shape {tuple(found[name].shape)}, the config implies "
                f"{tuple(expected[name].shape)}"
            )
        elif expected[name].dtype != found[name].dtype:
            problems.append(
                f"tensor {name!r} has dtype {found[name].dtype}, expected {expected[name].dtype}"
            )
    if problems:
        raise CheckpointError(f"{where}: " + "; ".join(problems))


# -------------------------------------------------------------------- helpers


def estimate_scale(x: Tensor) -> float:
    """s = sqrt(E‖x‖² / d), so that E‖x / s‖² = d."""
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


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    try:
        dir_fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_text(dest: Path, text: str) -> None:
    """Write text to a temp name, fsync, rename over ``dest``."""
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
    tmp.write_text(text)
    fsync_file(tmp)
    os.replace(tmp, dest)
    fsync_dir(dest.parent)
