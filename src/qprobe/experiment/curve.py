"""The learning curve (the paper's figure 2): test reward vs the number of training prompts.

For each size, probes are trained on `curve.subsets` random subsets of that many train prompts
(seeded by the experiment seed) and evaluated on the first test set at the headline (k, beta).
The second axis, `curve.samples`, keeps every train prompt and draws that many of each prompt's
samples instead: read side by side with the first at equal rows (prompts x samples), it says
whether more samples per prompt or more prompts buy more reward.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from qprobe.experiment.config import ExperimentConfig


def learning_curve(
    cfg: ExperimentConfig,
    train: Any,
    test: Any,
    candidate: Any,
    say: Any,
) -> dict[str, Any]:
    """Reward at (k, beta) of probes trained on `subsets` random prompt subsets of each size.

    train, test: the train and first test set's `Rollouts`; candidate: the inputs and steps
    cross-validation chose for the curve's objective (a `train.cv.Candidate`), or None for the
    collection feature with the configured training. Returns
    {"objective", "k", "beta", "inputs", "sizes": {size: [reward]}, "samples": {m: [reward]}}.
    """
    from qprobe.evaluate import evaluate_groups
    from qprobe.rollouts import feature_set_name
    from qprobe.train.cv import Candidate, _inputs, fit

    k = max(cfg.eval.ks)
    beta = cfg.eval.beta if candidate is None or candidate.beta is None else candidate.beta
    group, prompts = train.groups()
    n_prompts = len(prompts)
    te_group, _ = test.groups()
    base = cfg.train_config(cfg.curve.objective, 0)
    c = candidate or Candidate(feature_set_name(train.feature_spec), (), base.weight_decay,
                               base.min_steps)
    x_all = _inputs(train, c)  # [N, D (+ extras)], built once for every subset
    out: dict[str, Any] = {"objective": cfg.curve.objective, "k": k, "beta": beta,
                           "inputs": c.label, "sizes": {}}

    def sweep(draw: Any, what: str) -> list[float]:
        """Rewards of probes trained on `subsets` draws of train rows (seed j for draw j)."""
        vals = []
        for j in range(cfg.curve.subsets):
            probe, _ = fit(train, c, cfg.train_config(cfg.curve.objective, j), draw(), x=x_all,
                           data_fingerprint=False)
            sc = probe.score_rollouts(test).astype(np.float64)  # [N_test]
            res = evaluate_groups(te_group, test.rewards, sc, [k], [beta], n_boot=10,
                                  seed=cfg.seed)
            vals.append(res.probe[(k, beta)].mean)
        say(f"curve: {what} -> {np.mean(vals):.3f} (+- {np.std(vals):.3f})")
        return vals

    rng = np.random.default_rng([cfg.seed, 2])
    for size in cfg.curve.sizes:
        if size > n_prompts:
            say(f"curve: size {size} > {n_prompts} train prompts, skipped")
            continue
        out["sizes"][str(size)] = sweep(
            lambda size=size: np.flatnonzero(
                np.isin(group, rng.choice(n_prompts, size=size, replace=False))),
            f"{size} train prompts")

    members = [np.flatnonzero(group == g) for g in range(n_prompts)]  # each prompt's rows
    fewest = min(len(r) for r in members)
    rng_s = np.random.default_rng([cfg.seed, 3])
    for m in cfg.curve.samples:
        if m > fewest:
            say(f"curve: {m} samples per prompt > the {fewest} stored for some prompt, skipped")
            continue
        out.setdefault("samples", {})[str(m)] = sweep(
            lambda m=m: np.sort(np.concatenate([rng_s.choice(r, size=m, replace=False)
                                                for r in members])),
            f"{m} samples x {n_prompts} prompts")
    return out
