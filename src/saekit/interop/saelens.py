"""SAELens' format (sae_lens 6.x ``SAE.save_model`` / ``SAE.load_from_disk``).

A directory with ``cfg.json`` (``architecture``, ``d_in``, ``d_sae``, ``dtype``,
``apply_b_dec_to_input``, ``normalize_activations``, per-architecture fields such as ``k`` and
``rescale_acts_by_decoder_norm``, and ``metadata``: model_name, hook_name, context_size,
dataset_path, …) and ``sae_weights.safetensors`` with ``W_enc [d_in, d_sae]`` (transposed
against saekit), ``b_enc``, ``W_dec [d_sae, d_in]``, ``b_dec`` and, for ``jumprelu``,
``threshold [d_sae]``. Their encoders (sae_lens/saes/*.py):

- standard: ReLU(pre); topk: top-k of ``pre·‖W_dec,i‖`` if ``rescale_acts_by_decoder_norm``
  (decode then divides by the norms), ReLU'd; abstopk: the same by |pre|, signed; jumprelu:
  ReLU(pre)·H(pre − θ_i); gated: H(pre_gate)·ReLU(x W_enc·exp(r_mag) + b_mag), pre_gate with
  ``b_gate`` for b_enc (no ``b_enc`` tensor),
- with pre = (x − b_dec·[apply_b_dec_to_input]) W_enc + b_enc.

Transcoders (sae_lens/saes/transcoder.py): ``transcoder`` (ReLU) and ``jumprelu_transcoder``,
with ``skip_`` variants (``skip_transcoder``, ``jumprelu_skip_transcoder``) that add
``W_skip [d_out, d_in]``: ŷ = z W_dec + x W_skipᵀ + b_dec; ``d_out`` in cfg.json,
``apply_b_dec_to_input`` false (their encoder reads x uncentred, as saekit's transcoders do).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import Tensor

from saekit.interop.names import hf_hook_name
from saekit.interop.portable import InteropError, Portable
from saekit.interop.reading import read_json, read_safetensors

CONFIG = "cfg.json"
WEIGHTS = "sae_weights.safetensors"
SAELENS_VERSION = "6.0.0"
"""Written as metadata.sae_lens_version: SAELens reads configs without one (or older) as pre-6.0
and renames their fields."""
WRITES = {
    "relu": "standard",
    "topk": "topk",
    "jumprelu": "jumprelu",
    "abstopk": "abstopk",
    "gated": "gated",
}
"""Portable architecture → SAELens architecture."""
TENSORS = {
    "standard": {"W_enc", "b_enc", "W_dec", "b_dec"},
    "topk": {"W_enc", "b_enc", "W_dec", "b_dec"},
    "jumprelu": {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"},
    "abstopk": {"W_enc", "b_enc", "W_dec", "b_dec"},
    "gated": {"W_enc", "b_gate", "b_mag", "r_mag", "W_dec", "b_dec"},
    "transcoder": {"W_enc", "b_enc", "W_dec", "b_dec"},
    "skip_transcoder": {"W_enc", "b_enc", "W_dec", "b_dec", "W_skip"},
    "jumprelu_transcoder": {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"},
    "jumprelu_skip_transcoder": {"W_enc", "b_enc", "W_dec", "b_dec", "threshold", "W_skip"},
}
READS = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu", "abstopk": "abstopk"}
READS.update(gated="gated", transcoder="relu", skip_transcoder="relu")
READS.update(jumprelu_transcoder="jumprelu", jumprelu_skip_transcoder="jumprelu")
"""SAELens architecture → portable architecture."""
"""SAELens architecture → its tensors (the ones saekit reads)."""
TRANSCODERS = ("transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder")
WITH_K = ("topk", "abstopk")
ACTIVATION_FNS = ("relu", "topk")
"""The pre-6.0 ``activation_fn`` values saekit reads."""
"""SAELens architectures with a ``k`` (and ``rescale_acts_by_decoder_norm``) in cfg.json."""
TOPK_ACTIVATION_FN = "topk"
"""A pre-6.0 ``standard`` SAE's ``activation_fn`` that makes it a TopK one."""
WRITES_TRANSCODER = {"relu": "transcoder", "jumprelu": "jumprelu_transcoder"}
"""Portable architecture of a transcoder → SAELens architecture (without a skip path)."""


def write(p: Portable, out: Path) -> Path:
    """``out/cfg.json`` and ``out/sae_weights.safetensors``."""
    arch = _written_architecture(p)
    info = dict(p.info)
    cfg: dict[str, Any] = {
        "architecture": arch,
        "d_in": p.d_in,
        "d_sae": p.d_sae,
        "dtype": str(p.W_enc.dtype).removeprefix("torch."),
        "device": "cpu",
        "apply_b_dec_to_input": not p.transcoder,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": SAELENS_VERSION,
            "sae_lens_training_version": None,
            "model_name": info.get("model_name"),
            "hook_name": info.get("hook_transformer_lens") or info.get("hook"),
            "hook_head_index": None,
            "context_size": info.get("context_size"),
            "dataset_path": info.get("dataset"),
            "neuronpedia_id": None,
            "saekit": info,
        },
    }
    if arch in WITH_K:
        cfg.update(k=p.k, rescale_acts_by_decoder_norm=False)
    tensors = {"W_enc": p.W_enc.T, "b_enc": p.b_enc, "W_dec": p.W_dec, "b_dec": p.b_dec}
    if "b_gate" in TENSORS[arch]:  # gated: b_gate is saekit's b_enc
        tensors.update(b_gate=tensors.pop("b_enc"), **p.extra)
    if p.transcoder:
        cfg["d_out"] = p.d_out
        cfg["metadata"]["hook_name_out"] = info.get("target_hook_transformer_lens") or info.get(
            "target_hook"
        )
        if p.W_skip is not None:
            tensors["W_skip"] = p.W_skip
    if p.threshold is not None:  # jumprelu, jumprelu_transcoder, jumprelu_skip_transcoder
        tensors["threshold"] = p.threshold.to(p.W_enc.dtype)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(out / WEIGHTS))
    (out / CONFIG).write_text(json.dumps(cfg, indent=2))
    return out


def _written_architecture(p: Portable) -> str:
    if not p.transcoder:
        if p.architecture not in WRITES:
            raise InteropError(f"SAELens has no architecture for {p.architecture!r}")
        return WRITES[p.architecture]
    if p.architecture not in WRITES_TRANSCODER:
        raise InteropError(
            f"SAELens has no {p.architecture} transcoder (it serves ReLU and JumpReLU ones; a "
            "BatchTopK transcoder exports as JumpReLU)"
        )
    arch = WRITES_TRANSCODER[p.architecture]
    return arch if p.W_skip is None else arch.replace("transcoder", "skip_transcoder")


def read(path: Path) -> Portable:
    """A SAELens directory as a Portable SAE; InteropError names what is wrong."""
    cfg = read_json(path / CONFIG, f"SAELens SAE {path}")
    arch = _architecture(cfg, path)
    tensors = read_safetensors(path / WEIGHTS, f"SAELens SAE {path}")
    where = f"SAELens SAE {path}"
    if "scaling_factor" in tensors:  # finetuning scale of pre-6 SAELens: x̂ = (z·f) W_dec + b_dec
        factor = tensors.pop("scaling_factor")
        if "W_dec" in tensors:
            tensors["W_dec"] = tensors["W_dec"] * factor.unsqueeze(-1)
    unexpected = sorted(set(tensors) - TENSORS[arch])
    missing = sorted(TENSORS[arch] - set(tensors))
    if unexpected or missing:
        raise InteropError(
            f"{where}: architecture {arch!r} expects tensors {sorted(TENSORS[arch])}; missing "
            f"{missing}, unexpected {unexpected}"
        )
    transcoder = arch in TRANSCODERS
    d_in, d_sae = _dims(cfg, where)
    d_out = _d_out(cfg, where) if transcoder else d_in
    shapes = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_out), "b_dec": (d_out,)}
    shapes.update(threshold=(d_sae,), b_gate=(d_sae,), b_mag=(d_sae,), r_mag=(d_sae,))
    shapes["W_skip"] = (d_out, d_in)  # SAELens' own layout (Gemma Scope 2's raw file: transposed)
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != shapes[name]:
            raise InteropError(
                f"{where}: tensor {name} has shape {tuple(tensor.shape)}, cfg.json (d_in = "
                f"{d_in}, d_sae = {d_sae}{f', d_out = {d_out}' if transcoder else ''}) implies "
                f"{shapes[name]}"
            )
    W_enc, W_dec, b_dec = tensors["W_enc"].T.contiguous(), tensors["W_dec"], tensors["b_dec"]
    b_enc = tensors["b_gate" if "b_gate" in TENSORS[arch] else "b_enc"]
    extra = {n: tensors[n] for n in ("r_mag", "b_mag") if n in tensors}
    if transcoder and cfg.get("apply_b_dec_to_input", False):
        raise InteropError(f"{where}: a transcoder with apply_b_dec_to_input (SAELens refuses it)")
    if not transcoder and not cfg.get("apply_b_dec_to_input", True):
        # x W_enc + b_enc = (x − b_dec) W_enc + (b_enc + b_dec W_enc): saekit always subtracts.
        shift = W_enc.double().mv(b_dec.double())
        b_enc = b_enc + shift.to(b_enc.dtype)
        if "b_mag" in extra:  # gated: the magnitude path reads x W_enc·exp(r_mag) + b_mag
            shift = shift * extra["r_mag"].double().exp()
            extra["b_mag"] = extra["b_mag"] + shift.to(b_enc.dtype)
    p = Portable(READS[arch], W_enc, b_enc, W_dec, b_dec, extra=extra, info=_info(cfg, path, arch))
    p.transcoder, p.W_skip = transcoder, tensors.get("W_skip")
    if arch in WITH_K:
        p.k = _k(cfg, where)
        if cfg.get("rescale_acts_by_decoder_norm", False):
            _fold_decoder_norms(p)
    if "threshold" in tensors:
        # ReLU(pre)·H(pre − θ) = pre·H(pre − max(θ, 0)): the same latents with θ ≥ 0.
        p.threshold = tensors["threshold"].clamp_min(0.0)
    return p


def _architecture(cfg: dict[str, Any], path: Path) -> str:
    arch = cfg.get("architecture", "standard")
    if arch == "standard" and cfg.get("activation_fn") == TOPK_ACTIVATION_FN:  # pre-6.0 TopK
        arch = WRITES["topk"]
        cfg.setdefault("k", (cfg.get("activation_fn_kwargs") or {}).get("k"))
    if arch not in TENSORS:
        raise InteropError(
            f"SAELens SAE {path}: architecture {arch!r} has no saekit equivalent (saekit reads "
            f"{', '.join(sorted(TENSORS))})"
        )
    norm = cfg.get("normalize_activations", "none")
    if norm not in ("none", None, False):
        raise InteropError(
            f"SAELens SAE {path}: normalize_activations = {norm!r}; saekit reads SAEs on raw "
            "activations (fold the normalisation with SAELens first: "
            "fold_activation_norm_scaling_factor)"
        )
    if cfg.get("activation_fn", "relu") not in ACTIVATION_FNS:
        raise InteropError(f"SAELens SAE {path}: activation_fn {cfg['activation_fn']!r}")
    return arch


def _dims(cfg: dict[str, Any], where: str) -> tuple[int, int]:
    d_in, d_sae = cfg.get("d_in"), cfg.get("d_sae")
    if not all(isinstance(v, int) and v > 0 for v in (d_in, d_sae)):
        raise InteropError(f"{where}: cfg.json needs positive integers d_in and d_sae")
    return d_in, d_sae


def _d_out(cfg: dict[str, Any], where: str) -> int:
    d_out = cfg.get("d_out")
    if not isinstance(d_out, int) or d_out <= 0:
        raise InteropError(f"{where}: a transcoder's cfg.json needs a positive integer d_out")
    return d_out


def _k(cfg: dict[str, Any], where: str) -> int:
    k = cfg.get("k")
    if not isinstance(k, int) or k <= 0 or k > cfg["d_sae"]:
        raise InteropError(f"{where}: topk needs an integer k in [1, d_sae], got {k!r}")
    return k


def _fold_decoder_norms(p: Portable) -> None:
    """rescale_acts_by_decoder_norm: SAELens ranks pre·‖W_dec,i‖ and divides the latents by the
    norms before decoding. W_enc,i·n_i, b_enc,i·n_i, W_dec,i/n_i compute the same latents and
    reconstruction with the plain top-k."""
    norms: Tensor = p.W_dec.double().norm(dim=-1)
    p.W_enc = (p.W_enc.double() * norms.unsqueeze(-1)).to(p.W_enc.dtype)
    p.b_enc = (p.b_enc.double() * norms).to(p.b_enc.dtype)
    p.W_dec = (p.W_dec.double() / norms.unsqueeze(-1)).to(p.W_dec.dtype)


def _info(cfg: dict[str, Any], path: Path, arch: str) -> dict[str, Any]:
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else cfg
    saekit = meta.get("saekit") if isinstance(meta.get("saekit"), dict) else {}
    model, tl_hook = meta.get("model_name"), meta.get("hook_name") or meta.get("hook_point")
    info = {
        "model_name": model,
        "hook": saekit.get("hook") or hf_hook_name(tl_hook, model),
        "hook_transformer_lens": tl_hook,
        "dataset": meta.get("dataset_path"),
        "context_size": meta.get("context_size"),
        "imported_from": {"format": "saelens", "path": str(path), "architecture": arch},
    }
    if arch in TRANSCODERS:  # SAELens keeps the output hook top-level or in metadata
        tl_out = meta.get("hook_name_out") or cfg.get("hook_name_out")
        info["target_hook"] = saekit.get("target_hook") or hf_hook_name(tl_out, model)
        info["target_hook_transformer_lens"] = tl_out
    if cfg.get("reshape_activations", "none") != "none":
        info["reshape_activations"] = cfg["reshape_activations"]  # hook_z: heads flattened
    return info
