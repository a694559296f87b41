"""The demo: its task (times tables, a real verifier) and its experiment config."""

from __future__ import annotations

import pytest

from qprobe.cli import build_parser
from qprobe.experiment import demo_config
from qprobe.tasks import get_task


def test_times_tables_splits_are_disjoint_and_complete() -> None:
    t = get_task("times-tables")
    assert t.splits() == {"train": 81, "test": 40}
    train, test = t.prompts("train"), t.prompts("test")
    ids = {r["id"] for r in train} | {r["id"] for r in test}
    assert len(ids) == 121  # every a * b with a, b in 2..12 exactly once
    assert not {r["id"] for r in train} & {r["id"] for r in test}
    assert get_task("times-tables").prompts("test") == test  # the split is fixed


@pytest.mark.parametrize(
    "completion, ok",
    [
        ("42", True),
        ("6 * 7 = 42", True),
        ("The answer is 42.", True),
        ("6 × 7 = 42\n", True),
        ("It is 24", False),
        ("6 * 7 = 48", False),
        ("42 is wrong, it is 48", False),
        ("To solve this, we multiply 6 by 7", False),
        ("", False),
    ],
)
def test_times_tables_reward(completion: str, ok: bool) -> None:
    t = get_task("times-tables")
    row = t.row("6*7")
    assert t.reward([row["prompt"]], [completion], prompt_id=["6*7"]) == [float(ok)]
    # the answer column (as collect passes it) gives the same reward
    assert t.reward([row["prompt"]], [completion], answer=["42"], prompt_id=["6*7"]) == [float(ok)]


def test_demo_config_is_valid_and_cli_knows_demo() -> None:
    cfg = demo_config(out="somewhere", seed=3)
    assert cfg.train.task == "times-tables" and cfg.seed == 3 and str(cfg.out_dir) == "somewhere"
    assert cfg.sampling.k in cfg.eval.ks and cfg.eval.beta in cfg.eval.betas
    args = build_parser().parse_args(["demo", "--out", "x", "--seed", "1"])
    assert args.out == "x" and args.seed == 1
