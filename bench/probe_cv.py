"""Probe settings compared by cross-validation over the prompts of one train rollouts folder.

    python bench/probe_cv.py                                   # the MBPP/Qwen train rollouts
    python bench/probe_cv.py ROLLOUTS --folds 5 --configs '{"objective": "pg", "lr": 1e-4}'

Each config is TrainConfig fields as JSON, plus an optional "prep": "center" (subtract each
prompt's mean feature before training and scoring; for a linear probe this shifts a prompt's
scores by a constant, so it changes what is learnt, not how a choice is made). The prompts are
split into `--folds` folds (seeded); a probe is trained on the other folds and scored on each
held-out prompt's samples. Printed: the held-out selection reward over all of a prompt's samples
(argmax and softmax(Q/beta) with the config's beta), the held-out pass@1, and the within-prompt
concordance (`qprobe.evaluate.ranking`), each averaged over folds. Choose settings here, on train
data, never on a test set. Defaults: the comparison quoted in docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from qprobe.evaluate import ranking, softmax_expected_reward, split_groups
from qprobe.rollouts import Rollouts
from qprobe.train import TrainConfig, train_probe

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "results" / "mbpp-qwen-coder" / "rollouts" / "train"
CONFIGS = [
    {"objective": "q"}, {"objective": "ce"}, {"objective": "pg"},
    {"objective": "pg", "min_steps": 0}, {"objective": "pg", "lr": 1e-5},
    {"objective": "pg", "lr": 2e-4},
    {"objective": "pg", "optimizer": "adamw", "weight_decay": 10},
    {"objective": "pg", "optimizer": "adamw", "weight_decay": 100},
    {"objective": "ce", "optimizer": "adamw", "weight_decay": 10},
    {"objective": "pg", "val_fraction": 0.2, "patience": 20},
    {"objective": "pg", "beta": 0.3}, {"objective": "pg", "beta": 1.0},
    {"objective": "pg", "group_size": 16}, {"objective": "pg", "prep": "center"},
]


def centred(x: np.ndarray, group: np.ndarray) -> np.ndarray:
    """Features minus their prompt's mean feature -> float32 [N, D]."""
    sums = np.zeros((group.max() + 1, x.shape[1]))
    np.add.at(sums, group, x)
    return (x - (sums / np.bincount(group)[:, None])[group]).astype(np.float32)


def cross_validate(x: np.ndarray, y: np.ndarray, group: np.ndarray, config: dict, folds: int,
                   seed: int) -> np.ndarray:
    """[argmax reward, softmax reward, pass@1, within-prompt concordance], mean over folds."""
    config = dict(config)
    if config.pop("prep", None) == "center":
        x = centred(x, group)
    cfg = TrainConfig(**config)
    prompts = np.random.default_rng(seed).permutation(np.unique(group))
    out = []
    for f in range(folds):
        held = np.isin(group, prompts[f::folds])
        probe, _ = train_probe(x[~held], y[~held], group[~held], config=cfg,
                               data_fingerprint=False)
        s = probe.score(x[held]).astype(np.float64)
        per = split_groups(group[held], y[held], s)
        arg = np.mean([softmax_expected_reward(q, r, len(r), 0.0) for r, q in per])
        soft = np.mean([softmax_expected_reward(q, r, len(r), cfg.beta) for r, q in per])
        conc = ranking(group[held], y[held], s)["within_prompt"]
        out.append([arg, soft, np.mean([r.mean() for r, _ in per]), conc])
    return np.mean(out, axis=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("rollouts", nargs="?", default=str(DEFAULT))
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=123, help="seed of the fold split")
    ap.add_argument("--configs", nargs="+", help="TrainConfig fields as JSON, one per config")
    args = ap.parse_args()
    r = Rollouts(args.rollouts)
    group, prompts = r.groups()
    x, y = np.asarray(r.features, dtype=np.float32), r.rewards
    print(f"# {args.rollouts}: {len(prompts)} prompts, {len(r)} samples, dim {x.shape[1]}; "
          f"{args.folds}-fold CV by prompt (seed {args.seed})")
    print(f"{'config':64s} {'argmax':>7s} {'softmax':>7s} {'pass@1':>7s} {'within':>7s}")
    configs = [json.loads(c) for c in args.configs] if args.configs else CONFIGS
    for c in configs:
        res = cross_validate(x, y, group, c, args.folds, args.seed)
        print(f"{json.dumps(c):64s} " + " ".join(f"{v:7.3f}" for v in res), flush=True)


if __name__ == "__main__":
    main()
