"""The `qprobe` command line.

Each subcommand lives in its own module `qprobe.commands.<name>` exposing
`register(subparsers) -> None`, which adds its parser and sets `func=run`. Modules import heavy
libraries (torch, transformers) inside `run`, so `qprobe --help` stays fast.

User errors (`QProbeError`) print one line `qprobe: error: ...` and exit with code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from qprobe import __version__
from qprobe.errors import QProbeError

# Order is the order shown in `qprobe --help`. Add a module here to add a command.
COMMANDS: list[str] = ["collect", "embed", "review", "train", "train_head", "evaluate", "generate", "adapt", "run", "demo", "tasks", "score", "signals", "sandbox_check", "serve"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qprobe",
        description="Q-probes: sample k completions, score each with a probe on the model's "
        "own features, return the best.",
    )
    parser.add_argument("--version", action="version", version=f"qprobe {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"qprobe.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        rc = args.func(args)
    except QProbeError as e:
        print(f"qprobe: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qprobe: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
