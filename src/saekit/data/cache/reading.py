"""On-disk activation cache: sharded safetensors files plus a JSON manifest.

Layout of a cache directory::

    manifest.json              model, hooks, d, dtype, total_tokens, shard_tokens, shards[...],
                               held_out
    shard_000000.safetensors   one tensor "activations" [n_tokens, d]
    shard_000001.safetensors   ...

N hooks per token (version 2): ``hooks`` is ``[{"name": H, "width": w}, ...]`` in column order,
and each row is every hook's activation of one token, concatenated (``d`` = the sum of the
widths; layout and selection: saekit.data.hook_columns). Version 1 manifests (``hook``, and for
transcoder caches ``target_hook`` and ``d_in``, the width of ``hook``) are read as the 1- and
2-hook cases (:func:`_upgrade_v1`); a resumed version 1 cache is rewritten as version 2.

Held out: the last shard when the cache has at least 2 (:func:`held_out_shard`); training
(``saekit train --cache``) never reads it. When the activations come with document indices
(``saekit cache`` passes them), each shard entry records the documents of its tokens
(``documents``: index ranges, saekit.data.documents.ranges) and ``held_out`` the documents
whose every token is in the held-out shard, which ``saekit eval --cache C --model M`` evaluates.

Every file is written atomically (:mod:`saekit.core.atomic`) and the manifest is
rewritten after each shard, so the manifest only ever lists complete shards. An interrupted
:func:`saekit.data.cache.writing.write_cache` resumes when called again with the same
arguments: it skips the first ``total_tokens`` tokens of the source and continues with the
next shard. For that to give the same cache as an uninterrupted run the source must yield the
same token sequence again: same documents in the same order (same seed, rank and world size),
same model, dtype and token filter, same batching. Only safetensors and JSON are ever read
back, nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from torch import Tensor

from saekit.core.atomic import sha256_file
from saekit.data.buffer import ShuffleBuffer
from saekit.data.documents.ranges import Ranges
from saekit.data.lm.model_set import manifest_problem

MANIFEST = "manifest.json"
FORMAT = "saekit-activation-cache"
VERSION = 2
TENSOR_KEY = "activations"

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
# safetensors header dtype names
_ST_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}


class CacheError(ValueError):
    """A cache directory, manifest or shard is missing, corrupt or inconsistent."""


def dtype_name(dtype: torch.dtype | str) -> str:
    name = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"unsupported cache dtype {dtype!r}; use one of {sorted(_DTYPES)}")
    return name


def _shard_name(index: int) -> str:
    return f"shard_{index:06d}.safetensors"


def held_out_shard(n_shards: int) -> int | None:
    """The shard training never reads: the last one, when there are at least 2."""
    return n_shards - 1 if n_shards >= 2 else None


def _read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise CacheError(f"{path} not found: not an activation cache directory") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CacheError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict):
        raise CacheError(f"{path}: expected a JSON object")
    if manifest.get("format") != FORMAT:
        raise CacheError(f"{path}: format is {manifest.get('format')!r}, expected {FORMAT!r}")
    if manifest.get("version") not in (1, VERSION):
        raise CacheError(f"{path}: version {manifest.get('version')} is not supported")
    problem = _manifest_problem(manifest)
    if problem:  # an edited manifest: one line naming it, not a KeyError or TypeError
        raise CacheError(f"{path}: {problem}")
    return _upgrade_v1(manifest) if manifest["version"] == 1 else manifest


def _manifest_problem(m: dict[str, Any]) -> str | None:
    types = {"model": str, "dtype": str, "complete": bool, "total_tokens": int}
    if m["version"] == 1:
        types["hook"] = str
    for key, kind in types.items():
        if not isinstance(m.get(key), kind):
            return f"{key} is missing or not a {kind.__name__}"
    if m["version"] != 1:
        hooks = m.get("hooks")
        if not isinstance(hooks, list) or not hooks:
            return "hooks is missing or not a list"
        for i, h in enumerate(hooks):
            if not (
                isinstance(h, dict)
                and isinstance(h.get("name"), str)
                and (h.get("width") is None or isinstance(h.get("width"), int))
            ):
                return f"hooks.{i} is malformed (fields name, width)"
    if not (m.get("d") is None or isinstance(m["d"], int)) or not isinstance(m.get("shards"), list):
        return "d or shards is malformed"
    shard = {"file": str, "n_tokens": int, "bytes": int, "sha256": str}
    for i, s in enumerate(m["shards"]):
        known = set(shard) | {"documents"}
        if (
            not isinstance(s, dict)
            or set(s) - known
            or any(not isinstance(s.get(k), kind) for k, kind in shard.items())
        ):
            return f"shards.{i} is malformed (fields {sorted(known)})"
    return manifest_problem(m.get("models"), [h["name"] for h in m.get("hooks") or []])


def _upgrade_v1(manifest: dict[str, Any]) -> dict[str, Any]:
    """A version 1 manifest as version 2: ``hook`` (+ ``target_hook``, its rows ``[hook |
    target_hook]`` with ``d_in`` the width of ``hook``) become ``hooks``."""
    m = dict(manifest, version=VERSION)
    names = [m.pop("hook")] + ([m.pop("target_hook")] if m.get("target_hook") else [])
    m.pop("target_hook", None)
    d, d_in = m.get("d"), m.pop("d_in", None)
    widths = [d] if len(names) == 1 else [d_in, None if d is None else d - d_in]
    m["hooks"] = [{"name": n, "width": w} for n, w in zip(names, widths, strict=True)]
    return m


def hook_names(manifest: dict[str, Any]) -> list[str]:
    """The hooks of a (version 2) manifest, in column order."""
    return [h["name"] for h in manifest["hooks"]]


def _safetensors_header(path: Path) -> dict[str, Any]:
    """Parse the JSON header of a safetensors file without loading the data."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CacheError(f"{path.name}: truncated (no safetensors header)")
        (n,) = struct.unpack("<Q", raw)
        header = f.read(n)
    if len(header) != n:
        raise CacheError(f"{path.name}: truncated safetensors header")
    try:
        return json.loads(header)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CacheError(f"{path}: corrupt safetensors header") from None


@dataclass(frozen=True)
class ShardInfo:
    file: str
    n_tokens: int
    bytes: int
    sha256: str
    documents: Ranges | None = None
    """Indices of the documents with tokens in this shard (None: not recorded)."""


class ActivationCache:
    """Read a cache written by :func:`write_cache`."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.manifest = _read_manifest(self.directory)
        m = self.manifest
        self.model: str = m["model"]
        self.d: int = m["d"]
        self.hooks: list[tuple[str, int]] = [(h["name"], h["width"]) for h in m["hooks"]]
        """``(hook, width)`` per hook in column order (saekit.data.hook_columns's segments)."""
        self.hook: str = self.hooks[0][0]
        """The first hook (an SAE cache's only one)."""
        self._check_widths()
        self.dtype_name: str = dtype_name(m["dtype"])
        self.dtype = _DTYPES[self.dtype_name]
        self.complete: bool = m["complete"]
        self.shards = [ShardInfo(**s) for s in m["shards"]]
        self.n_tokens: int = sum(s.n_tokens for s in self.shards)
        if self.n_tokens != m["total_tokens"]:
            raise CacheError(
                f"{self.directory / MANIFEST}: total_tokens {m['total_tokens']} != sum of shard"
                f" tokens {self.n_tokens}"
            )

    def __len__(self) -> int:
        return self.n_tokens

    def _check_widths(self) -> None:
        """The hooks' widths add up to the rows' width ``d`` (each shard's header has ``d``)."""
        if self.d is None:  # nothing written yet
            return
        widths = [w for _, w in self.hooks]
        if any(not isinstance(w, int) or w < 1 for w in widths) or sum(widths) != self.d:
            names = ", ".join(f"{name} ({w})" for name, w in self.hooks)
            raise CacheError(
                f"{self.directory / MANIFEST}: the hooks' widths, {names}, do not add up to the"
                f" width of its rows d = {self.d}"
            )

    @property
    def held_out_shard(self) -> int | None:
        """The shard training never reads (documents: saekit.data.documents.cache_documents)."""
        return held_out_shard(len(self.shards))

    def _check_header(self, shard: ShardInfo) -> None:
        path = self.directory / shard.file
        header = _safetensors_header(path)
        entry = header.get(TENSOR_KEY)
        if entry is None:
            raise CacheError(f"{shard.file}: no tensor {TENSOR_KEY!r}")
        if entry["dtype"] != _ST_DTYPES[self.dtype_name]:
            raise CacheError(
                f"{shard.file}: dtype {entry['dtype']} but the manifest says {self.dtype_name}"
            )
        if entry["shape"] != [shard.n_tokens, self.d]:
            raise CacheError(
                f"{shard.file}: shape {entry['shape']} but the manifest says"
                f" [{shard.n_tokens}, {self.d}]"
            )

    def verify(self, *, require_complete: bool = True) -> None:
        """Check every shard's size, sha256, dtype and shape; raise :class:`CacheError` naming
        the first bad shard file (or saying the cache is unfinished)."""
        if require_complete and not self.complete:
            raise CacheError(
                f"{self.directory} is incomplete ({self.n_tokens} tokens so far): its write_cache"
                " run was interrupted; run it again with the same arguments to resume"
            )
        for shard in self.shards:
            path = self.directory / shard.file
            if not path.exists():
                raise CacheError(f"{shard.file}: missing from {self.directory}")
            size = path.stat().st_size
            if size != shard.bytes:
                kind = "truncated" if size < shard.bytes else "too long"
                raise CacheError(
                    f"{shard.file}: {kind}, {size} bytes but the manifest says {shard.bytes}"
                )
            if sha256_file(path) != shard.sha256:
                raise CacheError(f"{shard.file}: sha256 mismatch (corrupt shard)")
            self._check_header(shard)

    def load_shard(self, index: int, columns: slice | Tensor = slice(None)) -> Tensor:
        """Shard ``index`` as a ``[n_tokens, d]`` tensor (its ``columns`` only, e.g. some hooks':
        saekit.data.hook_columns.select_columns): size and header checked, and its sha256
        computed over the very bytes it is loaded from (:func:`read_verified_shard`)."""
        shard = self.shards[index]
        path = self.directory / shard.file
        if not path.exists():
            raise CacheError(f"{shard.file}: missing from {self.directory}")
        if path.stat().st_size != shard.bytes:
            raise CacheError(
                f"{shard.file}: {path.stat().st_size} bytes but the manifest says {shard.bytes}"
            )
        self._check_header(shard)
        return read_verified_shard(path, shard.sha256, self.directory)[:, columns]

    def rank_shards(self, rank: int = 0, world_size: int = 1) -> list[int]:
        """Shard indices of ``rank``: ``rank, rank + world_size, ...``."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        return list(range(rank, len(self.shards), world_size))

    def spread_sample(
        self, n_tokens: int, seed: int, max_shards: int = 8, columns: slice | Tensor = slice(None)
    ) -> Tensor:
        """``n_tokens`` float32 rows, seeded, evenly from up to ``max_shards`` evenly spaced
        shards: an SAE's initialisation sample. The start of a shuffled stream would come from
        one shard (buffer <= shard) and bias scale and b_dec towards its part of the corpus."""
        n, n_use = len(self.shards), min(len(self.shards), max_shards)
        picks = sorted({round(i * (n - 1) / max(n_use - 1, 1)) for i in range(n_use)})
        g = torch.Generator().manual_seed(seed)
        base, extra = divmod(n_tokens, len(picks))
        parts = []
        for j, index in enumerate(picks):
            x = self.load_shard(index, columns)
            rows = torch.randperm(len(x), generator=g)[: base + (j < extra)].sort().values
            parts.append(x[rows].to(torch.float32))
        return torch.cat(parts)

    def iter_batches(
        self,
        batch_size: int,
        shuffle_buffer_tokens: int = 0,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        *,
        epoch: int = 0,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        columns: slice | Tensor = slice(None),
    ) -> Iterator[Tensor]:
        """``[batch_size, d]`` batches of this rank's shards (their ``columns`` only).

        ``shuffle_buffer_tokens > 0`` shuffles the shard order and mixes tokens through a
        :class:`ShuffleBuffer` of that many tokens (seeded by ``seed`` and ``epoch``); 0 reads
        in file order. With ``world_size > 1`` every rank yields the same number of full
        batches (the smallest rank's share), so data-parallel steps stay in lockstep.
        """
        order = self.rank_shards(rank, world_size)
        if world_size > 1:
            per_rank = [
                sum(self.shards[i].n_tokens for i in self.rank_shards(r, world_size))
                for r in range(world_size)
            ]
            n_batches: int | None = min(per_rank) // batch_size
        else:
            n_batches = None
        mixed_seed = seed * 1_000_003 + epoch
        if shuffle_buffer_tokens > 0:
            g = torch.Generator().manual_seed(mixed_seed)
            order = [order[i] for i in torch.randperm(len(order), generator=g).tolist()]
            chunks = (self.load_shard(i, columns) for i in order)
            capacity = max(shuffle_buffer_tokens, batch_size)
            batches = ShuffleBuffer(capacity, batch_size, seed=mixed_seed).iterate(chunks)
        else:
            batches = _rebatch((self.load_shard(i, columns) for i in order), batch_size)
        for count, batch in enumerate(batches):
            if n_batches is not None and count >= n_batches:
                return
            if dtype is not None or device is not None:
                batch = batch.to(device=device, dtype=dtype)
            yield batch


def read_verified_shard(path: Path, sha256: str, directory: Path | None = None) -> Tensor:
    """A shard's tensor, read once: the bytes are hashed as they are read and the tensor is
    built from those same bytes, so a changed value is caught at the cost of one sha256 pass
    (about 1-2 GB/s on one core; a 400 MB shard of 64 batches of 4096 x 768 bf16 costs ~0.3 s)
    and no second read. Raises :class:`CacheError` naming the shard."""
    h = hashlib.sha256()
    data = bytearray()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
            data += block
    if h.hexdigest() != sha256:
        where = f" in {directory}" if directory is not None else ""
        raise CacheError(
            f"{path.name}{where}: sha256 mismatch, the shard is corrupt (run saekit cache verify)"
        )
    try:
        return load_safetensors(bytes(data))[TENSOR_KEY]
    except Exception as exc:
        raise CacheError(f"{path.name}: unreadable ({exc})") from exc


def _rebatch(chunks: Iterable[Tensor], batch_size: int) -> Iterator[Tensor]:
    """Cut a stream of ``[n, d]`` chunks into ``[batch_size, d]`` batches (last may be smaller)."""
    pending: list[Tensor] = []
    n = 0
    for chunk in chunks:
        pending.append(chunk)
        n += len(chunk)
        if n >= batch_size:
            flat = torch.cat(pending)
            full = len(flat) // batch_size * batch_size
            yield from flat[:full].split(batch_size)
            pending = [flat[full:]] if full < len(flat) else []
            n = len(flat) - full
    if n:
        yield torch.cat(pending)


def held_out_problem(manifest: dict[str, Any], where: Any) -> str | None:
    """Why the cache at ``where`` holds no held-out document to evaluate on, or None: its last
    shard (held out) records documents, but none lies wholly inside it (one long document
    spans the last shards), so ``saekit eval --cache`` with --model, and the pipeline's
    evaluation, would evaluate nothing."""
    held = manifest.get("held_out")
    if held is None or held.get("documents"):
        return None
    return (
        f"the activation cache {where} holds no whole document in its held-out last shard "
        f"(shard {held.get('shard')}: a document spans the last shards), so nothing can be "
        "evaluated on held-out documents; raise --shard-tokens (pipeline: cache.shard_tokens) "
        "above the longest document's tokens, or cache more, shorter documents"
    )
