"""The selection policy: softmax weights, argmax ties, seeded choice, expected reward, thm 4.1."""

from __future__ import annotations

import numpy as np
import pytest

from qprobe.errors import QProbeError
from qprobe.policy import choose, choose_batch, expected_reward, softmax_weights


def test_softmax_weights_match_formula_and_batch_shape():
    rng = np.random.default_rng(0)
    s = rng.standard_normal((3, 4, 5))  # [.., k]
    w = softmax_weights(s, 0.5)
    e = np.exp(s / 0.5)
    np.testing.assert_allclose(w, e / e.sum(-1, keepdims=True), rtol=1e-12)
    assert w.shape == s.shape


def test_softmax_weights_large_scores_do_not_overflow():
    w = softmax_weights(np.array([1000.0, 999.0]), 0.01)
    assert np.isfinite(w).all() and w[0] > 0.999


def test_beta_zero_is_argmax_with_lowest_index_on_ties():
    s = np.array([[0.1, 0.7, 0.7, 0.2], [3.0, 3.0, 3.0, 3.0]])
    w = softmax_weights(s, 0.0)
    np.testing.assert_array_equal(w, [[0, 1, 0, 0], [1, 0, 0, 0]])
    rng = np.random.default_rng(0)
    assert choose(s[0], 0.0, rng) == 1
    assert choose(s[1], 0.0, rng) == 0
    np.testing.assert_array_equal(choose_batch(s, 0.0, rng), [1, 0])


def test_neg_inf_candidates_are_never_chosen():
    s = np.array([-np.inf, 0.0, -np.inf])
    assert softmax_weights(s, 1.0).tolist() == [0.0, 1.0, 0.0]
    with pytest.raises(QProbeError, match="-inf"):
        softmax_weights(np.array([-np.inf, -np.inf]), 1.0)


def test_bad_inputs_raise_user_errors():
    with pytest.raises(QProbeError, match="beta"):
        softmax_weights(np.zeros(3), -1.0)
    with pytest.raises(QProbeError, match="NaN"):
        softmax_weights(np.array([0.0, np.nan]), 1.0)
    with pytest.raises(QProbeError, match="shape"):
        expected_reward(np.zeros((2, 3)), np.zeros((2, 4)), 0.1)


def test_choose_is_seeded_and_follows_the_weights():
    s = np.log(np.array([0.1, 0.2, 0.7]))  # beta=1: weights are exactly these probabilities
    a = [choose(s, 1.0, np.random.default_rng(7)) for _ in range(3)]
    assert len(set(a)) == 1  # same seed, same choice
    rng = np.random.default_rng(1)
    draws = np.array([choose(s, 1.0, rng) for _ in range(20000)])
    np.testing.assert_allclose(np.bincount(draws, minlength=3) / len(draws), [0.1, 0.2, 0.7],
                               atol=0.015)
    batch = choose_batch(np.tile(s, (20000, 1)), 1.0, np.random.default_rng(2))
    np.testing.assert_allclose(np.bincount(batch, minlength=3) / len(batch), [0.1, 0.2, 0.7],
                               atol=0.015)


def test_expected_reward_is_softmax_weighted_mean():
    s = np.array([[0.0, 1.0, 2.0], [5.0, 0.0, 0.0]])
    r = np.array([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    w = softmax_weights(s, 0.5)
    np.testing.assert_allclose(expected_reward(s, r, 0.5), (w * r).sum(-1))
    np.testing.assert_allclose(expected_reward(s, r, 0.0), [1.0, 1.0])  # argmax picks a 1
    # beta -> infinity is the base policy: the plain mean
    np.testing.assert_allclose(expected_reward(s, r, 1e9), r.mean(-1), atol=1e-6)
    # an excluded (-inf) candidate may carry an unscored (NaN) reward
    assert expected_reward(np.array([0.0, -np.inf]), np.array([1.0, np.nan]), 0.1) == 1.0


def _tv_of_selection(p0, q, beta, k, trials, rng):
    """Empirical distribution of the chosen item when k candidates are drawn from p0."""
    items = rng.choice(len(p0), size=(trials, k), p=p0)  # [T, k]
    chosen = choose_batch(q[items], beta, rng)  # [T]
    picked = items[np.arange(trials), chosen]
    emp = np.bincount(picked, minlength=len(p0)) / trials
    target = p0 * np.exp(q / beta)
    target /= target.sum()
    return 0.5 * np.abs(emp - target).sum()


def test_theorem_4_1_selection_tends_to_tilted_base_policy():
    """Paper thm 4.1: softmax(Q/beta) over k draws from p0 -> p0 exp(Q/beta) / Z as k grows."""
    p0 = np.array([0.4, 0.3, 0.15, 0.1, 0.05])
    q = np.array([0.0, 0.1, 0.3, 0.2, 0.5])
    beta = 0.2
    rng = np.random.default_rng(123)
    tv = {k: _tv_of_selection(p0, q, beta, k, 200_000, rng) for k in (1, 2, 8, 64)}
    # k = 1 is p0 itself: its distance to the target is the exact TV(p0, target)
    target = p0 * np.exp(q / beta)
    target /= target.sum()
    assert tv[1] == pytest.approx(0.5 * np.abs(p0 - target).sum(), abs=0.01)
    assert tv[1] > tv[2] > tv[8] > tv[64]
    assert tv[64] < 0.02 < tv[1] / 5
