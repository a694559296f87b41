"""The training objectives: one registry entry each, holding all the trainer knows about it.

An `Objective` names its data layout (`qprobe.train.data.LAYOUTS`: how rows are ordered and cut
into batches), its batch loss in torch, optionally the closed-form gradient of that loss for the
fused linear step (`qprobe.train.engines.torch_step`), and optionally its code in linfit.c
(`qprobe.train.engines.native`). The trainer picks the fastest engine the entry allows: linfit.c
where the entry has a C code and the library loads, else the fused torch step where it has a
closed-form gradient, else autograd (any loss works there; MLP probes always train that way).

Adding an objective is `register(Objective(name, help, layout, loss, ...))`; `grad` and `native`
are optional speed-ups. Derivations of the built-in five and the relations between them are in
docs/objectives.md:

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

This module is read by `TrainConfig` (names, help) and so by `qprobe --help`: torch is imported
on the first loss computed, not here.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qprobe.errors import QProbeError


class _OnFirstUse:
    """A module's stand-in until one of its attributes is read; then the module is imported and
    replaces the stand-in in this module's globals, so later reads cost nothing."""

    def __init__(self, alias: str, module: str):
        self.alias, self.module = alias, module

    def __getattr__(self, attr: str) -> Any:
        module = importlib.import_module(self.module)
        globals()[self.alias] = module
        return getattr(module, attr)


if TYPE_CHECKING:
    import torch
    import torch.nn.functional as F

    from qprobe.train.config import TrainConfig
    from qprobe.train.data import Batch
    from qprobe.train.engines.torch_step import Block
else:
    torch = _OnFirstUse("torch", "torch")
    F = _OnFirstUse("F", "torch.nn.functional")

# (cfg, scores [B] in layout order, batch) -> the batch loss to minimise
LossFn = Callable[["TrainConfig", "torch.Tensor", "Batch"], "torch.Tensor"]
# (cfg, scores [B + pad], block, scale, dL/ds out [B + pad]) -> the block's loss / scale
GradFn = Callable[["TrainConfig", "torch.Tensor", "Block", float, "torch.Tensor"], "torch.Tensor"]

__all__ = ["REGISTRY", "Objective", "bt_loss", "ce_loss", "dpo_loss", "dpo_margin", "get",
           "names", "pg_loss", "q_loss", "register"]


@dataclass(frozen=True)
class Objective:
    """One training objective: what the trainer needs to lay out its data and train a probe."""

    name: str
    help: str  # one line for `qprobe train --help`
    layout: str  # how its rows are ordered and batched: a key of qprobe.train.data.LAYOUTS
    loss: LossFn  # the batch loss, differentiable (autograd trains any objective with it)
    grad: GradFn | None = None  # the fused linear step's closed-form dL/ds (None: autograd)
    native: int | None = None  # its code in linfit.c (None: no C path, a torch engine trains it)
    pairs: bool = False  # trains on preference pairs (pairs.parquet) instead of rewards
    reward_range: tuple[float, float] | None = None  # rewards it accepts (None: any finite)
    uses_beta: bool = False  # trains with softmax(Q/beta): needs beta > 0
    # False: the loss only compares scores inside a unit, so the output bias has gradient exactly
    # 0; the fused steps keep it at 0 instead of turning rounding noise into lr-sized Adam steps
    fits_bias: bool = True
    # the output bias a fresh probe starts at, from the mean training reward (None: 0)
    start_bias: Callable[[float], float] | None = None
    # a term of the batch loss without gradient (pg: its baselines), added to the reported loss
    loss_offset: Callable[[Batch], torch.Tensor] | None = None
    # (name, value, higher_is_better) on the validation set laid out as one batch; None: the loss
    validate: Callable[[TrainConfig, torch.Tensor, Batch], tuple[str, float, bool]] | None = None
    # raises QProbeError (or warns through `say`) when the laid-out batches cannot train it
    check: Callable[[list[Batch], Callable[[str], None]], None] | None = None


REGISTRY: dict[str, Objective] = {}


def register(objective: Objective) -> Objective:
    """Add an objective to the registry (its name must be new); returns it."""
    if objective.name in REGISTRY:
        raise ValueError(f"objective {objective.name!r} is already registered")
    REGISTRY[objective.name] = objective
    return objective


def get(name: str) -> Objective:
    """The registered objective `name` (QProbeError if there is none)."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise QProbeError(f"unknown objective {name!r}; known: {names()}") from None


def names() -> tuple[str, ...]:
    """The registered objectives' names, in registration order."""
    return tuple(REGISTRY)


def gather(scores: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """scores [B] indexed by index [...] with -1 meaning 'absent' -> [...] with -inf there."""
    ext = torch.cat([scores, scores.new_full((1,), -math.inf)])  # [B + 1]; -1 picks the -inf
    return ext[index]


# --- the losses, on plain tensors ---------------------------------------------------------------
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


# --- closed-form gradients for the fused linear step ---------------------------------------------
# Each sets g_all[block rows] <- dL/ds of the batch loss (times `scale`, 1 / the count the batch
# loss is a mean over) from the scores s_all [B + pad] (only the block's rows are read: its units
# are complete), and returns the block's share of the loss divided by `scale` (pg: without its
# baselines). tests/test_train.py checks each against autograd of the loss above in float64.
def _q_grad(cfg: TrainConfig, s_all: torch.Tensor, blk: Block, scale: float,
            g_all: torch.Tensor) -> torch.Tensor:
    """q: dL/ds = 2 (s - r) / B."""
    s, g = s_all[blk.start:blk.end], g_all[blk.start:blk.end]  # [n]
    torch.sub(s, blk.rewards, out=g)
    loss = g.dot(g)  # sum (s - r)^2
    g.mul_(2.0 * scale)
    return loss


def _ce_grad(cfg: TrainConfig, s_all: torch.Tensor, blk: Block, scale: float,
             g_all: torch.Tensor) -> torch.Tensor:
    """ce: dL/ds = (sigmoid(s) - r) / B."""
    s, g = s_all[blk.start:blk.end], g_all[blk.start:blk.end]  # [n]
    loss = F.binary_cross_entropy_with_logits(s, blk.rewards, reduction="sum")
    torch.sigmoid(s, out=g).sub_(blk.rewards).mul_(scale)
    return loss


def _pg_grad(cfg: TrainConfig, s_all: torch.Tensor, blk: Block, scale: float,
             g_all: torch.Tensor) -> torch.Tensor:
    """pg: dL/ds_i = -(p_i / beta) (r_i - sum_j p_j r_j) / G with p = softmax(s / beta) over the
    group."""
    g = g_all[blk.start:blk.end]  # [n]
    p = torch.index_select(s_all, 0, blk.index).div_(cfg.beta).view(-1, blk.width)  # [G, m]
    p = torch.softmax(p, dim=-1)  # padding gets 0
    pr = p * blk.rewards  # [G, m] p_i r_i
    ev = pr.sum(-1, keepdim=True)  # [G, 1] sum_i p_i r_i
    loss = -ev.sum()
    d = pr.sub_(p.mul_(ev))  # p_i (r_i - sum_j p_j r_j)
    torch.index_select(d.view(-1), 0, blk.pos, out=g).mul_(-scale / cfg.beta)
    return loss


def _bt_grad(cfg: TrainConfig, s_all: torch.Tensor, blk: Block, scale: float,
             g_all: torch.Tensor) -> torch.Tensor:
    """bt (rows: chosen, rejected, chosen, ...): dL/ds = -/+ sigmoid(-(s_w - s_l)) / P."""
    s, g = s_all[blk.start:blk.end], g_all[blk.start:blk.end]  # [n]
    d = s[1::2] - s[0::2]  # [P] s_l - s_w
    loss = F.softplus(d).sum()  # -log sigmoid(s_w - s_l)
    q = d.sigmoid_().mul_(scale)
    torch.neg(q, out=g[0::2])
    g[1::2] = q
    return loss


def _dpo_grad(cfg: TrainConfig, s_all: torch.Tensor, blk: Block, scale: float,
              g_all: torch.Tensor) -> torch.Tensor:
    """dpo: with u = s / beta, c = logsumexp(u_others), m = log sigmoid(u_w - c) -
    log sigmoid(u_l - c) and dL/dm = -beta sigmoid(-beta m) / P: dm/du_w = sigmoid(c - u_w),
    dm/du_l = -sigmoid(c - u_l), dm/du_j = (sigmoid(c - u_l) - sigmoid(c - u_w))
    softmax(u_others)_j for every other j."""
    beta = cfg.beta
    g = g_all[blk.start:blk.end]  # [n]
    e = torch.index_select(s_all, 0, blk.index).div_(beta).view(-1, blk.width)  # [P, k]
    top = e.amax(-1, keepdim=True).nan_to_num_(neginf=0.0)  # [P, 1]
    e.sub_(top).exp_()  # exp(u_j - top): the top one is 1, padding 0
    tot = e.sum(-1, keepdim=True)  # [P, 1]: >= 1 where the pair has another sample, else 0
    has = (tot > 0)[:, 0]  # [P]
    c = torch.where(tot > 0, tot.log().add_(top), 0.0)  # [P, 1] logsumexp(u_others)
    z = torch.index_select(s_all, 0, blk.pair).div_(beta).view(-1, 2).sub_(c)  # [P, 2] u - c
    ls = F.logsigmoid(z)  # [P, 2]
    m = (ls[:, 0] - ls[:, 1]).mul_(has)  # [P] margin (0: no other sample)
    loss = F.softplus(m.mul_(-beta)).sum()  # -log sigmoid(beta m)
    dm = m.sigmoid_().mul_(has).mul_(-scale)  # [P] dL/dm / beta  (du = ds / beta)
    a = z.neg_().sigmoid_()  # [P, 2] sigmoid(c - u_w), sigmoid(c - u_l)
    e.mul_((a[:, 1] - a[:, 0]).mul_(dm)[:, None].div_(tot.clamp_min_(1.0)))  # others
    a.mul_(dm[:, None])
    a[:, 1].neg_()  # chosen: dm sigmoid(c - u_w); rejected: -dm sigmoid(c - u_l)
    g.zero_()
    g_all.index_add_(0, blk.targets, torch.cat([a.view(-1), e.view(-1)]))
    return loss


# --- validation metrics and checks --------------------------------------------------------------
def _pg_validate(cfg: TrainConfig, scores: torch.Tensor, b: Batch) -> tuple[str, float, bool]:
    """Expected reward of softmax(Q/beta) over ALL samples of a validation prompt."""
    return "val_sel_reward", float(-pg_loss(gather(scores, b.index), b.rewards, cfg.beta)), True


def _bt_validate(cfg: TrainConfig, scores: torch.Tensor, b: Batch) -> tuple[str, float, bool]:
    """Share of pairs ranked right."""
    s = scores.view(-1, 2)
    return "val_pair_acc", float((s[:, 0] > s[:, 1]).float().mean()), True


def _dpo_validate(cfg: TrainConfig, scores: torch.Tensor, b: Batch) -> tuple[str, float, bool]:
    """Share of pairs ranked right."""
    return "val_pair_acc", float((scores[b.chosen] > scores[b.rejected]).float().mean()), True


def _pg_check(batches: list[Batch], say: Callable[[str], None]) -> None:
    if not any(b.index.shape[1] > 1 and (b.index[:, 1] >= 0).any() for b in batches):
        raise QProbeError("train: pg needs at least 2 samples of a prompt (one group)")


def _dpo_check(batches: list[Batch], say: Callable[[str], None]) -> None:
    lonely = sum(int((~torch.isfinite(gather(torch.zeros(b.end - b.start), b.index))
                      ).all(-1).sum()) for b in batches)
    total = sum(len(b.chosen) for b in batches)
    if lonely == total:
        raise QProbeError("train: dpo needs samples of a prompt besides the pair (finite-k "
                          "policy); with pairs only, use --objective bt")
    if lonely:
        say(f"warning: dpo: {lonely} of {total} pairs have no other sample of their prompt "
            "and carry no signal")


def _logit(mean_reward: float) -> float:
    p = min(max(mean_reward, 1e-3), 1 - 1e-3)
    return math.log(p / (1 - p))


# --- the built-in objectives (their `native` codes are linfit.c's enum) ---------------------------
register(Objective(
    "q", "MSE to reward", "rows", native=0, start_bias=float,
    loss=lambda cfg, s, b: q_loss(s, b.rewards), grad=_q_grad))
register(Objective(
    "ce", "BCE, reward in [0,1]", "rows", native=1, reward_range=(0.0, 1.0), start_bias=_logit,
    loss=lambda cfg, s, b: ce_loss(s, b.rewards), grad=_ce_grad))
register(Objective(
    "pg", "policy gradient in groups of one prompt", "groups", native=2, uses_beta=True,
    fits_bias=False, loss_offset=lambda b: b.baseline.sum(), validate=_pg_validate,
    check=_pg_check, grad=_pg_grad,
    loss=lambda cfg, s, b: pg_loss(gather(s, b.index), b.rewards, cfg.beta, b.baseline)))
register(Objective(
    "bt", "Bradley-Terry on pairs", "pairs", native=3, pairs=True, fits_bias=False,
    validate=_bt_validate, grad=_bt_grad,
    loss=lambda cfg, s, b: bt_loss(s.view(-1, 2)[:, 0], s.view(-1, 2)[:, 1])))
register(Objective(
    "dpo", "DPO on the best-of-k policy, pairs + the prompt's other samples", "prompts",
    native=4, pairs=True, uses_beta=True, fits_bias=False, validate=_dpo_validate,
    check=_dpo_check, grad=_dpo_grad,
    loss=lambda cfg, s, b: dpo_loss(s[b.chosen], s[b.rejected], gather(s, b.index), cfg.beta)))
