"""The five objectives: values against hand formulas, gradient checks, pg baseline invariance,
the dpo -> bt limit; and the registry: a new objective is one entry."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from _synth import make, selection_reward
from qprobe.errors import QProbeError
from qprobe.train import TrainConfig, objectives, train_probe
from qprobe.train.engines import native
from qprobe.train.objectives import (
    Objective,
    bt_loss,
    ce_loss,
    dpo_loss,
    dpo_margin,
    pg_loss,
    q_loss,
)

INF = math.inf


def _grouped(seed: int = 0, g: int = 4, m: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Random [g, m] scores (float64, requires grad) with ragged groups padded by -inf."""
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(g, m, generator=gen, dtype=torch.float64)
    r = torch.rand(g, m, generator=gen, dtype=torch.float64)
    s[1, 3:] = -INF  # group 1 has 3 samples
    s[3, 4:] = -INF  # group 3 has 4 samples
    return s.requires_grad_(), r


def test_q_and_ce_match_their_formulas():
    s = torch.tensor([0.0, 1.0, -2.0], dtype=torch.float64)
    r = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    assert float(q_loss(s, r)) == (1 + 1 + 9) / 3
    p = torch.sigmoid(s)
    bce = -(r * torch.log(p) + (1 - r) * torch.log(1 - p)).mean()
    assert math.isclose(float(ce_loss(s, r)), float(bce), rel_tol=1e-12)


def test_pg_loss_is_negative_expected_reward_of_the_group_softmax():
    s, r = _grouped()
    beta = 0.3
    want = 0.0
    for gi in range(s.shape[0]):
        ok = torch.isfinite(s[gi])
        p = torch.softmax(s[gi][ok].detach() / beta, 0)
        want -= float((p * r[gi][ok]).sum())
    assert math.isclose(float(pg_loss(s.detach(), r, beta)), want / s.shape[0], rel_tol=1e-12)


def test_pg_gradient_matches_finite_differences():
    s, r = _grouped(seed=1)
    beta = 0.5

    # gradcheck needs finite inputs: check the padded entries separately below
    mask = torch.isfinite(s.detach())

    def f(x: torch.Tensor) -> torch.Tensor:
        return pg_loss(torch.where(mask, x, torch.full_like(x, -INF)), r, beta,
                       baseline=torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64))

    x = torch.where(mask, s.detach(), torch.zeros_like(s)).requires_grad_()
    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-8)
    (g,) = torch.autograd.grad(f(x), x)
    assert (g[~mask] == 0).all()  # padding gets no gradient
    # analytic: dL/ds_gi = -(1/G) p_gi (r_gi - sum_j p_gj r_gj) / beta
    p = torch.softmax(torch.where(mask, x, torch.full_like(x, -INF)) / beta, -1)
    rr = torch.where(mask, r, torch.zeros_like(r))
    want = -(p * (rr - (p * rr).sum(-1, keepdim=True))) / beta / s.shape[0]
    torch.testing.assert_close(g, want.detach())


def test_pg_baseline_constant_in_group_changes_loss_not_gradient():
    s, r = _grouped(seed=2)
    beta = 0.2
    grads, losses = [], []
    for b in (None, torch.full((4,), 0.5, dtype=torch.float64),  # global mean style
              torch.tensor([0.3, -1.0, 2.0, 0.7], dtype=torch.float64)):  # per prompt
        loss = pg_loss(s, r, beta, baseline=b)
        (g,) = torch.autograd.grad(loss, s)
        grads.append(g)
        losses.append(float(loss.detach()))
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-15)
    torch.testing.assert_close(grads[0], grads[2], rtol=0, atol=1e-15)
    # the loss value shifts by exactly the mean baseline
    assert math.isclose(losses[1] - losses[0], 0.5, rel_tol=1e-12)
    assert math.isclose(losses[2] - losses[0], (0.3 - 1.0 + 2.0 + 0.7) / 4, rel_tol=1e-12)


def test_bt_loss_formula():
    c = torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64)
    r = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    want = -(F.logsigmoid(c - r)).mean()
    assert float(bt_loss(c, r)) == float(want)
    assert math.isclose(float(bt_loss(torch.zeros(2), torch.zeros(2))), math.log(2), rel_tol=1e-6)


def _dpo_inputs(seed: int = 0, p: int = 5, n: int = 6):
    gen = torch.Generator().manual_seed(seed)
    c = torch.randn(p, generator=gen, dtype=torch.float64)
    r = torch.randn(p, generator=gen, dtype=torch.float64)
    o = torch.randn(p, n, generator=gen, dtype=torch.float64)
    o[2, 2:] = -INF  # pair 2 has 2 other samples
    o[4, :] = -INF  # pair 4 has none
    return c, r, o


def test_dpo_matches_finite_k_policy_formula():
    """loss = -log sig(beta * [log pi_k(w)/p0 - log pi_k(l)/p0]) with pi_k/p0 ~ k * softmax weight
    of the completion among itself and the prompt's other samples."""
    c, r, o = _dpo_inputs()
    beta = 0.4
    total = 0.0
    for i in range(len(c)):
        others = o[i][torch.isfinite(o[i])]
        if len(others) == 0:
            total += math.log(2)  # k = 1: pi = p0 whatever Q is, margin 0
            continue
        lw = torch.log_softmax(torch.cat([c[i:i + 1], others]) / beta, 0)[0]
        ll = torch.log_softmax(torch.cat([r[i:i + 1], others]) / beta, 0)[0]
        total += float(-F.logsigmoid(beta * (lw - ll)))
    assert math.isclose(float(dpo_loss(c, r, o, beta)), total / len(c), rel_tol=1e-10)
    m, has = dpo_margin(c, r, o, beta)
    assert has.tolist() == [True, True, True, True, False] and float(m[4]) == 0.0


def test_dpo_gradient_matches_finite_differences():
    c, r, o = _dpo_inputs(seed=3)
    mask = torch.isfinite(o)

    def f(cc, rr, oo):
        return dpo_loss(cc, rr, torch.where(mask, oo, torch.full_like(oo, -INF)), 0.3)

    oo = torch.where(mask, o, torch.zeros_like(o))
    args = (c.clone().requires_grad_(), r.clone().requires_grad_(), oo.requires_grad_())
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-8)
    gc, gr, go = torch.autograd.grad(f(*args), args)
    assert gc[4] == 0 and gr[4] == 0  # the pair without others carries no signal
    assert (go[~mask] == 0).all()


def test_dpo_tends_to_bt_when_the_other_samples_dominate():
    """k -> infinity: logsumexp of the others grows, beta * margin -> Q_w - Q_l, dpo -> bt."""
    c, r, _ = _dpo_inputs(seed=4)
    c.requires_grad_()
    beta = 0.5
    bt = bt_loss(c, r)
    (g_bt,) = torch.autograd.grad(bt, c)
    gaps = []
    for shift in (0.0, 2.0, 5.0, 10.0):  # others scored ever higher relative to the pair
        others = torch.full((len(c), 8), shift, dtype=torch.float64)
        d = dpo_loss(c, r, others, beta)
        (g_d,) = torch.autograd.grad(d, c)
        gaps.append((abs(float(d.detach()) - float(bt.detach())), float((g_d - g_bt).abs().max())))
    assert all(a[0] > b[0] and a[1] > b[1] for a, b in zip(gaps, gaps[1:]))
    assert gaps[-1][0] < 1e-6 and gaps[-1][1] < 1e-6


def test_dpo_saturates_when_the_chosen_already_wins_the_group():
    """Unlike bt, dpo stops pushing Q_w up once a_w beats all other candidates by far."""
    beta = 0.1
    others = torch.zeros(1, 4, dtype=torch.float64)
    c = torch.tensor([3.0], dtype=torch.float64, requires_grad=True)
    r = torch.tensor([0.0], dtype=torch.float64)
    (g_d,) = torch.autograd.grad(dpo_loss(c, r, others, beta), c)
    (g_b,) = torch.autograd.grad(bt_loss(c, r), c)
    assert abs(float(g_d)) < 1e-9 < abs(float(g_b))


def test_losses_are_finite_on_extreme_scores():
    big = torch.tensor([1e4, -1e4], dtype=torch.float32)
    assert np.isfinite(float(ce_loss(big, torch.tensor([0.0, 1.0]))))
    assert np.isfinite(float(bt_loss(big[:1], big[1:])))
    assert np.isfinite(float(dpo_loss(big[:1], big[1:], big.reshape(1, 2), 0.1)))
    assert np.isfinite(float(pg_loss(big.reshape(1, 2), torch.tensor([[1.0, 0.0]]), 0.01)))


# --- the registry ---------------------------------------------------------------------------------
@pytest.fixture
def register():
    """objectives.register, undone after the test."""
    added = []

    def add(entry: Objective) -> Objective:
        added.append(objectives.register(entry).name)
        return entry

    yield add
    for name in added:
        objectives.REGISTRY.pop(name)


def test_a_toy_objective_is_one_registry_entry_and_trains_through_autograd(register):
    """A pairwise hinge, mean max(0, 1 - (Q_w - Q_l)), given only its layout and torch loss:
    it trains end to end (autograd; linfit.c has no code for it) and learns the planted
    direction."""
    register(Objective(
        "hinge", "pairwise hinge", "pairs", pairs=True, fits_bias=False,
        loss=lambda cfg, s, b: torch.relu(1 - (s[0::2] - s[1::2])).mean()))
    tr, te = make(100, 16, 12, seed=1), make(200, 16, 12, seed=2)
    pairs = tr.pairs(4, np.random.default_rng(0))
    lines: list[str] = []
    probe, hist = train_probe(tr.features, None, tr.groups, pairs,
                              TrainConfig(objective="hinge", lr=3e-3, min_steps=1000, epochs=20),
                              log=lines.append, data_fingerprint=False)
    assert "autograd (hinge has no closed-form gradient)" in lines[0], lines[0]
    assert probe.objective == "hinge" and probe.info["train_config"]["objective"] == "hinge"
    assert hist["loss"][-1] < 0.5 * hist["loss"][0]
    random_pick, oracle = te.rewards.mean(), selection_reward(te.quality, te)
    assert selection_reward(probe.score(te.features), te) > random_pick + 0.6 * (oracle - random_pick)
    with pytest.raises(QProbeError, match="needs preference pairs"):  # the entry's `pairs`
        train_probe(tr.features, tr.rewards, tr.groups, None, TrainConfig(objective="hinge"))


def _mse_grad(cfg, s_all, blk, scale, g_all):
    """dL/ds = 2 (s - r) / B, written out for the toy below."""
    s, g = s_all[blk.start:blk.end], g_all[blk.start:blk.end]
    torch.sub(s, blk.rewards, out=g)
    loss = g.dot(g)
    g.mul_(2.0 * scale)
    return loss


@pytest.mark.parametrize("code", [None, 0])
def test_an_objective_without_a_c_path_trains_in_the_torch_step(register, monkeypatch, code):
    """MSE under a new name with a closed-form gradient: no C code (None), or a code linfit.c
    gives another objective (0 is q's; it warns): the C step is skipped and the torch step
    trains it, bit for bit as it trains q."""
    register(Objective("mse", "MSE, again", "rows", native=code, start_bias=float,
                       loss=lambda cfg, s, b: q_loss(s, b.rewards), grad=_mse_grad))
    tr = make(60, 8, 10, seed=3)
    kw = dict(lr=3e-3, min_steps=0, epochs=10, batch_size=100)
    lines: list[str] = []
    if code is not None and native.library() is not None:
        with pytest.warns(RuntimeWarning, match="'mse' has native code 0, which linfit.c calls"):
            got, _ = train_probe(tr.features, tr.rewards, tr.groups,
                                 config=TrainConfig(objective="mse", **kw), log=lines.append)
    else:
        got, _ = train_probe(tr.features, tr.rewards, tr.groups,
                             config=TrainConfig(objective="mse", **kw), log=lines.append)
    assert "torch step" in lines[0], lines[0]
    assert native.library() is None or "C step: no C path for mse" in lines[0]
    monkeypatch.setattr(native, "for_objective", lambda objective: None)  # q: the torch step too
    want, _ = train_probe(tr.features, tr.rewards, tr.groups,
                          config=TrainConfig(objective="q", **kw))
    for (k, a), b in zip(got.state_dict().items(), want.state_dict().values()):
        assert torch.equal(a, b), k


def test_the_registry_refuses_a_second_entry_of_one_name_and_names_unknown_ones():
    with pytest.raises(ValueError, match="already registered"):
        objectives.register(objectives.get("q"))
    with pytest.raises(QProbeError, match="unknown objective 'nope'"):
        objectives.get("nope")
    with pytest.raises(QProbeError, match="objective must be one of"):
        TrainConfig(objective="nope").validate()


def test_alpha_policy_gradient_matches_finite_differences():
    """pi(i) = softmax(Q_i / beta + alpha * m_i) with Q = X w (m: mean token log-prob). The pg
    loss -mean_g sum_i p_i r_i has dL/dw = -sum_i p_i (r_i - rbar) x_i / (beta G) and
    dL/dalpha = -sum_i p_i (r_i - rbar) m_i / G (docs/objectives.md); a linear probe with m as an
    extra input is this policy with alpha = c / beta for m's weight c."""
    import numpy as np
    import torch

    from qprobe.train.objectives import pg_loss

    rng = np.random.default_rng(0)
    G, k, D, beta = 5, 7, 4, 0.3
    X = torch.tensor(rng.standard_normal((G, k, D)), dtype=torch.float64)
    m = torch.tensor(rng.normal(-0.5, 0.2, (G, k)), dtype=torch.float64)
    R = torch.tensor(rng.random((G, k)) < 0.4, dtype=torch.float64)
    w = torch.tensor(rng.standard_normal(D), dtype=torch.float64)
    alpha = 1.7

    def loss(w, alpha):
        return float(pg_loss(X @ w + beta * alpha * m, R, beta))

    p = torch.softmax((X @ w) / beta + alpha * m, dim=-1)  # [G, k]
    adv = R - (p * R).sum(-1, keepdim=True)
    g_w = -(p * adv)[..., None].mul(X).sum((0, 1)) / (beta * G)
    g_a = -float((p * adv * m).sum()) / G
    eps = 1e-6
    fd_w = [(loss(w + eps * e, alpha) - loss(w - eps * e, alpha)) / (2 * eps)
            for e in torch.eye(D, dtype=torch.float64)]
    fd_a = (loss(w, alpha + eps) - loss(w, alpha - eps)) / (2 * eps)
    np.testing.assert_allclose(g_w.numpy(), fd_w, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(g_a, fd_a, rtol=1e-6, atol=1e-9)
