"""The five training objectives for a Q-probe, as batched torch losses.

Each takes probe scores Q (any float dtype; float64 for gradient checks) and returns a scalar
loss to minimise. Derivations and the relations between them are in docs/objectives.md.

- `q`  : mean squared error to the reward (reward modelling).
- `ce` : binary cross-entropy of sigmoid(Q) against a reward in [0, 1].
- `pg` : importance-weighted policy gradient inside groups of samples of ONE prompt:
         -sum_i (r_i - b) softmax(Q/beta)_i, averaged over groups. The baseline b is constant in
         a group; since sum_i softmax_i = 1, it shifts the loss by b and leaves the gradient alone.
- `bt` : Bradley-Terry on preference pairs, -log sigmoid(Q_w - Q_l).
- `dpo`: DPO on the Q-probe's own best-of-k policy (paper, appendix B). With the policy
         pi_k(a) ~= k p0(a) E[softmax weight of a among itself and k-1 other samples], the
         implicit DPO reward beta * log(pi_k / p0) of a completion is
         beta * log sigmoid(Q/beta - c) + const, c = logsumexp(Q_others / beta), so
         loss = -log sigmoid(beta * (log sigmoid(u_w - c) - log sigmoid(u_l - c))), u = Q/beta.
         When the other samples dominate (k -> infinity) this becomes `bt`; with no other sample
         (k = 1, the policy is p0 whatever Q is) it carries no signal.

Grouped inputs are padded matrices: `[groups, m]` with -inf scores where a group has fewer than
m samples. The trainer builds them with one gather per batch (no Python loop over samples).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qprobe.train_config import BASELINES, OBJECTIVES

__all__ = ["BASELINES", "OBJECTIVES", "bt_loss", "ce_loss", "dpo_loss", "dpo_margin", "pg_loss",
           "q_loss"]


def q_loss(scores: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """Mean squared error: mean_i (Q_i - r_i)^2.  scores, rewards: [B]."""
    return torch.mean((scores - rewards) ** 2)


def ce_loss(scores: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of sigmoid(Q) against rewards in [0, 1].  scores, rewards: [B]."""
    return F.binary_cross_entropy_with_logits(scores, rewards)


def pg_loss(
    scores: torch.Tensor,
    rewards: torch.Tensor,
    beta: float,
    baseline: torch.Tensor | None = None,
) -> torch.Tensor:
    """Importance-weighted policy gradient loss over groups of one prompt's samples.

    scores: [G, m] probe scores, -inf where a group has fewer than m samples (padding).
    rewards: [G, m] rewards (padding entries are ignored; keep them finite).
    baseline: None, or [G] / [G, 1] one value per group (constant inside the group).
    Returns -mean_g sum_i (r_gi - b_g) softmax(Q_g / beta)_i.
    """
    p = torch.softmax(scores / beta, dim=-1)  # [G, m], padding gets weight 0
    adv = rewards if baseline is None else rewards - baseline.reshape(-1, 1)  # [G, m]
    adv = torch.where(torch.isfinite(scores), adv, torch.zeros_like(adv))
    return -(p * adv).sum(dim=-1).mean()


def bt_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry: mean -log sigmoid(Q_w - Q_l).  chosen, rejected: [P] scores."""
    return -F.logsigmoid(chosen - rejected).mean()


def dpo_margin(
    chosen: torch.Tensor, rejected: torch.Tensor, others: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-ratio margin log(pi_k(a_w)/p0(a_w)) - log(pi_k(a_l)/p0(a_l)) of the finite-k policy.

    chosen, rejected: [P]; others: [P, n] scores of the prompt's other samples (neither of the
    pair), -inf for absent entries. Returns (margin [P], has_other [P] bool). Pairs without any
    other sample get margin 0 (no signal) and has_other False.
    """
    has_other = torch.isfinite(others).any(dim=-1)  # [P]
    safe = torch.where(has_other[:, None], others, torch.zeros_like(others))  # [P, n]
    c = torch.logsumexp(safe / beta, dim=-1)  # [P]
    m = F.logsigmoid(chosen / beta - c) - F.logsigmoid(rejected / beta - c)  # [P]
    return torch.where(has_other, m, torch.zeros_like(m)), has_other


def dpo_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, others: torch.Tensor, beta: float
) -> torch.Tensor:
    """DPO on the finite-k Q-probe policy: mean -log sigmoid(beta * margin).

    Same inputs as `dpo_margin`. As the others' logsumexp grows, beta * margin -> Q_w - Q_l and
    this equals `bt_loss`; see docs/objectives.md for the derivation.
    """
    m, _ = dpo_margin(chosen, rejected, others, beta)
    return -F.logsigmoid(beta * m).mean()
