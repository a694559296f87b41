"""The model's own decoding as policies: `sample` (one sample is the answer) and `greedy`."""

from __future__ import annotations

import dataclasses
from typing import Any

from qprobe.policy.base import Policy, model_sample


class SamplePolicy(Policy):
    """Each answer is one sample of the model at the request's temperature and top-p."""

    kind = "sample"
    per_token = True

    @classmethod
    def build(cls, cfg, ctx) -> Policy:
        return cls(cfg, ctx.model())

    plain_samples = True

    def sample(self, prompts, k, params, *, hook: Any = None, observe: Any = None):
        return model_sample(self.model, prompts, k, params, hook, observe)


class GreedyPolicy(SamplePolicy):
    """Greedy decoding: temperature 0 whatever the request asks."""

    kind = "greedy"

    def sampling(self, params):
        return dataclasses.replace(params, temperature=0.0)
