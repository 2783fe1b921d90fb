"""The package's shape, as issue 15 left it: no module over 600 lines, and no import cycle
among relayd's modules (imports for type checking included; an import inside a function, made
when the function runs, is not part of its module's shape)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "relayd"
MAX_LINES = 600


def modules() -> dict[str, Path]:
    """Dotted name -> file, for every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def top_level_imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The relayd modules `name` imports at its top level or under `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, ast.If | ast.Try):  # TYPE_CHECKING, optional imports
                visit(node.body)
                visit(node.orelse)
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parent, base] if base else parent)
                found.add(base)
                found.update(f"{base}.{alias.name}" for alias in node.names)

    visit(tree.body)
    return {m for m in found if m in known and m != name}


def test_no_module_is_over_600_lines() -> None:
    long = {
        name: n
        for name, path in modules().items()
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"over {MAX_LINES} lines: {long}"


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the graph (its first node repeated at the end), or None."""
    done: set[str] = set()
    path: list[str] = []

    def walk(name: str) -> list[str] | None:
        if name in path:
            return [*path[path.index(name) :], name]
        if name in done:
            return None
        path.append(name)
        for dep in sorted(graph.get(name, ())):
            if found := walk(dep):
                return found
        path.pop()
        done.add(name)
        return None

    for name in sorted(graph):
        if found := walk(name):
            return found
    return None


def test_no_import_cycle() -> None:
    found = modules()
    graph = {}
    for name, path in found.items():
        deps = top_level_imports(name, path, set(found))
        if path.name == "__init__.py":  # a package importing its own modules is how it is made
            deps = {m for m in deps if not m.startswith(name + ".")}
        graph[name] = deps
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_check_finds_a_cycle(tmp_path: Path) -> None:
    """The check itself can fail: two modules importing each other, one of them only for
    type checking, are a cycle."""
    (tmp_path / "a.py").write_text("from relayd import b\n")
    (tmp_path / "b.py").write_text("if TYPE_CHECKING:\n    from . import a\n")
    known = {"relayd.a", "relayd.b"}
    graph = {
        "relayd.a": top_level_imports("relayd.a", tmp_path / "a.py", known),
        "relayd.b": top_level_imports("relayd.b", tmp_path / "b.py", known),
    }
    assert graph == {"relayd.a": {"relayd.b"}, "relayd.b": {"relayd.a"}}
    assert find_cycle(graph) == ["relayd.a", "relayd.b", "relayd.a"]
    assert find_cycle({"relayd.a": {"relayd.b"}, "relayd.b": set()}) is None
