"""`qprobe run EXPERIMENT.yaml`: collect, baselines, train probes, evaluate, write a report."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "run",
        help="a whole experiment from a YAML file (collect, train, evaluate, report)",
        description="Run or resume the experiment described by EXPERIMENT.yaml: collect train and "
        "test rollouts (cached, resumable), greedy and few-shot baselines, probes for every "
        "objective x seed, evaluation and a report folder (results.md, results.json, plots).",
    )
    p.add_argument("config", metavar="EXPERIMENT.yaml", help="experiment file (see experiments/)")
    p.add_argument("--out", default=None, help="output folder (overrides the file's `out`)")
    p.add_argument(
        "--limit",
        type=int,
        default=None,
        help="cap every prompt set at N prompts (a quick smoke run)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set sampling.k=4 --set eval.ks=[1,2,4]",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="only parse and validate the file, print the resolved config",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from qprobe.errors import QProbeError
    from qprobe.experiment import load_config, run_experiment

    cfg = load_config(args.config, args.set)
    if args.out:
        cfg.out = args.out
    if args.limit is not None and args.limit < 1:
        raise QProbeError(f"--limit must be >= 1, got {args.limit}")
    if args.check:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    res = run_experiment(cfg, limit=args.limit)
    print()
    print(open(f"{res['report']}/results.md").read())
    print(f"report: {res['report']}")
    return 0
