"""train-head and generate --guide end to end on a tiny model: rollouts -> head -> guided text."""

from __future__ import annotations

import json

import pytest

from qprobe.backends import SamplingParams, load_model
from qprobe.cli import main
from qprobe.collect import collect_task
from qprobe.policy.heads import RewardHead
from qprobe.tasks import Score, Task
from tiny_lm import save_tiny


class Vowels(Task):
    """Reward = share of vowels in the completion."""

    name = "vowels"

    def splits(self):
        return {"train": 8}

    def _load(self, split):
        return [{"id": f"p{i}", "prompt": f"{w} {i}"} for i, w in
                enumerate(["the", "a dog", "x =", "hi", "so", "it", "we", "on"])]

    def score(self, prompts, completions, **columns):
        return [Score(sum(c in "aeiou" for c in t) / max(len(t), 1), "scored") for t in completions]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("guided")
    folder = save_tiny(root / "model")
    lm = load_model(str(folder), layer=1)
    collect_task(lm, Vowels(), "train", root / "roll", k=6, progress=False,
                 params=SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=10, seed=0))
    return root, folder


@pytest.mark.parametrize("kind", ["arm", "rad"])
def test_train_head_then_generate_guided(setup, kind, capsys):
    root, folder = setup
    head_dir = root / f"head-{kind}"
    rc = main(["train-head", str(root / "roll"), "--out", str(head_dir), "--kind", kind,
               "--rank", "4", "--label-threshold", "0.3", "--epochs", "3", "--quiet"])
    assert rc == 0 and "wrote" in capsys.readouterr().out
    head = RewardHead.load(head_dir)
    assert head.kind == kind and head.feature_spec.layer == 1
    assert head.info["training"]["samples"] > 0 and head.tokenizer["size"] > 0
    rc = main(["generate", "--model", str(folder), "--guide", str(head_dir), "--beta", "3",
               "--guide-top-k", "5", "--k", "3", "--all", "--max-new-tokens", "6", "ab"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["method"] == f"{kind}-own" and len(out["candidates"]) == 3
    assert out["kind"] == "guided" and out["top_k"] == 5 and out["beta"] == 3.0
    assert out["reward_calls_per_token"] == (0.0 if kind == "arm" else 5.0)


def test_distill_arm_from_rad_on_the_command_line(setup, capsys):
    root, _ = setup
    main(["train-head", str(root / "roll"), "--out", str(root / "rad"), "--kind", "rad",
          "--layer", "-1", "--label-threshold", "0.3", "--epochs", "2", "--quiet"])
    rc = main(["train-head", str(root / "roll"), "--out", str(root / "arm-d"), "--kind", "arm",
               "--rank", "4", "--distill-from", str(root / "rad"), "--epochs", "2", "--quiet"])
    assert rc == 0
    head = RewardHead.load(root / "arm-d")  # reads block 1, its teacher block 2
    assert head.info["training"]["distill_from"] == str(root / "rad")
    assert (head.feature_spec.layer, RewardHead.load(root / "rad").feature_spec.layer) == (1, 2)
    capsys.readouterr()


def test_guide_errors_are_one_line(setup, capsys):
    root, folder = setup
    assert main(["generate", "--model", str(folder), "ab"]) == 2
    assert "give --probe" in capsys.readouterr().err
    main(["train-head", str(root / "roll"), "--out", str(root / "h"), "--kind", "arm",
          "--label-threshold", "0.3", "--epochs", "1", "--quiet"])
    capsys.readouterr()
    assert main(["generate", "--model", str(folder), "--guide", str(root / "h"), "ab"]) == 2
    assert "needs --beta" in capsys.readouterr().err
    assert main(["train-head", str(root / "roll"), "--out", str(root / "x"), "--kind", "rad",
                 "--label-threshold", "0.3", "--distill-from", str(root / "h")]) == 2
    assert "arm head" in capsys.readouterr().err
