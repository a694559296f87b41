"""`qprobe tasks`: list the tasks and their splits; `qprobe tasks download NAME` fetches data."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "tasks",
        help="list tasks and their splits, or download a data set",
        description="List the registered tasks with their splits and sizes (reading the local "
        "data), or `download NAME` to fetch a data set into the cache (needs internet).",
    )
    p.add_argument("action", nargs="?", choices=["list", "download"], default="list")
    p.add_argument("name", nargs="?", help="data set to download (mbpp, gsm8k, hh-harmless)")
    p.add_argument("--data", help="data folder (default: $QPROBE_DATA, ../shared/data, cache)")
    p.add_argument("--to", help="download destination (default: the user cache folder)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qprobe.errors import QProbeError
    from qprobe.tasks import describe, get_task, list_tasks

    if args.action == "download":
        from qprobe.tasks.download import download

        if not args.name:
            raise QProbeError("tasks download: which data set? e.g. `qprobe tasks download mbpp`")
        for path in download(args.name, args.to):
            print(f"downloaded {path}")
        return 0
    out = []
    for name in list_tasks():
        try:
            splits, error = get_task(name, data=args.data).splits(), None
        except QProbeError as e:
            splits, error = {}, str(e)
        out.append({"task": name, "splits": splits, "description": describe(name), "error": error})
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    width = max(len(t["task"]) for t in out)
    for t in out:
        sizes = ", ".join(f"{k} {v}" for k, v in t["splits"].items()) or f"({t['error']})"
        print(f"{t['task']:<{width}}  {sizes}")
        print(f"{'':<{width}}  {t['description']}")
    return 0
