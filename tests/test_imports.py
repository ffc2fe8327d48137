"""No import cycle between modules of appliance/, deferred (function-level) imports included:
each module's imports are read from its source, every `import` statement wherever it sits."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parent.parent


def modules() -> dict[str, Path]:
    found = {}
    for path in (REPO / "appliance").rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The appliance modules `name` imports, anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        for target in targets:
            module = target
            while module and module not in known:  # `from a.b import f`: the module a.b
                module = module.rpartition(".")[0]
            if module and module != name:
                out.add(module)
    return out


def cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle, as the modules along it; [] when there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return []

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return []


def test_no_import_cycle_between_appliance_modules() -> None:
    known = modules()
    graph = {name: imports_of(name, path, known) for name, path in known.items()}
    assert graph["appliance.cli"], "the walk found no imports at all"
    found = cycle(graph)
    assert not found, "import cycle: " + " -> ".join(found)


def test_the_walk_finds_a_cycle_closed_by_a_deferred_import(tmp_path: Path) -> None:
    """The checker itself: the cycle control.py and core.py had (one side importing the
    other inside a function) is found."""
    (tmp_path / "core.py").write_text(
        "def run():\n    from pkg.control import Server  # deferred\n    return Server\n")
    (tmp_path / "control.py").write_text("from pkg.core import run\n")
    known = {"pkg.core": tmp_path / "core.py", "pkg.control": tmp_path / "control.py"}
    graph = {name: imports_of(name, path, known) for name, path in known.items()}
    assert cycle(graph) == ["pkg.control", "pkg.core", "pkg.control"]
