"""sparsify's format (EleutherAI, ``SparseCoder.save_to_disk`` / ``load_from_disk``).

One directory per hook point, named after it (``h.8``, ``layers.8``: the module whose output the
SAE reads, relative to the model's base model), holding ``cfg.json`` (``activation``: topk or
groupmax, ``k``, ``num_latents``, ``expansion_factor``, ``normalize_decoder``, ``multi_topk``,
``skip_connection``, ``transcode``, ``d_in``) and ``sae.safetensors`` with ``encoder.weight
[d_sae, d_in]``, ``encoder.bias``, ``W_dec [d_sae, d_in]``, ``b_dec`` (and ``W_skip`` with a skip
connection). Encoder: top-k of ReLU((x − b_dec) Wᵀ + b) per token; the same latents as saekit's
TopK (which ReLUs the kept values).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from saekit.interop.names import sparsify_hookpoint
from saekit.interop.portable import InteropError, Portable
from saekit.interop.reading import read_json, read_safetensors

CONFIG = "cfg.json"
WEIGHTS = "sae.safetensors"
TENSORS = ("encoder.weight", "encoder.bias", "W_dec", "b_dec")
SERVED = "topk"
"""The one portable architecture sparsify serves, also its ``activation`` name in cfg.json."""


def write(p: Portable, out: Path) -> Path:
    """``out/<hookpoint>/cfg.json`` and ``sae.safetensors``; returns that directory."""
    if p.transcoder:
        raise InteropError(
            "saekit does not write sparsify transcoders yet; export transcoders to saelens or "
            "circuit-tracer"
        )
    if p.architecture != SERVED:
        raise InteropError(
            f"sparsify serves top-k SAEs only; this SAE is {p.architecture!r} (export it to "
            "saelens)"
        )
    norms = p.W_dec.double().norm(dim=-1)
    cfg: dict[str, Any] = {
        "activation": SERVED,
        "expansion_factor": max(p.d_sae // p.d_in, 1),
        "normalize_decoder": bool(((norms - 1).abs() < 1e-5).all()),
        "num_latents": p.d_sae,
        "k": p.k,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": p.d_in,
        "saekit": p.info,  # sparsify's from_dict(drop_extra_fields=True) ignores it
    }
    target = out / sparsify_hookpoint(p.info.get("hook"))
    target.mkdir(parents=True, exist_ok=True)
    tensors = {"encoder.weight": p.W_enc, "encoder.bias": p.b_enc, "W_dec": p.W_dec}
    tensors["b_dec"] = p.b_dec
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(target / WEIGHTS))
    (target / CONFIG).write_text(json.dumps(cfg, indent=2))
    return target


def find(path: Path) -> Path:
    """The hook point directory: ``path`` itself, or its only subdirectory with a cfg.json."""
    if (path / CONFIG).is_file():
        return path
    found = sorted(d for d in path.iterdir() if (d / CONFIG).is_file()) if path.is_dir() else []
    if len(found) == 1:
        return found[0]
    if not found:
        raise InteropError(f"sparsify SAE {path}: no cfg.json in it or its subdirectories")
    names = ", ".join(d.name for d in found)
    raise InteropError(f"sparsify run {path} holds several hook points ({names}): name one")


def read(path: Path) -> Portable:
    path = find(path)
    where = f"sparsify SAE {path}"
    cfg = read_json(path / CONFIG, where)
    for flag, what in (("transcode", "a transcoder"), ("skip_connection", "a skip connection")):
        if cfg.get(flag):
            raise InteropError(f"{where}: {what} ({flag}: true); saekit holds autoencoders only")
    if cfg.get("activation", SERVED) != SERVED:
        raise InteropError(f"{where}: activation {cfg.get('activation')!r} (saekit reads topk)")
    tensors = read_safetensors(path / WEIGHTS, where)
    if set(tensors) != set(TENSORS):
        raise InteropError(f"{where}: expected tensors {list(TENSORS)}, found {sorted(tensors)}")
    d_in = cfg.get("d_in")
    W_enc = tensors["encoder.weight"]
    d_sae = W_enc.shape[0]
    shapes = {"encoder.weight": (d_sae, d_in), "encoder.bias": (d_sae,), "W_dec": (d_sae, d_in)}
    shapes["b_dec"] = (d_in,)
    for name, shape in shapes.items():
        if tuple(tensors[name].shape) != shape:
            raise InteropError(
                f"{where}: tensor {name} has shape {tuple(tensors[name].shape)}, expected "
                f"{shape} (d_in = {d_in} in cfg.json, d_sae = {d_sae} from encoder.weight)"
            )
    k = cfg.get("k")
    if not isinstance(k, int) or not 0 < k <= d_sae:
        raise InteropError(f"{where}: k must be an integer in [1, {d_sae}], got {k!r}")
    saekit = cfg.get("saekit") if isinstance(cfg.get("saekit"), dict) else {}
    info = {
        "model_name": saekit.get("model_name"),
        "hook": saekit.get("hook"),
        "sparsify_hookpoint": path.name,
        "imported_from": {"format": "sparsify", "path": str(path), "architecture": SERVED},
    }
    b_enc, W_dec, b_dec = tensors["encoder.bias"], tensors["W_dec"], tensors["b_dec"]
    return Portable(SERVED, W_enc, b_enc, W_dec, b_dec, k=k, info=info)
