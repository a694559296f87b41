"""`qprobe evaluate`: base pass@1, the pass@k skyline and a probe's reward at each k x beta."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path


def _ints(s: str) -> list[int]:
    try:
        out = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"k values must be >= 1, got {s!r}")
    return out


def _floats(s: str) -> list[float]:
    try:
        out = [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None
    if not out or min(out) < 0:
        raise argparse.ArgumentTypeError(f"beta values must be >= 0, got {s!r}")
    return out


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="table of pass@1, pass@k and a probe's expected reward at each k and beta",
        description="Evaluate a probe on a scored test rollout folder: base pass@1 (mean reward), "
        "pass@k (unbiased, the oracle skyline) and the probe's analytic expected reward over "
        "random k-subsets of each prompt's samples, with 95%% bootstrap CIs over prompts.",
    )
    p.add_argument("rollouts", metavar="ROLLOUTS_DIR", help="scored test rollouts (with features)")
    p.add_argument(
        "--probe",
        metavar="PROBE_DIR",
        default=None,
        help="probe folder (without it: only the baselines)",
    )
    p.add_argument("--k", type=_ints, default=[1, 2, 4, 8, 16], help="k values (1,2,4,8,16)")
    p.add_argument(
        "--beta",
        type=_floats,
        default=[0.0, 0.01, 0.1, 1.0],
        help="beta values; 0 = argmax (0,0.01,0.1,1)",
    )
    p.add_argument(
        "--greedy",
        metavar="ROLLOUTS_DIR",
        default=None,
        help="scored rollouts of greedy decoding, for the greedy baseline",
    )
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of bootstrap and subset sampling")
    p.add_argument("--json", metavar="OUT", default=None, help="also write all numbers as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qprobe.evaluate import evaluate_rollouts, format_table

    res = evaluate_rollouts(
        args.rollouts,
        args.probe,
        args.k,
        args.beta,
        greedy_dir=args.greedy,
        n_boot=args.bootstrap,
        seed=args.seed,
    )
    title = f"evaluate {args.rollouts}" + (f" with probe {args.probe}" if args.probe else "")
    print(format_table(res, title))
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        d = {"rollouts": str(args.rollouts), "probe": args.probe, **res.to_dict()}
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(d, f, indent=2)
        os.replace(tmp, out)
        print(f"wrote {out}")
    return 0
