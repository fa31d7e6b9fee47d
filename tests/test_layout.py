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
