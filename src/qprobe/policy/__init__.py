"""Policies: how a model's samples and a probe's scores become the text returned.

- `select`: the selection maths, numpy only: softmax(Q / beta) weights, a seeded choice, the
  analytic expected reward of the choice (also what `qprobe.evaluate` measures).
- `best_of_k`: the best-of-k policy object: sample k completions, score them with the probe,
  choose one (`QProbePolicy`, `best_of_k`, `Choice`).

- `heads`, `guided`, `head_train`: token-level reward-guided decoding (RAD, ARM) inside the
  local decode loop through its step hook (`GuidedSampler`, `RewardHead`, `train_head`); they
  import torch, so they are imported from their modules, not re-exported here.
"""

from qprobe.policy.best_of_k import Choice, QProbePolicy, best_of_k
from qprobe.policy.select import choose, choose_batch, expected_reward, softmax_weights

__all__ = [
    "Choice",
    "QProbePolicy",
    "best_of_k",
    "choose",
    "choose_batch",
    "expected_reward",
    "softmax_weights",
]
