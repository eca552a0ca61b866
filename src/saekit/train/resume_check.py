"""What ``--resume`` checks before it writes anything (issue 28).

The checkpoint records the config it was trained with; the run's ``config.yaml`` is what the user
sees and may edit. Resume compares the two (both normalised through ``build_run_config``) and
refuses a difference with one line naming the differing fields and how to proceed, instead of
silently training the checkpoint's config and rewriting ``config.yaml`` (a checkpoint copied in
from another run shows up here too). A missing or garbled ``config.yaml`` is reported, not
rewritten. ``--force`` continues from the checkpoint's config and rewrites ``config.yaml``.
``steps`` and ``parallel`` are the fields a resume may change: an edit of ``steps`` in
``config.yaml`` is applied like ``--steps``, one of ``parallel`` resumes on another mesh.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from saekit.core.configs import to_dict
from saekit.train.config import build_run_config
from saekit.train.config_files import load_config_file

CONFIG_FILE = "config.yaml"
RESUMABLE_FIELDS = ("out_dir", "steps", "parallel")
"""Fields a resumed run may take from elsewhere than the checkpoint: where the run lives now,
how long it trains (``--steps``), and how its processes split the work (``parallel``: a
latent-parallel checkpoint resumes on any (D, T), saekit.train.latent_checkpoint)."""


def normalised(data: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """The config as ``to_dict(build_run_config(data))`` (defaults filled in, kinds expanded)."""
    return to_dict(build_run_config({**data, "out_dir": str(run_dir)}))


def flat_differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted paths where two nested configs differ (a list of different length differs as a
    whole)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in list(a) + [k for k in b if k not in a]:
            out += flat_differences(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        out = []
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            out += flat_differences(x, y, f"{prefix}{i}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def _at(data: Any, path: str) -> Any:
    for part in path.split("."):
        if isinstance(data, list) and part.isdigit() and int(part) < len(data):
            data = data[int(part)]
        elif isinstance(data, dict):
            data = data.get(part)
        else:
            return None
    return data


def checked_resume_config(
    run_dir: Path, checkpointed: dict[str, Any], force: bool
) -> tuple[dict[str, Any], str | None]:
    """The config to resume with (the checkpoint's, ``steps`` possibly from ``config.yaml``)
    and a note to print, or a one-line ValueError when ``config.yaml`` is missing, garbled or
    differs from the checkpoint's config (unless ``force``)."""
    path = run_dir / CONFIG_FILE
    how = (
        f"continue from the checkpoint's config with --resume {run_dir} --force (config.yaml "
        "is rewritten from it)"
    )
    try:
        current = normalised(load_config_file(path), run_dir)
    except (ValueError, TypeError) as exc:
        problem = str(exc) if path.is_file() else f"{path} is missing"
        if not force:
            raise ValueError(f"--resume {run_dir}: {problem}; {how}") from None
        return dict(checkpointed), f"{problem}; continuing from the checkpoint's config"
    recorded = normalised(checkpointed, run_dir)
    fields = [
        f for f in flat_differences(recorded, current) if f.split(".")[0] not in RESUMABLE_FIELDS
    ]
    if fields:
        shown = ", ".join(f"{f}: {_at(recorded, f)!r} → {_at(current, f)!r}" for f in fields[:6])
        more = f" and {len(fields) - 6} more" if len(fields) > 6 else ""
        where = f"{path} differs from the config its checkpoint recorded ({shown}{more})"
        if not force:
            raise ValueError(
                f"--resume {run_dir}: {where}; start a new run with saekit train --config {path} "
                f"--out NEW_DIR, or {how}"
            )
        return dict(checkpointed), f"{where}; continuing from the checkpoint's config"
    data = dict(checkpointed)
    if current.get("steps") != recorded.get("steps"):
        data["steps"] = current.get("steps")
    if current.get("parallel") != recorded.get("parallel"):
        data["parallel"] = current.get("parallel")
    return data, None
