"""The shape of the package: no import cycles, no library module importing the CLI, small modules and functions.

The import graph is read from the source (every ``import`` at any depth, function-level ones included, so a
cycle cannot hide behind a deferred import); ``if TYPE_CHECKING:`` blocks are not imports at run time.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "nullbooth"
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported(tree: ast.AST, importer: str) -> set[str]:
    """The nullbooth modules ``importer`` imports (``from a.b import c`` names ``a.b.c`` when that is a module)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the importer's package
                package = importer.split(".")[: len(importer.split(".")) - node.level + (importer in _PACKAGES)]
                base = ".".join([*package, base] if base else package)
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {m for m in found if m in MODULES and m != importer}


_PACKAGES = {_module_name(p) for p in MODULES.values() if p.name == "__init__.py"}
GRAPH = {name: _imported(ast.parse(path.read_text(encoding="utf-8")), name) for name, path in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph)))
    for v in graph:
        if v not in index:
            strong(v)
    return out


def test_the_import_graph_has_no_cycles():
    # the root package imports its API lazily (PEP 562 __getattr__): no edge from it at run time
    graph = {m: (set() if m == "nullbooth" else deps) for m, deps in GRAPH.items()}
    assert _cycles(graph) == []


def test_the_cycle_finder_sees_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_library_module_imports_the_cli():
    offenders = {m: sorted(d for d in deps if d.startswith("nullbooth.cli"))
                 for m, deps in GRAPH.items() if not m.startswith("nullbooth.cli") and m != "nullbooth.__main__"}
    assert {m: d for m, d in offenders.items() if d} == {}


def test_modules_and_functions_are_small():
    too_long = {}
    for name, path in MODULES.items():
        text = path.read_text(encoding="utf-8")
        if (n := len(text.splitlines())) > MAX_MODULE_LINES:
            too_long[name] = n
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if (n := node.end_lineno - node.lineno + 1) > MAX_FUNCTION_LINES:
                    too_long[f"{name}:{node.name}"] = n
    assert too_long == {}


def test_import_nullbooth_and_help_load_no_torch():
    code = ("import sys\nimport nullbooth\nfrom nullbooth.cli import build_parser\nbuild_parser()\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n"
            "assert callable(nullbooth.load_covariance_data)\nprint('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.parametrize("name", sorted(__import__("nullbooth")._API))
def test_every_public_name_resolves(name):
    import nullbooth

    assert getattr(nullbooth, name) is not None
