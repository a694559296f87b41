"""Probe folders: round trip, float16/float32 scoring, spec checks, clear errors, atomic writes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from qprobe import FeatureSpec, FeatureSpecMismatch, Probe, QProbeError
from qprobe.probe import fingerprint

SPEC = FeatureSpec(model="tiny-lm", layer=2, position="last", dim=8, dtype="float16")


def _probe(hidden=(), standardize=True, seed=0) -> Probe:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    mean = rng.standard_normal(8).astype(np.float32) if standardize else None
    std = (rng.random(8) + 0.5).astype(np.float32) if standardize else None
    p = Probe(8, hidden, beta=0.2, objective="pg", feature_spec=SPEC, mean=mean, std=std,
              info={"training_data": {"fingerprint": "abc"}})
    with torch.no_grad():
        for prm in p.net.parameters():
            prm.copy_(torch.randn_like(prm))
    return p


@pytest.mark.parametrize("hidden", [(), (16, 4)])
def test_save_load_round_trip_scores_identically(tmp_path, hidden):
    p = _probe(hidden)
    x = np.random.default_rng(1).standard_normal((50, 8)).astype(np.float32)
    p.save(tmp_path / "probe")
    assert sorted(f.name for f in (tmp_path / "probe").iterdir()) == ["config.json",
                                                                      "probe.safetensors"]
    q = Probe.load(tmp_path / "probe")
    np.testing.assert_array_equal(p.score(x), q.score(x))
    assert q.beta == 0.2 and q.objective == "pg" and q.hidden == tuple(hidden)
    assert q.feature_spec == SPEC
    cfg = json.loads((tmp_path / "probe" / "config.json").read_text())
    assert cfg["architecture"] == {"type": "mlp" if hidden else "linear", "dim": 8,
                                   "hidden": list(hidden), "standardize": True}
    assert cfg["training_data"]["fingerprint"] == "abc"
    assert cfg["qprobe_version"]
    assert [f.name for f in tmp_path.iterdir()] == ["probe"]  # no temp folder left behind


def test_score_standardises_and_accepts_float16():
    p = _probe()
    x32 = np.random.default_rng(2).standard_normal((20, 8)).astype(np.float32)
    x16 = x32.astype(np.float16)
    w, b = p.net[0].weight.detach().numpy()[0], float(p.net[0].bias.detach())
    want = ((x16.astype(np.float32) - p.mean.numpy()) / p.std.numpy()) @ w + b
    got = p.score(x16)
    assert got.dtype == np.float32 and got.shape == (20,)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(p.score(x32), got, atol=1e-2)  # fp16 rounding only


def test_fresh_probe_scores_zero_so_policy_starts_at_base_model():
    p = Probe(8)
    assert (p.score(np.ones((3, 8), np.float32)) == 0).all()


def test_dimension_and_spec_mismatch_are_refused(tmp_path):
    p = _probe()
    with pytest.raises(FeatureSpecMismatch, match="dimension 9"):
        p.score(np.zeros((2, 9), np.float32))
    p.save(tmp_path / "p")
    other = FeatureSpec(model="tiny-lm", layer=3, position="last", dim=8)
    with pytest.raises(FeatureSpecMismatch, match="layer"):
        Probe.load(tmp_path / "p", feature_spec=other)
    # storage dtype may differ: same features
    Probe.load(tmp_path / "p", feature_spec=FeatureSpec("tiny-lm", 2, "last", 8, "float32"))
    with pytest.raises(FeatureSpecMismatch):
        p.check_features(FeatureSpec("tiny-lm", 2, "last", 16))
    with pytest.raises(FeatureSpecMismatch):
        Probe(8, feature_spec=FeatureSpec("m", 0, "last", 16))


def test_bad_probe_folders_give_one_line_errors(tmp_path):
    with pytest.raises(QProbeError, match="not a probe folder"):
        Probe.load(tmp_path)
    p = _probe()
    p.save(tmp_path / "p")
    cfg_path = tmp_path / "p" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text("{not json")
    with pytest.raises(QProbeError, match="invalid JSON"):
        Probe.load(tmp_path / "p")
    cfg_path.write_text(json.dumps({**cfg, "architecture": {**cfg["architecture"], "dim": 9}}))
    with pytest.raises(FeatureSpecMismatch, match="dim 8 differs from probe dim 9"):
        Probe.load(tmp_path / "p")
    cfg_path.write_text(json.dumps({**cfg, "architecture": {**cfg["architecture"], "dim": 9},
                                    "feature_spec": {**cfg["feature_spec"], "dim": 9}}))
    with pytest.raises(QProbeError, match="do not match config.json"):
        Probe.load(tmp_path / "p")
    cfg_path.write_text(json.dumps({**cfg, "format": "other/1"}))
    with pytest.raises(QProbeError, match="format"):
        Probe.load(tmp_path / "p")
    (tmp_path / "p" / "probe.safetensors").write_bytes(b"garbage")
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(QProbeError, match="cannot read weights"):
        Probe.load(tmp_path / "p")
    with pytest.raises(QProbeError) as err:
        Probe.load(tmp_path / "p")
    assert "\n" not in str(err.value)


def test_save_replaces_an_old_probe_but_never_a_foreign_folder(tmp_path):
    _probe(seed=0).save(tmp_path / "p")
    newer = _probe(seed=1)
    newer.save(tmp_path / "p")
    x = np.ones((1, 8), np.float32)
    assert Probe.load(tmp_path / "p").score(x) == newer.score(x)
    assert [f.name for f in tmp_path.iterdir()] == ["p"]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "keep.txt").write_text("mine")
    with pytest.raises(QProbeError, match="not a probe"):
        newer.save(tmp_path / "data")
    assert (tmp_path / "data" / "keep.txt").read_text() == "mine"


def test_fingerprint_changes_with_any_part_of_the_data():
    x = np.arange(12, dtype=np.float16).reshape(3, 4)
    r = np.array([0.0, 1.0, 0.5], np.float32)
    ids = ["a", "a", "b"]
    base = fingerprint(x, r, ids)
    assert base == fingerprint(x.copy(), r.copy(), list(ids))
    x2 = x.copy()
    x2[0, 0] = 7
    assert len({base, fingerprint(x2, r, ids), fingerprint(x, r[::-1].copy(), ids),
                fingerprint(x, r, ["a", "b", "b"]), fingerprint(x.astype(np.float32), r, ids),
                fingerprint(x, r, ids, pairs=np.array([[0, 1]]))}) == 6
