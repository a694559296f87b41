"""The sentiment-steering task: DExperts' prompt files, VADER reward, held-out neutral split."""

from __future__ import annotations

from pathlib import Path

import pytest

from qprobe.errors import QProbeError
from qprobe.tasks import get_task
from qprobe.tasks.sentiment import POSITIVE

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def test_splits_and_prompts():
    task = get_task("sentiment", data=DATA)
    sp = task.splits()
    assert sp == {"neutral": 5000, "negative": 2500, "positive": 2500,
                  "neutral-train": 4000, "neutral-test": 1000}
    first = task.prompts("neutral", limit=1)[0]
    assert first == {"id": "neutral-0000", "prompt": "God never intended to"}
    train = {r["id"] for r in task.prompts("neutral-train")}
    test = {r["id"] for r in task.prompts("neutral-test")}
    assert len(train) == 4000 and len(test) == 1000 and not train & test
    assert task.prompts("neutral-test")[:3] == get_task("sentiment", data=DATA).prompts(
        "neutral-test")[:3]  # a fixed split


def test_vader_reward_and_threshold():
    task = get_task("sentiment", data=DATA)
    scores = task.score(["x"] * 3, ["a wonderful, lovely day", "a horrible, awful mess", "the table"])
    assert scores[0].reward > POSITIVE and scores[0].status == "positive"
    assert scores[1].reward < -POSITIVE and scores[1].status == "negative"
    assert scores[2].reward == 0.0 and scores[2].status == "neutral"
    assert all(-1 <= s.reward <= 1 for s in scores)


def test_missing_data_is_one_line(tmp_path):
    with pytest.raises(QProbeError, match="sentiment: data file not found"):
        get_task("sentiment", data=tmp_path).splits()
