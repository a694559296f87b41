"""`qprobe demo`: collect -> train -> evaluate on the embedded model and the times-tables task."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from qprobe.commands.flags import add_flags, from_args


@dataclass
class DemoOptions:
    out: str = field(default="runs/demo", metadata={"help": "output folder"})
    seed: int = field(default=0, metadata={"help": "seed of sampling, subsets, bootstrap"})


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="the whole loop on the embedded SmolLM2-135M and a times-tables task (minutes)",
        description="Collect samples of the embedded SmolLM2-135M-Instruct on times-table "
        "problems, train probes (q, ce, pg x 3 seeds), evaluate on 40 held-out problems and write "
        "a report. Rerunning resumes from what is already in the output folder.",
    )
    add_flags(p, DemoOptions)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import time

    from qprobe.experiment import demo_config, run_experiment

    o = from_args(DemoOptions, args)
    t0 = time.perf_counter()
    res = run_experiment(demo_config(out=o.out, seed=o.seed))
    print()
    print(open(f"{res['report']}/results.md").read())
    print(f"demo finished in {time.perf_counter() - t0:.0f}s; report: {res['report']}")
    return 0
