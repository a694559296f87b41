"""New inputs near the ones a prompt shows, for MBR-exec among the candidates that pass its test.

The candidates that pass the shown test all agree on its input, so agreement there (`exec_sig`)
cannot tell them apart. Run on inputs next to it (one argument changed at a time: an integer
moved by one or doubled, a string or a list reversed or shortened, a boolean flipped), correct
programs still agree with each other while wrong ones that happen to pass the shown case split
off. The mutations are made from the literal arguments of the shown call, read with `ast` in this
process (nothing runs here); a call whose arguments are not literals gets none. No expected value
is needed: only agreement is measured, so no hidden test is read.
"""

from __future__ import annotations

import ast
from typing import Any

MAX_VARIANTS = 8  # mutated calls per shown call


def _variants(v: Any) -> list[Any]:
    """Values next to a literal `v`, in a fixed order (none for types left alone)."""
    if isinstance(v, bool):
        return [not v]
    if isinstance(v, int):
        return [v + 1, v - 1, 2 * v, 0] if v else [1, 2]
    if isinstance(v, float):
        return [v * 1.5, v + 1.0, -v]
    if isinstance(v, str):
        return [s for s in (v[::-1], v[1:], v + v[:1], v.upper()) if s != v] if v else ["a"]
    if isinstance(v, (list, tuple)):
        out = [v[::-1], v[:-1], v + v[:1]] if v else []
        try:
            out.append(type(v)(sorted(v, reverse=True)))
        except TypeError:
            pass
        return [x for x in out if x != v]
    return []


def mutated_calls(call_src: str, limit: int = MAX_VARIANTS) -> list[str]:
    """Calls like `call_src` (`f(3, [1, 2])`) with one literal argument changed, deduplicated, in
    a fixed order (argument by argument, mutation by mutation), at most `limit`; [] when the call
    does not parse or has no literal argument."""
    try:
        tree = ast.parse(call_src.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return []
    call = tree.body
    if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name):
        return []
    name = call.func.id
    args: list[Any] = []
    for a in call.args:
        try:
            args.append(ast.literal_eval(a))
        except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
            return []  # a non-literal argument (a name, a call): leave the call alone
    kwargs: dict[str, Any] = {}
    for kw in call.keywords:
        if kw.arg is None:
            return []
        try:
            kwargs[kw.arg] = ast.literal_eval(kw.value)
        except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
            return []
    slots = [("a", i) for i in range(len(args))] + [("k", k) for k in kwargs]
    out: list[str] = []
    original = _render(name, args, kwargs)
    for kind, key in slots:
        current = args[key] if kind == "a" else kwargs[key]
        for new in _variants(current):
            a2, k2 = list(args), dict(kwargs)
            if kind == "a":
                a2[key] = new
            else:
                k2[key] = new
            src = _render(name, a2, k2)
            if src != original and src not in out:
                out.append(src)
    # interleave: the first mutation of every argument before the second of any
    by_slot: dict[int, list[str]] = {}
    for s in out:
        by_slot.setdefault(_changed_slot(s, original), []).append(s)
    mixed = [s for rnd in range(max((len(v) for v in by_slot.values()), default=0))
             for v in by_slot.values() if rnd < len(v) for s in [v[rnd]]]
    return mixed[:limit]


def _render(name: str, args: list[Any], kwargs: dict[str, Any]) -> str:
    parts = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()]
    return f"{name}({', '.join(parts)})"


def _changed_slot(src: str, original: str) -> int:
    """Index of the first argument where `src` differs from `original` (both from _render)."""
    a, b = ast.parse(src, mode="eval").body, ast.parse(original, mode="eval").body
    vals = list(a.args) + [k.value for k in a.keywords]
    base = list(b.args) + [k.value for k in b.keywords]
    return next((i for i, (x, y) in enumerate(zip(vals, base))
                 if ast.dump(x) != ast.dump(y)), 0)
