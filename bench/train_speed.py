"""Probe training speed at the paper's MBPP size, every objective, side by side.

    python bench/train_speed.py                     # 464 prompts x 48 samples, 150 epochs
    python bench/train_speed.py --dims 896 --objectives q pg --repeats 3

Data are SYNTHETIC (random features with a planted reward direction, float16 as stored in
rollouts): speed does not depend on what the numbers mean. Each run is one `train_probe` call with
the paper's settings (Adam, lr 5e-5, batch 1000 rows / pg 100 prompts x 10 samples, 150 epochs,
min_steps 0 so exactly 150 epochs run), timed end to end: layout + standardisation + training.
Each cell runs in float32 (default) and with `precision="float16"` (half-precision features,
float32 accumulation and optimiser). The data fingerprint (sha256) is switched off; it is not
training. Wall and CPU seconds are both shown: on a machine shared with other jobs the wall time
mostly measures the queue for a core, the CPU time (all threads of this process) what the
training itself costs. Run it more than once and quote the range; ratios within one run are the
comparable numbers.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=464)
    ap.add_argument("--samples", type=int, default=48)
    ap.add_argument("--dims", type=int, nargs="+", default=[4096, 896])
    ap.add_argument("--objectives", nargs="+", default=["q", "ce", "pg", "bt", "dpo"])
    ap.add_argument("--epochs", type=int, default=150)
    ap.add_argument("--repeats", type=int, default=1, help="runs per cell; the fastest is shown")
    args = ap.parse_args()

    rows = args.prompts * args.samples
    print(f"# {args.prompts} prompts x {args.samples} samples = {rows} rows, {args.epochs} epochs,"
          f" synthetic float16 features; torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus")
    print(f"{'dim':>5} {'objective':>9} | {'fp32 wall':>9} {'cpu':>6} {'rows*ep/s':>10} | "
          f"{'fp16 wall':>9} {'cpu':>6} {'rows*ep/s':>10} | {'fp32/fp16':>9} {'/q fp32':>7}")
    warm = synthetic(8, 4, 16)  # first optimiser/autograd use loads lazy modules: not training
    train_probe(*warm[:3], None, TrainConfig(epochs=1, min_steps=0), data_fingerprint=False)
    for dim in args.dims:
        x, r, g, pairs = synthetic(args.prompts, args.samples, dim)
        base = None
        for obj in args.objectives:
            sec, cpu = {}, {}
            for precision in ("float32", "float16"):
                cfg = TrainConfig(objective=obj, epochs=args.epochs, min_steps=0,
                                  precision=precision)
                sec[precision] = cpu[precision] = float("inf")
                for _ in range(args.repeats):
                    t, c = time.perf_counter(), time.process_time()
                    train_probe(x, r, g, pairs if obj in ("bt", "dpo") else None, cfg,
                                data_fingerprint=False)
                    sec[precision] = min(sec[precision], time.perf_counter() - t)
                    cpu[precision] = min(cpu[precision], time.process_time() - c)
            base = sec["float32"] if base is None else base
            a, b = sec["float32"], sec["float16"]
            print(f"{dim:>5} {obj:>9} | {a:>9.2f} {cpu['float32']:>6.2f} "
                  f"{rows * args.epochs / a:>10,.0f} | {b:>9.2f} {cpu['float16']:>6.2f} "
                  f"{rows * args.epochs / b:>10,.0f} | {a / b:>9.2f} {a / base:>7.2f}", flush=True)


if __name__ == "__main__":
    main()
