"""The Bradley-Terry fit of the HH judge (experiments/hh_judge.py) on planted pairs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

_spec = importlib.util.spec_from_file_location(
    "hh_judge", Path(__file__).resolve().parents[1] / "experiments" / "hh_judge.py")
hh_judge = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hh_judge)


def _planted(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    w_true = np.zeros(16)
    w_true[:2] = [3.0, -2.0]
    a, b = rng.normal(size=(n, 16)), rng.normal(size=(n, 16))
    p = 1 / (1 + np.exp(-(a - b) @ w_true))  # P(a preferred)
    a_wins = rng.random(n) < p
    chosen = np.where(a_wins[:, None], a, b)
    rejected = np.where(a_wins[:, None], b, a)
    return chosen, rejected, np.arange(n) // 2  # two pairs per prompt


def test_bt_fit_recovers_the_planted_direction_and_orders_held_out_pairs():
    c, r, g = _planted(600, 0)
    l2, cv = hh_judge.cv_l2(c - r, g, grid=(1e-4, 1.0))
    assert l2 == 1e-4 and cv[1e-4] > cv[1.0]  # heavy shrinkage costs accuracy here
    w = hh_judge.fit_bt(c - r, l2)
    cos = w[:2] @ np.array([3.0, -2.0]) / np.linalg.norm(w) / np.sqrt(13)
    assert cos > 0.9
    tc, tr, _ = _planted(400, 1)
    acc = ((tc - tr) @ w > 0).mean()
    assert acc > 0.75  # the Bayes rate here is about 0.8
    # as good as the planted weights themselves on the same held-out pairs
    w_true = np.zeros(16)
    w_true[:2] = [3.0, -2.0]
    assert acc >= ((tc - tr) @ w_true > 0).mean() - 0.02
