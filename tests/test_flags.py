"""`qprobe.commands.flags`: one dataclass -> argparse flags, and back."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import pytest

from qprobe.commands.flags import add_flags, comma_list, from_args


@dataclass
class Options:
    path: str = field(default="", metadata={"positional": True, "metavar": "PATH", "help": "in"})
    k: int = field(default=8, metadata={"help": "candidates"})
    beta: float | None = field(default=None, metadata={"help": "temperature"})
    ks: list[int] = field(default_factory=lambda: [1, 2], metadata={"help": "k values"})
    hidden: tuple[int, ...] = field(default=(), metadata={"help": "hidden sizes"})
    standardize: bool = field(default=True, metadata={"help": "standardise"})
    all: bool = field(default=False, metadata={"action": "store_true", "help": "everything"})
    stop: list[str] = field(default_factory=list, metadata={"action": "append", "help": "stop"})
    mode: str = field(default="a", metadata={"choices": ["a", "b"], "help": "mode"})
    probe: str = field(default="", metadata={"required": True, "help": "probe folder"})
    betas: list[float] = field(default_factory=lambda: [0.0], metadata={
        "type": comma_list(float, "numbers", lambda v: v >= 0, "betas must be >= 0"),
        "help": "betas"})


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="t", exit_on_error=False)
    add_flags(p, Options)
    return p


def test_defaults_and_types_round_trip() -> None:
    o = from_args(Options, _parser().parse_args(["x", "--probe", "p"]))
    assert o == Options(path="x", probe="p")
    o = from_args(Options, _parser().parse_args([
        "x", "--probe", "p", "--k", "3", "--beta", "0.5", "--ks", "1,4", "--hidden", "256,64",
        "--no-standardize", "--all", "--stop", "a", "--stop", "b", "--mode", "b",
        "--betas", "0,0.1"]))  # fmt: skip
    assert o == Options(path="x", k=3, beta=0.5, ks=[1, 4], hidden=(256, 64), standardize=False,
                        all=True, stop=["a", "b"], mode="b", probe="p", betas=[0.0, 0.1])  # fmt: skip
    assert from_args(Options, _parser().parse_args(["x", "--probe", "p", "--hidden", "none"])).hidden == ()


def test_help_shows_defaults_once() -> None:
    text = _parser().format_help()
    assert "candidates (default: 8)" in text
    assert "k values (default: 1,2)" in text
    assert "standardise (default: True)" in text and "(default: True) (default" not in text
    assert "--standardize, --no-standardize" in text
    assert "temperature\n" in text and "hidden sizes\n" in text  # None, (): no default shown
    assert "everything (default" not in text and "--no-all" not in text


@pytest.mark.parametrize("argv", [
    ["x", "--probe", "p", "--mode", "c"],
    ["x", "--probe", "p", "--ks", "1,x"],
    ["x", "--probe", "p", "--betas", "-1"],
    ["x"],  # --probe is required
])  # fmt: skip
def test_bad_values_are_refused(argv: list[str]) -> None:
    with pytest.raises((argparse.ArgumentError, SystemExit)):
        _parser().parse_args(argv)
