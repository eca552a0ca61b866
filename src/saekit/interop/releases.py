"""SAELens release names → Hugging Face repo and folder, from the directory sae-lens ships
(``sae_lens/pretrained_saes.yaml``: ``{release: {repo_id, conversion_func, saes: [{id, path}]}}``).
The file is read as YAML; sae_lens itself is never imported."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import yaml

from saekit.interop.portable import InteropError


def directory_path() -> Path | None:
    """sae_lens' pretrained_saes.yaml, when sae-lens is installed."""
    spec = importlib.util.find_spec("sae_lens")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "pretrained_saes.yaml"
    return path if path.is_file() else None


def resolve_release(release: str, sae_id: str, directory: Path | None = None) -> tuple[str, str]:
    """(repo id, folder in it) of a release's SAE; a hub repo id ("owner/name") passes through
    with ``sae_id`` as the folder."""
    directory = directory or directory_path()
    releases: dict[str, Any] = {}
    if directory is not None:
        releases = yaml.safe_load(directory.read_text()) or {}
    if release not in releases:
        if "/" in release:
            return release, sae_id
        where = "its directory" if directory else "sae-lens (pip install sae-lens) for its names"
        raise InteropError(f"unknown SAELens release {release!r} (needs {where}, or a repo id)")
    entry = releases[release]
    if entry.get("conversion_func"):
        raise InteropError(
            f"release {release!r} is stored in another format (SAELens converts it with "
            f"{entry['conversion_func']!r}); saekit reads SAELens-format releases"
        )
    saes = {s["id"]: s for s in entry.get("saes", [])}
    if sae_id not in saes:
        some = ", ".join(list(saes)[:5])
        raise InteropError(f"release {release!r} has no SAE {sae_id!r} (it has {some}, …)")
    overrides = (entry.get("config_overrides") or {}).get("model_from_pretrained_kwargs")
    if overrides:
        print(
            f"saekit: warning: release {release!r} was trained on a TransformerLens model loaded "
            f"with {overrides}: its activations differ from the plain Hugging Face model's",
            file=sys.stderr,
        )
    return entry["repo_id"], saes[sae_id]["path"]
