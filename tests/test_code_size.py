"""Size limits that keep the library legible: no function over 60 lines, no class over 300."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "icl_cl"
MAX_FUNCTION_LINES = 60
MAX_CLASS_LINES = 300

# Over the limits today. Remove an entry once it fits: the test says when an entry is no longer
# needed.
KNOWN: set[str] = set()


def _too_long() -> dict[str, int]:
    """``path:Qualified.name`` -> lines, for every function or class over its limit."""
    found: dict[str, int] = {}

    def visit(node: ast.AST, path: str, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                lines = (child.end_lineno or child.lineno) - child.lineno + 1
                limit = MAX_CLASS_LINES if isinstance(child, ast.ClassDef) else MAX_FUNCTION_LINES
                if lines > limit:
                    found[f"{path}:{name}"] = lines
                visit(child, path, f"{name}.")
            else:
                visit(child, path, prefix)

    for file in sorted(PACKAGE.rglob("*.py")):
        visit(ast.parse(file.read_text(encoding="utf-8")), file.relative_to(PACKAGE).as_posix(), "")
    return found


def test_no_function_or_class_is_over_its_limit():
    found = _too_long()
    new = {name: lines for name, lines in found.items() if name not in KNOWN}
    assert not new, (
        f"over {MAX_FUNCTION_LINES} lines (function) or {MAX_CLASS_LINES} (class): {new}"
    )
    gone = sorted(name for name in KNOWN if name not in found)
    assert not gone, f"now within the limits, remove from KNOWN: {gone}"


def test_the_classifier_is_a_few_hundred_lines():
    assert len((PACKAGE / "classifier.py").read_text(encoding="utf-8").splitlines()) <= 300
