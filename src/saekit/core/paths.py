"""Outputs and inputs of one command: an output that is, or lies inside, one of the command's
inputs is refused before anything is written (issue 28: ``export SAE --out SAE`` overwrote the
SAE's own cfg.json; ``eval --json SAE/sae.safetensors`` overwrote the weights)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

Input = tuple[str, "str | Path | None"]
"""(what the command calls it, e.g. ``SAE_DIR`` or ``--cache``; its path, or None: not given)."""


def _inside(path: Path, parent: Path) -> bool:
    return path == parent or parent in path.parents


def refuse_output_over_inputs(
    output: str | Path | None,
    inputs: Iterable[Input],
    flag: str = "--out",
    may_hold: Iterable[str | Path] = (),
) -> None:
    """One-line ValueError when ``output`` is one of ``inputs`` or lies inside one (both
    resolved, so links and ``..`` do not hide it). ``may_hold``: input directories the
    output may lie inside (but not be), e.g. ``saekit report``'s default ``SAE/report``.
    Inputs given as hub ids (no such path here) never match."""
    if output is None:
        return
    out = Path(output).expanduser().resolve()
    allowed = {Path(p).expanduser().resolve() for p in may_hold}
    for label, given in inputs:
        if given is None or not Path(given).expanduser().exists():
            continue
        source = Path(given).expanduser().resolve()
        if out == source:
            raise ValueError(f"{flag} {output} is the input {label} {given}: choose another path")
        if _inside(out, source) and source not in allowed:
            raise ValueError(
                f"{flag} {output} lies inside the input {label} {given}, which it would "
                "overwrite: choose a path outside it"
            )


def document_inputs(args: Any) -> list[tuple[str, Any]]:
    """The model and document paths a command reads (``core.paths.refuse_output_over_inputs``
    refuses an output over any of them; hub ids match no path)."""
    names = (("--model", "model"), ("--dataset", "dataset"), ("--text-file", "text_file"))
    return [(flag, getattr(args, name, None)) for flag, name in names]
