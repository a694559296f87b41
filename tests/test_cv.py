"""`--cv`: candidates are scored on held-out prompts only, and the choice follows the signal."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import qprobe.probe
import qprobe.train
from qprobe.errors import QProbeError
from qprobe.features import FeatureSpec
from qprobe.rollouts import EMBED_DIR, Rollouts, write_rollouts
from qprobe.train import TrainConfig
from qprobe.train.cv import CVGrid, cross_validate, prompt_folds, train_with_cv

SPEC = FeatureSpec(model="m", layer=1, position="last", dim=8)


def make_folder(path, seed, signal_in="loglik", prompts=40, k=8):
    """Rewards follow the log-likelihood (signal_in="loglik") or feature 0 of set L2-mean."""
    rng = np.random.default_rng(seed)
    n = prompts * k
    lp_mean = rng.normal(-0.5, 0.3, n)
    other = rng.standard_normal((n, SPEC.dim)).astype(np.float32)
    key = lp_mean if signal_in == "loglik" else other[:, 0]
    z = (key - key.mean()) / key.std()
    rewards = (rng.random(n) < 1 / (1 + np.exp(-3 * z))).astype(np.float32)
    rows = [{"prompt_id": f"p{i // k}", "sample_idx": i % k, "prompt": f"P{i // k}",
             "completion": f"c{i}", "reward": float(rewards[i]), "num_tokens": 20} for i in range(n)]
    r = write_rollouts(path, rows, rng.standard_normal((n, SPEC.dim)).astype(np.float32),
                       meta={"task": "t"}, feature_spec=SPEC)
    emb = path / EMBED_DIR
    (emb / "L2-mean").mkdir(parents=True)
    spec2 = FeatureSpec(model="m", layer=2, position="mean", dim=SPEC.dim)
    (emb / "sets.json").write_text(json.dumps({"model": "m", "sets": {"L2-mean": spec2.to_dict()}}))
    np.save(emb / "L2-mean" / "features-00000.npy", other.astype(np.float16))
    pq.write_table(pa.table({"prompt_id": r.column("prompt_id"), "sample_idx": r.sample_idx,
                             "logprob_sum": lp_mean * 20, "logprob_tokens": np.full(n, 20, np.int32)}),
                   emb / "loglik-00000.parquet")
    return Rollouts(path)


BASE = TrainConfig(objective="pg", min_steps=300, epochs=5)
GRID = CVGrid(weight_decay=[0.0], min_steps=[300])


def test_folds_keep_prompts_whole():
    group = np.repeat(np.arange(10), 4)
    fold = prompt_folds(group, 3, seed=0)
    for g in range(10):
        assert len(set(fold[group == g])) == 1
    assert sorted(np.bincount(fold[::4])) == [3, 3, 4]


def test_cv_fits_each_fold_on_other_prompts_only(tmp_path, monkeypatch):
    r = make_folder(tmp_path / "train", 0)
    calls = []
    real = qprobe.train.train_probe

    def spy(x, rewards, groups, pairs, cfg, **kw):
        calls.append(set(np.asarray(kw["prompt_ids"]).tolist()))
        return real(x, rewards, groups, pairs, cfg, **kw)

    monkeypatch.setattr(qprobe.train, "train_probe", spy)
    cv = cross_validate(r, BASE, CVGrid(feature_sets=["L1-last"], loglik=["without"],
                                        weight_decay=[0.0], min_steps=[300]), folds=4, seed=3)
    group, prompts = r.groups()
    fold = prompt_folds(group, 4, 3)
    assert len(calls) == 4
    for f, seen in enumerate(calls):
        held = {prompts[g] for g in np.unique(group[fold == f])}
        assert seen and not (seen & held) and seen | held == set(prompts)
    assert len(cv["rows"]) == 1 and len(cv["rows"][0]["per_fold"]) == 4


def test_cv_follows_the_training_signal_not_a_held_out_one(tmp_path):
    train = make_folder(tmp_path / "train", 1, signal_in="loglik")
    test = make_folder(tmp_path / "test", 2, signal_in="features")  # would reward L2-mean if seen
    probe, _ = train_with_cv(train, BASE, GRID, folds=4, seed=0)
    chosen = probe.info["cv"]["chosen"]
    assert "loglik" in chosen, chosen
    assert probe.extras == ("logprob_mean", "logprob_sum", "logprob_tokens")
    table = {row["label"]: row["mean"] for row in probe.info["cv"]["rows"]}
    assert table[chosen] > table["L1-last wd=0 steps=300"]
    # The chosen probe reads what it was trained on from another folder too.
    s = probe.score_rollouts(test)
    assert s.shape == (len(test),)


def test_cv_refuses_bad_settings(tmp_path):
    r = make_folder(tmp_path / "train", 0, prompts=6)
    with pytest.raises(QProbeError, match="folds"):
        cross_validate(r, BASE, GRID, folds=7)
    with pytest.raises(QProbeError, match="no feature set"):
        cross_validate(r, BASE, CVGrid(feature_sets=["L9-last"]), folds=2)


def test_train_cli_cv_and_extras(tmp_path, capsys):
    from qprobe.cli import main
    from qprobe.probe import Probe

    make_folder(tmp_path / "train", 4)
    args = ["train", str(tmp_path / "train"), "--objective", "pg", "--epochs", "5",
            "--min-steps", "200"]
    assert main([*args, "--out", str(tmp_path / "p1"), "--cv", "3", "--cv-weight-decay", "0",
                 "--cv-min-steps", "200", "--cv-loglik", "without,only"]) == 0
    out = capsys.readouterr().out
    assert "cv: chose" in out and out.count("cv [") == 3  # two feature sets + loglik only
    p1 = Probe.load(tmp_path / "p1")
    assert p1.info["cv"]["chosen"] == p1.info["cv"]["rows"][p1.info["cv"]["best"]]["label"]
    assert main([*args, "--out", str(tmp_path / "p2"), "--feature-set", "none",
                 "--extras", "logprob_mean"]) == 0
    p2 = Probe.load(tmp_path / "p2")
    assert p2.extras == ("logprob_mean",) and p2.dim == 1 and p2.feature_spec is None
    assert main([*args, "--out", str(tmp_path / "p3"), "--extras", "nope"]) == 2


def _spy_configs(monkeypatch) -> list:
    """The TrainConfig of every fit, in order (the real trainer still runs)."""
    seen = []
    real = qprobe.train.train_probe

    def spy(x, rewards, groups, pairs, cfg, **kw):
        seen.append(cfg)
        return real(x, rewards, groups, pairs, cfg, **kw)

    monkeypatch.setattr(qprobe.train, "train_probe", spy)
    return seen


def test_cv_learning_rate_axis_reaches_the_trainer(tmp_path, monkeypatch):
    r = make_folder(tmp_path / "train", 0)
    grid = CVGrid(feature_sets=["L1-last"], loglik=["without"], weight_decay=[0.0],
                  min_steps=[300], lr=[1e-4, 1e-2])
    cfgs = _spy_configs(monkeypatch)
    cv = cross_validate(r, BASE, grid, folds=2, seed=0)
    assert [row["label"] for row in cv["rows"]] == ["L1-last wd=0 steps=300 lr=0.0001",
                                                    "L1-last wd=0 steps=300 lr=0.01"]
    assert [c.lr for c in cfgs] == [1e-4, 1e-4, 1e-2, 1e-2]
    assert [row["label"] for row in cross_validate(r, BASE, dataclasses.replace(grid, lr=None),
                                                   folds=2)["rows"]] == ["L1-last wd=0 steps=300"]
    assert [c.lr for c in cfgs[-2:]] == [BASE.lr, BASE.lr]


def test_cv_beta_axis_scores_each_probe_at_every_beta_and_sets_the_chosen_one(tmp_path, monkeypatch):
    r = make_folder(tmp_path / "train", 0)
    grid = CVGrid(feature_sets=["L1-last"], loglik=["without"], weight_decay=[0.0],
                  min_steps=[300], beta=[0.0, 1.0])
    cfgs = _spy_configs(monkeypatch)
    cv = cross_validate(r, BASE, grid, folds=2, seed=0)
    assert [c.beta for c in cfgs] == [BASE.beta, BASE.beta]  # one fit per fold, trained at the config's beta
    labels = [row["label"] for row in cv["rows"]]
    assert labels == ["L1-last wd=0 steps=300 beta=0", "L1-last wd=0 steps=300 beta=1"]
    # the same fitted probes: at beta = 1 the choice is softer, so nearer the fold's pass@1
    assert cv["rows"][0]["per_fold"] != cv["rows"][1]["per_fold"]
    probe, _ = train_with_cv(r, BASE, dataclasses.replace(grid, beta=[0.0]), folds=2)
    assert probe.beta == 0.0 and probe.info["cv"]["chosen"].endswith("beta=0")
    with pytest.raises(QProbeError, match="beta values must be >= 0"):
        cross_validate(r, BASE, dataclasses.replace(grid, beta=[-1.0]), folds=2)


def make_pair_folder(path, seed, prompts=60, flip=0.1):
    """Two answers per prompt; the chosen one has the larger feature 0 of set L2-mean (a share
    `flip` of the pairs the other way round). L1-last and the log-likelihood carry nothing."""
    r = make_folder(path, seed, signal_in="features", prompts=prompts, k=2)
    key = r.features_of("L2-mean")[:, 0].astype(np.float64).reshape(prompts, 2)
    rng = np.random.default_rng(seed + 1)
    first = (key[:, 0] > key[:, 1]) ^ (rng.random(prompts) < flip)  # answer 0 is chosen
    pq.write_table(pa.table({"prompt_id": [f"p{i}" for i in range(prompts)],
                             "chosen": np.where(first, 0, 1), "rejected": np.where(first, 1, 0)}),
                   path / "pairs.parquet")
    return Rollouts(path)


def test_cv_pairs_fits_on_training_pairs_and_picks_the_input_that_ranks_held_out_pairs(
        tmp_path, monkeypatch):
    r = make_pair_folder(tmp_path / "pairs", 0)
    seen = []
    real = qprobe.train.train_probe

    def spy(x, rewards, groups, pairs, cfg, **kw):
        pids = np.asarray(kw["prompt_ids"])
        assert pairs is not None and len(pairs) and pairs.max() < len(x)
        # every pair is two rows of one training prompt, renumbered into x
        assert (pids[pairs[:, 0]] == pids[pairs[:, 1]]).all()
        seen.append((len(pairs), set(pids.tolist())))
        return real(x, rewards, groups, pairs, cfg, **kw)

    monkeypatch.setattr(qprobe.train, "train_probe", spy)
    base = TrainConfig(objective="bt", lr=1e-2, min_steps=300, epochs=5)  # lr: 8 dims, few steps
    cv = cross_validate(r, base, CVGrid(feature_sets=["L1-last", "L2-mean"], loglik=["without"],
                                        weight_decay=[0.0], min_steps=[300]), folds=4, seed=1)
    group, prompts = r.groups()
    fold = prompt_folds(group, 4, 1)
    for (n_pairs, pids), f in zip(seen, [0, 1, 2, 3] * 2):
        held = {prompts[g] for g in np.unique(group[fold == f])}
        assert not (pids & held) and n_pairs == 60 - len(held)
    acc = {row["label"].split()[0]: row for row in cv["rows"]}
    assert acc["L2-mean"]["mean"] > 0.75 and abs(acc["L1-last"]["mean"] - 0.5) < 0.2
    assert cv["rows"][cv["best"]]["label"].startswith("L2-mean")
    with pytest.raises(QProbeError, match="pair accuracy"):
        cross_validate(r, base, CVGrid(loglik=["without"], beta=[0.0, 1.0]), folds=4)


@pytest.fixture
def anti_objective():
    """A planted objective: `q` trained on 1 - reward, so its probe ranks samples backwards."""
    from qprobe.train import objectives

    q = objectives.get("q")
    anti = dataclasses.replace(q, name="anti-q", grad=None, native=None,
                               loss=lambda cfg, s, b: q.loss(cfg, s, dataclasses.replace(
                                   b, rewards=1.0 - b.rewards)))
    objectives.register(anti)
    yield anti.name
    objectives.REGISTRY.pop(anti.name)


def test_cv_objective_axis_picks_the_objective_that_chooses_best(tmp_path, anti_objective):
    r = make_folder(tmp_path / "train", 0)
    grid = CVGrid(feature_sets=None, loglik=["only"], weight_decay=[0.0], min_steps=[300])
    for order in (["anti-q", "q"], ["q", "anti-q"]):
        cv = cross_validate(r, BASE, dataclasses.replace(grid, objectives=order), folds=2)
        assert [row["label"].split(":")[0] for row in cv["rows"]] == order
        means = {row["candidate"]["objective"]: row["mean"] for row in cv["rows"]}
        assert means["q"] > means["anti-q"] + 0.05, means
        assert cv["rows"][cv["best"]]["candidate"]["objective"] == "q"
    probe, _ = train_with_cv(r, BASE, dataclasses.replace(grid, objectives=["anti-q", "q"]),
                             folds=2)
    assert probe.info["cv"]["chosen"].startswith("q: ")
    assert probe.info["train_config"]["objective"] == "q"
    with pytest.raises(QProbeError, match="mix pair objectives"):
        cross_validate(r, BASE, dataclasses.replace(grid, objectives=["pg", "bt"]), folds=2)


def test_cv_signals_axis_adds_each_group_and_checks_names(tmp_path):
    r = make_folder(tmp_path / "train", 0)
    grid = CVGrid(feature_sets=["L1-last"], loglik=["without"], visible=["without"],
                  weight_decay=[0.0], min_steps=[300], signals=["none", "logprob_mean"])
    cv = cross_validate(r, BASE, grid, folds=2)
    assert [tuple(row["candidate"]["extras"]) for row in cv["rows"]] == [(), ("logprob_mean",)]
    assert cv["rows"][1]["label"] == "L1-last+loglik wd=0 steps=300"
    # the log-likelihood carries the planted signal: the group with it chooses better
    assert cv["rows"][1]["mean"] > cv["rows"][0]["mean"]
    with pytest.raises(QProbeError, match="unknown signal"):
        cross_validate(r, BASE, dataclasses.replace(grid, signals=["nope"]), folds=2)
    with pytest.raises(QProbeError, match="stores no"):
        cross_validate(r, BASE, dataclasses.replace(grid, signals=["visible_pass"]), folds=2)


def add_visible(r, path, visible):
    """Store a visible_reward column (1 pass, 0 fail) in the folder's one shard."""
    t = pq.read_table(path / "samples-00000.parquet")
    pq.write_table(t.append_column("visible_reward", pa.array(visible, pa.float32())),
                   path / "samples-00000.parquet")
    return Rollouts(path)


def test_gate_puts_passing_candidates_first_and_the_probe_ranks_inside(tmp_path):
    """Planted: a sample that fails the shown test never has reward 1, and among the passing
    ones the log-likelihood carries the signal. The gated probe is the filter with a learned
    order inside it, so CV must prefer it to the ungated one."""
    r = make_folder(tmp_path / "train", 0)
    rng = np.random.default_rng(5)
    rewards = r.rewards
    visible = np.where(rewards == 1, 1.0, (rng.random(len(rewards)) < 0.5).astype(np.float64))
    r = add_visible(r, tmp_path / "train", visible)
    grid = CVGrid(feature_sets=["L1-last"], loglik=["without"], visible=["with"],
                  weight_decay=[0.0], min_steps=[300], signals=["none", "logprob_mean"],
                  gate=["none", "visible_pass"], beta=[0.0])
    cv = cross_validate(r, BASE, grid, folds=2)
    by = {row["label"]: row["mean"] for row in cv["rows"]}
    gated = "L1-last+loglik+visible+gate(visible_pass) wd=0 steps=300 beta=0"
    assert gated in by and "L1-last+visible+gate(visible_pass) wd=0 steps=300 beta=0" in by
    assert cv["rows"][cv["best"]]["label"] == gated, by
    probe, _ = train_with_cv(r, BASE, grid, folds=2)
    assert probe.gate == "visible_pass"
    x = probe.inputs(r.features_of("L1-last"), r.extra_inputs())
    s = probe.score(x)
    passing, failing = s[visible == 1], s[visible == 0]
    assert passing.min() > failing.max()  # the gate decides first, whatever Q says
    probe.save(tmp_path / "p")
    again = qprobe.probe.Probe.load(tmp_path / "p")
    assert again.gate == "visible_pass" and np.array_equal(again.score(x), s)
    with pytest.raises(QProbeError, match="gate must be none"):
        cross_validate(r, BASE, dataclasses.replace(grid, gate=["logprob_mean"]), folds=2)
