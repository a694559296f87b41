"""Where the shown-test filter leaves its headroom, and which stored signal could take it.

Among a prompt's candidates that pass the test the prompt shows, the filter picks by mean
log-prob. This prints, per folder: the reward of an oracle choosing inside the passing candidates
(= pass@k whenever a correct candidate passes), of a random passing candidate, the number of
prompts whose passing candidates differ in reward (the only ones a learned order inside the
filter can improve, and its training signal), and each signal's within-prompt ranking AUC there.

    PYTHONPATH=src python bench/within_passers.py results/mbpp-qwen-coder/rollouts/{train,mbpp-test,humaneval}
"""

from __future__ import annotations

import sys

import numpy as np

from qprobe.evaluate import concordance
from qprobe.rollouts import Rollouts

SIGNALS = ("logprob_mean", "logprob_sum", "mbr_fuzz_share", "mbr_share", "reviewer_mean",
           "coder_reviewer")


def main(folders: list[str]) -> None:
    for path in folders:
        r = Rollouts(path)
        group, _ = r.groups()
        rewards = r.rewards
        x = r.extra_inputs()
        vis = x["visible_pass"]
        oracle, random_pass, mixed = [], [], []
        for g in range(int(group.max()) + 1):
            m = group == g
            p = m & (vis == 1)
            pool = p if p.any() else m
            oracle.append(np.nanmax(rewards[pool]))
            random_pass.append(np.nanmean(rewards[pool]))
            if p.sum() > 1 and 0 < np.nanmean(rewards[p]) < 1:
                mixed.append(p)
        auc = {}
        for name in SIGNALS:
            if name in x:
                cs = [concordance(x[name][p], rewards[p]) for p in mixed]
                cs = [c for c in cs if c is not None]
                auc[name] = round(float(np.mean(cs)), 3) if cs else None
        print(f"{path}: oracle inside the filter {np.mean(oracle):.3f}, random passing candidate "
              f"{np.mean(random_pass):.3f}, prompts whose passing candidates differ "
              f"{len(mixed)} of {int(group.max()) + 1}; within-prompt AUC there: {auc}")


if __name__ == "__main__":
    main(sys.argv[1:])
