"""The adapter method registry: every entry resolves to its implementation, and the command's
choices are the registry's keys (a new method is one entry, no string compared elsewhere)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from qprobe.adapters.config import METHODS as CHOICES
from qprobe.adapters.methods import METHODS, AdapterMethod, method
from qprobe.errors import QProbeError

SRC = Path(__file__).resolve().parents[1] / "src" / "qprobe"


def test_every_entry_resolves_to_an_adapter_method_of_its_key():
    pytest.importorskip("peft")
    assert CHOICES == tuple(METHODS) == ("qadapter", "dpo")
    for key in METHODS:
        impl = method(key)
        assert isinstance(impl, AdapterMethod) and impl.key == key
    with pytest.raises(QProbeError, match="unknown method 'nope'"):
        method("nope")


def test_no_module_compares_method_strings():
    """Outside the registry's entries, no code branches on a method name."""
    bad = []
    for p in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Compare):
                consts = [c.value for c in ast.walk(node) if isinstance(c, ast.Constant)]
                if any(c in METHODS for c in consts):
                    bad.append(f"{p.relative_to(SRC)}:{node.lineno}")
    assert not bad, f"method strings compared at {bad}"
