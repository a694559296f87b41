"""How many optimiser steps the paper's defaults need on small data (the `min_steps` choice).

    python bench/small_data.py            # ~5 minutes on 2 shared cores

SYNTHETIC data from tests/_synth.py: 100 train prompts x 16 samples, 576 dims (the hidden size of
SmolLM2-135M), binary reward = 1[difficulty + planted direction + noise > 0]; 300 held-out
prompts. Prints the held-out selection reward (argmax over each prompt's 16 samples) of probes
trained with the paper's defaults (Adam, lr 5e-5, batch 1000) for several step counts, next to a
random pick, the closed-form ridge regression and the oracle (the planted quality itself).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _synth import make, selection_reward  # noqa: E402
from qprobe.train import TrainConfig, train_probe  # noqa: E402


def main() -> None:
    dim = 576
    tr, te = make(100, 16, dim, seed=1), make(300, 16, dim, seed=2)
    print(f"# 100 x 16 train rows, {dim} dims, 300 test prompts x 16 (synthetic)")
    print(f"random pick            {te.rewards.mean():.3f}")
    print(f"oracle (planted)       {selection_reward(te.quality, te):.3f}")
    mu, sd = tr.features.mean(0), tr.features.std(0)
    x, xt = (tr.features - mu) / sd, (te.features - mu) / sd
    for lam in (10.0, 100.0):
        w = np.linalg.solve(x.T @ x + lam * np.eye(dim), x.T @ (tr.rewards - tr.rewards.mean()))
        print(f"ridge lambda={lam:<6g}    {selection_reward(xt @ w, te):.3f}")
    runs = [("q", s) for s in (0, 2000, 5000, 10000, 20000)] + [("ce", 10000), ("pg", 10000)]
    for obj, steps in runs:
        t = time.perf_counter()
        probe, _ = train_probe(tr.features, tr.rewards, tr.groups,
                               config=TrainConfig(objective=obj, min_steps=steps),
                               data_fingerprint=False)
        sel = selection_reward(probe.score(te.features), te)
        print(f"{obj:<3} {probe.info['metrics']['steps']:>6} steps       {sel:.3f}"
              f"   ({time.perf_counter() - t:.1f}s)", flush=True)


if __name__ == "__main__":
    main()
