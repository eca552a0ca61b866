"""The package's shape: no import cycles between saekit modules, no file too long to read whole.

Imports are read with ``ast``, not by importing: module-level and function-level imports both
count (a function-level import that closes a cycle is still a cycle, only deferred), imports
under ``if TYPE_CHECKING:`` do not (they never run). ``from saekit.x import y`` is an edge to
``saekit.x.y`` when that is a module, else to ``saekit.x``. Importing ``saekit.x.y`` also runs
``saekit/x/__init__.py``; that implicit edge is not counted (package ``__init__`` files only
gather names from their submodules).
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


def _runtime_imports(node: ast.AST):
    """Import nodes anywhere under ``node`` except in the body of ``if TYPE_CHECKING:``."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for other in child.orelse:
                yield from _runtime_imports(ast.Module(body=[other], type_ignores=[]))
            continue
        yield from _runtime_imports(child)


def imported_modules(name: str, path: Path, modules: set[str]) -> set[str]:
    """The saekit modules ``name`` (at ``path``) imports when it runs."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in _runtime_imports(ast.parse(path.read_text(), str(path))):
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


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imported_modules(name, path, set(files)) for name, path in files.items()}


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


def test_the_graph_sees_module_and_function_level_imports_but_not_type_checking_ones():
    graph = import_graph()
    assert "saekit.train.member" in graph["saekit.train.trainer"]  # module level
    assert "saekit.data.documents" in graph["saekit.train.config"]  # function level
    assert "saekit.kernels.triton_kernels" in graph["saekit.kernels.primitives"]  # pkg import mod
    assert "saekit.train.member" not in graph["saekit.train.comm"]  # under TYPE_CHECKING


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
