"""`qprobe review ROLLOUTS...`: the reviewer likelihood log p(instruction | program) of stored code
samples (Coder-Reviewer reranking; review.py)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from qprobe.commands.flags import add_flags, from_args


def register(subparsers: Any) -> None:
    from qprobe.review_config import ReviewConfig

    p = subparsers.add_parser(
        "review",
        help="score stored code samples by log p(instruction | program) (Coder-Reviewer)",
        description="For each stored candidate of ROLLOUTS (MBPP or HumanEval), run the model on "
        "the program followed by a request for its docstring and the prompt's docstring, and "
        "store the log-probability of the docstring's tokens (reviewer_sum, reviewer_mean) in "
        "embedded/reviewer-<shard>.parquet, with the cost in embedded/reviewer.json. Probes read "
        "them as --extras reviewer_sum, reviewer_mean, coder_reviewer, coder_reviewer_mean. "
        "Resumable: re-running continues where a killed run stopped.",
    )
    p.add_argument("rollouts", nargs="+", help="Rollouts folder(s), done in this order.")
    add_flags(p, ReviewConfig, skip=("rollouts",))
    p.add_argument("--json", action="store_true", help="Print each folder's summary as JSON.")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qprobe.embed import model_for
    from qprobe.review import ReviewConfig, load_reviewer, review_rollouts

    reviewer, loaded = None, None
    for folder in args.rollouts:
        cfg = from_args(ReviewConfig, argparse.Namespace(**{**vars(args), "rollouts": folder}))
        name = cfg.model or model_for(cfg)  # type: ignore[arg-type]  # reads .model, .rollouts
        if name != loaded:  # one load for folders of the same model
            print(f"review: loading {name}", flush=True)
            reviewer, loaded = load_reviewer(dataclasses.replace(cfg, model=name)), name
        summary = review_rollouts(cfg, reviewer=reviewer)
        if args.json:
            print(json.dumps(summary))
    return 0
