"""Evaluation of best-of-k selection: pass@k, the probe's expected reward, bootstrap CIs.

Everything here is numpy on arrays already in memory: a test rollout set gives, for each prompt,
n samples with a reward r_i and a probe score Q_i. The quantities (as in the paper's evaluation):

- base pass@1: the mean reward of a single sample (average over all samples of a prompt).
- pass@k (the skyline / oracle): the expected *best* reward among k samples drawn without
  replacement from the prompt's n samples. For 0/1 rewards this is the unbiased estimator of
  Chen et al. (2021), 1 - C(n-c, k) / C(n, k); for real rewards it is the expected maximum,
  sum_j r_(j) C(j-1, k-1) / C(n, k) over the rewards sorted ascending (exact, no sampling).
- probe@(k, beta): the expected reward of the Q-probe policy when it sees a random k-subset S:
  E_S[ sum_{i in S} softmax(Q_S / beta)_i r_i ]  (the analytic reward of the choice, not a draw).
  * beta = 0 (argmax, ties to the lowest sample index, as `qprobe.policy` does) is exact over all
    C(n, k) subsets: order the samples by (-Q, index); the sample at rank j is chosen iff it is in
    S and none of the j better ones is, with probability C(n-1-j, k-1) / C(n, k).
  * beta > 0 enumerates all subsets when C(n, k) <= `exact_limit` (default 5000) and otherwise
    averages over `mc_subsets` (default 4000) uniformly random k-subsets per prompt drawn from a
    seeded generator; the Monte-Carlo error is far below the bootstrap CI at these sizes.
- Each quantity is first computed per prompt, then averaged over prompts; the 95% CI is a
  percentile bootstrap over prompts (seeded, `n_boot` resamples). Gains over pass@1 use a *paired*
  bootstrap (the same resampled prompts for both), which is the honest CI of an improvement.

Prompts with fewer than k scored samples are left out of that k (the count is reported).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from qprobe.policy import expected_reward

# --------------------------------------------------------------------------------------------
# per-prompt estimators


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one prompt with n samples of which c are correct: 1 - C(n-c,k)/C(n,k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    # product form avoids huge binomials: C(n-c,k)/C(n,k) = prod_{i=n-c+1}^{n} (1 - k/i)
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def _rank_weights(n: int, k: int) -> np.ndarray:
    """w[j] = C(n-1-j, k-1) / C(n, k): chance that rank j (0 = best) is the best of a k-subset."""
    denom = math.comb(n, k)
    return np.array(
        [math.comb(n - 1 - j, k - 1) / denom for j in range(n)], dtype=np.float64
    )  # [n]


def expected_max_at_k(rewards: np.ndarray, k: int) -> float:
    """Expected maximum reward over a uniformly random k-subset of `rewards` (exact).

    For 0/1 rewards this equals `pass_at_k(n, sum(rewards), k)`.
    """
    r = np.sort(np.asarray(rewards, dtype=np.float64))[::-1]  # [n] best first
    return float(_rank_weights(len(r), k) @ r)


def argmax_expected_reward(scores: np.ndarray, rewards: np.ndarray, k: int) -> float:
    """Exact E_S[r_argmax_S Q] over all k-subsets S; ties go to the lowest sample index."""
    scores = np.asarray(scores, dtype=np.float64)
    rewards = np.asarray(rewards, dtype=np.float64)
    order = np.lexsort((np.arange(len(scores)), -scores))  # [n] by (-Q, index)
    return float(_rank_weights(len(scores), k) @ rewards[order])


def softmax_expected_reward(
    scores: np.ndarray,
    rewards: np.ndarray,
    k: int,
    beta: float,
    rng: np.random.Generator | None = None,
    exact_limit: int = 5000,
    mc_subsets: int = 4000,
) -> float:
    """E_S[ sum_{i in S} softmax(Q_S/beta)_i r_i ] over uniformly random k-subsets S.

    beta == 0 is the exact argmax form; beta > 0 enumerates when C(n, k) <= exact_limit and
    otherwise averages `mc_subsets` random subsets drawn from `rng` (seeded by the caller).
    """
    scores = np.asarray(scores, dtype=np.float64)
    rewards = np.asarray(rewards, dtype=np.float64)
    n = len(scores)
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be between 1 and the number of samples n={n}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if beta == 0:
        return argmax_expected_reward(scores, rewards, k)
    if k == 1:
        return float(rewards.mean())
    if math.comb(n, k) <= exact_limit:
        idx = np.array(list(itertools.combinations(range(n), k)))  # [C(n,k), k]
    else:
        rng = rng if rng is not None else np.random.default_rng(0)
        idx = np.argsort(rng.random((mc_subsets, n)), axis=1)[:, :k]  # [S, k] uniform k-subsets
    return float(expected_reward(scores[idx], rewards[idx], beta).mean())  # [S] -> mean


def with_extra_candidate_reward(
    scores: np.ndarray, rewards: np.ndarray, extra_score: float, extra_reward: float, k: int,
    beta: float, rng: np.random.Generator, subsets: int = 2000,
) -> float:
    """Expected reward when one fixed candidate (e.g. the greedy completion) is always among the
    k, beside k-1 samples drawn without replacement from the prompt's n samples.

    Monte Carlo over `subsets` random (k-1)-subsets (exact when k-1 = n): [n] scores/rewards."""
    n = len(scores)
    m = min(k - 1, n)
    if m <= 0:
        return float(extra_reward)
    if m == n:
        idx = np.arange(n)[None, :]  # [1, n]
    else:
        idx = np.argsort(rng.random((subsets, n)), axis=1)[:, :m]  # [S, m]
    q = np.concatenate([np.full((len(idx), 1), extra_score), scores[idx]], axis=1)  # [S, m + 1]
    r = np.concatenate([np.full((len(idx), 1), extra_reward), rewards[idx]], axis=1)
    return float(expected_reward(q, r, beta).mean())


def concordance(scores: np.ndarray, rewards: np.ndarray) -> float | None:
    """P(Q_i > Q_j | r_i > r_j) over the pairs of one prompt's samples with different rewards
    (ties in Q count one half): the AUC for 0/1 rewards. None when all rewards are equal.

    This is what selection among a prompt's samples needs; 0.5 is chance."""
    s, r = np.asarray(scores, np.float64), np.asarray(rewards, np.float64)
    better = r[:, None] > r[None, :]  # [n, n] i has the higher reward
    if not better.any():
        return None
    d = s[:, None] - s[None, :]
    return float(((d > 0) + 0.5 * (d == 0))[better].mean())


def ranking(group: np.ndarray, rewards: np.ndarray, scores: np.ndarray) -> dict[str, Any]:
    """How well scores order samples: within each prompt (mean concordance over the prompts
    whose samples' rewards differ) and pooled over all samples (0/1 rewards only, else None).

    A probe can predict which *prompts* are easy (high pooled AUC) without ordering the samples
    of one prompt (within-prompt concordance near 0.5); only the second helps best-of-k."""
    group, rewards, scores = np.asarray(group), np.asarray(rewards, np.float64), np.asarray(scores)
    keep = ~np.isnan(rewards)
    per = [concordance(s, r) for r, s in split_groups(group[keep], rewards[keep], scores[keep])]
    per = [c for c in per if c is not None]
    r, s = rewards[keep], np.asarray(scores[keep], np.float64)
    pooled = None
    if len(r) and np.isin(r, (0.0, 1.0)).all() and 0 < r.sum() < len(r):
        _, inv, counts = np.unique(s, return_inverse=True, return_counts=True)
        avg_rank = (np.cumsum(counts) - (counts - 1) / 2.0)[inv]  # 1-based ranks, ties averaged
        n_pos = r.sum()
        pooled = float((avg_rank[r == 1].sum() - n_pos * (n_pos + 1) / 2) /
                       (n_pos * (len(r) - n_pos)))  # Mann-Whitney U / (n_pos n_neg)
    return {"within_prompt": float(np.mean(per)) if per else None,
            "prompts_with_differing_rewards": len(per), "pooled_auc": pooled}


# --------------------------------------------------------------------------------------------
# grouping and bootstrap


def split_groups(group: np.ndarray, *arrays: np.ndarray) -> list[tuple[np.ndarray, ...]]:
    """Split aligned per-sample arrays into per-prompt tuples, in order of group id."""
    group = np.asarray(group)
    order = np.argsort(group, kind="stable")
    bounds = np.flatnonzero(np.diff(group[order])) + 1
    return [tuple(np.asarray(a)[ix] for a in arrays) for ix in np.split(order, bounds)]


def bootstrap_ci(
    values: np.ndarray, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of per-prompt `values` [P] (resampling prompts)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(n_boot, len(values)))  # [B, P]
    means = values[idx].mean(axis=1)  # [B]
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return (float(lo), float(hi))


@dataclass
class Estimate:
    """A mean over prompts with its 95% bootstrap CI; `n_prompts` it was computed on."""

    mean: float
    lo: float
    hi: float
    n_prompts: int

    @classmethod
    def of(cls, values: np.ndarray, n_boot: int, seed: int) -> Estimate:
        values = np.asarray(values, dtype=np.float64)
        lo, hi = bootstrap_ci(values, n_boot, seed)
        mean = float(values.mean()) if len(values) else float("nan")
        return cls(mean, lo, hi, len(values))

    def fmt(self, digits: int = 3) -> str:
        if self.n_prompts == 0:
            return "-"
        return f"{self.mean:.{digits}f} [{self.lo:.{digits}f}, {self.hi:.{digits}f}]"


@dataclass
class EvalResult:
    """All numbers of one evaluation; `to_dict` gives the JSON written by `qprobe evaluate`."""

    n_prompts: int
    n_samples: int
    ks: list[int]
    betas: list[float]
    pass1: Estimate
    pass_at_k: dict[int, Estimate]
    probe: dict[tuple[int, float], Estimate] = field(default_factory=dict)
    gain: dict[tuple[int, float], Estimate] = field(default_factory=dict)  # probe - pass@1, paired
    greedy: Estimate | None = None
    notes: list[str] = field(default_factory=list)
    # per-prompt probe rewards [P_k] for each (k, beta) when asked (keep_values); not in to_dict
    values: dict[tuple[int, float], np.ndarray] = field(default_factory=dict, repr=False)
    base_values: dict[int, np.ndarray] = field(default_factory=dict, repr=False)  # pass@1 [P_k]

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_prompts": self.n_prompts,
            "n_samples": self.n_samples,
            "ks": self.ks,
            "betas": self.betas,
            "pass@1": asdict(self.pass1),
            "pass@k": {str(k): asdict(e) for k, e in self.pass_at_k.items()},
            "probe": [
                {"k": k, "beta": b, **asdict(e), "gain": asdict(self.gain[(k, b)])}
                for (k, b), e in self.probe.items()
            ],
            "greedy": asdict(self.greedy) if self.greedy else None,
            "notes": self.notes,
        }


def evaluate_groups(
    group: np.ndarray,
    rewards: np.ndarray,
    scores: np.ndarray | None = None,
    ks: list[int] | tuple[int, ...] = (1, 2, 4, 8, 16),
    betas: list[float] | tuple[float, ...] = (0.0, 0.01, 0.1, 1.0),
    greedy_rewards: np.ndarray | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    exact_limit: int = 5000,
    mc_subsets: int = 4000,
    keep_values: bool = False,
) -> EvalResult:
    """Evaluate per-sample `rewards` [N] (and probe `scores` [N]) grouped by prompt `group` [N].

    Samples with a NaN reward (not scored) are dropped. `greedy_rewards` [P_g] are per-prompt
    rewards of greedy decoding (any prompt set), reported with their own CI.
    """
    group = np.asarray(group)
    rewards = np.asarray(rewards, dtype=np.float64)
    scores = None if scores is None else np.asarray(scores, dtype=np.float64)
    notes: list[str] = []
    keep = ~np.isnan(rewards)
    if not keep.all():
        notes.append(f"{int((~keep).sum())} sample(s) without a reward were left out")
    if scores is not None and not np.isfinite(scores[keep]).all():
        raise ValueError("probe scores contain NaN or inf")
    cols = (rewards[keep],) if scores is None else (rewards[keep], scores[keep])
    groups = split_groups(group[keep], *cols)
    sizes = np.array([len(g[0]) for g in groups])
    if len(groups) == 0:
        raise ValueError("nothing to evaluate: no sample has a reward")

    res = EvalResult(
        n_prompts=len(groups),
        n_samples=int(sizes.sum()),
        ks=[int(k) for k in ks],
        betas=[float(b) for b in betas],
        pass1=Estimate.of(np.array([g[0].mean() for g in groups]), n_boot, seed),
        pass_at_k={},
        notes=notes,
    )
    too_big = [k for k in res.ks if k > sizes.max()]
    if too_big:
        notes.append(f"k={too_big} left out: no prompt has that many scored samples")
        res.ks = [k for k in res.ks if k <= sizes.max()]
    for k in res.ks:
        sel = [g for g in groups if len(g[0]) >= k]
        if len(sel) < len(groups):
            notes.append(
                f"k={k}: {len(groups) - len(sel)} prompt(s) with fewer than {k} samples left out"
            )
        res.pass_at_k[k] = Estimate.of(
            np.array([expected_max_at_k(g[0], k) for g in sel]), n_boot, seed
        )
        if scores is None:
            continue
        base = np.array([g[0].mean() for g in sel])  # [P_k] per-prompt pass@1
        for bi, beta in enumerate(res.betas):
            rng = np.random.default_rng([seed, k, bi])
            vals = np.array(
                [
                    softmax_expected_reward(g[1], g[0], k, beta, rng, exact_limit, mc_subsets)
                    for g in sel
                ]
            )  # [P_k]
            res.probe[(k, beta)] = Estimate.of(vals, n_boot, seed)
            res.gain[(k, beta)] = Estimate.of(vals - base, n_boot, seed)
            if keep_values:
                res.values[(k, beta)] = vals
                res.base_values[k] = base
    if greedy_rewards is not None:
        g = np.asarray(greedy_rewards, dtype=np.float64)
        g = g[~np.isnan(g)]
        res.greedy = Estimate.of(g, n_boot, seed)
    return res


def format_table(res: EvalResult, title: str = "") -> str:
    """A readable plain-text table: baselines, then the probe's reward at each k x beta."""
    lines = [title] if title else []
    lines.append(
        f"{res.n_prompts} prompts, {res.n_samples} samples; mean [95% bootstrap CI over prompts]"
    )
    lines.append(f"  base pass@1 (mean reward)   {res.pass1.fmt()}")
    if res.greedy is not None:
        lines.append(
            f"  greedy                      {res.greedy.fmt()}  ({res.greedy.n_prompts} prompts)"
        )
    lines.append("")
    head = f"  {'k':>3}  {'pass@k (skyline)':<24}"
    if res.probe:
        head += "".join(f"  {'probe beta=' + _b(b):<24}" for b in res.betas)
    lines.append(head)
    for k in res.ks:
        row = f"  {k:>3}  {res.pass_at_k[k].fmt():<24}"
        for b in res.betas if res.probe else []:
            row += f"  {res.probe[(k, b)].fmt():<24}"
        lines.append(row)
    if res.probe:
        lines.append("")
        lines.append("  gain of the probe over pass@1 (paired bootstrap CI):")
        for k in res.ks:
            row = f"  {k:>3}  {'':<24}"
            for b in res.betas:
                g = res.gain[(k, b)]
                row += f"  {_signed(g):<24}"
            lines.append(row)
    for n in res.notes:
        lines.append(f"  note: {n}")
    return "\n".join(lines)


def _b(b: float) -> str:
    return f"{b:g}"


def _signed(e: Estimate) -> str:
    if e.n_prompts == 0:
        return "-"
    return f"{e.mean:+.3f} [{e.lo:+.3f}, {e.hi:+.3f}]"


# --------------------------------------------------------------------------------------------
# rollouts + probe


def evaluate_rollouts(
    rollouts_dir: str,
    probe_dir: str | None = None,
    ks: list[int] | tuple[int, ...] = (1, 2, 4, 8, 16),
    betas: list[float] | tuple[float, ...] = (0.0, 0.01, 0.1, 1.0),
    greedy_dir: str | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> EvalResult:
    """Evaluate a probe (or only the baselines when `probe_dir` is None) on a rollout folder.

    Refuses (FeatureSpecMismatch) a probe trained on other features than the rollouts carry.
    `greedy_dir` is a rollout folder of greedy completions (one per prompt) for the greedy baseline.
    """
    from qprobe.errors import QProbeError
    from qprobe.rollouts import Rollouts

    r = Rollouts(rollouts_dir)
    group, _prompts = r.groups()
    rewards = r.rewards
    if np.isnan(rewards).all():
        raise QProbeError(f"{rollouts_dir}: no sample has a reward; score the rollouts first")
    scores = None
    if probe_dir is not None:
        from qprobe.probe import Probe

        probe = Probe.load(probe_dir)
        if probe.feature_dim and probe.feature_spec is None and r.feature_spec is None:
            raise QProbeError(f"{rollouts_dir}: rollouts carry no features; a probe needs them")
        # the feature set (own or from `qprobe embed`) and extras the probe was trained on;
        # refuses features of another spec
        scores = np.asarray(probe.score_rollouts(r), dtype=np.float64)  # [N]
    greedy = None
    if greedy_dir is not None:
        greedy = Rollouts(greedy_dir).rewards
    return evaluate_groups(group, rewards, scores, ks, betas, greedy, n_boot=n_boot, seed=seed)


# --------------------------------------------------------------------------------------------
# preference pairs


def pair_accuracy(group: np.ndarray, chosen: np.ndarray, rejected: np.ndarray, n_boot: int = 1000,
                  seed: int = 0) -> Estimate:
    """How often a score ranks the chosen answer above the rejected one (ties count one half):
    per prompt over its pairs `group` [P], then the mean over prompts with a bootstrap CI."""
    chosen, rejected = np.asarray(chosen, np.float64), np.asarray(rejected, np.float64)
    if not (np.isfinite(chosen).all() and np.isfinite(rejected).all()):
        raise ValueError("pair scores contain NaN or inf")
    hit = (chosen > rejected) + 0.5 * (chosen == rejected)  # [P]
    per = [g[0].mean() for g in split_groups(np.asarray(group), hit)]
    return Estimate.of(np.asarray(per), n_boot, seed)


def evaluate_pairs(rollouts_dir: str, probe_dir: str | None = None, n_boot: int = 1000,
                   seed: int = 0) -> dict[str, Any]:
    """Held-out pair accuracy of a probe's Q (and of the base model's log-likelihood, summed and
    per token, as baselines that need no training) on a folder with pairs.parquet."""
    from qprobe.rollouts import Rollouts

    r = Rollouts(rollouts_dir)
    rows = r.pair_rows()  # [P, 2]; one-line error without pairs.parquet
    c, w = rows[:, 0], rows[:, 1]
    group = np.unique(r.prompt_ids[c], return_inverse=True)[1]  # [P] prompt of each pair
    out: dict[str, Any] = {"n_pairs": len(c), "n_prompts": int(group.max()) + 1, "scores": {}}
    ll = r.loglik()
    if ll is not None:
        for name in ("logprob_sum", "logprob_mean"):
            out["scores"][f"base {name}"] = pair_accuracy(group, ll[name][c], ll[name][w], n_boot, seed)
    if probe_dir is not None:
        from qprobe.probe import Probe

        probe = Probe.load(probe_dir)
        q = np.asarray(probe.score_rollouts(r), dtype=np.float64)  # [N]
        out["scores"]["probe"] = pair_accuracy(group, q[c], q[w], n_boot, seed)
        out["probe_margin_mean"] = float(np.mean(q[c] - q[w]))
    return out


def format_pairs(res: dict[str, Any], title: str = "") -> str:
    lines = [title] if title else []
    lines.append(f"{res['n_pairs']} pairs over {res['n_prompts']} prompts; pair accuracy "
                 "(chosen scored above rejected), mean [95% bootstrap CI over prompts]")
    for name, e in res["scores"].items():
        lines.append(f"  {name:<22}  {e.fmt()}")
    return "\n".join(lines)
