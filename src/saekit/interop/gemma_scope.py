"""Gemma Scope 2's raw transcoder files (google/gemma-scope-2-*, ``transcoder*/layer_N/``), as
sae_lens 6 reads them (``gemma_3_sae_huggingface_loader`` in
sae_lens/loading/pretrained_sae_loaders.py).

``params.safetensors`` holds ``w_enc [d_in, d_sae]``, ``b_enc``, ``w_dec [d_sae, d_out]``,
``b_dec [d_out]``, ``threshold [d_sae]`` and, for the affine (skip) transcoders,
``affine_skip_connection`` stored **[d_in, d_out]**: transposed against SAELens' and saekit's
``W_skip [d_out, d_in]`` (SAELens' loader transposes it). With d_in = d_out the shapes agree
either way, so only the transpose here keeps ŷ = z W_dec + x W_skipᵀ + b_dec right. The
encoder reads x uncentred and is JumpReLU, ReLU(pre)·H(pre − θ). ``config.json`` beside it
(optional) names ``model_name``, ``hf_hook_point_in`` and ``hf_hook_point_out``.
"""

from __future__ import annotations

from pathlib import Path

from saekit.interop.portable import InteropError, Portable
from saekit.interop.reading import read_json, read_safetensors

PARAMS = "params.safetensors"
TENSORS = {"w_enc", "b_enc", "w_dec", "b_dec", "threshold"}
SKIP = "affine_skip_connection"


def module_hook(point: str | None) -> str | None:
    """``model.layers.5.pre_feedforward_layernorm.output`` → saekit's module-and-side name."""
    if not point:
        return None
    module, _, side = point.rpartition(".")
    return module if side == "output" else f"{module}:input" if side == "input" else point


def read(path: Path) -> Portable:
    """A Gemma Scope 2 transcoder directory as a portable transcoder."""
    where = f"Gemma Scope 2 transcoder {path}"
    t = read_safetensors(path / PARAMS, where)
    found = set(t) - {SKIP}
    if found != TENSORS:
        raise InteropError(
            f"{where}: expects tensors {sorted(TENSORS)} (+ {SKIP}); missing "
            f"{sorted(TENSORS - found)}, unexpected {sorted(found - TENSORS)}"
        )
    d_in, d_sae = t["w_enc"].shape
    d_out = t["w_dec"].shape[-1]
    if SKIP in t and tuple(t[SKIP].shape) != (d_in, d_out):
        raise InteropError(
            f"{where}: {SKIP} has shape {tuple(t[SKIP].shape)}, expected [d_in, d_out] = "
            f"{(d_in, d_out)}"
        )
    cfg = read_json(path / "config.json", where) if (path / "config.json").is_file() else {}
    info = {
        "model_name": cfg.get("model_name"),
        "hook": module_hook(cfg.get("hf_hook_point_in")),
        "target_hook": module_hook(cfg.get("hf_hook_point_out")),
        "imported_from": {"format": "gemma_scope_2", "path": str(path)},
    }
    p = Portable("jumprelu", t["w_enc"].T.contiguous(), t["b_enc"], t["w_dec"], t["b_dec"])
    p.threshold = t["threshold"].clamp_min(0.0)  # ReLU(pre)·H(pre − θ) = pre·H(pre − max(θ, 0))
    p.transcoder, p.info = True, info
    p.W_skip = t[SKIP].T.contiguous() if SKIP in t else None  # [d_in, d_out] → [d_out, d_in]
    return p
