"""Atomic writes: a crash at any moment leaves either the whole old or the whole new content.

Files (:func:`atomic_write_bytes`, :func:`atomic_write_text`): written under a temporary
sibling name, fsynced, renamed over the destination (``os.replace`` is atomic on POSIX), then
the parent directory is fsynced so that the rename itself survives a power cut.

Directories whose files must match one another (a training checkpoint) cannot be renamed over a
non-empty destination, so :func:`replace_directory` fills a temporary sibling, fsyncs it, then
swaps in three steps::

    1. DEST           -> .DEST.old-PID   (skipped when there is no DEST yet)
    2. .DEST.tmp-PID  -> DEST
    3. remove .DEST.old-PID, fsync the parent

A crash before step 1 leaves the old DEST, one after step 2 the new one. Between steps 1 and 2
DEST is missing and the complete old directory is ``.DEST.old-PID``. **Recovery rule:** whoever
reads or resumes from DEST calls :func:`recover_directory` first, which renames that old
directory back to DEST when the process that was swapping is no longer alive.

Temporary names are hidden and carry the writer's PID (``.NAME.tmp-PID``, ``.NAME.old-PID``), so
the leftovers of a killed process are recognisable; :func:`remove_stale_temporaries` removes
them. Liveness is judged on this machine (``kill(pid, 0)``): on a filesystem shared between
hosts, only one host should write a given directory.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)$")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Persist a directory's entries (renames, new files); a no-op where directories cannot be
    opened or fsynced (some platforms and network filesystems)."""
    try:
        dir_fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def temporary_name(name: str, kind: str = "tmp", pid: int | None = None) -> str:
    """``.NAME.tmp-PID`` (being written) or ``.NAME.old-PID`` (the previous version, mid-swap)."""
    return f".{name}.{kind}-{os.getpid() if pid is None else pid}"


def atomic_write_bytes(dest: Path, data: bytes) -> None:
    """Write ``data`` to ``dest`` so that readers see the old file or the new one, never a part."""
    dest = Path(dest)
    tmp = dest.parent / temporary_name(dest.name)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(dest.parent)


def atomic_write_text(dest: Path, text: str) -> None:
    """:func:`atomic_write_bytes` of ``text`` encoded as UTF-8."""
    atomic_write_bytes(dest, text.encode("utf-8"))


def replace_directory(dest: Path, fill: Callable[[Path], None]) -> Path:
    """Replace the directory ``dest`` by the one ``fill(tmp)`` writes into the empty ``tmp``.

    Every file written is fsynced before the swap (module docstring). If ``fill`` raises, the
    old ``dest`` is untouched and the temporary directory is removed.
    """
    dest = Path(dest)
    parent = dest.parent
    parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(parent, dest.name)  # also restores a dest lost mid-swap
    tmp = parent / temporary_name(dest.name, "tmp")
    old = parent / temporary_name(dest.name, "old")
    tmp.mkdir()
    try:
        fill(tmp)
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    had_old = dest.exists()
    if had_old:
        os.replace(dest, old)
    os.replace(tmp, dest)
    fsync_dir(parent)
    if had_old:
        shutil.rmtree(old)
        fsync_dir(parent)
    return dest


def recover_directory(dest: Path, *, any_writer: bool = False) -> bool:
    """Apply the recovery rule: if ``dest`` is missing but a swap left ``.DEST.old-PID`` behind,
    rename it back. Returns whether it did.

    A swap still running in another live process is left alone (its step 2 is imminent), unless
    ``any_writer`` (the caller knows that nobody else writes ``dest``).
    """
    dest = Path(dest)
    if dest.exists():
        return False
    olds = [
        path
        for path, kind, _, pid in _temporaries(dest.parent, dest.name)
        if kind == "old" and (any_writer or not _other_writer_alive(pid))
    ]
    if not olds:
        return False
    try:
        newest = max(olds, key=lambda p: p.stat().st_mtime)
        os.replace(newest, dest)
    except OSError:  # another reader (another rank) recovered it first
        return False
    fsync_dir(dest.parent)
    return True


def remove_stale_temporaries(parent: Path, name: str | None = None, *, owner: bool = False) -> None:
    """Remove ``.NAME.tmp-PID`` / ``.NAME.old-PID`` leftovers in ``parent`` of processes that are
    no longer alive (and of this process), after applying the recovery rule to ``NAME``.

    ``name=None``: every name. ``owner=True``: the caller is the only writer of these names (e.g.
    at the start of its run), so every leftover is stale, whatever its PID.
    """
    parent = Path(parent)
    if not parent.is_dir():
        return
    for leftover_name in {n for _, _, n, _ in _temporaries(parent, name)}:
        recover_directory(parent / leftover_name, any_writer=owner)
    for path, _, _, pid in _temporaries(parent, name):
        if owner or not _other_writer_alive(pid):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists on this machine."""
    if pid <= 0:  # kill(0) and kill(-1) would address process groups
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _other_writer_alive(pid: int) -> bool:
    """This process never has a swap in flight while it looks for leftovers (it is here instead),
    so its own temporaries are stale too."""
    return pid != os.getpid() and pid_alive(pid)


def _temporaries(parent: Path, name: str | None) -> list[tuple[Path, str, str, int]]:
    """(path, "tmp" or "old", NAME, writer PID) of the temporaries of ``name`` (None: any)."""
    if not parent.is_dir():
        return []
    found = []
    for path in parent.iterdir():
        match = _TEMPORARY.match(path.name)
        if match and (name is None or match["name"] == name):
            found.append((path, match["kind"], match["name"], int(match["pid"])))
    return found


def _fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (deepest first), then ``root``."""
    for directory, _, files in os.walk(root, topdown=False):
        for file in files:
            fsync_file(Path(directory) / file)
        fsync_dir(Path(directory))
