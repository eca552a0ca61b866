"""Gemma Scope 2's cross-layer transcoders (google/gemma-scope-2-*, ``clt/<name>/``), as
circuit-tracer reads them (``load_gemma_scope_2_clt`` in
circuit_tracer/transcoder/cross_layer_transcoder.py, 0.5.0).

One file per layer, ``params_layer_{l}.safetensors`` (l = 0..L−1), each a JumpReLU
multi-layer SAE's slice: ``w_enc [d_in, M]``, ``b_enc [M]``, ``threshold [M]``, ``w_dec [M, L,
d_out]`` (into every layer; a CLT's latents write only to targets t ≥ l, so circuit-tracer
keeps ``w_dec[:, l:]``) and ``b_dec [d_out]``, the bias of target l; the ``_affine`` CLTs add
``affine_skip_connection [d_in, d_out]``. The encoder is Gemma Scope's JumpReLU,
ReLU(pre)·H(pre − θ) = pre·H(pre − max(θ, 0)). ``config.json`` beside the files (optional)
gives ``model_name`` and the hooks; without it the hooks are those SAELens infers for Gemma
Scope 2's ``clt`` folders (``_infer_gemma_3_raw_cfg_dict``): block l's
``pre_feedforward_layernorm`` output into its ``post_feedforward_layernorm`` output.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from saekit.interop.gemma_scope import TENSORS, module_hook
from saekit.interop.portable import InteropError
from saekit.interop.portable_clt import PortableCLT, stack_layers
from saekit.interop.reading import read_json, read_safetensors

SKIP = "affine_skip_connection"
HOOKS = (
    "model.layers.0.pre_feedforward_layernorm.output",
    "model.layers.0.post_feedforward_layernorm.output",
)


def layer_files(path: Path) -> list[Path]:
    """``params_layer_0..L−1.safetensors`` in ``path`` (empty when there are none)."""
    numbers = sorted(
        int(m.group(1))
        for f in path.glob("params_layer_*.safetensors")
        if (m := re.fullmatch(r"params_layer_(\d+)\.safetensors", f.name))
    )
    if numbers and numbers != list(range(len(numbers))):
        raise InteropError(f"Gemma Scope 2 CLT {path}: layer files {numbers}, not 0..L−1")
    return [path / f"params_layer_{n}.safetensors" for n in numbers]


def _per_layer(point: str, n_layers: int) -> list[str | None]:
    """A config's hook point with its block index set to each layer in turn."""
    return [
        module_hook(re.sub(r"layers\.\d+\.", f"layers.{layer}.", point))
        for layer in range(n_layers)
    ]


def read(path: Path) -> PortableCLT:
    """A Gemma Scope 2 CLT directory as a portable CLT."""
    where = f"Gemma Scope 2 CLT {path}"
    files = layer_files(path)
    if not files:
        raise InteropError(f"{where}: no params_layer_0.safetensors")
    layers = [read_safetensors(f, where) for f in files]
    for f, t in zip(files, layers, strict=True):
        if SKIP in t:
            raise InteropError(
                f"{where}: {f.name} holds {SKIP} (an _affine CLT); saekit's CLT has no skip path"
            )
        if set(t) != TENSORS:
            raise InteropError(
                f"{where}: {f.name} expects tensors {sorted(TENSORS)}; missing "
                f"{sorted(TENSORS - set(t))}, unexpected {sorted(set(t) - TENSORS)}"
            )
    n = len(layers)
    w_dec = [t["w_dec"] for t in layers]
    if any(w.ndim != 3 or w.shape[1] != n for w in w_dec):
        shapes = sorted({tuple(w.shape) for w in w_dec})
        raise InteropError(f"{where}: w_dec has shapes {shapes}, expected [M, L = {n}, d_out]")
    acausal = max(
        float(w[:, :layer].abs().max()) if layer else 0.0 for layer, w in enumerate(w_dec)
    )
    if acausal > 0:  # circuit-tracer drops them too: a CLT's latents write to later layers only
        print(
            f"saekit: warning: {where}: decoders into earlier layers (|w| ≤ {acausal:.3g}) are "
            "not part of a cross-layer transcoder and are dropped, as circuit-tracer does",
            file=sys.stderr,
        )
    cfg = read_json(path / "config.json", where) if (path / "config.json").is_file() else {}
    point_in = cfg.get("hf_hook_point_in") or HOOKS[0]
    point_out = cfg.get("hf_hook_point_out") or HOOKS[1]
    stack = {
        name: stack_layers([t[name] for t in layers], where, name) for name in TENSORS - {"w_dec"}
    }
    pc = PortableCLT(
        "jumprelu",
        stack["w_enc"].transpose(1, 2).contiguous(),  # [L, d_in, M] → [L, M, d_in]
        stack["b_enc"],
        [w[:, layer:].contiguous() for layer, w in enumerate(w_dec)],
        stack["b_dec"],
        threshold=stack["threshold"].clamp_min(0.0),  # ReLU(pre)·H(pre − θ), see above
        info={
            "model_name": cfg.get("model_name"),
            "hooks": _per_layer(point_in, n),
            "target_hooks": _per_layer(point_out, n),
            "imported_from": {"format": "gemma_scope_2", "path": str(path)},
        },
    )
    pc.check(where)
    return pc


def holds_clt(path: Path) -> bool:
    """Whether ``path`` is a Gemma Scope 2 CLT directory (its first layer's file)."""
    return (path / "params_layer_0.safetensors").is_file()
