"""The learning curve (the paper's figure 2): test reward vs the number of training prompts.

For each size, probes are trained on `curve.subsets` random subsets of that many train prompts
(seeded by the experiment seed) and evaluated on the first test set at the headline (k, beta).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from qprobe.experiment.config import ExperimentConfig


def learning_curve(
    cfg: ExperimentConfig,
    feats: np.ndarray,
    rewards: np.ndarray,
    group: np.ndarray,
    n_prompts: int,
    test: Any,
    spec: Any,
    say: Any,
) -> dict[str, Any]:
    """Reward at (k, beta) of probes trained on `subsets` random prompt subsets of each size.

    feats [N, D], rewards [N], group [N] (prompt index < n_prompts): the train rollouts; test: the
    first test set's `Rollouts`. Returns {"objective", "k", "beta", "sizes": {size: [reward]}}.
    """
    from qprobe.evaluate import evaluate_groups
    from qprobe.train import train_probe

    k, beta = max(cfg.eval.ks), cfg.eval.beta
    te_group, _ = test.groups()
    te_feats, te_rewards = np.asarray(test.features), test.rewards
    rng = np.random.default_rng([cfg.seed, 2])
    out: dict[str, Any] = {"objective": cfg.curve.objective, "k": k, "beta": beta, "sizes": {}}
    for size in cfg.curve.sizes:
        if size > n_prompts:
            say(f"curve: size {size} > {n_prompts} train prompts, skipped")
            continue
        vals = []
        for j in range(cfg.curve.subsets):
            chosen = rng.choice(n_prompts, size=size, replace=False)
            rows = np.flatnonzero(np.isin(group, chosen))
            probe, _ = train_probe(
                feats[rows],
                rewards[rows],
                group[rows],
                config=cfg.train_config(cfg.curve.objective, j),
                feature_spec=spec,
                data_fingerprint=False,
            )
            sc = probe.score(te_feats).astype(np.float64)  # [N_test]
            res = evaluate_groups(te_group, te_rewards, sc, [k], [beta], n_boot=10, seed=cfg.seed)
            vals.append(res.probe[(k, beta)].mean)
        out["sizes"][str(size)] = vals
        say(f"curve: {size} train prompts -> {np.mean(vals):.3f} (+- {np.std(vals):.3f})")
    return out
