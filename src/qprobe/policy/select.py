"""The Q-probe selection policy: pick one of k candidates from their probe scores.

Given scores Q(x, a_1..a_k) the policy samples a_i with probability softmax(Q/beta)_i. As k grows
this tends to p0(a|x) exp(Q(x, a)/beta) / Z(x), the maximiser of E[Q] - beta KL(pi || p0)
(theorem 4.1 of the paper; `tests/test_policy.py` checks it by Monte Carlo). beta = 0 is argmax,
ties going to the lowest index so that selection is deterministic.

Evaluation uses the analytic expected reward of the choice, sum_i softmax_i r_i (as the paper's
evaluation does); generation uses the real sampled choice. Everything here is numpy and works on
the last axis, so `[..., k]` batches of prompts need no loop.
"""

from __future__ import annotations

import numpy as np

from qprobe.errors import QProbeError


def _check_beta(beta: float) -> float:
    beta = float(beta)
    if not np.isfinite(beta) or beta < 0:
        raise QProbeError(f"policy: beta must be a finite number >= 0, got {beta!r}")
    return beta


def softmax_weights(scores: np.ndarray, beta: float) -> np.ndarray:
    """Selection probabilities softmax(scores / beta) over the last axis.

    scores: [..., k]; returns float64 [..., k] summing to 1 on the last axis. beta = 0 gives the
    one-hot argmax (ties to the lowest index). Candidates scored -inf are never chosen (unless
    all of a row are -inf, which raises).
    """
    beta = _check_beta(beta)
    s = np.asarray(scores, dtype=np.float64)  # [..., k]
    if s.shape[-1] == 0:
        raise QProbeError("policy: no candidates to choose from (k = 0)")
    if np.isnan(s).any():
        raise QProbeError("policy: scores contain NaN")
    if np.isneginf(s.max(axis=-1)).any():
        raise QProbeError("policy: every candidate of a row is scored -inf")
    if beta == 0.0:
        w = np.zeros_like(s)
        np.put_along_axis(w, np.argmax(s, axis=-1)[..., None], 1.0, axis=-1)
        return w
    z = (s - s.max(axis=-1, keepdims=True)) / beta  # [..., k], max is 0: no overflow
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def choose(scores: np.ndarray, beta: float, rng: np.random.Generator) -> int:
    """Index of the chosen candidate for one prompt: a draw from softmax(scores / beta).

    scores: [k]. beta = 0 is argmax (lowest index on ties) and does not consume randomness.
    """
    s = np.asarray(scores)
    if s.ndim != 1:
        raise QProbeError(f"policy.choose: scores must be 1-D [k], got shape {s.shape}")
    w = softmax_weights(s, beta)  # [k]
    if float(beta) == 0.0:
        return int(np.argmax(w))
    return int(rng.choice(len(w), p=w))


def choose_batch(scores: np.ndarray, beta: float, rng: np.random.Generator) -> np.ndarray:
    """`choose` for many prompts at once: scores [n, k] -> chosen indices int64 [n].

    Uses one uniform draw per row (inverse CDF), so results are reproducible for a seeded rng.
    """
    w = softmax_weights(scores, beta)  # [n, k]
    if w.ndim != 2:
        raise QProbeError(f"policy.choose_batch: scores must be 2-D [n, k], got shape {w.shape}")
    if float(beta) == 0.0:
        return np.argmax(w, axis=-1).astype(np.int64)
    cdf = np.cumsum(w, axis=-1)  # [n, k]
    u = rng.random(w.shape[0])[:, None] * cdf[:, -1:]  # [n, 1]
    return np.minimum((cdf <= u).sum(axis=-1), w.shape[1] - 1).astype(np.int64)


def expected_reward(scores: np.ndarray, rewards: np.ndarray, beta: float) -> np.ndarray:
    """Analytic expected reward of the policy's choice: sum_i softmax(scores/beta)_i * r_i.

    scores, rewards: [..., k] (same shape); returns float64 [...]. Rewards must be finite: drop
    unscored candidates before calling (give them score -inf to exclude them).
    """
    w = softmax_weights(scores, beta)  # [..., k]
    r = np.asarray(rewards, dtype=np.float64)
    if r.shape != w.shape:
        raise QProbeError(
            f"policy.expected_reward: scores {w.shape} and rewards {r.shape} differ in shape"
        )
    r = np.where(w > 0, r, 0.0)  # excluded candidates may carry NaN rewards
    if not np.isfinite(r).all():
        raise QProbeError("policy.expected_reward: rewards of selectable candidates must be finite")
    return (w * r).sum(axis=-1)
