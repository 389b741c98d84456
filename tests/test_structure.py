"""The package's shape is its architecture: separate rooms (public update, coefficients, backends,
engine, front ends, checkpoints, report), no import cycles between fastrms's modules, and no
module over about 500 lines or without a sentence saying its role. Imports inside functions
count too: a lazy import hides a cycle from the interpreter, not from a reader.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "fastrms"
MAX_LINES = 520
#: The compiled module (cffi): a leaf, whether built here or not.
EXTENSION = "fastrms._fastrms_c"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The fastrms modules that ``path`` imports, anywhere in the file."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from package import module` depends on the module; `from module import name`
            # (or a name the package defines) on the module or package itself.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files) | {EXTENSION}
    return {EXTENSION: set(), **{name: _imports(path, modules) for name, path in files.items()}}


def _cycles(graph: dict[str, set[str]]) -> set[frozenset[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, result = {}, {}, [], set(), set()

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                result.add(frozenset(component))

    for node in graph:
        if node not in index:
            visit(node)
    return result


def test_the_import_graph_is_read_correctly():
    graph = _graph()
    assert "fastrms.report.workload" in graph["fastrms.report.registry"]
    assert "fastrms.report.peers" in graph["fastrms.report.registry"]
    assert "fastrms.report.tables" in graph["fastrms.report.plots"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == {frozenset("abc")}


def test_no_import_cycles():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(sorted(c)) for c in cycles)


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_is_over_about_500_lines_and_each_says_its_role(path):
    source = path.read_text()
    lines = len(source.splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(PACKAGE)} has {lines} lines"
    if path.name != "_version.py":
        docstring = ast.get_docstring(ast.parse(source))
        assert docstring and len(docstring.split()) >= 5, f"{path.relative_to(PACKAGE)}: no role"


def test_the_rooms_are_there():
    graph = _graph()
    for room in ("_update", "_coefficients", "backends", "engine", "optimizer", "torch",
                 "checkpoint", "report"):
        assert f"fastrms.{room}" in graph, room
    # The engine knows no front end: the front ends depend on it, never the reverse.
    for name, imported in graph.items():
        if name.startswith("fastrms.engine"):
            assert not {m for m in imported if m.startswith(("fastrms.optimizer",
                                                              "fastrms.torch"))}, name
