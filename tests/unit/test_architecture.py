"""The size rules of docs/architecture.md, checked on the service's own code: no module over
400 lines, no function over 80, every module opening with a docstring that says what it is.
(The import direction is checked by import-linter in `make lint`.)"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("app", "workers", "ingestion", "retrieval")
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80


def _modules() -> list[Path]:
    found = [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]
    # Alembic revisions are written once and never grow; they are data, not structure.
    return [p for p in found if "migrations" not in p.relative_to(ROOT).parts]


MODULES = _modules()


def _name(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_the_packages_are_found() -> None:
    assert len(MODULES) > 100
    assert ROOT / "app" / "server" / "factory.py" in MODULES


@pytest.mark.parametrize("path", MODULES, ids=_name)
def test_module_is_small_and_says_what_it_is(path: Path) -> None:
    text = path.read_text()
    lines = text.count("\n")
    assert lines <= MAX_MODULE_LINES, (
        f"{_name(path)} has {lines} lines (at most {MAX_MODULE_LINES}): split it by concern"
    )
    tree = ast.parse(text)
    if text.strip():
        assert ast.get_docstring(tree), f"{_name(path)} has no module docstring"
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines, line {node.lineno})"
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"{_name(path)}: functions over {MAX_FUNCTION_LINES} lines: {long}"
