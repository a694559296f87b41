"""One dataclass -> argparse flags, for every command.

A command declares its options as a dataclass; `add_flags(parser, Options)` makes one argument
per field and `from_args(Options, args)` builds the dataclass back from the parsed namespace, so
the options have one definition (name, type, default, help). A field becomes `--field-name`
(underscores as dashes) with:

- help: `metadata["help"]`, followed by `(default: ...)` when the default is worth showing;
- type from the annotation: `T | None` parses as T (default None); `bool` is `--x/--no-x`;
  `list[T]` takes comma-separated values (`--k 1,2,4`); `tuple[int, ...]` too, where "" or
  "none" is the empty tuple (`--hidden 256,64`);
- metadata that changes it: "positional" (True: an argument without dashes), "flag" (another
  flag name), "action" ("store_true" for a plain switch, "store_false" for `--no-x`, "append"
  for a repeatable flag), "type" (a parser replacing the annotation's), and "metavar",
  "choices", "nargs", "required" (passed to argparse as they are).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def parse_int_tuple(text: str) -> tuple[int, ...]:
    """'256,64' -> (256, 64); '' or 'none' -> () (e.g. a linear probe: no hidden layers)."""
    text = text.strip()
    if text.lower() in ("", "none", "linear"):
        return ()
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def comma_list(item: Callable[[str], Any], name: str = "values",
               check: Callable[[Any], bool] | None = None, why: str = "") -> Callable[[str], list]:
    """A parser of comma-separated values: '1,2,4' -> [1, 2, 4]. `item` parses each value;
    a value failing `check` is refused with the message `why`."""

    def parse(text: str) -> list:
        try:
            out = [item(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {name}, got {text!r}"
            ) from None
        if not out or (check is not None and not all(check(v) for v in out)):
            raise argparse.ArgumentTypeError(f"{why or 'expected ' + name}, got {text!r}")
        return out

    return parse


def _show(default: Any) -> str:
    if isinstance(default, list | tuple):
        return ",".join(_show(v) for v in default)
    if isinstance(default, float):
        return f"{default:g}"
    return str(default)


def _unwrap_optional(hint: Any) -> Any:
    """`T | None` -> T; other hints unchanged."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _argument(f: dataclasses.Field, hint: Any) -> tuple[list[str], dict[str, Any]]:
    """The names and keywords of `parser.add_argument` for one field."""
    md, default = f.metadata, _default(f)
    hint = _unwrap_optional(hint)
    kw: dict[str, Any] = {"default": default}
    action = md.get("action")
    if action:
        kw["action"] = action
        if action == "append":  # one value per flag, of the list's item type
            kw["type"] = md.get("type", typing.get_args(hint)[0])
    elif hint is bool:
        kw["action"] = argparse.BooleanOptionalAction
    elif "type" in md:
        kw["type"] = md["type"]
    elif typing.get_origin(hint) is tuple:
        kw["type"], kw["metavar"] = parse_int_tuple, "N,N,..."
    elif typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        kw["type"] = comma_list(item)
    elif hint in (int, float, str):
        kw["type"] = hint
    for key in ("metavar", "choices", "nargs", "required"):
        if key in md:
            kw[key] = md[key]
    show = (default not in (None, "", [], ()) and action not in ("store_true", "store_false")
            and not kw.get("required") and md.get("show_default", True))  # fmt: skip
    text = md.get("help", "")
    kw["help"] = None if text is None else text + (f" (default: {_show(default)})" if show else "")
    if md.get("positional"):
        kw.pop("required", None)
        return [f.name], kw
    kw["dest"] = f.name
    return [md.get("flag", "--" + f.name.replace("_", "-"))], kw


def add_flags(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Add one argument per field of dataclass `cls` (except `skip`), in field order."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name not in skip:
            names, kw = _argument(f, hints[f.name])
            parser.add_argument(*names, **kw)


def from_args(cls: type[T], args: argparse.Namespace) -> T:
    """The dataclass `cls` from parsed arguments (fields the namespace lacks keep defaults)."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in vars(args).items() if k in names})
