"""Inputs next to the shown one (verifier/fuzz.py): one literal argument changed at a time."""

from __future__ import annotations

from qprobe.verifier.fuzz import mutated_calls


def test_one_argument_changed_at_a_time_first_mutation_of_each_first():
    got = mutated_calls("f(3, [1, 2, 3])")
    assert got[:2] == ["f(4, [1, 2, 3])", "f(3, [3, 2, 1])"]  # interleaved by argument
    assert set(got) == {"f(4, [1, 2, 3])", "f(2, [1, 2, 3])", "f(6, [1, 2, 3])",
                        "f(0, [1, 2, 3])", "f(3, [3, 2, 1])", "f(3, [1, 2])",
                        "f(3, [1, 2, 3, 1])"}
    assert "f(3, [1, 2, 3])" not in got and len(got) == len(set(got))
    assert mutated_calls("f(3, [1, 2, 3])", limit=3) == got[:3]


def test_strings_bools_floats_and_keywords():
    assert mutated_calls("g('ab')") == ["g('ba')", "g('b')", "g('aba')", "g('AB')"]
    assert mutated_calls("h(True, k=2.5)") == ["h(False, k=2.5)", "h(True, k=3.75)",
                                               "h(True, k=3.5)", "h(True, k=-2.5)"]


def test_no_mutation_where_an_argument_is_not_a_literal_or_nothing_parses():
    for src in ("f(x)", "f(Pair(1, 2), 3)", "f(*a)", "f(**kw)", "not a call(", "g()",
                "obj.method(1)", "1 + 2"):
        assert mutated_calls(src) == [], src
