"""The trainer on synthetic data with a planted reward direction (tests/_synth.py)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from _synth import make, selection_reward
from qprobe import Probe, QProbeError
from qprobe.train import TrainConfig, data, objectives, train_probe
from qprobe.train.engines import torch_step

FAST = dict(lr=3e-3, min_steps=1000, epochs=20)  # small problems: a larger lr, fewer steps


def _cos_to_w_star(probe: Probe, data) -> float:
    """Cosine between the probe's direction in raw feature space and the planted w*."""
    w = probe.net[-1].weight.detach().numpy()[0] / probe.std.numpy()  # [D] raw-feature units
    return float(w @ data.w_star / np.linalg.norm(w))


@pytest.fixture(scope="module")
def planted():
    return make(100, 16, 12, seed=1), make(200, 16, 12, seed=2)


@pytest.mark.parametrize("objective", ["q", "ce", "pg", "bt", "dpo"])
def test_every_objective_learns_the_planted_direction(planted, objective):
    tr, te = planted
    pairs = tr.pairs(4, np.random.default_rng(0)) if objective in ("bt", "dpo") else None
    probe, hist = train_probe(tr.features, tr.rewards, tr.groups, pairs,
                              TrainConfig(objective=objective, **FAST), data_fingerprint=False)
    assert hist["loss"][-1] < hist["loss"][0]
    assert _cos_to_w_star(probe, tr) > 0.9
    random_pick, oracle = te.rewards.mean(), selection_reward(te.quality, te)
    got = selection_reward(probe.score(te.features), te)
    assert got > random_pick + 0.6 * (oracle - random_pick)


def test_figure_4_pg_beats_q_when_prompt_difficulty_dominates():
    """e0 carries prompt difficulty (reward up between prompts) but is anti-correlated with
    reward inside a prompt: q's fit of the per-prompt offsets ranks samples worse than pg."""
    kw = dict(nuisance=2.0, anti=0.7, difficulty=1.5)
    tr, te = make(100, 16, 16, seed=1, **kw), make(300, 16, 16, seed=2, **kw)
    sel = {}
    for obj in ("q", "pg"):
        probe, _ = train_probe(tr.features, tr.rewards, tr.groups,
                               config=TrainConfig(objective=obj, lr=1e-3, min_steps=1000),
                               data_fingerprint=False)
        sel[obj] = selection_reward(probe.score(te.features), te)
        if obj == "pg":  # pg learns the within-prompt sign of e0 (negative), q the between sign
            assert probe.net[-1].weight[0, 0] < 0
    assert sel["pg"] > sel["q"] + 0.08, sel


def test_paper_defaults_give_a_useful_probe_on_100_prompts_x_16():
    """Defaults only (lr 5e-5, batch 1000, 150 epochs raised by min_steps): still learns."""
    tr, te = make(100, 16, 32, seed=3), make(200, 16, 32, seed=4)
    probe, hist = train_probe(tr.features, tr.rewards, tr.groups, data_fingerprint=False)
    assert probe.info["metrics"]["steps"] >= TrainConfig().min_steps
    random_pick, oracle = te.rewards.mean(), selection_reward(te.quality, te)
    got = selection_reward(probe.score(te.features), te)
    assert got > random_pick + 0.6 * (oracle - random_pick), (random_pick, got, oracle)
    # without the step floor the same defaults are only 300 steps and learn much less
    short, _ = train_probe(tr.features, tr.rewards, tr.groups,
                           config=TrainConfig(min_steps=0), data_fingerprint=False)
    assert selection_reward(short.score(te.features), te) < got


def test_training_is_deterministic_for_a_seed_and_differs_across_seeds(planted):
    tr, _ = planted
    cfg = TrainConfig(objective="pg", hidden=(8,), **FAST)
    a, _ = train_probe(tr.features, tr.rewards, tr.groups, config=cfg, data_fingerprint=False)
    b, _ = train_probe(tr.features, tr.rewards, tr.groups, config=cfg, data_fingerprint=False)
    c, _ = train_probe(tr.features, tr.rewards, tr.groups,
                       config=dataclasses.replace(cfg, seed=1), data_fingerprint=False)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    assert not all(torch.equal(va, vc) for va, vc in zip(a.state_dict().values(),
                                                         c.state_dict().values()))


def test_unscored_rows_are_dropped_with_a_warning(planted):
    tr, _ = planted
    r = tr.rewards.copy()
    r[::5] = np.nan
    lines: list[str] = []
    probe, _ = train_probe(tr.features, r, tr.groups, config=TrainConfig(**FAST), log=lines.append)
    assert any(f"dropped {int(np.isnan(r).sum())} of {len(r)} rows" in s for s in lines)
    assert probe.info["training_data"]["dropped_unscored"] == int(np.isnan(r).sum())
    assert len(probe.info["training_data"]["fingerprint"]) == 64


def test_validation_split_is_by_prompt_and_keeps_the_best_epoch(planted):
    tr, _ = planted
    lines: list[str] = []
    probe, hist = train_probe(tr.features, tr.rewards, tr.groups,
                              config=TrainConfig(objective="pg", val_fraction=0.25, patience=3,
                                                 lr=1e-2, min_steps=0, epochs=200),
                              log=lines.append, data_fingerprint=False)
    m = probe.info["metrics"]
    assert probe.info["training_data"]["validation_prompts"] == 25
    assert m["val_sel_reward"] == pytest.approx(max(hist["val"]))
    assert m["best_epoch"] == 1 + int(np.argmax(hist["val"]))
    if len(hist["epoch"]) < 200:  # stopped early: patience epochs after the best one
        assert len(hist["epoch"]) == m["best_epoch"] + 3
        assert any("early stop" in s for s in lines)


def test_mlp_probe_trains_and_standardisation_can_be_off(planted):
    tr, te = planted
    probe, _ = train_probe(tr.features, tr.rewards, tr.groups,
                           config=TrainConfig(hidden=(16, 8), standardize=False, **FAST),
                           data_fingerprint=False)
    assert not probe.standardize and probe.hidden == (16, 8)
    assert selection_reward(probe.score(te.features), te) > te.rewards.mean() + 0.1


def test_user_errors_are_one_line_qprobe_errors(planted):
    tr, _ = planted
    bad = [
        (dict(config=TrainConfig(objective="ce")), dict(rewards=tr.rewards * 3), "ce needs"),
        (dict(config=TrainConfig(objective="bt")), {}, "needs preference pairs"),
        (dict(config=TrainConfig(objective="pg", beta=0.0)), {}, "beta must be > 0"),
        (dict(config=TrainConfig(lr=-1.0)), {}, "lr must be > 0"),
        ({}, dict(rewards=np.full(len(tr.rewards), np.nan)), "no rows with a reward"),
        ({}, dict(groups=tr.groups[:-1]), "groups must have shape"),
    ]
    for kw, arrays, msg in bad:
        args = dict(features=tr.features, rewards=tr.rewards, groups=tr.groups) | arrays
        with pytest.raises(QProbeError, match=msg) as e:
            train_probe(**args, **kw, data_fingerprint=False)
        assert "\n" not in str(e.value)
    nan = tr.features.copy()
    nan[7, 3] = np.nan
    with pytest.raises(QProbeError, match="NaN"):
        train_probe(nan, tr.rewards, tr.groups, config=TrainConfig(**FAST), data_fingerprint=False)
    same = np.array([[0, 0]])
    with pytest.raises(QProbeError, match="same sample"):
        train_probe(tr.features, None, tr.groups, same, TrainConfig(objective="bt"),
                    data_fingerprint=False)
    with pytest.raises(QProbeError, match="mixes two prompts"):
        train_probe(tr.features, None, tr.groups, np.array([[0, 16]]),
                    TrainConfig(objective="bt"), data_fingerprint=False)
    # dpo on pairs only (no other sample of the prompt) has no signal: say so
    two = np.flatnonzero(tr.groups < 10)
    two = two[np.isin(two % 16, [0, 1])]  # 2 samples per prompt
    pairs = np.stack([np.arange(0, len(two), 2), np.arange(1, len(two), 2)], 1)
    with pytest.raises(QProbeError, match="use --objective bt"):
        train_probe(tr.features[two], None, tr.groups[two], pairs,
                    TrainConfig(objective="dpo"), data_fingerprint=False)


@pytest.mark.parametrize("objective", ["q", "pg", "dpo"])
def test_float16_precision_trains_the_same_probe_up_to_rounding(planted, objective):
    tr, te = planted
    pairs = tr.pairs(4, np.random.default_rng(0)) if objective == "dpo" else None
    probes = {}
    for precision in ("float32", "float16"):
        probes[precision], _ = train_probe(
            tr.features, tr.rewards, tr.groups, pairs,
            TrainConfig(objective=objective, precision=precision, **FAST), data_fingerprint=False)
    w32, w16 = (probes[p].net[0].weight.detach().numpy()[0] for p in ("float32", "float16"))
    assert np.linalg.norm(w16 - w32) < 0.05 * np.linalg.norm(w32)
    s32 = selection_reward(probes["float32"].score(te.features), te)
    assert abs(selection_reward(probes["float16"].score(te.features), te) - s32) < 0.02


def _ragged(seed: int = 0):
    """300 rows of 40 prompts of unequal size, 7 dims, rewards in [0, 1], pairs in most prompts
    (some prompts with only the pair, so dpo sees pairs without other samples)."""
    rng = np.random.default_rng(seed)
    groups = np.sort(rng.integers(0, 40, 300))
    pairs = [(rs[i], rs[i + 1]) for p in np.unique(groups)
             for rs in [np.flatnonzero(groups == p)] for i in range(0, len(rs) - 1, 2)
             if rng.random() < 0.7]
    return (rng.standard_normal((300, 7)), rng.random(300).astype(np.float32), groups,
            np.array(pairs))


@pytest.mark.parametrize("objective", ["q", "ce", "pg", "bt", "dpo"])
def test_fused_block_gradients_equal_autograd_of_the_batch_loss(objective):
    """Float64: the fused step's closed-form dL/ds per block (Objective.grad) gives the gradient
    autograd gives for the objective's batch loss, for block sizes from one row (or unit) to the
    whole batch."""
    x, r, groups, pairs = _ragged()
    cfg = TrainConfig(objective=objective, beta=0.3, group_size=4)
    order, batches = data.layout(cfg, np.arange(300), r, groups,
                                 pairs if objective in ("bt", "dpo") else None,
                                 np.random.default_rng(1), 100, 4)
    xl = torch.from_numpy(x[order])  # [L, 7] float64
    for b in batches:
        for f in ("rewards", "baseline"):
            if getattr(b, f) is not None:
                setattr(b, f, getattr(b, f).double())
    for rows in (1, 7, 30, 1000):
        fused = torch_step.FusedLinear(cfg, 7, batches, block_rows=rows, dtype=torch.float64)
        for b in batches:
            layer = torch.nn.Linear(7, 1).double()
            torch.nn.init.normal_(layer.weight)
            loss = fused.step(layer, xl, b)
            got = layer.weight.grad.clone(), layer.bias.grad.clone()
            layer.zero_grad()
            want = objectives.get(objective).loss(cfg, layer(xl[b.start:b.end]).squeeze(-1), b)
            want.backward()
            assert torch.allclose(loss, want, rtol=1e-12)
            assert torch.allclose(got[0], layer.weight.grad, rtol=1e-10, atol=1e-14), rows
            if objective in ("q", "ce"):  # else exactly 0, autograd's is rounding noise
                assert torch.allclose(got[1], layer.bias.grad, rtol=1e-10, atol=1e-14), rows


@pytest.fixture
def autograd_copy():
    """Registers a copy of a built-in objective without its closed-form gradient and C code
    (so autograd trains it); removed again after the test."""
    added = []

    def copy(name: str) -> str:
        entry = dataclasses.replace(objectives.get(name), name=f"{name}-autograd", grad=None,
                                    native=None)
        added.append(objectives.register(entry).name)
        return entry.name

    yield copy
    for name in added:
        objectives.REGISTRY.pop(name)


@pytest.mark.parametrize("objective", ["q", "ce", "pg", "bt", "dpo"])
def test_fused_step_trains_the_same_probe_as_the_autograd_step(planted, objective,
                                                               autograd_copy):
    """Float32 end to end: 20 epochs with the default (fused) step and with autograd through the
    probe and torch's Adam give the same parameters up to float32 rounding."""
    tr, _ = planted
    pairs = tr.pairs(4, np.random.default_rng(0)) if objective in ("bt", "dpo") else None
    cfg = TrainConfig(objective=objective, lr=3e-3, min_steps=0, epochs=20, batch_size=200)
    got, _ = train_probe(tr.features, tr.rewards, tr.groups, pairs, cfg, data_fingerprint=False)
    lines: list[str] = []
    want, _ = train_probe(tr.features, tr.rewards, tr.groups, pairs,
                          dataclasses.replace(cfg, objective=autograd_copy(objective)),
                          log=lines.append, data_fingerprint=False)
    assert "autograd" in lines[0]
    w_got, w_want = got.net[0].weight, want.net[0].weight
    assert torch.allclose(w_got, w_want, rtol=1e-4, atol=1e-5)
    if objective in ("q", "ce"):  # pg/bt/dpo: the bias has gradient 0 (the fused step keeps it)
        assert torch.allclose(got.net[0].bias, want.net[0].bias, rtol=1e-4, atol=1e-5)
    else:
        assert float(got.net[0].bias.detach()) == 0.0


@pytest.mark.parametrize("objective", ["pg", "dpo"])
def test_fused_float16_training_is_bit_for_bit_deterministic(planted, objective):
    tr, _ = planted
    pairs = tr.pairs(4, np.random.default_rng(0)) if objective == "dpo" else None
    cfg = TrainConfig(objective=objective, precision="float16", lr=3e-3, min_steps=0, epochs=5)
    a, _ = train_probe(tr.features, tr.rewards, tr.groups, pairs, cfg, data_fingerprint=False)
    b, _ = train_probe(tr.features, tr.rewards, tr.groups, pairs, cfg, data_fingerprint=False)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k


@pytest.mark.parametrize("objective", ["q", "pg", "dpo"])
def test_fused_step_gives_the_same_bits_on_one_or_two_threads(planted, objective):
    """The shards of a batch are summed in a fixed order: the thread count changes nothing."""
    tr, _ = planted
    pairs = tr.pairs(4, np.random.default_rng(0)) if objective == "dpo" else None
    probes = []
    for threads in (1, 2):
        cfg = TrainConfig(objective=objective, precision="float16", lr=3e-3, min_steps=0,
                          epochs=5, threads=threads)
        probes.append(train_probe(tr.features, tr.rewards, tr.groups, pairs, cfg,
                                  data_fingerprint=False)[0])
    for (k, va), vb in zip(probes[0].state_dict().items(), probes[1].state_dict().values()):
        assert torch.equal(va, vb), k


def test_shards_split_a_batch_at_unit_boundaries_into_halves():
    b = data.Batch(0, 100, 11, units=np.array([10] * 7 + [5, 10, 10, 5]))
    n = 100
    b.index = torch.as_tensor(data.padded([np.arange(s, s + u) for s, u in
                                           zip(np.concatenate([[0], np.cumsum(b.units)[:-1]]),
                                               b.units)]))
    b.rewards = torch.zeros(b.index.shape)
    shards = torch_step.make_blocks("groups", b, rows=30, pad=n, shards=2)
    rows = [[(blk.start, blk.end) for blk in sh] for sh in shards]
    assert rows == [[(0, 30), (30, 50)], [(50, 75), (75, 100)]]
    for sh in shards:  # blocks never exceed the row budget unless one unit does
        assert all(blk.end - blk.start <= 30 for blk in sh)


@pytest.mark.parametrize("optimizer,wd", [("adam", 0.0), ("adam", 0.1), ("adamw", 0.5)])
def test_the_fused_steps_adam_is_torchs(optimizer, wd):
    """The fused step's Adam takes the steps torch.optim.Adam / AdamW take."""
    torch.manual_seed(0)
    a = [torch.randn(5, requires_grad=True), torch.randn(1, requires_grad=True)]
    b = [t.detach().clone().requires_grad_(True) for t in a]
    ours = torch_step.Adam(a, 1e-2, wd, optimizer == "adamw")
    cls = torch.optim.AdamW if optimizer == "adamw" else torch.optim.Adam
    theirs = cls(b, lr=1e-2, weight_decay=wd)
    for _ in range(50):
        grads = [torch.randn(5), torch.randn(1)]
        for p, q, gr in zip(a, b, grads):
            p.grad, q.grad = gr.clone(), gr.clone()
        ours.step()
        theirs.step()
    for p, q in zip(a, b):
        assert torch.allclose(p, q, rtol=1e-6, atol=1e-7)


def test_auto_threads_use_one_on_a_busy_machine(monkeypatch):
    """Two threads only help when both cores are free: on a loaded machine every hand-off waits."""
    from qprobe.train import threads as th

    cfg = TrainConfig(objective="q")
    x = torch.zeros(4096, 896, dtype=torch.float16)  # a batch big enough to be split
    monkeypatch.setattr(th, "cores", lambda: 2)
    monkeypatch.setattr(th.os, "getloadavg", lambda: (0.5, 0.5, 0.5))
    assert th.step_threads(cfg, x, native=True) == 2
    monkeypatch.setattr(th.os, "getloadavg", lambda: (2.5, 2.0, 1.0))
    assert th.step_threads(cfg, x, native=True) == 1
    assert th.step_threads(TrainConfig(objective="q", threads=2), x, native=True) == 2  # asked for
