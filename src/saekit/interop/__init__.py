"""SAEs in and out of SAELens, sparsify and dictionary_learning, transcoders and cross-layer
transcoders in and out of circuit-tracer and Gemma Scope 2 (docs/design.md, "Interop").

Every format is translated through :class:`~saekit.interop.portable.Portable` (a cross-layer
transcoder through :class:`~saekit.interop.portable_clt.PortableCLT`): export maps a saekit
activation to its portable form (its ``export_form``) and a format writes it; import reads a
format into the portable form and builds the saekit SAE or CLT.
"""

from __future__ import annotations

from pathlib import Path

from saekit.interop import (
    circuit_tracer,
    circuit_tracer_clt,
    dictionary_learning,
    gemma_scope,
    gemma_scope_clt,
    saelens,
    sparsify,
)
from saekit.interop.metadata import clt_export_info, export_info
from saekit.interop.portable import InteropError, Portable, to_portable, to_sae
from saekit.interop.portable_clt import to_clt, to_portable_clt
from saekit.model.clt import CrossLayerTranscoder
from saekit.model.dictionary import Dictionary
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
    "circuit-tracer": circuit_tracer.read,
}
"""Import formats."""
CLT_READERS = {
    "circuit-tracer": (circuit_tracer_clt.holds_clt, circuit_tracer_clt.read),
    "gemma_scope_2": (gemma_scope_clt.holds_clt, gemma_scope_clt.read),
}
"""Import formats of cross-layer transcoders: (does this path hold one, its reader)."""


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


def export_dictionary(
    model: Dictionary, to: str, out: str | Path, sae_dir: str | Path | None = None
) -> Path:
    """An SAE or transcoder (:func:`export_sae`) or a cross-layer transcoder
    (:func:`export_clt`) in format ``to``; other dictionaries (crosscoders) are refused."""
    if isinstance(model, SAE):
        return export_sae(model, to, out, sae_dir)
    if isinstance(model, CrossLayerTranscoder):
        return export_clt(model, to, out)
    raise InteropError(f"{to} has no format for a {model.cfg.kind} (SAEs, transcoders and CLTs)")


def export_clt(clt: CrossLayerTranscoder, to: str, out: str | Path) -> Path:
    """Write a cross-layer transcoder in format ``to`` (circuit-tracer's CLT) under ``out``."""
    if to != "circuit-tracer":
        raise InteropError(
            f"{to} has no cross-layer transcoder format (export CLTs to circuit-tracer)"
        )
    pc = to_portable_clt(clt)
    pc.info = clt_export_info(clt)
    return circuit_tracer_clt.write(pc, Path(out))


def import_dictionary(path: str | Path, from_: str) -> SAE | CrossLayerTranscoder:
    """The saekit SAE, transcoder or cross-layer transcoder stored at ``path`` in format
    ``from_`` (eval mode): a CLT where the format has one and ``path`` holds it."""
    path = Path(path)
    holds_clt, read = CLT_READERS.get(from_, (None, None))
    if holds_clt is not None and path.is_dir() and holds_clt(path):
        return to_clt(read(path))
    return import_sae(path, from_)


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
    "export_clt",
    "export_dictionary",
    "export_sae",
    "export_transcoder_set",
    "import_dictionary",
    "import_sae",
    "saved_saes",
]
