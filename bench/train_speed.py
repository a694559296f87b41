"""Probe training speed at the paper's MBPP size, every objective: the fused step against the
previous two-pass step, side by side in one run on the same data.

    python bench/train_speed.py                     # 464 prompts x 48 samples, 150 epochs
    python bench/train_speed.py --dims 896 --objectives q pg --precisions float16 --repeats 3

Data are SYNTHETIC (random features with a planted reward direction, float16 as stored in
rollouts): speed does not depend on what the numbers mean. Each run is one `train_probe` call with
the paper's settings (Adam, lr 5e-5, batch 1000 rows / pg 100 prompts x 10 samples, 150 epochs,
min_steps 0 so exactly 150 epochs run), timed end to end: feature statistics, layout,
standardisation and training. "new" is the current trainer (fused one-pass step in cache-sized
blocks, single-threaded setup); "old" sets `qprobe.train.LEGACY_STEP`, which restores the previous
step (two matrix-vector passes per batch, autograd on the scores; float16: half-precision GEMVs
on a row-major and a transposed copy) and the previous threading of the setup (the new
float32 feature statistics run in both). Both run at
`precision` float32 and float16 (features stored in half precision). The data fingerprint
(sha256) is switched off; it is not training. Wall and CPU seconds are both shown: on a machine
shared with other jobs the wall time mostly measures the queue for a core, the CPU time (all
threads of this process) what the training itself costs. old/new is the ratio of CPU seconds
(wall ratio in brackets). Run it more than once and quote the range; ratios within one run are
the comparable numbers.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch

import qprobe.train as T
from qprobe.train import TrainConfig, train_probe


def synthetic(n_prompts: int, k: int, dim: int, seed: int = 0):
    """Features [P*k, D] float16, binary rewards, groups, and k/2 disjoint pairs per prompt."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n_prompts * k, dim), dtype=np.float32)  # [N, D]
    score = x[:, 0] + 0.5 * np.repeat(rng.standard_normal(n_prompts), k)
    rewards = (score > 0).astype(np.float32)
    groups = np.repeat(np.arange(n_prompts), k)
    rows = np.arange(n_prompts * k).reshape(n_prompts, k // 2, 2)  # [P, k/2, 2]
    better = x[rows[..., 0], 0] >= x[rows[..., 1], 0]
    pairs = np.where(better[..., None], rows, rows[..., ::-1]).reshape(-1, 2)
    return x.astype(np.float16), rewards, groups, pairs


def _time(x, r, g, pairs, cfg: TrainConfig, legacy: bool, repeats: int) -> tuple[float, float]:
    """Fastest (wall, cpu) seconds of `repeats` train_probe calls."""
    T.LEGACY_STEP = legacy
    wall = cpu = float("inf")
    try:
        for _ in range(repeats):
            t, c = time.perf_counter(), time.process_time()
            train_probe(x, r, g, pairs if cfg.objective in ("bt", "dpo") else None, cfg,
                        data_fingerprint=False)
            wall = min(wall, time.perf_counter() - t)
            cpu = min(cpu, time.process_time() - c)
    finally:
        T.LEGACY_STEP = False
    return wall, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=464)
    ap.add_argument("--samples", type=int, default=48)
    ap.add_argument("--dims", type=int, nargs="+", default=[4096, 896])
    ap.add_argument("--objectives", nargs="+", default=["q", "ce", "pg", "bt", "dpo"])
    ap.add_argument("--precisions", nargs="+", default=["float16", "float32"])
    ap.add_argument("--epochs", type=int, default=150)
    ap.add_argument("--repeats", type=int, default=1, help="runs per cell; the fastest is shown")
    ap.add_argument("--no-old", action="store_true", help="skip the previous step (no ratios)")
    args = ap.parse_args()

    rows = args.prompts * args.samples
    print(f"# {args.prompts} prompts x {args.samples} samples = {rows} rows, {args.epochs} epochs,"
          f" synthetic float16 features; torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
          f"load average {os.getloadavg()[0]:.1f} at start")
    print(f"{'dim':>5} {'objective':>9} {'precision':>9} | {'new wall':>8} {'cpu':>6} "
          f"{'rows*ep/s':>10} | {'old wall':>8} {'cpu':>6} {'rows*ep/s':>10} | "
          f"{'old/new cpu (wall)':>18}")
    warm = synthetic(8, 4, 16)  # first optimiser/autograd use loads lazy modules: not training
    for legacy in (False, True):
        _time(*warm[:3], None, TrainConfig(epochs=1, min_steps=0), legacy, 1)
    for dim in args.dims:
        x, r, g, pairs = synthetic(args.prompts, args.samples, dim)
        for obj in args.objectives:
            for precision in args.precisions:
                cfg = TrainConfig(objective=obj, epochs=args.epochs, min_steps=0,
                                  precision=precision)
                nw, nc = _time(x, r, g, pairs, cfg, False, args.repeats)
                line = (f"{dim:>5} {obj:>9} {precision:>9} | {nw:>8.2f} {nc:>6.2f} "
                        f"{rows * args.epochs / nw:>10,.0f} | ")
                if not args.no_old:
                    ow, oc = _time(x, r, g, pairs, cfg, True, args.repeats)
                    line += (f"{ow:>8.2f} {oc:>6.2f} {rows * args.epochs / ow:>10,.0f} | "
                             f"{oc / nc:>10.2f} ({ow / nw:.2f})")
                print(line, flush=True)
    print(f"# load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
