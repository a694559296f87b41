"""Issue 25: is the sentiment experiment, rerun through `qprobe run`, the same as the committed
standalone driver's, within sampling noise?

    python experiments/sentiment_compare.py [--run results/sentiment-guided-run]
        [--driver results/sentiment-guided] [--out results/sentiment-guided-run/compare.md]

The run (experiments/sentiment-guided.yaml) draws one answer per test prompt and policy; the
driver (experiments/sentiment-guided/run.py) drew 25 per prompt and method, on the same test
prompts, with the same heads and probe. Per policy, on the prompts both have: the run's mean
VADER compound and positive rate (compound > 0.05), the driver's, and the paired difference
(run's answer minus the driver's per-prompt mean, 95% bootstrap CI over prompts). "Same within
noise": the CI of the difference holds 0. The run's policy names map to the driver's methods
(sample -> base, best-of-8 -> bok-8; the guided ones by the same name).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from qprobe.evaluate import bootstrap_ci
from qprobe.fileio import atomic_write_text
from qprobe.rollouts import Rollouts
from qprobe.tasks.sentiment import POSITIVE

DRIVER_NAME = {"sample": "base", "best-of-8": "bok-8"}


def driver_means(driver: Path, method: str) -> dict[str, np.ndarray]:
    """Per prompt text: the driver's compound scores [S] for one method."""
    gen = driver / "generations"
    rows = [json.loads(line) for line in (gen / f"{method}.jsonl").read_text().splitlines()]
    scores = json.loads((gen / f"{method}.scores.json").read_text())["compound"]
    if len(scores) != len(rows):
        raise SystemExit(f"error: {gen / method}: {len(rows)} rows but {len(scores)} scores")
    out: dict[str, list[float]] = {}
    for r, c in zip(rows, scores):
        out.setdefault(r["prompt"], []).append(float(c))
    return {p: np.asarray(v) for p, v in out.items()}


def compare(run: Path, driver: Path, split: str = "neutral-test") -> list[dict]:
    """One dict per policy of the run that the driver has too."""
    out = []
    for folder in sorted((run / "rollouts").glob(f"policy-*-{split}")):
        name = folder.name[len("policy-"): -len(f"-{split}")]
        method = DRIVER_NAME.get(name, name)
        gen = driver / "generations" / f"{method}.jsonl"
        if not gen.is_file() or not any(folder.glob("samples-*.parquet")):
            continue  # a method the driver lacks, or a policy still running
        r = Rollouts(folder)
        mine = dict(zip(r.column("prompt"), (float(x) for x in r.column("reward"))))
        theirs = driver_means(driver, method)
        common = [p for p in mine if p in theirs]
        a = np.array([mine[p] for p in common])  # [P] the run's one answer per prompt
        b = np.array([theirs[p].mean() for p in common])  # [P] the driver's mean of 25
        pa = (a > POSITIVE).astype(float)
        pb = np.array([(theirs[p] > POSITIVE).mean() for p in common])
        row = {"policy": name, "driver": method, "prompts": len(common),
               "driver_samples": int(sum(len(theirs[p]) for p in common))}
        for key, x, y in (("compound", a, b), ("positive", pa, pb)):
            lo, hi = bootstrap_ci(x - y, n_boot=2000, seed=0)
            row[key] = {"run": float(x.mean()), "driver": float(y.mean()),
                        "diff": float((x - y).mean()), "lo": lo, "hi": hi,
                        "same": bool(lo <= 0 <= hi)}
        out.append(row)
    return out


def render(rows: list[dict], run: Path, driver: Path) -> str:
    lines = ["# The sentiment experiment through `qprobe run` against the standalone driver", "",
             f"Run: `{run}` (experiments/sentiment-guided.yaml, one answer per prompt and "
             f"policy). Driver: `{driver}` (25 answers per prompt and method). Paired by "
             "prompt: the run's answer minus the driver's mean over its answers to that prompt; "
             "95% bootstrap CI over prompts. Command: `python experiments/sentiment_compare.py`.",
             "", "| policy (driver's method) | prompts | compound: run / driver | difference "
             "[95% CI] | positive rate: run / driver | difference [95% CI] | within noise |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        c, p = r["compound"], r["positive"]
        same = "yes" if c["same"] and p["same"] else "no"
        lines.append(
            f"| {r['policy']} ({r['driver']}) | {r['prompts']} | {c['run']:.3f} / "
            f"{c['driver']:.3f} | {c['diff']:+.3f} [{c['lo']:+.3f}, {c['hi']:+.3f}] | "
            f"{p['run']:.3f} / {p['driver']:.3f} | {p['diff']:+.3f} [{p['lo']:+.3f}, "
            f"{p['hi']:+.3f}] | {same} |")
    n_same = sum(r["compound"]["same"] and r["positive"]["same"] for r in rows)
    lines += ["", f"{n_same} of {len(rows)} policies: both differences' CIs hold 0."]
    if len(rows) > 2:  # do the policies keep their order? (one number per policy and side)
        x = np.array([r["compound"]["run"] for r in rows])
        y = np.array([r["compound"]["driver"] for r in rows])
        lines.append(f"Across the {len(rows)} policies, the run's mean compound against the "
                     f"driver's: Pearson r = {np.corrcoef(x, y)[0, 1]:.3f}.")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default="results/sentiment-guided-run")
    ap.add_argument("--driver", default="results/sentiment-guided")
    ap.add_argument("--out", default=None, help="default: RUN/compare.md (and .json)")
    a = ap.parse_args(argv)
    run, driver = Path(a.run), Path(a.driver)
    if not (run / "rollouts").is_dir() or not (driver / "generations").is_dir():
        print(f"error: need {run}/rollouts and {driver}/generations", file=sys.stderr)
        return 2
    rows = compare(run, driver)
    out = Path(a.out) if a.out else run / "compare.md"
    atomic_write_text(out, render(rows, run, driver))
    atomic_write_text(out.with_suffix(".json"), json.dumps(rows, indent=1) + "\n")
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
