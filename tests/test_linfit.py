"""The linear probe's training loop in C (qprobe/train/engines/native.c) against the torch step
it replaces, and the check of its interface at load."""

from __future__ import annotations

import ctypes
import dataclasses
import platform

import numpy as np
import pytest
import torch

from qprobe.errors import QProbeError
from qprobe.train import TrainConfig, data, train_probe
from qprobe.train.engines import native

lib = native.library()
needs_lib = pytest.mark.skipif(lib is None, reason=f"no linfit library: {native.why_not}")


def _data(n: int = 480, dim: int = 37, group: int = 12, seed: int = 0):
    """float16 features (dim 37: not a multiple of 8), rewards, prompts of `group` samples, and
    disjoint preference pairs inside each prompt."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, dim)) * 2 + 0.5).astype(np.float16)
    r = (x[:, 0] + 0.5 * rng.standard_normal(n) > 0.5).astype(np.float32)
    groups = np.repeat(np.arange(n // group), group)
    pairs = np.stack([np.arange(0, n, 2), np.arange(1, n, 2)], 1)
    pairs = np.where((x[pairs[:, 0], 0] > x[pairs[:, 1], 0])[:, None], pairs, pairs[:, ::-1])
    return x, r, groups, pairs


def _train(cfg: TrainConfig, use_c: bool, monkeypatch, arrays=None):
    x, r, groups, pairs = arrays or _data()
    monkeypatch.setattr(native, "ENABLED", use_c)
    probe, hist = train_probe(x, r, groups, pairs if cfg.objective in ("bt", "dpo") else None,
                              cfg, data_fingerprint=False)
    return probe, hist


@needs_lib
@pytest.mark.parametrize("dim", [1, 7, 8, 31, 33, 896])
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 17])
def test_products_equal_float64(rows, dim):
    g = torch.Generator().manual_seed(rows * 1000 + dim)
    x = torch.randn(rows, dim, generator=g).half()  # [R, D]
    w, v = torch.randn(dim, generator=g), torch.randn(rows, generator=g)
    out = torch.full((rows,), float("nan"))
    lib.dot_rows(x, w, torch.tensor([0.75]), out)
    want = x.double() @ w.double() + 0.75
    assert torch.allclose(out.double(), want, rtol=1e-5, atol=1e-5 * dim ** 0.5)
    acc = torch.linspace(-1, 1, dim)
    lib.add_rows(x, v, acc)
    want = torch.linspace(-1, 1, dim).double() + x.double().t() @ v.double()
    assert torch.allclose(acc.double(), want, rtol=1e-5, atol=1e-5 * rows ** 0.5)


@needs_lib
def test_products_refuse_wrong_arguments():
    x = torch.zeros(4, 8, dtype=torch.float16)
    with pytest.raises(ValueError, match="linfit"):
        lib.dot_rows(x.float(), torch.zeros(8), torch.zeros(1), torch.zeros(4))
    with pytest.raises(ValueError, match="linfit"):
        lib.dot_rows(x.t(), torch.zeros(8), torch.zeros(1), torch.zeros(4))
    with pytest.raises(ValueError, match="linfit"):
        lib.add_rows(x, torch.zeros(3), torch.zeros(8))


@needs_lib
@pytest.mark.parametrize("objective", ["q", "ce", "pg", "bt", "dpo"])
@pytest.mark.parametrize("precision", ["float32", "float16"])
def test_c_and_torch_train_the_same_probe(objective, precision, monkeypatch):
    """Same layout, batch order, closed-form gradients and Adam: the same probe up to float32
    summation order, and the same loss history."""
    cfg = TrainConfig(objective=objective, precision=precision, lr=3e-3, min_steps=0, epochs=15,
                      batch_size=120, group_size=5)
    a, ha = _train(cfg, True, monkeypatch)
    b, hb = _train(cfg, False, monkeypatch)
    assert b.net[0].weight.abs().max() > 0.02  # it learned something
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(va, vb, rtol=1e-4, atol=2e-5), k
    assert np.allclose(ha["loss"], hb["loss"], rtol=1e-5, atol=1e-6)
    assert not torch.equal(a.net[0].weight, b.net[0].weight)  # it was the other code path


@needs_lib
@pytest.mark.parametrize("optimizer,objective", [("adam", "q"), ("adamw", "pg"), ("adam", "dpo")])
def test_weight_decay_as_torch(optimizer, objective, monkeypatch):
    cfg = TrainConfig(objective=objective, optimizer=optimizer, weight_decay=0.5, lr=3e-3,
                      min_steps=0, epochs=10, batch_size=120)
    a, _ = _train(cfg, True, monkeypatch)
    b, _ = _train(cfg, False, monkeypatch)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(va, vb, rtol=1e-4, atol=2e-5), k


@needs_lib
@pytest.mark.parametrize("objective", ["ce", "pg", "dpo"])
def test_one_or_two_threads_give_the_same_bits(objective, monkeypatch):
    base = TrainConfig(objective=objective, precision="float16", lr=3e-3, min_steps=0, epochs=8,
                       batch_size=120)
    one, _ = _train(dataclasses.replace(base, threads=1), True, monkeypatch)
    two, _ = _train(dataclasses.replace(base, threads=2), True, monkeypatch)
    for (k, va), vb in zip(one.state_dict().items(), two.state_dict().values()):
        assert torch.equal(va, vb), k


@needs_lib
def test_dpo_when_the_pair_dominates_its_prompt(monkeypatch):
    """A pair whose scores dwarf the rest of its prompt: the others' sum is taken on its own
    instead of as total minus the pair (which would cancel to 0); C and torch still agree."""
    x, r, groups, pairs = _data(n=120, dim=9, group=6)
    x[pairs[:, 0], 0] = 60.0  # after standardising and beta 0.01: exp differences of ~1e3
    cfg = TrainConfig(objective="dpo", beta=0.01, lr=1e-2, min_steps=0, epochs=20, batch_size=60)
    a, ha = _train(cfg, True, monkeypatch, (x, r, groups, pairs))
    b, hb = _train(cfg, False, monkeypatch, (x, r, groups, pairs))
    assert np.isfinite(ha["loss"]).all()
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(va, vb, rtol=1e-3, atol=1e-4), k


@needs_lib
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_setup_passes_as_torch(dtype, monkeypatch):
    """Feature statistics and the standardised matrix from C equal torch's."""
    x = _data(n=700, dim=21)[0].astype(dtype)
    x[:, 3] = 1000.0 + x[:, 3] / 100  # |mean| >> std: the shift keeps the variance exact
    rows = np.random.default_rng(1).permutation(700)[:650]
    got = data.feature_stats(x, rows)
    monkeypatch.setattr(native, "ENABLED", False)
    want = data.feature_stats(x, rows)
    for g, w in zip(got, want):
        assert np.allclose(g, w, rtol=1e-5, atol=1e-6)
    mean, std = want
    for out in (torch.float16, torch.float32):
        monkeypatch.setattr(native, "ENABLED", False)
        want_x = data.standardised(x, rows, mean, std, out)
        monkeypatch.setattr(native, "ENABLED", True)
        got_x = data.standardised(x, rows, mean, std, out)
        assert got_x.dtype == out and torch.allclose(got_x.float(), want_x.float(), rtol=1e-6,
                                                      atol=1e-6)


@needs_lib
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_setup_finds_nan_and_inf(bad):
    x = _data(n=50, dim=11)[0].astype(np.float32)
    x[33, 10] = bad  # in the scalar tail of a row
    with pytest.raises(QProbeError, match="NaN or inf"):
        data.standardised(x, np.arange(50), None, None, torch.float16)
    x[33, 10], x[7, 2] = 0.0, bad  # in the vector part
    with pytest.raises(QProbeError, match="NaN or inf"):
        data.standardised(x, np.arange(50), None, None, torch.float32)


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("QPROBE_NATIVE", "0")
    native.library.cache_clear()
    try:
        assert native.library() is None and "QPROBE_NATIVE" in native.why_not
    finally:
        monkeypatch.delenv("QPROBE_NATIVE")
        native.library.cache_clear()
    assert (native.library() is None) == (lib is None)


def test_a_failed_build_falls_back(monkeypatch, tmp_path):
    """No usable compiler: library() says why, leaves no half-written library behind, and
    training still works (the torch step)."""
    monkeypatch.setenv("QPROBE_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    native.library.cache_clear()
    try:
        assert native.library() is None and native.why_not
        if platform.machine().lower() in ("x86_64", "amd64"):
            assert "could not build" in native.why_not
        assert not list(tmp_path.rglob("*.so"))
        probe, _ = _train(TrainConfig(objective="pg", min_steps=0, epochs=3), True, monkeypatch)
        assert torch.isfinite(probe.net[0].weight).all()
    finally:
        native.library.cache_clear()


def _reload(monkeypatch, **env):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    native.library.cache_clear()
    return native.library()


@needs_lib
def test_a_library_of_another_abi_is_refused_with_a_warning(monkeypatch, tmp_path):
    """linfit.c built with another LINFIT_ABI than native.py's ABI: library() warns (one line),
    returns None, and training takes the torch step."""
    text = native.SOURCE.read_text()
    define = f"#define LINFIT_ABI {native.ABI}\n"
    assert define in text
    other = tmp_path / "linfit.c"
    other.write_text(text.replace(define, f"#define LINFIT_ABI {native.ABI + 1}\n"))
    monkeypatch.setattr(native, "SOURCE", other)
    try:
        with pytest.warns(RuntimeWarning, match=f"linfit.c has ABI {native.ABI + 1}") as w:
            assert _reload(monkeypatch, QPROBE_CACHE=str(tmp_path / "cache")) is None
        assert "\n" not in str(w[0].message) and "torch step" in str(w[0].message)
        lines: list[str] = []
        cfg = TrainConfig(objective="q", min_steps=0, epochs=2)
        train_probe(*_data()[:3], config=cfg, log=lines.append, data_fingerprint=False)
        assert "torch step" in lines[0] and "ABI" in lines[0]
    finally:
        native.library.cache_clear()


@needs_lib
@pytest.mark.parametrize("change", ["drop the last field", "swap two fields of one type"])
def test_a_ctypes_mirror_that_differs_from_the_c_struct_is_refused(monkeypatch, change):
    """The check compares the size and every field's name and offset of Fit and Part."""
    fields = list(native._Fit._fields_)
    if change == "drop the last field":
        fields = fields[:-1]
    else:
        fields[1], fields[2] = fields[2], fields[1]  # half, dim: both int64, same offsets
    wrong = type("_Fit", (ctypes.Structure,), {"_fields_": fields})
    monkeypatch.setattr(native, "_Fit", wrong)
    try:
        with pytest.warns(RuntimeWarning, match="Fit differs from its ctypes mirror"):
            assert _reload(monkeypatch) is None
        assert "mirror" in native.why_not
    finally:
        monkeypatch.undo()
        native.library.cache_clear()
    assert native.library() is not None  # the real mirror matches
