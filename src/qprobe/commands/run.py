"""`qprobe run EXPERIMENT.yaml`: collect, baselines, train probes, evaluate, write a report."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from qprobe.commands.flags import add_flags, from_args


@dataclass
class RunOptions:
    config: str = field(default="", metadata={
        "positional": True, "metavar": "EXPERIMENT.yaml",
        "help": "experiment file (see experiments/)"})
    out: str | None = field(default=None, metadata={
        "help": "output folder (overrides the file's `out`)"})
    limit: int | None = field(default=None, metadata={
        "help": "cap every prompt set at N prompts (a quick smoke run)"})
    set: list[str] = field(default_factory=list, metadata={
        "action": "append", "metavar": "KEY=VALUE", "show_default": False,
        "help": "override a config value, e.g. --set sampling.k=4 --set eval.ks=[1,2,4]"})
    check: bool = field(default=False, metadata={
        "action": "store_true",
        "help": "only parse and validate the file, print the resolved config"})


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "run",
        help="a whole experiment from a YAML file (collect, train, evaluate, report)",
        description="Run or resume the experiment described by EXPERIMENT.yaml: collect train and "
        "test rollouts (cached, resumable), greedy and few-shot baselines, probes for every "
        "objective x seed, evaluation and a report folder (results.md, results.json, plots).",
    )
    add_flags(p, RunOptions)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from qprobe.errors import QProbeError
    from qprobe.experiment import load_config, run_experiment

    o = from_args(RunOptions, args)
    cfg = load_config(o.config, o.set)
    if o.out:
        cfg.out = o.out
    if o.limit is not None and o.limit < 1:
        raise QProbeError(f"--limit must be >= 1, got {o.limit}")
    if o.check:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    res = run_experiment(cfg, limit=o.limit)
    print()
    print(open(f"{res['report']}/results.md").read())
    print(f"report: {res['report']}")
    return 0
