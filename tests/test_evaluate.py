"""evaluate: pass@k and the probe's expected reward against brute-force enumeration."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from qprobe.cli import main
from qprobe.errors import FeatureSpecMismatch
from qprobe.evaluate import (
    argmax_expected_reward,
    bootstrap_ci,
    evaluate_groups,
    evaluate_rollouts,
    expected_max_at_k,
    format_table,
    pass_at_k,
    softmax_expected_reward,
)


def brute_pass_at_k(rewards: np.ndarray, k: int) -> float:
    subsets = list(itertools.combinations(range(len(rewards)), k))
    return float(np.mean([max(rewards[list(s)]) for s in subsets]))


def brute_probe(scores: np.ndarray, rewards: np.ndarray, k: int, beta: float) -> float:
    vals = []
    for s in itertools.combinations(range(len(rewards)), k):
        q, r = scores[list(s)], rewards[list(s)]
        if beta == 0:
            vals.append(r[int(np.argmax(q))])  # np.argmax: first (lowest index) of ties
        else:
            w = np.exp((q - q.max()) / beta)
            vals.append(float((w / w.sum()) @ r))
    return float(np.mean(vals))


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_matches_enumeration(n: int) -> None:
    rng = np.random.default_rng(n)
    for _ in range(5):
        r = (rng.random(n) < 0.4).astype(float)
        for k in range(1, n + 1):
            expect = brute_pass_at_k(r, k)
            assert pass_at_k(n, int(r.sum()), k) == pytest.approx(expect, abs=1e-12)
            assert expected_max_at_k(r, k) == pytest.approx(expect, abs=1e-12)


def test_pass_at_k_formula_and_edges() -> None:
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(10, 3, 2) == pytest.approx(1 - math.comb(7, 2) / math.comb(10, 2))
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 8, 3) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def test_expected_max_real_rewards() -> None:
    rng = np.random.default_rng(0)
    r = rng.normal(size=7)
    for k in range(1, 8):
        assert expected_max_at_k(r, k) == pytest.approx(brute_pass_at_k(r, k), abs=1e-12)


def test_argmax_exact_with_ties() -> None:
    rng = np.random.default_rng(1)
    for _trial in range(20):
        n = int(rng.integers(2, 9))
        q = rng.integers(0, 3, size=n).astype(float)  # many ties
        r = rng.random(n)
        for k in range(1, n + 1):
            assert argmax_expected_reward(q, r, k) == pytest.approx(
                brute_probe(q, r, k, 0.0), abs=1e-12
            )


def test_softmax_exact_enumeration_matches_brute_force() -> None:
    rng = np.random.default_rng(2)
    q, r = rng.normal(size=8), (rng.random(8) < 0.5).astype(float)
    for k in (2, 3, 5, 8):
        for beta in (0.01, 0.1, 1.0):
            got = softmax_expected_reward(q, r, k, beta)
            assert got == pytest.approx(brute_probe(q, r, k, beta), abs=1e-12)


def test_softmax_monte_carlo_close_to_exact_and_seeded() -> None:
    rng = np.random.default_rng(3)
    q, r = rng.normal(size=12), rng.random(12)
    exact = brute_probe(q, r, 5, 0.3)  # C(12,5)=792 subsets
    mc = softmax_expected_reward(
        q, r, 5, 0.3, np.random.default_rng(7), exact_limit=10, mc_subsets=20000
    )
    assert mc == pytest.approx(exact, abs=0.01)
    mc2 = softmax_expected_reward(
        q, r, 5, 0.3, np.random.default_rng(7), exact_limit=10, mc_subsets=20000
    )
    assert mc == mc2


def test_beta_limits() -> None:
    q = np.array([0.1, 2.0, -1.0, 0.5])
    r = np.array([0.0, 1.0, 0.0, 1.0])
    # tiny beta -> argmax; huge beta -> uniform choice = mean reward
    assert softmax_expected_reward(q, r, 3, 1e-6) == pytest.approx(argmax_expected_reward(q, r, 3))
    assert softmax_expected_reward(q, r, 3, 1e6) == pytest.approx(r.mean(), abs=1e-5)
    # k=1: any policy gets the mean reward
    assert softmax_expected_reward(q, r, 1, 0.0) == pytest.approx(r.mean())


def test_bootstrap_ci_seeded_and_contains_mean() -> None:
    v = np.random.default_rng(0).random(50)
    lo, hi = bootstrap_ci(v, 500, seed=3)
    assert lo < v.mean() < hi
    assert (lo, hi) == bootstrap_ci(v, 500, seed=3)
    assert bootstrap_ci(np.full(10, 0.5), 100) == (0.5, 0.5)


def test_evaluate_groups_perfect_and_useless_probe() -> None:
    rng = np.random.default_rng(0)
    P, n = 30, 8
    group = np.repeat(np.arange(P), n)
    rewards = (rng.random(P * n) < 0.3).astype(float)
    perfect = evaluate_groups(
        group, rewards, rewards + 1e-3 * rng.random(P * n), ks=[1, 4, 8], betas=[0.0]
    )
    const = evaluate_groups(group, rewards, np.zeros(P * n), ks=[1, 4, 8], betas=[0.0])
    for k in (1, 4, 8):
        # a probe that ranks by the reward reaches the skyline; a constant one picks sample 0
        assert perfect.probe[(k, 0.0)].mean == pytest.approx(perfect.pass_at_k[k].mean)
        first = rewards.reshape(P, n)
        expect = np.mean([brute_probe(np.zeros(n), first[p], k, 0.0) for p in range(P)])
        assert const.probe[(k, 0.0)].mean == pytest.approx(expect)
    assert perfect.pass1.mean == pytest.approx(rewards.mean())
    g = perfect.gain[(8, 0.0)]
    assert g.lo > 0 and g.mean == pytest.approx(perfect.pass_at_k[8].mean - rewards.mean())
    text = format_table(perfect)
    assert "pass@1" in text and "beta=0" in text
    d = perfect.to_dict()
    assert d["pass@k"]["8"]["mean"] == pytest.approx(perfect.pass_at_k[8].mean)


def test_evaluate_groups_nan_rewards_uneven_groups_and_greedy() -> None:
    group = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    rewards = np.array([1, 0, np.nan, 0, 1, 0, 0, 1, 1], dtype=float)
    scores = np.arange(9, dtype=float)
    res = evaluate_groups(
        group,
        rewards,
        scores,
        ks=[1, 2, 3, 8],
        betas=[0.0, 0.5],
        greedy_rewards=np.array([1.0, 0.0, np.nan]),
    )
    assert res.ks == [1, 2, 3]  # k=8: no prompt has 8 samples
    assert res.pass_at_k[3].n_prompts == 1  # only prompt 2 has >= 3 scored samples
    assert res.pass1.mean == pytest.approx(np.mean([0.5, 0.5, 0.5]))
    assert res.greedy is not None and res.greedy.mean == pytest.approx(0.5)
    assert any("without a reward" in n for n in res.notes)
    assert res.probe[(2, 0.0)].mean == pytest.approx(
        np.mean(
            [
                brute_probe(np.array([0.0, 1.0]), np.array([1.0, 0.0]), 2, 0.0),
                brute_probe(np.array([3.0, 4.0]), np.array([0.0, 1.0]), 2, 0.0),
                brute_probe(scores[5:], rewards[5:], 2, 0.0),
            ]
        )
    )


def _rollouts_and_probe(tmp_path, P=12, n=6, dim=5, seed=0):
    """Synthetic scored rollouts whose reward is 1 when feature 0 > 0, and a probe on feature 0."""
    import torch

    from qprobe.features import FeatureSpec
    from qprobe.probe import Probe
    from qprobe.rollouts import write_rollouts

    rng = np.random.default_rng(seed)
    spec = FeatureSpec(model="synthetic", layer=1, position="last", dim=dim, dtype="float32")
    feats = rng.normal(size=(P * n, dim)).astype(np.float32)
    rewards = (feats[:, 0] + 0.5 * rng.normal(size=P * n) > 0).astype(float)
    rows = [
        {
            "prompt_id": f"p{i // n}",
            "sample_idx": i % n,
            "prompt": f"q{i // n}",
            "completion": f"a{i}",
            "reward": float(rewards[i]),
        }
        for i in range(P * n)
    ]
    write_rollouts(tmp_path / "test", rows, feats, meta={"task": "synthetic"}, feature_spec=spec)
    probe = Probe(dim, beta=0.1, objective="q", feature_spec=spec)
    with torch.no_grad():
        probe.net[-1].weight.zero_()
        probe.net[-1].weight[0, 0] = 1.0
    probe.save(tmp_path / "probe")
    return feats, rewards, spec


def test_evaluate_rollouts_scores_with_the_probe(tmp_path) -> None:
    feats, rewards, _ = _rollouts_and_probe(tmp_path)
    res = evaluate_rollouts(str(tmp_path / "test"), str(tmp_path / "probe"), [1, 3, 6], [0.0, 1.0])
    direct = evaluate_groups(
        np.repeat(np.arange(12), 6), rewards, feats[:, 0], [1, 3, 6], [0.0, 1.0]
    )
    for key, e in direct.probe.items():
        assert res.probe[key].mean == pytest.approx(e.mean, abs=1e-6)
    assert res.probe[(6, 0.0)].mean > res.pass1.mean  # the planted direction helps


def test_evaluate_rollouts_reads_the_probes_extras(tmp_path) -> None:
    """A probe of extras alone (what --cv often picks) is scored from the folder's columns, not
    from its features (it used to be refused: dimension D does not match the probe's 0)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from qprobe.probe import Probe

    feats, rewards, _ = _rollouts_and_probe(tmp_path)
    shard = tmp_path / "test" / "samples-00000.parquet"
    t = pq.read_table(shard)
    pq.write_table(t.append_column("visible_reward", pa.array(feats[:, 0] > 0)), shard)
    probe = Probe(1, beta=0.1, objective="q", extras=("visible_pass",))
    with torch.no_grad():
        probe.net[-1].weight.fill_(1.0)
    probe.save(tmp_path / "extras-only")
    res = evaluate_rollouts(str(tmp_path / "test"), str(tmp_path / "extras-only"), [6], [0.0])
    direct = evaluate_groups(np.repeat(np.arange(12), 6), rewards,
                             (feats[:, 0] > 0).astype(np.float64), [6], [0.0])
    assert res.probe[(6, 0.0)].mean == pytest.approx(direct.probe[(6, 0.0)].mean, abs=1e-9)


def test_evaluate_refuses_probe_of_other_features(tmp_path) -> None:
    from qprobe.features import FeatureSpec
    from qprobe.probe import Probe

    _rollouts_and_probe(tmp_path)
    other = FeatureSpec(model="another-model", layer=1, position="last", dim=5, dtype="float32")
    Probe(5, feature_spec=other).save(tmp_path / "other")
    with pytest.raises(FeatureSpecMismatch):
        evaluate_rollouts(str(tmp_path / "test"), str(tmp_path / "other"))


def test_cli_evaluate_table_json_and_errors(tmp_path, capsys) -> None:
    import json

    _rollouts_and_probe(tmp_path)
    out = tmp_path / "res" / "eval.json"
    rc = main(
        [
            "evaluate",
            str(tmp_path / "test"),
            "--probe",
            str(tmp_path / "probe"),
            "--k",
            "1,2,4",
            "--beta",
            "0,0.1",
            "--json",
            str(out),
        ]
    )
    text = capsys.readouterr().out
    assert rc == 0 and "pass@1" in text and "beta=0.1" in text
    d = json.loads(out.read_text())
    assert d["ks"] == [1, 2, 4] and len(d["probe"]) == 6
    assert main(["evaluate", str(tmp_path / "missing"), "--probe", str(tmp_path / "probe")]) == 2
    assert "qprobe: error:" in capsys.readouterr().err


def test_ranking_against_brute_force():
    from qprobe.evaluate import concordance, ranking

    rng = np.random.default_rng(3)
    group = np.repeat(np.arange(6), 5)
    rewards = rng.integers(0, 2, 30).astype(float)
    rewards[:5] = 1.0  # prompt 0: all pass, no pair to compare
    scores = rng.integers(0, 4, 30).astype(float)  # ties on purpose
    got = ranking(group, rewards, scores)
    per = []
    for p in range(6):
        i = np.flatnonzero(group == p)
        pairs = [(a, b) for a in i for b in i if rewards[a] > rewards[b]]
        if pairs:
            per.append(np.mean([1.0 if scores[a] > scores[b] else 0.5 if scores[a] == scores[b]
                                else 0.0 for a, b in pairs]))
    assert got["prompts_with_differing_rewards"] == len(per) and len(per) < 6
    assert got["within_prompt"] == pytest.approx(np.mean(per))
    pos, neg = np.flatnonzero(rewards == 1), np.flatnonzero(rewards == 0)
    brute = np.mean([1.0 if scores[a] > scores[b] else 0.5 if scores[a] == scores[b] else 0.0
                     for a in pos for b in neg])
    assert got["pooled_auc"] == pytest.approx(brute)
    assert concordance(np.array([1.0, 2.0]), np.array([0.5, 0.5])) is None
    assert concordance(np.array([3.0, 1.0, 2.0]), np.array([1.0, 0.0, 0.5])) == 1.0
    assert ranking(group, rewards * 0.5 + 0.25, scores)["pooled_auc"] is None  # not 0/1


def test_with_extra_candidate_reward_exact_and_monte_carlo():
    """The greedy completion always among the k: exact when k-1 = n, and the Monte Carlo over
    (k-1)-subsets agrees with enumerating them."""
    import itertools

    from qprobe.evaluate import with_extra_candidate_reward
    from qprobe.policy import expected_reward

    rng = np.random.default_rng(0)
    q = np.array([0.3, -1.0, 2.0, 0.5, 0.1])
    r = np.array([0.0, 1.0, 1.0, 0.0, 1.0])
    g_q, g_r = 1.0, 0.0
    full = with_extra_candidate_reward(q, r, g_q, g_r, 6, 0.0, rng)
    assert full == float(expected_reward(np.r_[g_q, q], np.r_[g_r, r], 0.0))  # argmax: q=2.0
    for beta in (0.0, 0.5):
        exact = np.mean([float(expected_reward(np.r_[g_q, q[list(c)]], np.r_[g_r, r[list(c)]], beta))
                         for c in itertools.combinations(range(5), 2)])
        mc = with_extra_candidate_reward(q, r, g_q, g_r, 3, beta, rng, subsets=20000)
        assert abs(mc - exact) < 0.01
    assert with_extra_candidate_reward(q, r, g_q, 0.7, 1, 0.0, rng) == 0.7  # k = 1: greedy only
