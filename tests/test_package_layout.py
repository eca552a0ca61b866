"""The package's shape: floors that import downward only, no import cycle, no name imported
through a module that merely re-exports it, no file too long to read whole.

Imports are read with ``ast``, not by importing: module-level, function-level and type-only
(``if TYPE_CHECKING:``) imports all count (a function-level import that closes a cycle is still
a cycle, only deferred; a type-only one still makes a reader of the lower floor read the upper).
``from saekit.x import y`` is an edge to ``saekit.x.y`` when that is a module, else to
``saekit.x``. Importing ``saekit.x.y`` also runs ``saekit/x/__init__.py``; that implicit edge is
not counted (package ``__init__`` files only gather their submodules' names, lazily).
The floors are docs/design.md's ("Floors"); keep the two in agreement.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "saekit"
MAX_LINES = 400

# Known exceptions, owned by others and to be emptied as they are fixed. The test fails when an
# entry is no longer needed, so the lists only shrink.
KNOWN_LONG_FILES: set[str] = set()
KNOWN_CYCLE_MODULES: set[str] = set()


def module_files() -> dict[str, Path]:
    """Every module of the package by dotted name (``saekit.data`` for data/__init__.py)."""
    modules = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(node: ast.AST, type_only: bool = True):
    """Import nodes anywhere under ``node``; those in the body of ``if TYPE_CHECKING:`` only
    with ``type_only``."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        if not type_only and isinstance(child, ast.If) and _is_type_checking(child.test):
            for other in child.orelse:
                yield from _imports(ast.Module(body=[other], type_ignores=[]), type_only)
            continue
        yield from _imports(child, type_only)


def imported_modules(name: str, path: Path, modules: set[str], type_only: bool = True) -> set[str]:
    """The saekit modules ``name`` (at ``path``) imports (``type_only``: those it imports only
    for type checking too)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in _imports(ast.parse(path.read_text(), str(path)), type_only):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                package = name.split(".") if is_package else name.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join([*package, base] if base else package)
            targets = [f"{base}.{alias.name}" for alias in node.names]
            targets = [t if t in modules else base for t in targets]
        found |= {t for t in targets if t in modules and t != name}
    return found


def import_graph(type_only: bool = True) -> dict[str, set[str]]:
    files = module_files()
    return {
        name: imported_modules(name, path, set(files), type_only) for name, path in files.items()
    }


def cyclic_components(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in graph.get(module, ()):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = set()
            while True:
                member = stack.pop()
                component.add(member)
                if member == module:
                    break
            if len(component) > 1:
                components.append(component)

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return components


def find_cycle(graph: dict[str, set[str]], allowed: set[str] = frozenset()) -> list[str] | None:
    """A shortest cycle ``[a, b, ..., a]`` through a module not in ``allowed``, or None: a cycle
    is tolerated only when every module of its component is allowed."""
    for component in sorted(cyclic_components(graph), key=min):
        if component <= allowed:
            continue
        start = min(component - allowed)
        parent = {start: start}
        queue = [start]
        for module in queue:  # breadth first, inside the component, back to start
            for target in sorted(graph[module] & component):
                if target == start:
                    path = [module]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [*reversed(path), start]
                if target not in parent:
                    parent[target] = module
                    queue.append(target)
    return None


def test_the_graph_sees_module_function_level_and_type_checking_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text(
        "from typing import TYPE_CHECKING\n"
        "from saekit.p import sub\n"  # a package's submodule
        "from saekit.q import name\n"  # a name: the edge goes to the module
        "if TYPE_CHECKING:\n    from saekit.t import T\n"
        "def f():\n    import saekit.f\n"
    )
    known = {"saekit.p", "saekit.p.sub", "saekit.q", "saekit.t", "saekit.f", "saekit.m"}
    found = imported_modules("saekit.m", module, known)
    assert found == {"saekit.p.sub", "saekit.q", "saekit.t", "saekit.f"}
    assert "saekit.t" not in imported_modules("saekit.m", module, known, type_only=False)


def test_find_cycle_reports_the_path_and_tolerates_only_wholly_allowed_cycles():
    graph = {"a": {"b"}, "b": {"c", "a"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "a"]
    assert find_cycle(graph, allowed={"a", "b", "c"}) is None
    assert find_cycle(graph, allowed={"a", "b"}) == ["c", "a", "b", "c"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    cycle = find_cycle(import_graph(), allowed=KNOWN_CYCLE_MODULES)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_known_cycle_modules_are_still_in_a_cycle():
    in_cycles = set().union(*cyclic_components(import_graph()))
    fixed = KNOWN_CYCLE_MODULES - in_cycles
    assert not fixed, f"in no import cycle any more, remove from KNOWN_CYCLE_MODULES: {fixed}"


def test_no_file_is_longer_than_a_reader_can_hold():
    lengths = {
        str(path.relative_to(SRC)): len(path.read_text().splitlines())
        for path in module_files().values()
    }
    too_long = {f: n for f, n in lengths.items() if n > MAX_LINES and f not in KNOWN_LONG_FILES}
    assert not too_long, f"files over {MAX_LINES} lines: {too_long}"
    fixed = {f for f in KNOWN_LONG_FILES if lengths.get(f, 0) <= MAX_LINES}
    assert not fixed, f"no longer over {MAX_LINES} lines, remove from KNOWN_LONG_FILES: {fixed}"


# ---------------------------------------------------------------------------------------- floors
# Lowest first; a module may import its own floor and those below, never one above. Within a
# floor the no-cycle test keeps the order. docs/design.md, "Floors", draws the same list.
FLOORS: tuple[tuple[str, ...], ...] = (
    ("saekit._version", "saekit.core"),
    ("saekit.kernels",),
    ("saekit.objective",),
    ("saekit.activations",),
    ("saekit.model",),
    ("saekit.data",),
    ("saekit.eval",),
    ("saekit.interop", "saekit.report"),
    ("saekit.train",),
    # SynthSAEBench, the benchmark: its protocol trains SAEs and scores them with its metrics;
    # its world and sampler are a data source (saekit.data.synthetic, data.source synthbench)
    ("saekit.synthbench",),
    ("saekit.commands",),
    ("saekit", "saekit.__main__", "saekit.cli"),
)
# (importer, imported) pairs that still go upward, to be emptied as they are fixed; the test
# fails when an entry is no longer needed, so the list only shrinks.
KNOWN_UPWARD: set[tuple[str, str]] = set()


def floor_of(module: str) -> int:
    """The floor of the longest prefix of ``module`` named in FLOORS."""
    best, best_len = None, -1
    for level, prefixes in enumerate(FLOORS):
        for prefix in prefixes:
            matches = module == prefix or module.startswith(prefix + ".")
            if matches and len(prefix) > best_len and (prefix != "saekit" or module == "saekit"):
                best, best_len = level, len(prefix)
    assert best is not None, f"{module} is on no floor: add it to FLOORS (and docs/design.md)"
    return best


def upward_imports() -> set[tuple[str, str]]:
    graph = import_graph()
    return {
        (importer, imported)
        for importer, targets in graph.items()
        for imported in targets
        if floor_of(imported) > floor_of(importer)
    }


def test_floor_of_picks_the_longest_prefix():
    assert floor_of("saekit") == len(FLOORS) - 1
    assert floor_of("saekit.core.configs") == 0
    assert floor_of("saekit.model.sae") > floor_of("saekit.activations.topk")
    assert floor_of("saekit.cli") == len(FLOORS) - 1


def test_every_import_goes_down_a_floor_or_stays():
    upward = upward_imports() - KNOWN_UPWARD
    assert not upward, "imports from a floor above: " + ", ".join(
        f"{a} -> {b}" for a, b in sorted(upward)
    )


def test_known_upward_imports_are_still_there():
    fixed = KNOWN_UPWARD - upward_imports()
    assert not fixed, f"no longer upward, remove from KNOWN_UPWARD: {fixed}"


# ------------------------------------------------------------------------------ no re-exports
def _defined_names(path: Path) -> tuple[set[str], dict[str, tuple[str, str]]]:
    """A module's top-level definitions, and the names it imports from saekit (name → (module,
    original name)); TYPE_CHECKING blocks excluded (nothing is defined there at run time)."""
    defined: set[str] = set()
    imported: dict[str, tuple[str, str]] = {}

    def walk(body):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                defined.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    defined.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(PACKAGE):
                for alias in node.names:
                    imported[alias.asname or alias.name] = (node.module, alias.name)
            elif isinstance(node, ast.If):
                if not _is_type_checking(node.test):
                    walk(node.body)
                walk(node.orelse)
            elif isinstance(node, ast.Try):
                walk(node.body)
                for handler in node.handlers:
                    walk(handler.body)

    walk(ast.parse(path.read_text(), str(path)).body)
    return defined, imported


def reexport_imports() -> list[str]:
    """Every ``from saekit.x import name`` in the package (outside ``saekit/__init__.py``, the
    public face) where ``name`` is neither defined in ``saekit.x`` nor a submodule of it."""
    files = module_files()
    found = []
    for name, path in files.items():
        if name == PACKAGE:
            continue
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.ImportFrom) or node.level or node.module not in files:
                continue
            defined, _ = _defined_names(files[node.module])
            for alias in node.names:
                if alias.name not in defined and f"{node.module}.{alias.name}" not in files:
                    found.append(f"{name}: from {node.module} import {alias.name}")
    return found


def test_reexport_detection_sees_an_import_through_a_shim(tmp_path):
    shim = tmp_path / "shim.py"
    shim.write_text("from saekit.core.configs import to_dict\nLOCAL = 1\n")
    defined, imported = _defined_names(shim)
    assert defined == {"LOCAL"} and imported == {"to_dict": ("saekit.core.configs", "to_dict")}


def test_every_name_is_imported_from_the_module_that_defines_it():
    found = reexport_imports()
    assert not found, "imports through a re-export (import from the defining module): " + "; ".join(
        found
    )
