"""The inputs candidates are run on, as call-expression text. Read with `ast` in this process
(parsing only: nothing of a prompt, a candidate or a model-written test is executed here).

MBPP shows one assert, `assert f(args) == expected`: its input is the call `f(args)`. HumanEval
shows docstring examples (`>>> f(args)`, doctest sources, setup statements included) and prose
examples (`f(args) => value`). Model-written tests are asserts on the entry point.
"""

from __future__ import annotations

import ast
import builtins

PARSE_ERRORS = (SyntaxError, ValueError, RecursionError, MemoryError, OverflowError)


def _parse(src: str) -> ast.Module | None:
    try:
        return ast.parse(src)
    except PARSE_ERRORS:
        return None


def entry_point(assert_src: str) -> str | None:
    """The function an assert tests: the first called plain name that is not a builtin
    (`assert set(f(x)) == {1}` -> "f"), else the first called plain name (MBPP has a task whose
    function is `sum`); None if there is none or the text does not parse."""
    tree = _parse(assert_src)
    names = [node.func.id for node in (ast.walk(tree) if tree is not None else ())
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)]
    return next((n for n in names if not hasattr(builtins, n)), names[0] if names else None)


def calls_of(src: str, name: str) -> list[str]:
    """Source text of the outermost calls of `name` in `src`, in order
    (`assert f(1, 2) == f(2, 1)` -> ["f(1, 2)", "f(2, 1)"]); [] if it does not parse."""
    tree = _parse(src)
    if tree is None:
        return []
    out: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == name:
            seg = ast.get_source_segment(src, node)
            if seg:
                out.append(seg)
            return
        for child in ast.iter_child_nodes(node):
            visit(child)

    try:
        visit(tree)
    except RecursionError:
        return []
    return out


def _docstring_sources(prompt: str, name: str) -> list[str]:
    """The `>>>` example sources of function `name`'s docstring in `prompt` (a signature +
    docstring prompt, completed with `pass` to parse)."""
    import doctest

    tree = _parse(prompt + "    pass\n")
    for node in ast.walk(tree) if tree is not None else ():
        if isinstance(node, ast.FunctionDef) and node.name == name:
            try:
                examples = doctest.DocTestParser().get_examples(ast.get_docstring(node) or "")
            except ValueError:
                return []
            return [e.source.strip() for e in examples if e.source.strip()]
    return []


def shown_inputs(row: dict) -> tuple[str | None, list[str]]:
    """(entry point, the call / statement sources of the tests the prompt shows) for an MBPP
    row (`test_list`: the first assert is shown) or a HumanEval row (`entry_point`: docstring
    and prose examples); (None, []) when the prompt shows nothing runnable."""
    if row.get("entry_point"):
        from qprobe.tasks.humaneval import _prose_examples

        name = row["entry_point"]
        sources = _docstring_sources(row["prompt"], name)
        for a in _prose_examples(row["prompt"], name):
            sources += calls_of(a, name)[:1]
        return name, sources
    tests = row.get("test_list") or []
    if not tests:
        return None, []
    name = entry_point(tests[0])
    return name, (calls_of(tests[0], name) if name else [])


def parse_asserts(text: str, name: str, limit: int = 0) -> list[str]:
    """The single-line `assert` statements in model-written `text` that parse and call `name`,
    stripped and deduplicated in order (at most `limit`, 0 = all)."""
    out: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("assert ") or line in out:
            continue
        tree = _parse(line)
        if tree is None or len(tree.body) != 1 or not isinstance(tree.body[0], ast.Assert):
            continue
        if not calls_of(line, name):
            continue
        out.append(line)
        if limit and len(out) >= limit:
            break
    return out
