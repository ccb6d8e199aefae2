"""How the package is cut, checked: no import cycles (function-local imports included), no prints in the library.

The graph is read from the source with :mod:`ast`, so an import inside a
function counts as much as one at the top of a module: a cycle that only
closes at run time still ties two modules into one.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fisherstore"


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: Path) -> dict[str, set[str]]:
    """Module → the package modules it imports anywhere in its source (``from . import x`` counts as ``x``)."""
    paths = {module_name(p, package.parent): p for p in package.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.split(".")[: len(here.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    deps.add(sub if sub in paths else target)
            elif isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names)
        # The package's own __init__ re-exports everything lazily; importing it is not a dependency edge.
        graph[name] = {d for d in deps if d in paths and d not in (name, package.name)}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle_through_a_local_import(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import f\n")
    (pkg / "b.py").write_text("def f():\n    from . import a\n")
    (pkg / "c.py").write_text("from pkg.a import f\n")
    graph = import_graph(pkg)
    assert graph == {"pkg": set(), "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"}, "pkg.c": {"pkg.a"}}
    assert cycles(graph) == [["pkg.a", "pkg.b"]]


def test_the_package_has_no_import_cycle():
    graph = import_graph(PACKAGE)
    assert "fisherstore.store" in graph and "fisherstore.formats.base" in graph["fisherstore.store"]
    assert cycles(graph) == []


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_library_logs_instead_of_printing(path):
    calls = [
        node.lineno
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print"
    ]
    assert calls == [], f"{path.name}: print() at lines {calls}; use logging (the CLI prints)"


def architecture_order() -> list[str]:
    """The package's modules in the order ARCHITECTURE.md's layer tree lists them, top to bottom."""
    text = (ROOT / "ARCHITECTURE.md").read_text()
    tree = text[text.index("fisherstore/__init__.py") : text.index("```", text.index("fisherstore/__init__.py"))]
    order, folder = [], ""
    for line in tree.splitlines():
        entry = re.match(r"\s*(?:├─|└─)\s+(\S+)", line)
        nested = re.match(r"\s*│\s{2,}(\w+\.py)\b", line)
        if entry:
            path = entry.group(1)
            folder = path.rstrip("/") if path.endswith("/") else ""
            name = path.rstrip("/").removesuffix(".py").replace("/", ".")
        elif nested and folder:
            name = f"{folder}.{nested.group(1).removesuffix('.py')}"
        else:
            continue
        order.append(f"fisherstore.{name}")
    return order


def test_architecture_md_lists_every_module_above_what_it_imports():
    graph = import_graph(PACKAGE)
    order = architecture_order()
    # fisherstore.testing stands where synthetic.py does; its lazy re-export of backend.py is no layer edge.
    position = {name: i for i, name in enumerate(order)}
    position["fisherstore.testing"] = position["fisherstore.testing.synthetic"]
    assert sorted(set(graph) - set(position) - {"fisherstore", "fisherstore.data"}) == []
    upward = [
        f"{module} -> {dep}"
        for module, deps in graph.items()
        for dep in deps
        if module in position
        and dep in position
        and position[dep] < position[module]
        and not dep.startswith(module + ".")
    ]
    assert upward == [], "ARCHITECTURE.md lists these imports' targets above the importer"
