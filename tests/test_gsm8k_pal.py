"""gsm8k-pal: the prompt, answer extraction and scoring of hand-made programs (hostile ones
included: they run only in the sandbox), the answers as execution signatures, and the majority
and probe-weighted votes on a hand-worked example."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from qprobe.errors import QProbeError
from qprobe.sandbox import SandboxConfig, Verdict
from qprobe.tasks import get_task, list_tasks
from qprobe.tasks.gsm8k_pal import MARK, SHOTS, answer_of, answer_signature, header

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def task():
    t = get_task("gsm8k-pal", data=str(DATA), sandbox=SandboxConfig(timeout=3.0, workers=2))
    yield t
    t.close()


def test_registered_prompt_and_splits(task):
    assert "gsm8k-pal" in list_tasks()
    assert task.splits() == {"train": 7473 - len(SHOTS), "test": 1319}
    train_ids = [r["id"] for r in task.prompts("train", limit=3)]
    assert train_ids == ["train/8", "train/9", "train/10"]  # the shots are no train prompts
    p = task.prompts("test", limit=1)[0]
    assert p["answer"] == "18"
    assert p["prompt"].startswith("Q: Natalia sold clips")  # the first shot
    assert p["prompt"].count("def solution():") == 9  # 8 shots + the question
    assert p["prompt"].endswith("# solution in Python:\n\n\ndef solution():\n    \"\"\""
                                + p["question"] + "\"\"\"\n")
    test_questions = {r["question"] for r in task._raw("test")}
    assert not any(task._raw("train")[i]["question"] in test_questions for i, _ in SHOTS)
    three = get_task("gsm8k-pal", data=str(DATA), few_shot=3).prompts("test", limit=1)[0]
    assert three["prompt"].count("def solution():") == 4
    registered = get_task("gsm8k-pal-3shot", data=str(DATA))
    assert registered.name == "gsm8k-pal-3shot" and registered.prompts("test", 1)[0] == three
    with pytest.raises(QProbeError, match="few_shot must be 0..8"):
        get_task("gsm8k-pal", data=str(DATA), few_shot=9)
    with pytest.raises(QProbeError, match="unknown prompt_id"):
        task.row("test/99999")


def test_docstring_escapes_quotes_and_backslashes():
    h = header('He said """hi""" \\o/')
    ns: dict = {}
    exec(compile(h + "    return 1\n", "<header>", "exec"), ns)  # trusted text: our own header
    assert ns["solution"].__doc__ == 'He said """hi""" \\o/'


def test_shots_return_their_gold_answers(task):
    rows = [task.row(f"train/{i}") for i, _ in SHOTS]
    scores = task.score([r["prompt"] for r in rows], [b for _, b in SHOTS],
                        prompt_id=[r["id"] for r in rows])
    assert [s.status for s in scores] == ["passed"] * len(SHOTS), scores


BODY_OK = "    eggs = 16 - 3 - 4\n    result = eggs * 2\n    return result\n"
CASES = [  # (completion, reward, status, stored signature)
    (BODY_OK, 1.0, "passed", '["=18"]'),
    ("    return 18.000000001\n", 1.0, "passed", '["=18"]'),  # rounded to 6 decimals
    ("    return 0.1 * 180\n", 1.0, "passed", '["=18"]'),  # 18.000000000000004
    ("    return '18'\n", 1.0, "passed", '["=18"]'),  # a numeric string counts, like float()
    ("    return 17\n", 0.0, "failed", '["=17"]'),
    ("    return 10.0 ** 30\n", 0.0, "failed", '["=1' + "0" * 30 + '"]'),  # beyond Decimal's quantize
    ("    return 'eighteen'\n", 0.0, "error", "!error"),
    ("    return None\n", 0.0, "error", "!error"),
    ("    return True\n", 0.0, "error", "!error"),  # a bool is no number
    ("    return float('inf')\n", 0.0, "failed", "!no_answer"),
    ("    return 1 / 0\n", 0.0, "error", "!error"),
    ("    x = (\n", 0.0, "error", "!error"),  # syntax error
    ("    while True:\n        pass\n", 0.0, "timeout", "!timeout"),
]


@pytest.mark.parametrize("completion,reward,status,sig", CASES)
def test_scoring_hand_made_programs(task, completion, reward, status, sig):
    row = task.row("test/0")
    [s] = task.score([row["prompt"]], [completion], prompt_id=[row["id"]])
    assert (s.reward, s.status) == (reward, status), s
    [(_, v)] = list(task.sandbox.map([task.program(row, completion)]))
    assert answer_signature(v) == sig


def test_hostile_programs_run_only_in_the_sandbox(task, tmp_path):
    """Each tries to harm the host or to fake a right answer; none gets 18 and the host file
    is untouched."""
    row = task.row("test/0")
    target = tmp_path / "host-file.txt"
    target.write_text("intact")
    hostile = [
        # writes to a host path (the sandbox has its own root and uid)
        f"    open({str(target)!r}, 'w').write('pwned')\n    return 0\n",
        # prints a fake result line with the gold answer, then returns a wrong one
        f"    print('\\n{MARK}' + '\"18\"')\n    return 5\n",
        # leaves before the suffix prints anything: no value, no reward
        "    import sys\n    sys.exit(0)\n",
        "    import os\n    os._exit(0)\n",
        # kills its parent (the sandbox worker's child)
        "    import os, signal\n    os.kill(os.getppid(), signal.SIGKILL)\n    return 18\n",
    ]
    scores = task.score([row["prompt"]] * len(hostile), hostile, prompt_id=[row["id"]] * len(hostile))
    assert [s.reward for s in scores[:4]] == [0.0, 0.0, 0.0, 0.0], scores
    assert scores[4].reward in (0.0, None)  # never 1.0: the value is never seen printed
    assert target.read_text() == "intact"
    assert os.getpid() > 0  # this process is alive, and the sandbox still answers:
    assert task.score([row["prompt"]], [BODY_OK], prompt_id=[row["id"]])[0].reward == 1.0


def test_answer_of_reads_only_finished_programs():
    out = f"noise\n{MARK}\"18.0\"\n"
    assert answer_of(Verdict("passed", output=out)) == "18"
    assert answer_of(Verdict("timeout", output=out)) is None
    assert answer_of(Verdict("passed", output="18\n")) is None
    assert answer_of(Verdict("passed", output=f"{MARK}\"nan\"\n")) is None
    assert answer_signature(Verdict("sandbox_error")) is None  # retried on resume


# ---------------------------------------------------------------- votes, worked by hand

# One prompt, gold 18: two candidates answer 18, three answer 20, one timed out.
SIGS = ['["=18"]', '["=18"]', '["=20"]', '["=20"]', '["=20"]', "!timeout"]
REWARDS = np.array([1, 1, 0, 0, 0, 0], dtype=np.float64)
GROUP = np.zeros(6, dtype=np.int64)


def _chosen(scores: np.ndarray) -> int:
    from qprobe.evaluate import argmax_expected_reward

    assert argmax_expected_reward(scores, REWARDS, 6) in (0.0, 1.0)
    return int(np.lexsort((np.arange(6), -scores))[0])


def test_majority_vote_hand_worked():
    from qprobe.experiment.run import vote_rules
    from qprobe.verifier.agreement import exec_extras

    cols = exec_extras({"exec_sig": SIGS}, GROUP)
    assert cols["mbr_size"].tolist() == [2, 2, 3, 3, 3, 0]  # the vote counts; a timeout: none
    assert np.allclose(cols["mbr_share"], [2 / 6, 2 / 6, 3 / 6, 3 / 6, 3 / 6, 0])
    lp = np.array([-0.1, -0.2, -0.9, -0.5, -0.7, -0.05])
    sc = vote_rules(cols, {"logprob_mean": lp})["majority_vote"]
    assert _chosen(sc) == 3  # answer 20 (3 votes), its likeliest sample; reward 0
    # a 2-2 tie is broken by the likeliest sample of either answer
    tie = exec_extras({"exec_sig": SIGS[:4]}, GROUP[:4])
    sc = vote_rules(tie, {"logprob_mean": lp[:4]})["majority_vote"]
    assert int(np.argmax(sc)) == 0
    # without log-likelihoods (a server that gives none) ties go by sample order
    assert _chosen(vote_rules(cols, None)["majority_vote"]) == 2  # answer 20's first sample
    assert int(np.argmax(vote_rules(tie, None)["majority_vote"])) == 0
    assert vote_rules({}, {"logprob_mean": lp}) == {}


def test_weighted_vote_hand_worked():
    from qprobe.verifier.agreement import _vote_weights, weighted_vote

    q = np.array([2.0, 1.0, 0.0, -1.0, -1.0, 5.0])
    # mean 1, deviations [1, 0, -1, -2, -2, 4], sd sqrt(26/6); weights exp(dev / sd)
    sd = math.sqrt(26 / 6)
    w = [math.exp(d / sd) for d in (1, 0, -1, -2, -2)]
    w18, w20 = w[0] + w[1], w[2] + w[3] + w[4]  # 2.617 vs 1.385
    got = _vote_weights(list(zip(SIGS, q.tolist())))
    assert np.allclose(got, [w18, w18, w20, w20, w20, 0.0])
    assert w18 > w20  # the probe's weights overturn the 3-2 majority
    assert _chosen(weighted_vote(GROUP, SIGS, q)) == 0  # answer 18 (reward 1), its best sample
    assert _chosen(q) == 5  # the probe's own argmax: the timed-out candidate, reward 0
    # equal scores: the plain vote (answer 20), then the first of its samples
    assert _chosen(weighted_vote(GROUP, SIGS, np.zeros(6))) == 2


def test_fill_answers_writes_signatures(task, tmp_path):
    """The `exec_sig` stage on a tiny rollouts folder (no model: rows written directly)."""
    from qprobe.features import FeatureSpec
    from qprobe.rollouts import Rollouts, RolloutWriter
    from qprobe.verifier.signals import fill_answers

    row = task.row("test/0")
    comps = [BODY_OK, "    return 17\n", "    while True:\n        pass\n"]
    spec = FeatureSpec(model="none", layer=0, position="last", dim=2)
    w = RolloutWriter(tmp_path / "r", meta={"task": "gsm8k-pal", "k": 3}, feature_spec=spec)
    w.append([{"prompt_id": row["id"], "sample_idx": j, "prompt": row["prompt"], "completion": c,
               "reward": None} for j, c in enumerate(comps)], np.zeros((3, 2), np.float32))
    fill_answers(tmp_path / "r", task, say=lambda s: None)
    r = Rollouts(tmp_path / "r")
    assert r.column("exec_sig") == ['["=18"]', '["=17"]', "!timeout"]
    assert r.extra_inputs()["mbr_share"].tolist() == [1 / 3, 1 / 3, 0.0]
    assert "answers" in json.loads((tmp_path / "r" / "signals.json").read_text())
    with pytest.raises(QProbeError, match="no answers to vote on"):
        fill_answers(tmp_path / "r", get_task("gsm8k", data=str(DATA)))
