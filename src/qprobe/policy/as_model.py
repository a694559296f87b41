"""A policy seen as a `LanguageModel` that returns its answer: the adapter that lets the one
collection loop (`qprobe.collect`) store a policy's answers as a rollouts folder, scored by the
task and resumable, as `qprobe run` does for the `policies:` of its YAML.

`sample(prompts, k, params)` returns, per prompt, k answers of the policy: a per-token policy's k
samples; for a choosing policy (best-of-k, logprob) k must be 1: its chosen candidate. The
choice's generator is seeded from (params.seed, prompt text), so an answer does not depend on
which other prompts share its batch.
"""

from __future__ import annotations

import hashlib
from typing import Any

from qprobe.backends.base import LanguageModel, Sample, SamplingParams
from qprobe.errors import QProbeError


class PolicyLanguageModel(LanguageModel):
    """The answers of `policy` (`policy.base.Policy`), named `name` in the rollouts' meta."""

    def __init__(self, policy: Any, name: str) -> None:
        self.policy, self.name = policy, name
        self.chat = bool(getattr(policy.model, "chat", False))
        self.max_batch_rows = int(getattr(policy.model, "max_batch_rows", 128))

    @property
    def feature_spec(self):
        return None  # answers are stored as text and rewards; their features are not probes'

    def sample(self, prompts: list[str], k: int, params: SamplingParams) -> list[list[Sample]]:
        import numpy as np

        if k != 1 and not self.policy.per_token:
            raise QProbeError(f"policy {self.name}: one answer per prompt (k = 1) for a "
                              f"{self.policy.kind!r} policy")
        params = self.policy.sampling(params)
        samples = self.policy.sample(list(prompts), self.policy.draws(k), params)
        rngs = [np.random.default_rng([params.seed, _key(p)]) for p in prompts]
        answers = self.policy.choose(list(prompts), samples, rngs)
        if self.policy.per_token:
            return [list(a.samples[:k]) for a in answers]
        return [[a.samples[a.chosen]] for a in answers]


def _key(prompt: str) -> int:
    return int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:4], "little")
