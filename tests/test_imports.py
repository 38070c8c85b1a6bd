"""relay's modules import one another without circles.

Every import counts, including those under `if TYPE_CHECKING:` and inside functions: a
circle hidden that way still means neither module can be understood (or moved) without
the other. Read from the source, so the test does not depend on import order.
"""

from __future__ import annotations

import ast
from pathlib import Path

import relay

ROOT = Path(relay.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def relay_imports(path: Path, modules: set[str]) -> set[str]:
    """The relay modules `path` imports (`from pkg import mod` names the module mod)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path.parent)
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in found if name in modules}


def find_circle(graph: dict[str, set[str]]) -> list[str]:
    """One circle as [a, b, ..., a], or [] when the graph has none."""
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> list[str]:
        if node in path:
            return [*path[path.index(node) :], node]
        if node in done:
            return []
        path.append(node)
        for nxt in sorted(graph[node]):
            circle = visit(nxt)
            if circle:
                return circle
        path.pop()
        done.add(node)
        return []

    for node in sorted(graph):
        circle = visit(node)
        if circle:
            return circle
    return []


def test_find_circle_reports_one() -> None:
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b"}, "b": set()}) == []


def test_relay_has_no_import_circles() -> None:
    paths = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {name: relay_imports(path, set(paths)) - {name} for name, path in paths.items()}
    assert " -> ".join(find_circle(graph)) == ""
