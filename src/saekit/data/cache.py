"""On-disk activation cache: sharded safetensors files plus a JSON manifest.

Layout of a cache directory::

    manifest.json              model, hook, d, dtype, total_tokens, shard_tokens, shards[...]
    shard_000000.safetensors   one tensor "activations" [n_tokens, d]
    shard_000001.safetensors   ...

Every file is written atomically (:mod:`saekit.atomic`) and the manifest is
rewritten after each shard, so the manifest only ever lists complete shards. An interrupted
:func:`write_cache` resumes when called again with the same arguments: it skips the first
``total_tokens`` tokens of the source and continues with the next shard. For that to give the
same cache as an uninterrupted run the source must yield the same token sequence again: same
documents in the same order (same seed, rank and world size), same model, dtype and token
filter, same batching. Only safetensors and JSON are ever read back, nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

from saekit.atomic import atomic_write_bytes, remove_stale_temporaries, sha256_file
from saekit.data.buffer import ShuffleBuffer

MANIFEST = "manifest.json"
FORMAT = "saekit-activation-cache"
VERSION = 1
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


def write_cache(
    out_dir: str | Path,
    activation_batches: Iterable[Tensor | Mapping[str, Tensor]],
    hook: str,
    model_name: str,
    dtype: torch.dtype | str = torch.float32,
    *,
    shard_tokens: int = 1 << 18,
    max_tokens: int | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``[n, d]`` activation batches (or :class:`Harvester` dicts, read at ``hook``) to
    ``out_dir`` as shards of ``shard_tokens`` tokens (the last may be smaller). Returns the
    final manifest. Resumes an interrupted run (see the module docstring); a finished cache
    with the same arguments is returned as is. Raises ``ValueError`` on NaN/inf activations.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = dtype_name(dtype)
    torch_dtype = _DTYPES[name]
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
    remove_stale_temporaries(out, owner=True)  # one writer per cache directory
    identity = {"model": model_name, "hook": hook, "dtype": name, "shard_tokens": shard_tokens}
    manifest = _read_manifest(out) if (out / MANIFEST).exists() else None
    if manifest is not None:
        differing = {k: (manifest.get(k), v) for k, v in identity.items() if manifest.get(k) != v}
        if differing:
            raise CacheError(
                f"{out / MANIFEST} was written with different settings {differing}"
                " (manifest, requested); use a new directory"
            )
        if manifest["complete"]:
            return manifest
    else:
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            **identity,
            "d": None,
            "total_tokens": 0,
            "complete": False,
            "metadata": dict(metadata or {}),
            "shards": [],
        }
        atomic_write_bytes(out / MANIFEST, json.dumps(manifest, indent=1).encode())
    already = manifest["total_tokens"]
    accepted = already  # tokens written or pending

    def write_shard(acts_ND: Tensor) -> None:
        if manifest["d"] is None:
            manifest["d"] = acts_ND.shape[1]
        data = save_safetensors({TENSOR_KEY: acts_ND.contiguous()})
        file = _shard_name(len(manifest["shards"]))
        atomic_write_bytes(out / file, data)
        manifest["shards"].append(
            {
                "file": file,
                "n_tokens": len(acts_ND),
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
        )
        manifest["total_tokens"] += len(acts_ND)
        atomic_write_bytes(out / MANIFEST, json.dumps(manifest, indent=1).encode())

    pending: list[Tensor] = []
    n_pending = 0
    to_skip = already
    for batch_index, batch in enumerate(activation_batches):
        if isinstance(batch, Mapping):
            batch = batch[hook]
        if batch.ndim != 2:
            batch = batch.reshape(-1, batch.shape[-1])
        d = manifest["d"] if manifest["d"] is not None else batch.shape[1]
        if batch.shape[1] != d:
            raise ValueError(f"batch {batch_index} has d={batch.shape[1]}, the cache has d={d}")
        if to_skip >= len(batch):
            to_skip -= len(batch)
            continue
        batch, to_skip = batch[to_skip:], 0
        if max_tokens is not None:
            batch = batch[: max(max_tokens - accepted, 0)]
        stored = batch.detach().to("cpu", torch_dtype)
        _check_finite(stored, batch, batch_index, hook, name)
        if manifest["d"] is None:
            manifest["d"] = d
        pending.append(stored)
        n_pending += len(stored)
        accepted += len(stored)
        while n_pending >= shard_tokens:
            flat = torch.cat(pending)
            write_shard(flat[:shard_tokens])
            rest = flat[shard_tokens:]
            pending, n_pending = ([rest] if len(rest) else []), len(rest)
        if max_tokens is not None and accepted >= max_tokens:
            break
    if to_skip:
        raise CacheError(
            f"the source ended {to_skip} tokens before the {already} tokens already cached in"
            f" {out}: it is not the source this cache was started with"
        )
    if n_pending:
        write_shard(torch.cat(pending))
    if manifest["d"] is None:
        raise ValueError("write_cache got no activations")
    manifest["complete"] = True
    atomic_write_bytes(out / MANIFEST, json.dumps(manifest, indent=1).encode())
    return manifest


def _check_finite(
    stored: Tensor, original: Tensor, batch_index: int, hook: str, dtype: str
) -> None:
    if torch.isfinite(stored).all():
        return
    n_nan = int(torch.isnan(original).sum())
    n_inf = int(torch.isinf(original).sum())
    if n_nan or n_inf:
        raise ValueError(
            f"batch {batch_index} of hook {hook!r} has {n_nan} NaN and {n_inf} inf activations;"
            " refusing to cache non-finite values"
        )
    raise ValueError(
        f"batch {batch_index} of hook {hook!r} overflows {dtype} (max |x| ="
        f" {float(original.abs().max()):.4g}); cache as float32 or bfloat16"
    )


def _read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise CacheError(f"{path} not found: not an activation cache directory") from None
    except json.JSONDecodeError as exc:
        raise CacheError(f"{path} is not valid JSON: {exc}") from None
    if manifest.get("format") != FORMAT:
        raise CacheError(f"{path}: format is {manifest.get('format')!r}, expected {FORMAT!r}")
    if manifest.get("version") != VERSION:
        raise CacheError(f"{path}: version {manifest.get('version')} is not supported")
    return manifest


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
    except json.JSONDecodeError:
        raise CacheError(f"{path.name}: corrupt safetensors header") from None


@dataclass(frozen=True)
class ShardInfo:
    file: str
    n_tokens: int
    bytes: int
    sha256: str


class ActivationCache:
    """Read a cache written by :func:`write_cache`."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.manifest = _read_manifest(self.directory)
        m = self.manifest
        self.model: str = m["model"]
        self.hook: str = m["hook"]
        self.d: int = m["d"]
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

    def load_shard(self, index: int) -> Tensor:
        """Shard ``index`` as a ``[n_tokens, d]`` tensor: size and header checked, and its
        sha256 computed over the very bytes it is loaded from (:func:`read_verified_shard`)."""
        shard = self.shards[index]
        path = self.directory / shard.file
        if not path.exists():
            raise CacheError(f"{shard.file}: missing from {self.directory}")
        if path.stat().st_size != shard.bytes:
            raise CacheError(
                f"{shard.file}: {path.stat().st_size} bytes but the manifest says {shard.bytes}"
            )
        self._check_header(shard)
        return read_verified_shard(path, shard.sha256, self.directory)

    def rank_shards(self, rank: int = 0, world_size: int = 1) -> list[int]:
        """Shard indices of ``rank``: ``rank, rank + world_size, ...``."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        return list(range(rank, len(self.shards), world_size))

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
    ) -> Iterator[Tensor]:
        """``[batch_size, d]`` batches of this rank's shards.

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
            chunks = (self.load_shard(i) for i in order)
            capacity = max(shuffle_buffer_tokens, batch_size)
            batches = ShuffleBuffer(capacity, batch_size, seed=mixed_seed).iterate(chunks)
        else:
            batches = _rebatch((self.load_shard(i) for i in order), batch_size)
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
