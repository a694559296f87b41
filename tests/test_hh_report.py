"""The HH report's judge comparison pairs by prompt (issue 26): the same prompts, the same base
samples, DPO's seeds averaged per prompt, on a hand-made example."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from qprobe.rollouts import RolloutWriter

_spec = importlib.util.spec_from_file_location(
    "hh_report", Path(__file__).resolve().parent.parent / "experiments" / "hh_report.py")
hh_report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hh_report)

# judge scores of the base pool: 3 prompts x 4 samples
BASE = {"p0": [0.1, 0.5, 0.2, 0.9], "p1": [0.4, 0.3, 0.8, 0.0], "p2": [0.6, 0.6, 0.1, 0.2]}
DPO = {"dpo": {"p0": 0.7, "p1": 0.2, "p2": 0.5}, "dpo-s1": {"p0": 0.3, "p1": 0.6, "p2": 0.1}}


def _folder(path: Path, scores: dict[str, list[float]], order: list[str]) -> None:
    w = RolloutWriter(path, meta={"task": "hh-harmless", "split": "test",
                                  "k": len(next(iter(scores.values())))})
    for p in order:  # one shard per prompt, in the given order
        w.append([{"prompt_id": p, "sample_idx": j, "prompt": f"Human: {p}", "completion": f"a{j}",
                   "reward": s} for j, s in enumerate(scores[p])])


@pytest.fixture()
def out(tmp_path: Path) -> Path:
    _folder(tmp_path / "test-base", BASE, ["p2", "p0", "p1"])
    for m, scores in DPO.items():
        (tmp_path / f"adapter-{m}").mkdir()
        (tmp_path / f"adapter-{m}" / "adapter.json").write_text("{}")
        _folder(tmp_path / f"test-{m}", {p: [s] for p, s in scores.items()}, ["p1", "p2", "p0"])
    return tmp_path


def test_best_of_k_pairs_every_policy_by_prompt(out: Path):
    bk = hh_report.best_of_k(out, "test-base", [2, 4, 8])
    assert bk["prompts"] == ["p0", "p1", "p2"] and bk["k_pool"] == 4
    # plain sampling: each prompt's mean over its 4 base samples
    assert np.allclose(bk["base_mean"], [0.425, 0.375, 0.375])
    # DPO: the mean of the two seeds' samples of the same prompt, whatever the storage order
    assert np.allclose(bk["dpo_mean"], [0.5, 0.4, 0.3])
    judge = bk["per_prompt"]["the judge itself (ceiling)"]
    assert set(judge) == {"2", "4"}  # k = 8 is more than the pool holds
    assert np.allclose(judge["2"], [0.5, 0.4, 0.6])  # the best of each prompt's first 2 samples
    assert np.allclose(judge["4"], [0.9, 0.8, 0.6])
    assert bk["agree"]["the judge itself (ceiling)"] == 1.0


def test_dpo_mean_needs_every_prompt(out: Path):
    assert hh_report.dpo_mean(out, ["p0", "p9"]) is None  # p9 has no DPO sample
