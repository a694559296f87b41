"""The rollout store: round trip, resume, refusals, crash recovery and validation."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qprobe.errors import QProbeError
from qprobe.features import FeatureSpec
from qprobe.rollouts import FORMAT, Rollouts, RolloutWriter, write_rollouts

SPEC = FeatureSpec(model="tiny", layer=1, position="last", dim=4)
META = {"task": "t", "split": "train", "k": 2, "sampling": {"temperature": 0.8, "top_p": 0.95}}


def make_rows(prompt_ids, k=2, reward=1.0):
    return [
        {"prompt_id": p, "sample_idx": j, "prompt": f"P{p}", "completion": f"c{p}{j}", "reward": reward}
        for p in prompt_ids
        for j in range(k)
    ]


def feats(n, seed=0):
    return np.random.default_rng(seed).standard_normal((n, SPEC.dim)).astype(np.float32)


def test_round_trip_multiple_shards(tmp_path):
    w = RolloutWriter(tmp_path / "r", meta=META, feature_spec=SPEC)
    f1, f2 = feats(4, 1), feats(2, 2)
    w.append(make_rows(["a", "b"]), f1)
    rows = make_rows(["c"])
    rows[1]["reward"] = None
    w.append(rows, f2)

    r = Rollouts(tmp_path / "r")
    assert len(r) == 6
    assert r.meta["format"] == FORMAT and r.meta["task"] == "t"
    assert r.feature_spec == SPEC
    assert r.features.shape == (6, 4) and r.features.dtype == np.float16
    np.testing.assert_allclose(r.features, np.concatenate([f1, f2]), rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(r.prompt_ids, ["a", "a", "b", "b", "c", "c"])
    np.testing.assert_array_equal(r.sample_idx, [0, 1, 0, 1, 0, 1])
    assert np.isnan(r.rewards[5]) and r.rewards[:5].tolist() == [1.0] * 5
    group, prompts = r.groups()
    assert prompts == ["a", "b", "c"] and group.tolist() == [0, 0, 1, 1, 2, 2]


def test_single_shard_features_are_memory_mapped(tmp_path):
    r = write_rollouts(tmp_path / "r", make_rows(["a"]), feats(2), meta=META, feature_spec=SPEC)
    assert isinstance(r.features, np.memmap)


def test_resume_skips_done_and_refuses_duplicates(tmp_path):
    w = RolloutWriter(tmp_path / "r", meta=META, feature_spec=SPEC)
    w.append(make_rows(["a"]), feats(2))
    w2 = RolloutWriter(tmp_path / "r", meta=META, feature_spec=SPEC)
    assert w2.done == {("a", 0), ("a", 1)}
    with pytest.raises(QProbeError, match="already stored"):
        w2.append(make_rows(["a"]), feats(2))
    w2.append(make_rows(["b"]), feats(2))
    assert len(Rollouts(tmp_path / "r")) == 4


@pytest.mark.parametrize(
    "change, match",
    [
        ({"k": 3}, "k: stored 2, now 3"),
        ({"sampling": {"temperature": 1.0, "top_p": 0.95}}, "sampling"),
        ({"model": "other"}, "model"),
    ],
)
def test_mismatched_resume_is_refused(tmp_path, change, match):
    RolloutWriter(tmp_path / "r", meta=META, feature_spec=SPEC).append(make_rows(["a"]), feats(2))
    with pytest.raises(QProbeError, match=match):
        RolloutWriter(tmp_path / "r", meta={**META, **change}, feature_spec=SPEC)


def test_mismatched_feature_spec_resume_is_refused(tmp_path):
    RolloutWriter(tmp_path / "r", meta=META, feature_spec=SPEC)
    other = FeatureSpec(model="tiny", layer=0, position="last", dim=4)
    with pytest.raises(QProbeError, match="feature spec"):
        RolloutWriter(tmp_path / "r", meta=META, feature_spec=other)


def test_crash_leftovers_are_cleaned_on_resume(tmp_path):
    path = tmp_path / "r"
    w = RolloutWriter(path, meta=META, feature_spec=SPEC)
    w.append(make_rows(["a"]), feats(2))
    # A crash after the features rename but before the samples rename, and one mid-write.
    np.save(path / "features-00001.npy", feats(2))
    (path / "samples-00001.parquet.tmp").write_bytes(b"partial")
    w2 = RolloutWriter(path, meta=META, feature_spec=SPEC)
    assert not (path / "features-00001.npy").exists()
    assert not list(path.glob("*.tmp"))
    w2.append(make_rows(["b"]), feats(2, 5))
    r = Rollouts(path)
    assert len(r) == 4
    np.testing.assert_allclose(r.features[2:], feats(2, 5), atol=1e-3)


def test_refuses_non_empty_foreign_folder(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "notes.txt").write_text("mine")
    with pytest.raises(QProbeError, match="not empty"):
        RolloutWriter(tmp_path / "r", meta=META, feature_spec=SPEC)


def test_append_validation(tmp_path):
    w = RolloutWriter(tmp_path / "r", meta=META, feature_spec=SPEC)
    with pytest.raises(QProbeError, match="shape"):
        w.append(make_rows(["a"]), feats(3))
    bad = feats(2)
    bad[0, 0] = np.nan
    with pytest.raises(QProbeError, match="NaN"):
        w.append(make_rows(["a"]), bad)
    rows = make_rows(["a"])
    del rows[0]["completion"]
    with pytest.raises(QProbeError, match="completion"):
        w.append(rows, feats(2))
    with pytest.raises(QProbeError, match="features are required"):
        w.append(make_rows(["a"]))
    assert not list((tmp_path / "r").glob("samples-*"))


def _good_store(tmp_path):
    return write_rollouts(tmp_path / "r", make_rows(["a", "b"]), feats(4), meta=META, feature_spec=SPEC).path


def test_reader_missing_column(tmp_path):
    path = _good_store(tmp_path)
    t = pq.read_table(path / "samples-00000.parquet").drop_columns(["reward"])
    pq.write_table(t, path / "samples-00000.parquet")
    with pytest.raises(QProbeError, match=r"samples-00000.parquet: missing required column\(s\) \['reward'\]"):
        Rollouts(path)


def test_reader_nan_features(tmp_path):
    path = _good_store(tmp_path)
    f = np.load(path / "features-00000.npy")
    f[2, 1] = np.nan
    np.save(path / "features-00000.npy", f)
    with pytest.raises(QProbeError, match="features-00000.npy: row 2 has NaN"):
        Rollouts(path)


def test_reader_row_count_mismatch(tmp_path):
    path = _good_store(tmp_path)
    np.save(path / "features-00000.npy", feats(3).astype(np.float16))
    with pytest.raises(QProbeError, match="shape .*4 rows"):
        Rollouts(path)


def test_reader_dim_mismatch_and_missing_features(tmp_path):
    path = _good_store(tmp_path)
    np.save(path / "features-00000.npy", np.zeros((4, 5), np.float16))
    with pytest.raises(QProbeError, match="dim 5"):
        Rollouts(path)
    (path / "features-00000.npy").unlink()
    with pytest.raises(QProbeError, match="features-00000.npy: missing"):
        Rollouts(path)


def test_reader_bad_meta(tmp_path):
    with pytest.raises(QProbeError, match="not found"):
        Rollouts(tmp_path / "nope")
    (tmp_path / "x").mkdir()
    with pytest.raises(QProbeError, match="no meta.json"):
        Rollouts(tmp_path / "x")
    (tmp_path / "x" / "meta.json").write_text(json.dumps({"format": "other/9"}))
    with pytest.raises(QProbeError, match="expected 'qprobe-rollouts/1'"):
        Rollouts(tmp_path / "x")


def test_set_rewards_and_extra_columns(tmp_path):
    w = RolloutWriter(tmp_path / "r", meta=META, feature_spec=SPEC)
    w.append(make_rows(["a"], reward=None), feats(2))
    w.append(make_rows(["b"], reward=None), feats(2))
    r = Rollouts(tmp_path / "r")
    r.set_rewards([1.0, 0.0, None, 1.0], extra_columns={"verdict": ["passed", "failed", "error", "passed"]})
    r2 = Rollouts(tmp_path / "r")
    np.testing.assert_array_equal(r2.rewards[[0, 1, 3]], [1.0, 0.0, 1.0])
    assert np.isnan(r2.rewards[2])
    assert r2.column("verdict") == ["passed", "failed", "error", "passed"]
    with pytest.raises(QProbeError, match="got 3 values"):
        r2.set_rewards([1.0, 0.0, 1.0])


def test_pairs_and_no_feature_store(tmp_path):
    rows = make_rows(["a"])
    r = write_rollouts(tmp_path / "r", rows, meta={"task": "hh"}, pairs=[{"prompt_id": "a", "chosen": 0, "rejected": 1}])
    assert r.feature_spec is None
    assert r.pairs.to_pylist() == [{"prompt_id": "a", "chosen": 0, "rejected": 1}]
    with pytest.raises(QProbeError, match="no features"):
        r.features  # noqa: B018


def test_extra_columns_promote_across_shards(tmp_path):
    w = RolloutWriter(tmp_path / "r", meta=META, feature_spec=SPEC)
    rows = make_rows(["a"])
    for row in rows:
        row["note"] = None
    w.append(rows, feats(2))
    rows = make_rows(["b"])
    for row in rows:
        row["note"] = "x"
    w.append(rows, feats(2))
    assert Rollouts(tmp_path / "r").column("note") == [None, None, "x", "x"]
    assert pa.types.is_string(Rollouts(tmp_path / "r").table.schema.field("note").type)
