"""`qprobe evaluate`: base pass@1, the pass@k skyline and a probe's reward at each k x beta."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field

from qprobe.commands.flags import add_flags, comma_list, from_args


@dataclass
class EvaluateOptions:
    rollouts: str = field(default="", metadata={
        "positional": True, "metavar": "ROLLOUTS_DIR",
        "help": "scored test rollouts (with features)"})
    probe: str | None = field(default=None, metadata={
        "metavar": "PROBE_DIR", "help": "probe folder (without it: only the baselines)"})
    k: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16], metadata={
        "type": comma_list(int, "integers", lambda v: v >= 1, "k values must be >= 1"),
        "help": "k values"})
    beta: list[float] = field(default_factory=lambda: [0.0, 0.01, 0.1, 1.0], metadata={
        "type": comma_list(float, "numbers", lambda v: v >= 0, "beta values must be >= 0"),
        "help": "beta values; 0 = argmax"})
    greedy: str | None = field(default=None, metadata={
        "metavar": "ROLLOUTS_DIR",
        "help": "scored rollouts of greedy decoding, for the greedy baseline"})
    bootstrap: int = field(default=1000, metadata={"help": "bootstrap resamples"})
    seed: int = field(default=0, metadata={"help": "seed of bootstrap and subset sampling"})
    json: str | None = field(default=None, metadata={
        "metavar": "OUT", "help": "also write all numbers as JSON"})


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="table of pass@1, pass@k and a probe's expected reward at each k and beta",
        description="Evaluate a probe on a scored test rollout folder: base pass@1 (mean reward), "
        "pass@k (unbiased, the oracle skyline) and the probe's analytic expected reward over "
        "random k-subsets of each prompt's samples, with 95% bootstrap CIs over prompts.",
    )
    add_flags(p, EvaluateOptions)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from qprobe.evaluate import evaluate_rollouts, format_table
    from qprobe.fileio import atomic_write_text

    o = from_args(EvaluateOptions, args)
    if (Path(o.rollouts) / "pairs.parquet").is_file():
        return _run_pairs(o)
    res = evaluate_rollouts(o.rollouts, o.probe, o.k, o.beta, greedy_dir=o.greedy,
                            n_boot=o.bootstrap, seed=o.seed)  # fmt: skip
    title = f"evaluate {o.rollouts}" + (f" with probe {o.probe}" if o.probe else "")
    print(format_table(res, title))
    if o.json:
        out = Path(o.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        d = {"rollouts": str(o.rollouts), "probe": o.probe, **res.to_dict()}
        atomic_write_text(out, json.dumps(d, indent=2))
        print(f"wrote {out}")
    return 0


def _run_pairs(o: EvaluateOptions) -> int:
    """A folder of preference pairs: held-out pair accuracy (and, when some samples have
    rewards, e.g. from a judge via `qprobe score`, the usual table on those)."""
    from dataclasses import asdict
    from pathlib import Path

    import numpy as np

    from qprobe.evaluate import evaluate_pairs, evaluate_rollouts, format_pairs, format_table
    from qprobe.fileio import atomic_write_text
    from qprobe.rollouts import Rollouts

    res = evaluate_pairs(o.rollouts, o.probe, n_boot=o.bootstrap, seed=o.seed)
    print(format_pairs(res, f"evaluate {o.rollouts}" + (f" with probe {o.probe}" if o.probe else "")))
    d = {"rollouts": str(o.rollouts), "probe": o.probe, **res,
         "scores": {k: asdict(e) for k, e in res["scores"].items()}}
    if not np.isnan(Rollouts(o.rollouts).rewards).all():
        table = evaluate_rollouts(o.rollouts, o.probe, o.k, o.beta, n_boot=o.bootstrap, seed=o.seed)
        print(format_table(table, "samples with a reward"))
        d["samples"] = table.to_dict()
    if o.json:
        out = Path(o.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, json.dumps(d, indent=2))
        print(f"wrote {out}")
    return 0
