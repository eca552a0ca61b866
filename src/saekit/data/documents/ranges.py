"""Sets of document indices as half-open ranges ``[[start, stop], ...]`` (``stop`` None: to the
end of the source): small in JSON however many documents, exact under union, intersection and
difference. Caches record their shards' documents this way, SAEs the documents they trained on.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

Ranges = list[list[Any]]
"""[[start, stop], ...]: sorted, disjoint, half-open; the last stop may be None (unbounded)."""


def spans(ranges: Ranges | None) -> list[tuple[float, float]]:
    """(start, stop) pairs, an unbounded stop as inf."""
    return [(a, math.inf if b is None else b) for a, b in ranges or []]


def _ranges(spans: Iterable[tuple[float, float]]) -> Ranges:
    """Sorted, merged (touching spans join), empty spans dropped."""
    out: list[list[float]] = []
    for a, b in sorted(s for s in spans if s[1] > s[0]):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [[int(a), None if b == math.inf else int(b)] for a, b in out]


def to_ranges(indices: Iterable[int]) -> Ranges:
    """The ranges of a collection of indices (any order, repeats allowed)."""
    return _ranges((i, i + 1) for i in indices)


def union(*sets: Ranges | None) -> Ranges:
    return _ranges(s for r in sets for s in spans(r))


def intersect(a: Ranges | None, b: Ranges | None) -> Ranges:
    return _ranges((max(x0, y0), min(x1, y1)) for x0, x1 in spans(a) for y0, y1 in spans(b))


def subtract(a: Ranges | None, b: Ranges | None) -> Ranges:
    kept = spans(a)
    for y0, y1 in spans(b):
        kept = [p for x0, x1 in kept for p in ((x0, min(x1, y0)), (max(x0, y1), x1))]
    return _ranges(kept)


def count(ranges: Ranges | None) -> int:
    """How many indices; an unbounded range raises (its end is unknown)."""
    if any(b is None for _, b in ranges or []):
        raise ValueError("cannot count an unbounded range of documents")
    return sum(b - a for a, b in ranges or [])


def contains(ranges: Ranges | None, index: int) -> bool:
    return any(a <= index < b for a, b in spans(ranges))
