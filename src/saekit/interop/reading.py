"""Reading other libraries' files: one-line errors, and nothing unpickled.

safetensors files are read with ``safe_open``; PyTorch files (dictionary_learning's ``ae.pt``)
with ``torch.load(weights_only=True)``, which refuses anything but tensors and plain containers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from saekit.interop.portable import InteropError


def read_json(path: Path, where: str) -> dict[str, Any]:
    if not path.is_file():
        raise InteropError(f"{where}: missing {path.name}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InteropError(f"{where}: {path.name} is not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise InteropError(f"{where}: {path.name} does not hold a JSON object")
    return data


def read_safetensors(path: Path, where: str) -> dict[str, Tensor]:
    if not path.is_file():
        raise InteropError(f"{where}: missing {path.name}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except Exception as exc:  # safetensors raises its own error types
        raise InteropError(f"{where}: cannot read {path.name} ({exc})") from exc


def read_torch(path: Path, where: str) -> dict[str, Tensor]:
    """A state dict saved with torch.save, loaded with weights_only=True (never unpickled)."""
    if not path.is_file():
        raise InteropError(f"{where}: missing {path.name}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt zip, or a pickle of objects weights_only refuses
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InteropError(f"{where}: cannot read {path.name} as tensors ({first})") from exc
    if not isinstance(data, dict) or not all(isinstance(v, Tensor) for v in data.values()):
        raise InteropError(f"{where}: {path.name} does not hold a state dict of tensors")
    return data
