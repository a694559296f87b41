"""Best of k by the model's own likelihood: the candidate with the highest mean (per token) or
summed log-probability (`Sample.logprob_sum`, the model's distribution at temperature 1)."""

from __future__ import annotations

from typing import Any

import numpy as np

from qprobe.errors import QProbeError
from qprobe.policy.base import Answer, Policy, model_sample


def loglik_scores(samples: list[Any], reduce: str) -> list[float]:
    """Each sample's summed log-probability, or its mean per token ("mean"; an empty
    completion scores -inf: it says nothing)."""
    out = []
    for s in samples:
        if s.logprob_sum is None:
            raise QProbeError("policy logprob: the model returned no log-probabilities")
        if reduce == "sum":
            out.append(float(s.logprob_sum))
        else:
            n = int(s.num_tokens or 0)
            out.append(float(s.logprob_sum) / n if n else -np.inf)
    return out


class LogprobPolicy(Policy):
    kind = "logprob"

    @classmethod
    def build(cls, cfg, ctx) -> Policy:
        return cls(cfg, ctx.model())

    plain_samples = True

    def draws(self, n: int) -> int:
        return max(int(self.cfg.k), int(n))

    def sample(self, prompts, k, params, *, hook: Any = None, observe: Any = None):
        return model_sample(self.model, prompts, k, params, hook, observe)

    def choose(self, prompts, samples, rngs) -> list[Answer]:
        out = []
        for p, group in zip(prompts, samples):
            q = loglik_scores(group, self.cfg.reduce)
            if all(np.isneginf(q)):  # every candidate empty: the first one
                j = 0
            else:
                j = int(np.argmax(q))
            w = [1.0 if i == j else 0.0 for i in range(len(group))]
            out.append(Answer(p, j, list(group), q, w))
        return out
