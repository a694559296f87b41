"""`qprobe tasks`: list the tasks and their splits; `qprobe tasks download NAME` fetches data."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field

from qprobe.commands.flags import add_flags, from_args


@dataclass
class TasksOptions:
    action: str = field(default="list", metadata={
        "positional": True, "nargs": "?", "choices": ["list", "download"], "show_default": False,
        "help": None})
    name: str | None = field(default=None, metadata={
        "positional": True, "nargs": "?",
        "help": "data set to download (mbpp, gsm8k, hh-harmless)"})
    data: str | None = field(default=None, metadata={
        "help": "data folder (default: $QPROBE_DATA, ../shared/data, cache)"})
    to: str | None = field(default=None, metadata={
        "help": "download destination (default: the user cache folder)"})
    json: bool = field(default=False, metadata={"action": "store_true", "help": "print JSON"})


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "tasks",
        help="list tasks and their splits, or download a data set",
        description="List the registered tasks with their splits and sizes (reading the local "
        "data), or `download NAME` to fetch a data set into the cache (needs internet).",
    )
    add_flags(p, TasksOptions)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qprobe.errors import QProbeError
    from qprobe.tasks import describe, get_task, list_tasks

    o = from_args(TasksOptions, args)
    if o.action == "download":
        from qprobe.tasks.download import download

        if not o.name:
            raise QProbeError("tasks download: which data set? e.g. `qprobe tasks download mbpp`")
        for path in download(o.name, o.to):
            print(f"downloaded {path}")
        return 0
    out = []
    for name in list_tasks():
        try:
            splits, error = get_task(name, data=o.data).splits(), None
        except QProbeError as e:
            splits, error = {}, str(e)
        out.append({"task": name, "splits": splits, "description": describe(name), "error": error})
    if o.json:
        print(json.dumps(out, indent=2))
        return 0
    width = max(len(t["task"]) for t in out)
    for t in out:
        sizes = ", ".join(f"{k} {v}" for k, v in t["splits"].items()) or f"({t['error']})"
        print(f"{t['task']:<{width}}  {sizes}")
        print(f"{'':<{width}}  {t['description']}")
    return 0
