"""One reused [N, M] buffer per SAE for the CPU encoder matmul of the fast path.

A fresh [N, M] tensor above glibc's mmap threshold (≤ 32 MiB) is mapped anew and faulted in
4 KiB at a time on every step: ~55 ms of a ~420 ms step at N = 4096, M = 8192 on the project's
CPU (benchmarks/README.md, "Host memory"). The fast path computes pre into the buffer it used
last time instead, but only when nothing else still holds that buffer: its storage's use count
says whether the previous step's pre-activations (or any view of them) are still alive, so a
caller who keeps an old output never sees it overwritten. CUDA's caching allocator already
reuses memory, so this runs on CPU tensors only, never under autocast (``out=`` is not
autocast) and never in inference mode (an inference tensor cannot be written outside it).
"""

from __future__ import annotations

import sys
import weakref

import torch
from torch import Tensor

_BUFFERS: weakref.WeakKeyDictionary[object, Tensor] = weakref.WeakKeyDictionary()
_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)


def _storage_object_refs(tensor: Tensor) -> int:
    """References to the storage's Python object, which PyTorch keeps unique per storage: a
    caller holding ``pre.untyped_storage()`` raises this without raising the use count."""
    return sys.getrefcount(tensor.untyped_storage())


_LONE_STORAGE_OBJECT_REFS = _storage_object_refs(torch.empty(1))
"""The count for a storage nobody else holds, measured (it depends on the Python version)."""


def free_buffer(owner: object, n_rows: int, n_cols: int, dtype: torch.dtype) -> Tensor | None:
    """An [n_rows, n_cols] CPU tensor ``owner`` may overwrite (its last one when nothing else
    holds it, else a new one it keeps for next time), or None where reuse does not apply."""
    if _storage_use_count is None or _autocast_on() or torch.is_inference_mode_enabled():
        return None  # an inference tensor could never be written outside inference mode
    buffer = _BUFFERS.get(owner)
    if buffer is None or buffer.shape != (n_rows, n_cols) or buffer.dtype != dtype or _held(buffer):
        buffer = torch.empty(n_rows, n_cols, dtype=dtype)
        _BUFFERS[owner] = buffer
    # An alias, not the cached tensor itself: whoever keeps the result (or anything made from
    # it) adds to the storage's use count, which is what _held reads.
    return buffer.view(n_rows, n_cols)


def _held(buffer: Tensor) -> bool:
    """Whether anything besides the cache holds the buffer's storage: another tensor (the use
    count is 2 for the cache's own tensor and the storage object made to read it), the storage
    object itself, or another process (a tensor sent through torch.multiprocessing moves to
    shared memory, and the sender keeps no count of the receiver)."""
    if buffer.is_shared():
        return True
    if _storage_object_refs(buffer) > _LONE_STORAGE_OBJECT_REFS:
        return True
    return _storage_use_count(buffer.untyped_storage()._cdata) > 2


def _autocast_on() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled()
