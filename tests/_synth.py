"""Synthetic Q-probe data with a planted reward direction (shared by the probe/train tests).

Each prompt p has a difficulty a_p and k samples. Features phi = prompt part + sample part:
    phi_i = mean_p + delta_i,   mean_p = nuisance * a_p * e0 + N(0, 0.5^2 I),   delta_i ~ N(0, I)
The sample's quality is s_i = w* . delta_i - anti * delta_i[0] with w* = e1, and
    reward_i = 1[a_p + s_i + noise > 0]          (binary, like tests passing), or
    reward_i = a_p + s_i + noise                 (continuous) when binary=False.
With nuisance > 0 and anti > 0 the feature e0 predicts reward positively between prompts (it
carries the difficulty) and negatively inside a prompt: the paper's figure-4 situation, where
fitting the reward (q) is dominated by the per-prompt offsets and gets the ranking inside a prompt
wrong, while pg only looks inside prompts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Synth:
    features: np.ndarray  # [P*k, D] float32
    rewards: np.ndarray  # [P*k] float32
    groups: np.ndarray  # [P*k] int64 prompt index
    quality: np.ndarray  # [P*k] latent within-prompt quality s_i
    w_star: np.ndarray  # [D] planted direction
    k: int

    def pairs(self, per_prompt: int, rng: np.random.Generator) -> np.ndarray:
        """[P*per_prompt, 2] (chosen, rejected) rows: random pairs, chosen = higher quality."""
        out = []
        for p in np.unique(self.groups):
            rows = np.flatnonzero(self.groups == p)
            for _ in range(per_prompt):
                a, b = rng.choice(rows, size=2, replace=False)
                out.append((a, b) if self.quality[a] > self.quality[b] else (b, a))
        return np.asarray(out, dtype=np.int64)


def make(
    n_prompts: int,
    k: int,
    dim: int,
    *,
    nuisance: float = 0.0,
    anti: float = 0.0,
    difficulty: float = 1.0,
    noise: float = 0.3,
    binary: bool = True,
    offset: float = 3.0,
    scale: float = 1.0,
    seed: int = 0,
) -> Synth:
    """Draw a synthetic rollout set; `offset`/`scale` shift and scale raw features (standardise!)."""
    rng = np.random.default_rng(seed)
    w_star = np.zeros(dim)
    w_star[1] = 1.0  # orthogonal to the nuisance direction e0
    a = difficulty * rng.standard_normal(n_prompts)  # [P]
    mean = 0.5 * rng.standard_normal((n_prompts, dim))  # [P, D]
    mean[:, 0] = nuisance * a
    delta = rng.standard_normal((n_prompts, k, dim))  # [P, k, D]
    x = mean[:, None, :] + delta  # [P, k, D]
    s = delta @ w_star - anti * delta[:, :, 0]  # [P, k]
    latent = a[:, None] + s + noise * rng.standard_normal((n_prompts, k))
    r = (latent > 0).astype(np.float32) if binary else latent.astype(np.float32)
    return Synth(
        features=(offset + scale * x.reshape(-1, dim)).astype(np.float32),
        rewards=r.reshape(-1),
        groups=np.repeat(np.arange(n_prompts), k),
        quality=s.reshape(-1),
        w_star=w_star,
        k=k,
    )


def selection_reward(scores: np.ndarray, data: Synth, beta: float = 0.0) -> float:
    """Mean over prompts of the expected reward of softmax(scores/beta) among its k samples."""
    from qprobe.policy import expected_reward

    return float(expected_reward(scores.reshape(-1, data.k), data.rewards.reshape(-1, data.k),
                                 beta).mean())
