"""Writing an activation cache (layout and resume rule: :mod:`saekit.data.cache.reading`)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_safetensors
from torch import Tensor

from saekit.core.atomic import atomic_write_bytes, remove_stale_temporaries
from saekit.data.cache.reading import (
    _DTYPES,
    FORMAT,
    MANIFEST,
    TENSOR_KEY,
    VERSION,
    CacheError,
    _read_manifest,
    _shard_name,
    dtype_name,
    held_out_shard,
    hook_names,
)
from saekit.data.documents.ranges import subtract, to_ranges, union
from saekit.data.hook_columns import join_hooks
from saekit.data.lm.model_set import check_models, split_hook
from saekit.data.lm.text import DOCUMENT_IDS

_UNKNOWN = -2
"""Document index of a token that came without one (such shards record no documents)."""


def _held_out_record(shards: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The held-out shard and the documents wholly inside it (None: nothing recorded)."""
    held = held_out_shard(len(shards))
    if held is None or any("documents" not in s for s in shards):
        return None
    training = union(*(s["documents"] for i, s in enumerate(shards) if i != held))
    return {"shard": held, "documents": subtract(shards[held]["documents"], training)}


def write_cache(
    out_dir: str | Path,
    activation_batches: Iterable[Tensor | Mapping[str, Tensor]],
    hook: str | Sequence[str],
    model_name: str,
    dtype: torch.dtype | str = torch.float32,
    *,
    shard_tokens: int = 1 << 18,
    max_tokens: int | None = None,
    metadata: Mapping[str, Any] | None = None,
    target_hook: str | None = None,
    models: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Write ``[n, d]`` activation batches (or :class:`Harvester` dicts, read at ``hook``) to
    ``out_dir`` as shards of ``shard_tokens`` tokens (the last may be smaller). Returns the
    final manifest. Resumes an interrupted run (see the module docstring); a finished cache
    with the same arguments is returned as is. Raises ``ValueError`` on NaN/inf activations.
    Dicts that also hold ``DOCUMENT_IDS`` ([n] document indices) have their documents recorded
    per shard. ``hook`` may be a list of hooks (dicts only): each token's row is the activation
    at every hook, in that order, and the manifest records each hook's width (``hooks``);
    ``target_hook`` (a transcoder's, as ``saekit cache --target-hook``) is the same as
    ``hook=[hook, target_hook]``. ``models``: the model set the hooks name as ``LABEL/HOOK``
    (several models on the same tokens: saekit.data.lm.model_set), recorded as ``models``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = dtype_name(dtype)
    torch_dtype = _DTYPES[name]
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
    remove_stale_temporaries(out, owner=True)  # one writer per cache directory
    names = [hook] if isinstance(hook, str) else list(hook)
    names += [] if target_hook is None else [target_hook]
    if len(set(names)) != len(names) or not names:
        raise ValueError(f"write_cache needs distinct hooks, got {names}")
    if models is not None:
        models = check_models(models, "write_cache models")
    for n in names:  # LABEL/HOOK of a model set, HOOK of one model
        split_hook(n, models, "write_cache")
    identity = {"model": model_name, "dtype": name, "shard_tokens": shard_tokens}
    if models is not None:
        identity["models"] = dict(models)
    manifest = _read_manifest(out) if (out / MANIFEST).exists() else None
    if manifest is not None:
        differing = {k: (manifest.get(k), v) for k, v in identity.items() if manifest.get(k) != v}
        if hook_names(manifest) != names:
            differing["hooks"] = (hook_names(manifest), names)
        if manifest.get("models") != identity.get("models"):
            differing["models"] = (manifest.get("models"), identity.get("models"))
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
            "hooks": [{"name": n, "width": None} for n in names],
            "d": None,
            "total_tokens": 0,
            "complete": False,
            "metadata": dict(metadata or {}),
            "shards": [],
        }
        atomic_write_bytes(out / MANIFEST, json.dumps(manifest, indent=1).encode())
    already = manifest["total_tokens"]
    accepted = already  # tokens written or pending

    def write_shard(acts_ND: Tensor, doc_ids_N: Tensor) -> None:
        if manifest["d"] is None:
            manifest["d"] = acts_ND.shape[1]
        data = save_safetensors({TENSOR_KEY: acts_ND.contiguous()})
        file = _shard_name(len(manifest["shards"]))
        atomic_write_bytes(out / file, data)
        entry = {
            "file": file,
            "n_tokens": len(acts_ND),
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
        if not (doc_ids_N == _UNKNOWN).any():
            entry["documents"] = to_ranges(doc_ids_N.unique().tolist())
        manifest["shards"].append(entry)
        manifest["total_tokens"] += len(acts_ND)
        atomic_write_bytes(out / MANIFEST, json.dumps(manifest, indent=1).encode())

    pending: list[Tensor] = []
    pending_docs: list[Tensor] = []  # document index of each pending token (_UNKNOWN: none)
    n_pending = 0
    to_skip = already
    for batch_index, batch in enumerate(activation_batches):
        docs = batch.get(DOCUMENT_IDS) if isinstance(batch, Mapping) else None
        if isinstance(batch, Mapping):
            widths = [batch[n].shape[-1] for n in names]
            batch = join_hooks(batch, names)
        elif len(names) > 1:
            raise TypeError("write_cache of several hooks reads harvester dicts")
        else:
            widths = [batch.shape[-1]]
        if batch.ndim != 2:
            batch = batch.reshape(-1, batch.shape[-1])
        docs = torch.full((len(batch),), _UNKNOWN) if docs is None else docs.cpu()
        d = manifest["d"] if manifest["d"] is not None else batch.shape[1]
        if batch.shape[1] != d:
            raise ValueError(f"batch {batch_index} has d={batch.shape[1]}, the cache has d={d}")
        _record_widths(manifest["hooks"], widths, batch_index)
        if to_skip >= len(batch):
            to_skip -= len(batch)
            continue
        batch, docs, to_skip = batch[to_skip:], docs[to_skip:], 0
        if max_tokens is not None:
            keep = max(max_tokens - accepted, 0)
            batch, docs = batch[:keep], docs[:keep]
        stored = batch.detach().to("cpu", torch_dtype)
        _check_finite(stored, batch, batch_index, names, name)
        if manifest["d"] is None:
            manifest["d"] = d
        pending.append(stored)
        pending_docs.append(docs)
        n_pending += len(stored)
        accepted += len(stored)
        while n_pending >= shard_tokens:
            flat, flat_docs = torch.cat(pending), torch.cat(pending_docs)
            write_shard(flat[:shard_tokens], flat_docs[:shard_tokens])
            rest, rest_docs = flat[shard_tokens:], flat_docs[shard_tokens:]
            pending, pending_docs = ([rest], [rest_docs]) if len(rest) else ([], [])
            n_pending = len(rest)
        if max_tokens is not None and accepted >= max_tokens:
            break
    if to_skip:
        raise CacheError(
            f"the source ended {to_skip} tokens before the {already} tokens already cached in"
            f" {out}: it is not the source this cache was started with"
        )
    if n_pending:
        write_shard(torch.cat(pending), torch.cat(pending_docs))
    if manifest["d"] is None:
        raise ValueError("write_cache got no activations")
    held_out = _held_out_record(manifest["shards"])
    if held_out is not None:
        manifest["held_out"] = held_out
    manifest["complete"] = True
    atomic_write_bytes(out / MANIFEST, json.dumps(manifest, indent=1).encode())
    return manifest


def _record_widths(hooks: list[dict[str, Any]], widths: list[int], batch_index: int) -> None:
    """Record each hook's width in the manifest's ``hooks`` (the first batch's), or check it."""
    for entry, width in zip(hooks, widths, strict=True):
        if entry["width"] is None:
            entry["width"] = width
        elif entry["width"] != width:
            raise ValueError(
                f"batch {batch_index} has width {width} at hook {entry['name']!r}, the cache has"
                f" {entry['width']}"
            )


def _check_finite(
    stored: Tensor, original: Tensor, batch_index: int, hooks: list[str], dtype: str
) -> None:
    if torch.isfinite(stored).all():
        return
    n_nan = int(torch.isnan(original).sum())
    n_inf = int(torch.isinf(original).sum())
    if n_nan or n_inf:
        raise ValueError(
            f"batch {batch_index} of hook {', '.join(map(repr, hooks))} has {n_nan} NaN and"
            f" {n_inf} inf activations; refusing to cache non-finite values"
        )
    raise ValueError(
        f"batch {batch_index} of hook {', '.join(map(repr, hooks))} overflows {dtype} (max |x| ="
        f" {float(original.abs().max()):.4g}); cache as float32 or bfloat16"
    )
