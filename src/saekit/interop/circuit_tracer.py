"""circuit-tracer's per-layer transcoder format (circuit_tracer 0.5, ``load_relu_transcoder`` in
circuit_tracer/transcoder/single_layer_transcoder.py, and ``TranscoderSet.to_safetensors``).

One safetensors file per layer, ``layer_{N}.safetensors``, with ``W_enc [d_transcoder,
d_model]`` (saekit's layout, no transpose), ``W_dec [d_transcoder, d_model]``, ``b_enc``,
``b_dec [d_model]``, optionally ``W_skip [d_model, d_model]`` and, for JumpReLU,
``activation_function.threshold [d_transcoder]``. Its transcoder computes
pre = x W_encᵀ + b_enc (``F.linear``; nothing subtracted), z = ReLU(pre) or pre·1[pre > θ], and
ŷ = z W_dec + b_dec + x W_skipᵀ: saekit's transcoder exactly. The loader reads no config; the
layer index and the input/output hooks go in the set's config (``feature_input_hook``,
``feature_output_hook``), which this writer leaves to the user: ``saekit.json`` beside the
file records the layer and both hooks.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from safetensors.torch import save_file

from saekit.interop.portable import InteropError, Portable

THRESHOLD = "activation_function.threshold"
SERVED = ("relu", "jumprelu")
"""The portable architectures of circuit-tracer's per-layer transcoders."""


def layer_index(hook: str | None) -> int | None:
    """The block index in a hook name (``model.layers.5.mlp`` → 5), or None."""
    found = re.search(r"\.(\d+)(?:\.|:|$)", hook or "")
    return None if found is None else int(found.group(1))


def write(p: Portable, out: Path) -> Path:
    """``out/layer_{N}.safetensors`` (N from the target hook, else 0) and ``out/saekit.json``
    (where it came from); returns ``out``."""
    if not p.transcoder:
        raise InteropError("circuit-tracer reads transcoders; this is an SAE (no d_out)")
    if p.architecture not in SERVED:
        raise InteropError(
            f"circuit-tracer's per-layer transcoders are ReLU or JumpReLU; this one is "
            f"{p.architecture!r} (a BatchTopK transcoder exports as JumpReLU)"
        )
    if p.d_out != p.d_in:
        raise InteropError(
            f"circuit-tracer's transcoders map d_model to d_model; this one maps d_in = {p.d_in}"
            f" to d_out = {p.d_out}"
        )
    tensors = {"W_enc": p.W_enc, "W_dec": p.W_dec, "b_enc": p.b_enc, "b_dec": p.b_dec}
    if p.W_skip is not None:
        tensors["W_skip"] = p.W_skip
    if p.threshold is not None:
        tensors[THRESHOLD] = p.threshold.to(p.W_enc.dtype)
    layer = layer_index(p.info.get("target_hook") or p.info.get("hook"))
    out.mkdir(parents=True, exist_ok=True)
    name = f"layer_{0 if layer is None else layer}.safetensors"
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(out / name))
    (out / "saekit.json").write_text(json.dumps({"file": name, "layer": layer, **p.info}, indent=2))
    return out
