"""dictionary_learning's checkpoints (saprmarks/dictionary_learning ``trainSAE``): ``ae.pt`` (a
state dict, ``torch.save``) and ``config.json`` (``{"trainer": {"dict_class", "activation_dim",
"dict_size", "k", "lm_name", "layer", "submodule_name", …}, "buffer": {…}}``). Read with
``torch.load(weights_only=True)``; nothing is unpickled. The dictionaries
(dictionary_learning/dictionary.py, trainers/*.py) and what saekit makes of them:

- AutoEncoder: ReLU(W(x − bias) + b); decoder.weight [d, M] → relu.
- JumpReluAutoEncoder: ReLU(pre·H(pre − θ)) with pre = x W_enc + b_enc: b_dec is NOT subtracted
  from the input (apply_b_dec_to_input is False and not saved), so b_enc gains b_dec W_enc, and
  θ becomes max(θ, 0) → jumprelu.
- AutoEncoderTopK: per-token top-k of ReLU(pre); it saves a ``threshold`` it does not encode by
  (use_threshold=False) → topk, never jumprelu.
- BatchTopKSAE, MatryoshkaBatchTopKSAE: ReLU(pre)·H(ReLU(pre) − θ) at inference → batchtopk.
- GatedAutoEncoder: gate_bias is b_gate (saekit's b_enc), mag_bias and r_mag → gated.

dictionary_learning's ``normalize_activations`` folds its norm factor into the biases
(``scale_biases``) before saving, so every ae.pt takes raw activations.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import Tensor

from saekit.interop.portable import InteropError, Portable
from saekit.interop.reading import read_json, read_torch

WEIGHTS = "ae.pt"
CONFIG = "config.json"


def _linear(s: dict[str, Tensor], bias: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """nn.Linear encoder/decoder: encoder.weight [M, d], decoder.weight [d, M]."""
    return s["encoder.weight"], s["encoder.bias"], s["decoder.weight"].T.contiguous(), s[bias]


def _parameters(s: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Raw parameters: W_enc [d, M], W_dec [M, d]."""
    return s["W_enc"].T.contiguous(), s["b_enc"], s["W_dec"], s["b_dec"]


def _autoencoder(s: dict[str, Tensor]) -> Portable:
    return Portable("relu", *_linear(s, "bias"))


def _jumprelu(s: dict[str, Tensor]) -> Portable:
    W_enc, b_enc, W_dec, b_dec = _parameters(s)
    b_enc = b_enc + W_enc.double().mv(b_dec.double()).to(b_enc.dtype)
    return Portable("jumprelu", W_enc, b_enc, W_dec, b_dec, threshold=s["threshold"].clamp_min(0))


def _topk(s: dict[str, Tensor]) -> Portable:
    return Portable("topk", *_linear(s, "b_dec"), k=int(s["k"]))


def _batchtopk(s: dict[str, Tensor]) -> Portable:
    theta = s["threshold"].clamp_min(0.0)  # ReLU(pre) > θ with θ < 0 (never set) keeps all > 0
    return Portable("batchtopk", *_linear(s, "b_dec"), k=int(s["k"]), threshold=theta)


def _gated(s: dict[str, Tensor]) -> Portable:
    """π_gate = W(x − decoder_bias) + gate_bias, π_mag = exp(r_mag)·W(x − decoder_bias) + mag_bias
    (dictionary.py GatedAutoEncoder.encode)."""
    extra = {"r_mag": s["r_mag"], "b_mag": s["mag_bias"]}
    W_dec = s["decoder.weight"].T.contiguous()
    return Portable(
        "gated", s["encoder.weight"], s["gate_bias"], W_dec, s["decoder_bias"], extra=extra
    )


def _matryoshka(s: dict[str, Tensor]) -> Portable:
    theta = s["threshold"].clamp_min(0.0)
    return Portable("batchtopk", *_parameters(s), k=int(s["k"]), threshold=theta)


DICTIONARIES: dict[str, tuple[set[str], Callable[[dict[str, Tensor]], Portable]]] = {
    "AutoEncoder": ({"bias", "encoder.weight", "encoder.bias", "decoder.weight"}, _autoencoder),
    "JumpReluAutoEncoder": ({"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}, _jumprelu),
    "AutoEncoderTopK": (
        {"encoder.weight", "encoder.bias", "decoder.weight", "b_dec", "k", "threshold"},
        _topk,
    ),
    "BatchTopKSAE": (
        {"encoder.weight", "encoder.bias", "decoder.weight", "b_dec", "k", "threshold"},
        _batchtopk,
    ),
    "GatedAutoEncoder": (
        {"encoder.weight", "decoder.weight", "decoder_bias", "r_mag", "gate_bias", "mag_bias"},
        _gated,
    ),
    "MatryoshkaBatchTopKSAE": (
        {"W_enc", "b_enc", "W_dec", "b_dec", "k", "threshold", "group_sizes"},
        _matryoshka,
    ),
}
"""dict_class → (its state dict's keys, its portable form)."""


def read(path: Path) -> Portable:
    directory = path.parent if path.name == WEIGHTS else path
    where = f"dictionary_learning SAE {directory}"
    config = read_json(directory / CONFIG, where)
    trainer = config.get("trainer")
    if not isinstance(trainer, dict) or not isinstance(trainer.get("dict_class"), str):
        raise InteropError(f"{where}: {CONFIG} has no trainer.dict_class")
    dict_class = trainer["dict_class"]
    if dict_class not in DICTIONARIES:
        raise InteropError(
            f"{where}: dict_class {dict_class!r} has no saekit equivalent (saekit reads "
            f"{', '.join(DICTIONARIES)})"
        )
    keys, convert = DICTIONARIES[dict_class]
    state = read_torch(directory / WEIGHTS, where)
    if set(state) != keys:
        raise InteropError(
            f"{where}: {dict_class} expects tensors {sorted(keys)}, found {sorted(state)}"
        )
    p = convert(state)
    _check_sizes(p, trainer, where)
    p.info = _info(config, trainer, directory, dict_class)
    if "group_sizes" in state:
        p.info["matryoshka_group_sizes"] = [int(g) for g in state["group_sizes"]]
    return p


def _check_sizes(p: Portable, trainer: dict[str, Any], where: str) -> None:
    d_in, d_sae = trainer.get("activation_dim", p.d_in), trainer.get("dict_size", p.d_sae)
    found = {
        "W_enc": tuple(p.W_enc.shape),
        "W_dec": tuple(p.W_dec.shape),
        "b_enc": tuple(p.b_enc.shape),
        "b_dec": tuple(p.b_dec.shape),
    }
    expected = {"W_enc": (d_sae, d_in), "W_dec": (d_sae, d_in), "b_enc": (d_sae,)}
    expected["b_dec"] = (d_in,)
    bad = [f"{n} {found[n]} (expected {expected[n]})" for n in found if found[n] != expected[n]]
    if bad:
        raise InteropError(
            f"{where}: shapes disagree with activation_dim = {d_in}, dict_size = {d_sae}: "
            + "; ".join(bad)
        )
    if p.k is not None and not 0 < p.k <= d_sae:
        raise InteropError(f"{where}: k = {p.k} outside [1, {d_sae}]")


def _info(config: dict, trainer: dict, directory: Path, dict_class: str) -> dict[str, Any]:
    buffer = config.get("buffer") if isinstance(config.get("buffer"), dict) else {}
    layer, submodule = trainer.get("layer"), trainer.get("submodule_name")
    return {
        "model_name": trainer.get("lm_name"),
        "dictionary_learning_submodule": submodule,
        "layer": layer,
        "context_size": buffer.get("ctx_len"),
        "imported_from": {
            "format": "dictionary_learning",
            "path": str(directory),
            "architecture": dict_class,
        },
    }
