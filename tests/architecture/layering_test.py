"""Dependencies point down: cli/reporting/deploy -> trainers -> training -> library -> nothing.

An AST walk over every module of the package (function-local imports included) builds the import
graph; the library packages must not import the layers above them, and the graph has no cycle.
Run ``pytest -q tests/architecture`` to see a violation named by module and line.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "fedjax_med"
LIBRARY = ("privacy", "federated", "secure", "attacks", "models", "data", "randomness", "config")
UPPER = ("trainers", "training", "reporting", "deploy", "cli")
# Who may import whom (by top-level subpackage); anything not listed is a violation.
ALLOWED_ABOVE = {
    "training": ("trainers", "reporting", "deploy", "cli"),
    "trainers": ("reporting", "deploy", "cli"),
    "reporting": ("cli",),
    "deploy": ("cli",),
    "cli": (),
}


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # "from a.b import c": module a.b.c when it exists (resolved in _graph), else a.b.
            found += [(f"{node.module}.{alias.name}", node.lineno) for alias in node.names]
    return [(name, line) for name, line in found if name.startswith("fedjax_med")]


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for imported, _ in _imports(path):
            targets.add(imported if imported in modules else imported.rsplit(".", 1)[0])
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_library_packages_import_nothing_above_them():
    violations = []
    for path in PACKAGE.rglob("*.py"):
        source = _layer(_module_name(path))
        for imported, line in _imports(path):
            target = _layer(imported)
            if target == source:
                continue
            if source in LIBRARY and target in UPPER:
                violations.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {imported}")
            elif source in UPPER and target in UPPER and source not in ALLOWED_ABOVE[target]:
                violations.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {imported}")
    assert not violations, "upward imports:\n" + "\n".join(sorted(violations))


def test_import_graph_has_no_cycle():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_the_walk_sees_a_known_edge():
    # Guards the test itself: a graph without the trainers' edge to the privacy code is broken.
    assert "fedjax_med.privacy.noise" in _graph()["fedjax_med.trainers.dp_sgd"]
