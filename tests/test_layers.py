"""The package's layers: no import circle, and no import from a lower layer to a higher one.

Read from the source with ``ast`` (nothing is imported), counting every import: at the top of a
module, inside a function (deferred), and under ``TYPE_CHECKING``. Each layer may import its
own modules and those of the layers below it. A new module must be given a layer here.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = SRC / "hyperfleet"

# From the bottom up: (what the layer holds, the modules and packages in it).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("errors and the stored-trial schema", ("hyperfleet.errors", "hyperfleet.store.schema")),
    ("storage and the run folder", ("hyperfleet.store",)),
    ("sampling", ("hyperfleet.sampling",)),
    ("the machine's resources", ("hyperfleet.resources",)),
    ("the worker processes and their protocol", ("hyperfleet.workers",)),
    ("run settings", ("hyperfleet.config",)),
    ("the run's state and its views", ("hyperfleet.display",)),
    (
        "what objectives and callbacks use: the objective's other forms, the client, tracker tags",
        ("hyperfleet.objective", "hyperfleet.client", "hyperfleet.tracking"),
    ),
    ("many machines", ("hyperfleet.cluster",)),
    ("campaign files", ("hyperfleet.campaign",)),
    ("reports", ("hyperfleet.report",)),
    ("the controller", ("hyperfleet.controller",)),
    ("entry points", ("hyperfleet.app",)),
    ("the public package", ("hyperfleet",)),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int:
    """The index of the layer whose longest prefix names the module."""
    best, best_length = -1, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            inside = module == prefix or module.startswith(prefix + ".")
            if inside and len(prefix) > best_length:
                best, best_length = index, len(prefix)
    return best


def imported_modules(module: str) -> Iterator[str]:
    """The package's modules that ``module`` imports, anywhere in its source."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names if alias.name in MODULES)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            for alias in node.names:
                # The version is the package's own constant, set before its lazy imports.
                if base == "hyperfleet" and alias.name == "__version__":
                    continue
                if f"{base}.{alias.name}" in MODULES:  # from package import module
                    yield f"{base}.{alias.name}"
                elif base in MODULES:
                    yield base


GRAPH = {module: set(imported_modules(module)) - {module} for module in MODULES}


def test_every_module_has_a_layer() -> None:
    assert [module for module in MODULES if layer_of(module) < 0] == []


def test_no_module_imports_a_higher_layer() -> None:
    upward = [
        f"{module} ({LAYERS[layer_of(module)][0]}) imports {imported} "
        f"({LAYERS[layer_of(imported)][0]})"
        for module, imports in GRAPH.items()
        for imported in sorted(imports)
        if layer_of(imported) > layer_of(module)
    ]
    assert upward == []


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    circles.append(sorted(group))
    return circles


def test_no_import_circle() -> None:
    assert import_circles(GRAPH) == []


@pytest.mark.parametrize(
    ("graph", "circles"),
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
        ({"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"c"}}, [["a", "b"], ["c", "d"]]),
    ],
)
def test_circles_are_found(graph: dict[str, set[str]], circles: list[list[str]]) -> None:
    assert sorted(import_circles(graph)) == circles


def test_deferred_imports_count() -> None:
    """An import inside a function is an edge like any other (report/ once imported status
    that way, and status imported report)."""
    assert "hyperfleet.store.run_reader" in GRAPH["hyperfleet.report.batch"]
