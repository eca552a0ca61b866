"""circuit-tracer's per-layer transcoder format (circuit_tracer 0.5, ``load_relu_transcoder`` and
``load_transcoder_set`` in circuit_tracer/transcoder/single_layer_transcoder.py,
``TranscoderSet.to_safetensors``, and ``load_transcoders`` in circuit_tracer/utils/hf_utils.py
for the config).

One safetensors file per layer, ``layer_{N}.safetensors``, with ``W_enc [d_transcoder,
d_model]`` (saekit's layout, no transpose), ``W_dec [d_transcoder, d_model]``, ``b_enc``,
``b_dec [d_model]``, optionally ``W_skip [d_model, d_model]`` and, for JumpReLU,
``activation_function.threshold [d_transcoder]``. Its transcoder computes
pre = x W_encᵀ + b_enc (``F.linear``; nothing subtracted), z = ReLU(pre) or pre·1[pre > θ], and
ŷ = z W_dec + b_dec + x W_skipᵀ: saekit's transcoder exactly. A set is the files of layers
0..N−1 (``TranscoderSet`` asserts every layer from 0 to the last is there, with one width)
and ``config.yaml``: ``model_kind: transcoder_set``, ``model_name``, ``feature_input_hook`` and
``feature_output_hook``, the TransformerLens hook names after ``blocks.{layer}.`` (one pair for
every layer). ``saekit.json`` beside them records where each came from.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from safetensors.torch import save_file

from saekit.interop.portable import InteropError, Portable
from saekit.interop.reading import read_json, read_safetensors

THRESHOLD = "activation_function.threshold"
SERVED = ("relu", "jumprelu")
"""The portable architectures of circuit-tracer's per-layer transcoders."""
CONFIG = "config.yaml"


def layer_index(hook: str | None) -> int | None:
    """The block index in a hook name (``model.layers.5.mlp`` → 5), or None."""
    found = re.search(r"\.(\d+)(?:\.|:|$)", hook or "")
    return None if found is None else int(found.group(1))


def hook_suffix(tl_name: str | None) -> str | None:
    """circuit-tracer's hook name, the TransformerLens name after ``blocks.{layer}.``
    (``blocks.3.ln2.hook_normalized`` → ``ln2.hook_normalized``), or None."""
    found = re.fullmatch(r"blocks\.\d+\.(.+)", tl_name or "")
    return None if found is None else found.group(1)


def check(p: Portable) -> None:
    """What a circuit-tracer transcoder can hold: ReLU or JumpReLU, d_model → d_model."""
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


def config(model_name: str | None, kind: str, hooks: tuple[str | None, str | None]) -> str:
    """circuit-tracer's ``config.yaml`` (``load_transcoders``): the hooks it cannot name (no
    TransformerLens name known) are left out, for the user to add."""
    data: dict[str, Any] = {"model_name": model_name, "model_kind": kind}
    for key, hook in zip(("feature_input_hook", "feature_output_hook"), hooks, strict=True):
        if hook is not None:
            data[key] = hook
    return yaml.safe_dump(data, sort_keys=False)


def _layers(ps: list[Portable]) -> list[int]:
    """Each transcoder's layer, from its target hook (else its input hook): distinct."""
    layers = [layer_index(p.info.get("target_hook") or p.info.get("hook")) for p in ps]
    if len(ps) == 1:
        return [0 if layers[0] is None else layers[0]]
    if None in layers:
        raise InteropError(
            "circuit-tracer's set is indexed by layer; a transcoder's hooks name no block "
            f"({ps[layers.index(None)].info.get('target_hook')!r})"
        )
    clash = sorted({n for n in layers if layers.count(n) > 1})
    if clash:
        raise InteropError(f"circuit-tracer's set holds one transcoder per layer; layer {clash}")
    return layers  # type: ignore[return-value]


def _shared(ps: list[Portable], what: str, values: list[Any]) -> Any:
    if len(set(values)) > 1:
        raise InteropError(f"circuit-tracer's set has one {what} for every layer; found {values}")
    return values[0]


def write_set(ps: list[Portable], out: Path) -> tuple[Path, list[int]]:
    """``out/layer_{N}.safetensors`` per transcoder (N its block), ``out/saekit.json`` and, when
    the layers are 0..N−1 as circuit-tracer's set needs, ``out/config.yaml``. Returns ``out``
    and the layers missing below the last (none: a set circuit-tracer loads)."""
    for p in ps:
        check(p)
    layers = _layers(ps)
    _shared(ps, "width d_transcoder", [p.d_sae for p in ps])
    _shared(ps, "skip path (all or none)", [p.W_skip is not None for p in ps])
    hooks = (
        _shared(ps, "input hook", [hook_suffix(p.info.get("hook_transformer_lens")) for p in ps]),
        _shared(
            ps,
            "output hook",
            [hook_suffix(p.info.get("target_hook_transformer_lens")) for p in ps],
        ),
    )
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for layer, p in sorted(zip(layers, ps, strict=True), key=lambda pair: pair[0]):
        tensors = {"W_enc": p.W_enc, "W_dec": p.W_dec, "b_enc": p.b_enc, "b_dec": p.b_dec}
        if p.W_skip is not None:
            tensors["W_skip"] = p.W_skip
        if p.threshold is not None:
            tensors[THRESHOLD] = p.threshold.to(p.W_enc.dtype)
        name = f"layer_{layer}.safetensors"
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(out / name))
        written.append({"file": name, "layer": layer, **p.info})
    missing = sorted(set(range(max(layers))) - set(layers))
    if not missing:
        model = _shared(ps, "model", [p.info.get("model_name") for p in ps])
        (out / CONFIG).write_text(config(model, "transcoder_set", hooks))
    (out / "saekit.json").write_text(json.dumps({"transcoders": written}, indent=2))
    return out, missing


def write(p: Portable, out: Path) -> Path:
    """One transcoder: ``out/layer_{N}.safetensors`` (N from the target hook, else 0) and
    ``out/saekit.json``; ``config.yaml`` too when N = 0 (a set of one). Returns ``out``."""
    return write_set([p], out)[0]


def read(path: Path) -> Portable:
    """One circuit-tracer per-layer transcoder: ``layer_{N}.safetensors``, or a directory
    holding one such file (hooks from ``saekit.json`` when saekit wrote it)."""
    if path.is_dir():
        files = sorted(path.glob("layer_*.safetensors"))
        if len(files) != 1:
            names = [f.name for f in files]
            raise InteropError(f"{path}: give one of its per-layer files ({names})")
        path = files[0]
    where = f"circuit-tracer transcoder {path}"
    t = read_safetensors(path, where)
    found, required = set(t), {"W_enc", "W_dec", "b_enc", "b_dec"}
    unexpected = found - required - {"W_skip", THRESHOLD}
    if not required <= found or unexpected:
        raise InteropError(
            f"{where}: expects tensors {sorted(required)} (+ W_skip, {THRESHOLD}); missing "
            f"{sorted(required - found)}, unexpected {sorted(unexpected)}"
        )
    p = Portable(
        "jumprelu" if THRESHOLD in t else "relu", t["W_enc"], t["b_enc"], t["W_dec"], t["b_dec"]
    )
    p.threshold = t.get(THRESHOLD)
    p.transcoder, p.W_skip = True, t.get("W_skip")  # [d_out, d_in], as saekit's (x W_skipᵀ)
    beside = path.parent / "saekit.json"
    entries = read_json(beside, where).get("transcoders", []) if beside.is_file() else []
    info = next((e for e in entries if e.get("file") == path.name), {})
    p.info = {k: info.get(k) for k in ("model_name", "hook", "target_hook")}
    p.info["imported_from"] = {"format": "circuit-tracer", "path": str(path)}
    return p
