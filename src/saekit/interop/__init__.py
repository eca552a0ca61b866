"""SAEs in and out of SAELens, sparsify and dictionary_learning (docs/design.md, "Interop").

Every format is translated through :class:`~saekit.interop.portable.Portable`: export maps a
saekit activation to its portable form (its ``export_form``) and a format writes it; import
reads a format into the portable form and builds the saekit SAE.
"""

from __future__ import annotations

from pathlib import Path

from saekit.interop import circuit_tracer, dictionary_learning, gemma_scope, saelens, sparsify
from saekit.interop.metadata import export_info
from saekit.interop.portable import InteropError, Portable, to_portable, to_sae
from saekit.model.format import CONFIG_FILE, WEIGHTS_FILE
from saekit.model.sae import SAE

WRITERS = {
    "saelens": saelens.write,
    "sparsify": sparsify.write,
    "circuit-tracer": circuit_tracer.write,
}
"""Export formats."""
READERS = {
    "saelens": saelens.read,
    "sparsify": sparsify.read,
    "dictionary_learning": dictionary_learning.read,
    "gemma_scope_2": gemma_scope.read,
}
"""Import formats."""


def export_sae(sae: SAE, to: str, out: str | Path, sae_dir: str | Path | None = None) -> Path:
    """Write ``sae`` in format ``to`` under ``out``; ``sae_dir`` (its saekit directory) supplies
    the final L0, dead count and context size. Returns the directory written."""
    if to not in WRITERS:
        raise InteropError(f"unknown export format {to!r} (one of {', '.join(WRITERS)})")
    p = to_portable(sae)
    if to == "sparsify" and p.architecture != sparsify.SERVED:  # name the SAE's kind
        raise InteropError(
            f"sparsify serves top-k SAEs only; this SAE is {sae.cfg.activation.kind!r} (export "
            "it to saelens)"
        )
    p.info = export_info(sae, None if sae_dir is None else Path(sae_dir))
    return WRITERS[to](p, Path(out))


def export_transcoder_set(
    saes: list[tuple[SAE, Path | None]], out: str | Path
) -> tuple[Path, list[int]]:
    """Per-layer transcoders (each with its saekit directory, or None) as one circuit-tracer
    transcoder set under ``out``; returns the directory and the layers a loadable set still
    lacks (circuit-tracer's set covers every layer from 0)."""
    ps = []
    for sae, sae_dir in saes:
        p = to_portable(sae)
        p.info = export_info(sae, sae_dir)
        ps.append(p)
    return circuit_tracer.write_set(ps, Path(out))


def import_sae(path: str | Path, from_: str) -> SAE:
    """The saekit SAE of the SAE stored at ``path`` in format ``from_`` (eval mode)."""
    if from_ not in READERS:
        raise InteropError(f"unknown import format {from_!r} (one of {', '.join(READERS)})")
    path = Path(path)
    if not path.exists():
        raise InteropError(f"{path} does not exist")
    return to_sae(READERS[from_](path))


def saved_saes(path: str | Path) -> dict[str, Path]:
    """The saekit SAE directories at ``path``: itself, or a run directory's SAEs by name."""
    path = Path(path)
    if (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file():
        return {path.name: path}
    found = {
        d.name: d
        for d in sorted(path.iterdir() if path.is_dir() else [])
        if (d / CONFIG_FILE).is_file() and (d / WEIGHTS_FILE).is_file()
    }
    if not found:
        raise InteropError(f"{path} is neither a saved SAE nor a run directory holding SAEs")
    return found


__all__ = [
    "READERS",
    "WRITERS",
    "InteropError",
    "Portable",
    "export_sae",
    "export_transcoder_set",
    "import_sae",
    "saved_saes",
]
