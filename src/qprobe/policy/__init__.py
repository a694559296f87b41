"""Policies: how a model's samples and a probe's scores become the text returned.

- `select`: the selection maths, numpy only: softmax(Q / beta) weights, a seeded choice, the
  analytic expected reward of the choice (also what `qprobe.evaluate` measures).
- `best_of_k`: the best-of-k policy object: sample k completions, score them with the probe,
  choose one (`QProbePolicy`, `best_of_k`, `Choice`).

- `heads`, `guided`, `head_train`: token-level reward-guided decoding (RAD, ARM) inside the
  local decode loop through its step hook (`GuidedSampler`, `RewardHead`, `train_head`); they
  import torch, so they are imported from their modules, not re-exported here.
"""

import importlib
from typing import Any

# Loaded on first use: importing `qprobe.policy.head_config` (for `qprobe --help`) must not
# import numpy and the policy stack.
_LAZY = {"Choice": "best_of_k", "QProbePolicy": "best_of_k", "best_of_k": "best_of_k",
         "choose": "select", "choose_batch": "select", "expected_reward": "select",
         "softmax_weights": "select"}

__all__ = [
    "Choice",
    "QProbePolicy",
    "best_of_k",
    "choose",
    "choose_batch",
    "expected_reward",
    "softmax_weights",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"qprobe.policy.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'qprobe.policy' has no attribute {name!r}")
