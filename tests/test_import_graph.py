"""The package's import graph: no circle through the collection wing, no arrow back up.

The graph is read from the source with `ast` (nothing is imported): an edge A -> B for every
`import B` / `from B import x` in module A, at module level or inside a function (both run some
time), except under `if TYPE_CHECKING:`. A name imported from a package that is itself a module
(`from qprobe import collect`) points at that module. Modules loaded through a registry key
(`importlib.import_module` of a string, e.g. `backends.registry.BACKENDS`) are not edges: a key is
the plug-in point that lets a lower floor use a higher one without importing it.

QPROBE_SRC=/path/to/src runs the checks on another checkout (e.g. to see them fail on an old one).
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

SRC = Path(os.environ.get("QPROBE_SRC") or Path(__file__).resolve().parents[1] / "src")

# The collection wing: the package and its modules (collect_ray and preferences: where it was
# before it was one folder, so that the checks also read an old checkout).
COLLECTION = ("qprobe.collect", "qprobe.collect_ray", "qprobe.preferences")
# What collection may not import (higher floors), and what may not import collection (lower).
ABOVE_COLLECTION = ("qprobe.adapters", "qprobe.cli", "qprobe.commands", "qprobe.experiment",
                    "qprobe.serve", "qprobe.policy", "qprobe.train", "qprobe.probe",
                    "qprobe.evaluate", "qprobe.embed")
BELOW_COLLECTION = ("qprobe.backends", "qprobe.tasks", "qprobe.rollouts", "qprobe.sandbox",
                    "qprobe.features", "qprobe.models", "qprobe.fileio", "qprobe.errors",
                    "qprobe.defaults")


def _modules(src: Path) -> dict[str, Path]:
    out = {}
    for p in sorted((src / "qprobe").rglob("*.py")):
        parts = list(p.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Every Import / ImportFrom node, not descending into `if TYPE_CHECKING:` bodies."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _target(name: str, modules: dict[str, Path]) -> str | None:
    """The module `name` names, or the longest package prefix of it that is one."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    """{module: the qprobe modules it imports}."""
    modules = _modules(src)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        is_pkg = path.name == "__init__.py"
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:  # relative: from the package this module is in
                    pkg = mod.split(".")
                    pkg = pkg[: len(pkg) - node.level + (1 if is_pkg else 0)]
                    base = ".".join(pkg + ([base] if base else []))
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                         for a in node.names]
            for n in names:
                if n.split(".")[0] == "qprobe":
                    t = _target(n, modules)
                    if t is not None and t != mod:
                        graph[mod].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on, stack, out = set(), [], []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _under(mod: str, prefixes: tuple[str, ...]) -> bool:
    return any(mod == p or mod.startswith(p + ".") for p in prefixes)


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    if not (SRC / "qprobe").is_dir():
        pytest.fail(f"QPROBE_SRC={SRC} has no qprobe package")
    return import_graph(SRC)


def test_the_graph_is_read(graph):
    """The reader sees real edges (a broken reader would pass every check below)."""
    assert "qprobe.errors" in graph["qprobe.rollouts"]
    assert "qprobe.backends.base" in graph["qprobe.backends.hf.model"]
    assert any(_under(t, COLLECTION) for t in graph["qprobe.experiment.run"])


def test_no_circle_through_the_collection(graph):
    bad = [c for c in cycles(graph) if any(_under(m, COLLECTION) for m in c)]
    assert not bad, f"import circles through the collection: {bad}"


def test_no_circle_anywhere(graph):
    """train/ included: its modules (config, objectives, data, engines) import one way."""
    assert not cycles(graph), f"import circles: {cycles(graph)}"


def test_collection_imports_no_higher_floor_and_no_lower_floor_imports_it(graph):
    up = sorted((m, t) for m, ts in graph.items() if _under(m, COLLECTION)
                for t in ts if _under(t, ABOVE_COLLECTION))
    back = sorted((m, t) for m, ts in graph.items() if _under(m, BELOW_COLLECTION)
                  for t in ts if _under(t, COLLECTION))
    assert not up, f"collection imports a higher floor: {up}"
    assert not back, f"a lower floor imports collection: {back}"


def test_cycle_finder_finds_a_planted_circle():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(g) == [["a", "b", "c"]]
