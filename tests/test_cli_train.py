"""`qprobe train` end to end on small rollouts folders (qprobe.rollouts format)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from _synth import make, selection_reward
from qprobe import FeatureSpec, Probe
from qprobe.cli import main
from qprobe.rollouts import RolloutWriter

DIM = 12
SPEC = FeatureSpec(model="synthetic", layer=3, position="last", dim=DIM, dtype="float16")
FLAGS = ["--lr", "3e-3", "--min-steps", "600", "--epochs", "20"]


def _write(path, data, *, pairs=None, null_every=0):
    w = RolloutWriter(path, meta={"task": "synthetic", "split": "train"}, feature_spec=SPEC)
    rows = []
    for i in range(len(data.rewards)):
        reward = None if null_every and i % null_every == 0 else float(data.rewards[i])
        rows.append({"prompt_id": f"p{data.groups[i]}", "sample_idx": i % data.k,
                     "prompt": f"prompt {data.groups[i]}", "completion": f"c{i}",
                     "reward": reward})
    half = len(rows) // 2  # two shards
    w.append(rows[:half], data.features[:half])
    w.append(rows[half:], data.features[half:])
    if pairs is not None:
        w.write_pairs([{"prompt_id": f"p{data.groups[c]}", "chosen": int(c % data.k),
                        "rejected": int(r % data.k)} for c, r in pairs])
    return path


@pytest.fixture(scope="module")
def data():
    return make(60, 8, DIM, seed=5), make(200, 8, DIM, seed=6)


@pytest.mark.parametrize("objective", ["q", "ce", "pg", "bt", "dpo"])
def test_train_writes_a_probe_that_selects_well(tmp_path, data, objective, capsys):
    tr, te = data
    pairs = tr.pairs(3, np.random.default_rng(1)) if objective in ("bt", "dpo") else None
    roll = _write(tmp_path / "roll", tr, pairs=pairs)
    out = tmp_path / "probe"
    assert main(["train", str(roll), "--objective", objective, "--out", str(out), *FLAGS]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "epoch 1/" in printed
    probe = Probe.load(out, feature_spec=SPEC)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["objective"] == objective and cfg["feature_spec"] == SPEC.to_dict()
    assert len(cfg["training_data"]["fingerprint"]) == 64
    assert cfg["training_data"]["rollouts"] == str(roll)
    assert cfg["train_config"]["lr"] == 3e-3
    got = selection_reward(probe.score(te.features.astype(np.float16)), te)
    assert got > te.rewards.mean() + 0.5 * (selection_reward(te.quality, te) - te.rewards.mean())


def test_flags_map_to_the_config_and_null_rewards_are_dropped(tmp_path, data, capsys):
    tr, _ = data
    roll = _write(tmp_path / "roll", tr, null_every=4)
    out = tmp_path / "probe"
    rc = main(["train", str(roll), "--out", str(out), "--hidden", "8,4", "--no-standardize",
               "--baseline", "prompt", "--objective", "pg", "--group-size", "4", *FLAGS])
    assert rc == 0
    assert f"dropped {len(tr.rewards) // 4} of {len(tr.rewards)} rows" in capsys.readouterr().out
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] == {"type": "mlp", "dim": DIM, "hidden": [8, 4],
                                   "standardize": False}
    assert cfg["train_config"]["group_size"] == 4 and cfg["train_config"]["baseline"] == "prompt"
    assert cfg["training_data"]["dropped_unscored"] == len(tr.rewards) // 4


def _break_missing_column(roll):
    t = pq.read_table(roll / "samples-00000.parquet")
    pq.write_table(t.drop_columns(["reward"]), roll / "samples-00000.parquet")


def _break_nan_features(roll):
    f = np.load(roll / "features-00001.npy")
    f[3, 5] = np.nan
    np.save(roll / "features-00001.npy", f)


def _break_row_count(roll):
    np.save(roll / "features-00000.npy", np.load(roll / "features-00000.npy")[:-1])


@pytest.mark.parametrize("breaker, message", [
    (_break_missing_column, "missing required column"),
    (_break_nan_features, "NaN"),
    (_break_row_count, "rows"),
])
def test_bad_rollouts_give_one_line_and_exit_2(tmp_path, data, capsys, breaker, message):
    tr, _ = data
    roll = _write(tmp_path / "roll", tr)
    breaker(roll)
    out = tmp_path / "probe"
    assert main(["train", str(roll), "--out", str(out), *FLAGS]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qprobe: error: ") and message in err and "\n" not in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["roll"]


def test_pair_objectives_without_pairs_and_missing_folder(tmp_path, data, capsys):
    tr, _ = data
    roll = _write(tmp_path / "roll", tr)
    assert main(["train", str(roll), "--objective", "bt", "--out", str(tmp_path / "p")]) == 2
    assert "needs pairs.parquet" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "nope"), "--out", str(tmp_path / "p")]) == 2
    assert "not found" in capsys.readouterr().err


def test_subprocess_exit_code_and_single_error_line(tmp_path, data):
    tr, _ = data
    roll = _write(tmp_path / "roll", tr)
    _break_nan_features(roll)
    p = subprocess.run([sys.executable, "-m", "qprobe", "train", str(roll), "--out",
                        str(tmp_path / "probe")], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qprobe: error: ") and "NaN" in lines[0]
    assert not (tmp_path / "probe").exists()


def test_the_train_flags_are_built_without_torch():
    """`qprobe --help` builds every command's flags: the TrainConfig and the objective registry
    it reads must not import torch (seconds)."""
    code = ("import argparse, sys\n"
            "from qprobe.commands import train\n"
            "train.register(argparse.ArgumentParser().add_subparsers())\n"
            "from qprobe.train import TrainConfig\n"
            "TrainConfig(objective='dpo').validate()\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"
