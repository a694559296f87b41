"""Probe training speed at the paper's MBPP size, every objective: the C training loop on two
threads and on one, and the torch step it replaced, side by side in one run on the same data.

    python bench/train_speed.py                     # 464 prompts x 48 samples, 150 epochs
    python bench/train_speed.py --dims 896 --objectives q pg --precisions float16 --repeats 3

Data are SYNTHETIC (random features with a planted reward direction, float16 as stored in
rollouts): speed does not depend on what the numbers mean. Each run is one `train_probe` call with
the paper's settings (Adam, lr 5e-5, batch 1000 rows / pg 100 prompts x 10 samples, 150 epochs,
min_steps 0 so exactly 150 epochs run), timed end to end: feature statistics, layout,
standardisation and training. Columns:
- new: the current trainer with its default threads: `qprobe/train/engines/linfit.c` runs whole
  epochs of the one-pass step (cache-sized blocks of whole units, each batch cut into two shards
  that run on two threads on a machine with 2+ cores), and the setup passes (statistics,
  standardising);
- 1thr: the same with `threads=1` (the shards one after the other; the same probe, bit for bit);
- torch: `qprobe.train.engines.native.ENABLED = False`, the same step written with torch
  operations (the fallback where linfit.c cannot be built; float16 blocks upcast to float32).
(docs/objectives.md also quotes an "old" column: the two-pass step before the fused one, since
removed.) Each at `precision` float32 and float16 (features kept in half precision). For scale,
each dim first prints the memory floor: the time to read the float16 matrix once per epoch (a
torch sum), on one and on two threads. The data fingerprint (sha256) is switched off; it is not
training. Wall seconds, CPU seconds (all threads) in brackets; x is the wall ratio to "new". On a
machine shared with other jobs, wall time mostly measures the queue for a core: run it on an idle
machine, more than once, and quote the range; ratios within one run are the comparable numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import time

import numpy as np
import torch

from qprobe.train import TrainConfig, train_probe
from qprobe.train.engines import native


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


def _time(x, r, g, pairs, cfg: TrainConfig, repeats: int, use_c: bool = True
          ) -> tuple[float, float]:
    """Fastest (wall, cpu) seconds of `repeats` train_probe calls."""
    native.ENABLED = use_c
    wall = cpu = float("inf")
    try:
        for _ in range(repeats):
            t, c = time.perf_counter(), time.process_time()
            train_probe(x, r, g, pairs if cfg.objective in ("bt", "dpo") else None, cfg,
                        data_fingerprint=False)
            wall = min(wall, time.perf_counter() - t)
            cpu = min(cpu, time.process_time() - c)
    finally:
        native.ENABLED = True
    return wall, cpu


def stream_seconds(x: np.ndarray, threads: int, repeats: int = 5) -> float:
    """Fastest time to read the [N, D] matrix once (a torch sum): the memory floor of an epoch."""
    t = torch.from_numpy(x)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t.sum()
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            t.sum()
            best = min(best, time.perf_counter() - start)
        return best
    finally:
        torch.set_num_threads(before)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=464)
    ap.add_argument("--samples", type=int, default=48)
    ap.add_argument("--dims", type=int, nargs="+", default=[4096, 896])
    ap.add_argument("--objectives", nargs="+", default=["q", "ce", "pg", "bt", "dpo"])
    ap.add_argument("--precisions", nargs="+", default=["float16", "float32"])
    ap.add_argument("--epochs", type=int, default=150)
    ap.add_argument("--repeats", type=int, default=1, help="runs per cell; the fastest is shown")
    ap.add_argument("--only-new", action="store_true", help="skip the comparison columns")
    args = ap.parse_args()

    rows = args.prompts * args.samples
    lib = native.library()
    print(f"# {args.prompts} prompts x {args.samples} samples = {rows} rows, {args.epochs} epochs,"
          f" synthetic float16 features; torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
          f"load average {os.getloadavg()[0]:.1f} at start; linfit.c: "
          f"{'yes' if lib else 'no (' + str(native.why_not) + ')'}")
    print("# new: the default trainer (linfit.c; 2 shards on 2 threads on a 2+ core machine); "
          "1thr: threads=1; torch: the same step in torch (the fallback). Seconds are wall (cpu); "
          "x = wall / new.")
    print(f"{'dim':>5} {'objective':>9} {'precision':>9} | {'new':>13} {'rows*ep/s':>10} | "
          f"{'1thr':>13} {'x':>5} | {'torch':>13} {'x':>5}")
    warm = synthetic(8, 4, 16)  # first optimiser use loads lazy modules: not training
    for use_c in (True, False):
        _time(*warm[:3], None, TrainConfig(epochs=1, min_steps=0), 1, use_c)
    for dim in args.dims:
        x, r, g, pairs = synthetic(args.prompts, args.samples, dim)
        floor = {n: stream_seconds(x, n) * args.epochs for n in (1, 2)}
        print(f"# {dim} dims: reading the float16 matrix once per epoch takes at least "
              f"{floor[1]:.2f} s on one thread, {floor[2]:.2f} s on two (torch sum, best of 5)")
        for obj in args.objectives:
            for precision in args.precisions:
                cfg = TrainConfig(objective=obj, epochs=args.epochs, min_steps=0,
                                  precision=precision)
                nw, nc = _time(x, r, g, pairs, cfg, args.repeats)
                line = (f"{dim:>5} {obj:>9} {precision:>9} | {nw:>6.2f} ({nc:>5.2f}) "
                        f"{rows * args.epochs / nw:>10,.0f} | ")
                cells = []
                if not args.only_new:
                    cells.append(_time(x, r, g, pairs, dataclasses.replace(cfg, threads=1),
                                       args.repeats))
                    cells.append(_time(x, r, g, pairs, cfg, args.repeats, use_c=False)
                                 if lib else None)
                line += " | ".join(f"{'-':>13} {'-':>5}" if c is None else
                                   f"{c[0]:>6.2f} ({c[1]:>5.2f}) {c[0] / nw:>5.2f}" for c in cells)
                print(line, flush=True)
    print(f"# load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
