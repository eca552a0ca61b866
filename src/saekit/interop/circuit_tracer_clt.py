"""circuit-tracer's cross-layer transcoder format (circuit_tracer 0.5:
``CrossLayerTranscoder.to_safetensors`` and ``load_clt`` in
circuit_tracer/transcoder/cross_layer_transcoder.py).

A directory with, for every layer i = 0..L−1, ``W_enc_{i}.safetensors`` holding ``W_enc_{i}``
[M, d_model], ``b_enc_{i}`` [M], ``b_dec_{i}`` [d_model] (the bias of *target* layer i) and, for
JumpReLU, ``threshold_{i}`` [M]; and ``W_dec_{i}.safetensors`` holding ``W_dec_{i}`` [M, L − i,
d_model] (layer i's latents into targets i..L−1). The loader counts the ``W_enc_*`` files for L,
reads the dimensions from the tensors, and picks JumpReLU when ``threshold_0`` exists (else
ReLU); its CLT computes pre = einsum(x, W_enc) + b_enc, z = ReLU(pre) or pre·1[pre > θ], and
ŷ_t = Σ_{l ≤ t} z_l W_dec_l[:, t − l] + b_dec_t: the portable CLT exactly. It has no input
scale (saekit folds it) and reads no skip path from these files. ``config.yaml`` beside them
(``model_name``, ``model_kind: cross_layer_transcoder``, ``feature_input_hook``,
``feature_output_hook``: TransformerLens names after ``blocks.{layer}.``) is what
``load_transcoders`` reads from the hub; ``saekit.json`` records where it came from.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from safetensors.torch import save_file
from torch import Tensor

from saekit.interop.circuit_tracer import SERVED, config, hook_suffix, layer_index
from saekit.interop.names import transformer_lens_name
from saekit.interop.portable import InteropError
from saekit.interop.portable_clt import PortableCLT, stack_layers
from saekit.interop.reading import read_json, read_safetensors

KIND = "cross_layer_transcoder"


def _one_hook(hooks: list[str | None], what: str) -> str | None:
    """circuit-tracer's one hook name for every layer (None where the hooks are not named), or
    InteropError: its CLT reads layer i's input at ``blocks.{i}.{hook}``, so the hooks must name
    blocks 0..L−1 in order and the same point in each."""
    if all(h is None for h in hooks):
        return None
    layers = [layer_index(h) for h in hooks]
    if layers != list(range(len(hooks))):
        raise InteropError(
            f"circuit-tracer's CLT reads layer i from block i; this one's {what} hooks are in "
            f"blocks {layers}"
        )
    suffixes = {hook_suffix(transformer_lens_name(h)) for h in hooks}
    if len(suffixes) > 1:
        raise InteropError(
            f"circuit-tracer's CLT names one {what} hook for every layer; these are {hooks}"
        )
    return suffixes.pop()


def write(pc: PortableCLT, out: Path) -> Path:
    """The directory circuit-tracer's ``load_clt`` reads, with ``config.yaml`` and
    ``saekit.json``; returns ``out``."""
    if pc.architecture not in SERVED:
        raise InteropError(
            f"circuit-tracer's CLTs are ReLU or JumpReLU; this one is {pc.architecture!r} (a "
            "BatchTopK CLT exports as JumpReLU)"
        )
    if pc.d_out != pc.d_in:
        raise InteropError(
            f"circuit-tracer's CLTs map d_model to d_model; this one maps d_in = {pc.d_in} to "
            f"d_out = {pc.d_out}"
        )
    hooks = (
        _one_hook(pc.info.get("hooks") or [None] * pc.n_layers, "input"),
        _one_hook(pc.info.get("target_hooks") or [None] * pc.n_layers, "output"),
    )
    out.mkdir(parents=True, exist_ok=True)
    for i in range(pc.n_layers):
        enc = {f"W_enc_{i}": pc.W_enc[i], f"b_enc_{i}": pc.b_enc[i], f"b_dec_{i}": pc.b_dec[i]}
        if pc.threshold is not None:
            enc[f"threshold_{i}"] = pc.threshold[i].to(pc.W_enc.dtype)
        save_file(_plain(enc), str(out / f"W_enc_{i}.safetensors"))
        save_file(_plain({f"W_dec_{i}": pc.W_dec[i]}), str(out / f"W_dec_{i}.safetensors"))
    (out / "config.yaml").write_text(config(pc.info.get("model_name"), KIND, hooks))
    (out / "saekit.json").write_text(json.dumps(pc.info, indent=2))
    return out


def _plain(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def read(path: Path) -> PortableCLT:
    """A circuit-tracer CLT directory as a portable CLT (hooks from ``saekit.json`` when saekit
    wrote it)."""
    where = f"circuit-tracer CLT {path}"
    numbers = sorted(
        int(m.group(1))
        for f in path.glob("W_enc_*.safetensors")
        if (m := re.fullmatch(r"W_enc_(\d+)\.safetensors", f.name))
    )
    if not numbers or numbers != list(range(len(numbers))):
        raise InteropError(f"{where}: expects W_enc_0..W_enc_{{L-1}}.safetensors; found {numbers}")
    enc = [read_safetensors(path / f"W_enc_{i}.safetensors", where) for i in numbers]
    jump = [f"threshold_{i}" in t for i, t in enumerate(enc)]
    if len(set(jump)) > 1:  # load_clt decides from layer 0 alone
        raise InteropError(f"{where}: threshold_i in some layers' files only ({jump})")
    try:
        W_enc = [t[f"W_enc_{i}"] for i, t in enumerate(enc)]
        b_enc = [t[f"b_enc_{i}"] for i, t in enumerate(enc)]
        b_dec = [t[f"b_dec_{i}"] for i, t in enumerate(enc)]
        theta = [t[f"threshold_{i}"] for i, t in enumerate(enc)] if jump[0] else None
        W_dec = [
            read_safetensors(path / f"W_dec_{i}.safetensors", where)[f"W_dec_{i}"] for i in numbers
        ]
    except KeyError as exc:
        raise InteropError(f"{where}: missing tensor {exc}") from None
    info = read_json(path / "saekit.json", where) if (path / "saekit.json").is_file() else {}
    info["imported_from"] = {"format": "circuit-tracer", "path": str(path)}
    pc = PortableCLT(
        "jumprelu" if theta is not None else "relu",
        stack_layers(W_enc, where, "W_enc"),
        stack_layers(b_enc, where, "b_enc"),
        W_dec,
        stack_layers(b_dec, where, "b_dec"),
        threshold=None if theta is None else stack_layers(theta, where, "threshold"),
        info=info,
    )
    pc.check(where)
    return pc


def holds_clt(path: Path) -> bool:
    """Whether ``path`` is a circuit-tracer CLT directory (its first encoder file)."""
    return (path / "W_enc_0.safetensors").is_file()
