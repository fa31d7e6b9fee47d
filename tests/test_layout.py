"""The layout's rules, read from the source: which package may import which.

jobs -> pipeline -> maskrcnn, one way; jobs/ reaches maskrcnn/ only through
pipeline/; pipeline/segment/ and pipeline/train/ never import each other;
maskrcnn/ needs neither Ray nor fsspec nor Arrow at import time.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import REPO


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, at top level or inside functions (absolute names)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def offenders(folder: str, forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    """Files under ``folder`` importing a module that starts with one of ``forbidden``."""
    found = {}
    for path in sorted((REPO / folder).rglob("*.py")):
        bad = sorted(
            m
            for m in imported_modules(path)
            if any(m == f or m.startswith(f + ".") for f in forbidden)
        )
        if bad:
            found[str(path.relative_to(REPO))] = bad
    return found


@pytest.mark.parametrize(
    ("folder", "forbidden"),
    [
        ("maskrcnn", ("pipeline", "jobs", "ray", "pyarrow", "duckdb")),
        ("pipeline", ("jobs",)),
        ("jobs", ("maskrcnn",)),
        ("pipeline/segment", ("pipeline.train",)),
        ("pipeline/train", ("pipeline.segment",)),
    ],
)
def test_imports_point_one_way(folder, forbidden):
    assert offenders(folder, forbidden) == {}


def test_maskrcnn_reads_fsspec_only_inside_the_checkpoint_io():
    """maskrcnn/ works without fsspec: only checkpoint I/O of remote URIs imports it, lazily."""
    users = offenders("maskrcnn", ("fsspec",))
    assert set(users) <= {"maskrcnn/checkpoint.py"}
    source = (REPO / "maskrcnn/checkpoint.py").read_text()
    assert "\nimport fsspec" not in source and "\nfrom fsspec" not in source


def test_no_test_module_imports_another_or_bench():
    assert offenders("tests", ("bench",)) == {}
    for path in sorted((REPO / "tests").rglob("*.py")):
        others = [m for m in imported_modules(path) if m.split(".")[0].startswith("test_")]
        assert others == [], path


PACKAGES = ("maskrcnn", "pipeline", "jobs")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the project's modules it names in an import, at top level or inside a
    function (a function-local import closes a cycle as surely, only later)."""
    paths = {module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}
    graph = {}
    for name, path in paths.items():
        # "from a.b import c" names module a.b.c when there is one, else a.b
        targets = {m for m in imported_modules(path) if m in paths}
        graph[name] = {
            m
            for m in targets
            if m != name and not any(o.startswith(m + ".") and o in targets for o in targets)
        }
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while (member := stack.pop()) != node:
                component.append(member)
            component.append(node)
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_import_graph_finds_a_cycle_hidden_in_a_function():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_anywhere():
    graph = import_graph()
    assert len(graph) > 50 and graph["pipeline.segment.driver"]  # the graph is the project's
    assert cycles(graph) == []
