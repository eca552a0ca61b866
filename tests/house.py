#!/usr/bin/env python
"""Draw the package as a house from its imports: rooms, floors, upward arrows, circles.

A room is a sub-package of saekit (``saekit.data``) or a module at the root (``saekit.cli``).
Floors are tests/test_package_layout.py's FLOORS. Edges are the imports
test_package_layout reads (module, function and type-only imports). Prints a markdown report:

    .venv/bin/python tests/house.py            # this tree
    .venv/bin/python tests/house.py --src OTHER/src --floors OLD   # another tree, by an old order

``--floors`` takes a comma-separated room order, lowest first (rooms not named go on top), to
draw a tree whose FLOORS differ from today's. Not collected by pytest; nothing imports it.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import test_package_layout as layout  # noqa: E402


def room_of(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--src", type=Path, default=layout.SRC, help="the src/ folder to read")
    p.add_argument("--floors", help="room order, lowest first, comma-separated")
    args = p.parse_args(argv)
    layout.SRC = args.src.resolve()
    files = layout.module_files()
    graph = layout.import_graph()
    lines = {m: len(path.read_text().splitlines()) for m, path in files.items()}
    rooms = sorted({room_of(m) for m in files})
    if args.floors:
        order = args.floors.split(",")
        level = {r: order.index(r) if r in order else len(order) for r in rooms}
    else:
        level = {r: layout.floor_of(r) for r in rooms}

    print("| room | floor | modules | lines |\n| --- | --- | --- | --- |")
    for r in sorted(rooms, key=lambda r: (level[r], r)):
        members = [m for m in files if room_of(m) == r]
        print(f"| {r} | {level[r]} | {len(members)} | {sum(lines[m] for m in members)} |")
    edges = Counter(
        (room_of(a), room_of(b)) for a, ts in graph.items() for b in ts if room_of(a) != room_of(b)
    )
    upward = {e: n for e, n in edges.items() if level[e[1]] > level[e[0]]}
    cycles = layout.cyclic_components(graph)
    room_cycles = layout.cyclic_components({r: {b for (a, b) in edges if a == r} for r in rooms})
    root = [m for m in files if m.count(".") == 1 and files[m].name != "__init__.py"]
    print(
        f"\nrooms: {len(rooms)}; root modules: {len(root)}; floors used: {len(set(level.values()))}"
        f"; room-to-room import edges: {len(edges)}"
    )
    print(f"upward arrows (room → room above, module pairs): {len(upward)}")
    for (a, b), n in sorted(upward.items()):
        print(f"- {a} → {b} ({n})")
    print(f"circles between modules: {len(cycles)}; between rooms: {len(room_cycles)}")
    for c in cycles + room_cycles:
        print("- " + ", ".join(sorted(c)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
