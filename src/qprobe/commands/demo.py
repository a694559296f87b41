"""`qprobe demo`: collect -> train -> evaluate on the embedded model and the times-tables task."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="the whole loop on the embedded SmolLM2-135M and a times-tables task (minutes)",
        description="Collect samples of the embedded SmolLM2-135M-Instruct on times-table "
        "problems, train probes (q, ce, pg x 3 seeds), evaluate on 40 held-out problems and write "
        "a report. Rerunning resumes from what is already in the output folder.",
    )
    p.add_argument("--out", default="runs/demo", help="output folder (runs/demo)")
    p.add_argument("--seed", type=int, default=0, help="seed of sampling, subsets, bootstrap (0)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import time

    from qprobe.demo import demo_config
    from qprobe.experiment import run_experiment

    t0 = time.perf_counter()
    cfg = demo_config(out=args.out, seed=args.seed)
    res = run_experiment(cfg)
    print()
    print(open(f"{res['report']}/results.md").read())
    print(f"demo finished in {time.perf_counter() - t0:.0f}s; report: {res['report']}")
    return 0
