"""The float16 matrix-vector kernels of the probe trainer (qprobe/halfmv.c) against torch."""

from __future__ import annotations

import platform

import numpy as np
import pytest
import torch

from qprobe import halfmv
from qprobe.train import TrainConfig, train_probe

kern = halfmv.kernels()
needs_kernels = pytest.mark.skipif(kern is None, reason=f"no halfmv kernels: {halfmv.why_not}")


@needs_kernels
@pytest.mark.parametrize("dim", [1, 7, 8, 31, 33, 896])
@pytest.mark.parametrize("rows", [1, 3, 4, 9])
def test_kernels_equal_float64_products(rows, dim):
    g = torch.Generator().manual_seed(rows * 1000 + dim)
    x = torch.randn(rows, dim, generator=g).half()  # [R, D]
    w, v = torch.randn(dim, generator=g), torch.randn(rows, generator=g)
    bias = torch.tensor([0.75])
    out = torch.full((rows,), float("nan"))
    kern.dot_rows(x, w, bias, out)
    want = x.double() @ w.double() + 0.75
    assert torch.allclose(out.double(), want, rtol=1e-5, atol=1e-5 * dim ** 0.5)
    acc = torch.linspace(-1, 1, dim)
    kern.add_rows(x, v, acc)
    want = torch.linspace(-1, 1, dim).double() + x.double().t() @ v.double()
    assert torch.allclose(acc.double(), want, rtol=1e-5, atol=1e-5 * rows ** 0.5)


@needs_kernels
def test_kernels_refuse_wrong_arguments():
    x = torch.zeros(4, 8, dtype=torch.float16)
    with pytest.raises(ValueError, match="halfmv"):
        kern.dot_rows(x.float(), torch.zeros(8), torch.zeros(1), torch.zeros(4))
    with pytest.raises(ValueError, match="halfmv"):
        kern.dot_rows(x.t(), torch.zeros(8), torch.zeros(1), torch.zeros(4))
    with pytest.raises(ValueError, match="halfmv"):
        kern.add_rows(x, torch.zeros(3), torch.zeros(8))


@needs_kernels
@pytest.mark.parametrize("objective", ["q", "pg", "bt"])
def test_training_with_and_without_the_kernels_agrees(objective, monkeypatch):
    """float16 training reads the rows with the kernels or upcasts them with torch: the same
    probe up to float32 summation order."""
    import qprobe.train as T

    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 37)).astype(np.float16)  # 37: not a multiple of 8
    r = (x[:, 0] > 0).astype(np.float32)
    groups = np.repeat(np.arange(40), 10)
    pairs = np.stack([np.arange(0, 400, 2), np.arange(1, 400, 2)], 1)
    pairs = np.where((x[pairs[:, 0], 0] > x[pairs[:, 1], 0])[:, None], pairs, pairs[:, ::-1])
    cfg = TrainConfig(objective=objective, precision="float16", lr=3e-3, min_steps=0, epochs=10,
                      batch_size=100)
    p = pairs if objective == "bt" else None
    a, _ = train_probe(x, r, groups, p, cfg, data_fingerprint=False)
    monkeypatch.setattr(T, "HALFMV", False)
    b, _ = train_probe(x, r, groups, p, cfg, data_fingerprint=False)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(va, vb, rtol=1e-4, atol=1e-5), k
    assert not torch.equal(a.net[0].weight, b.net[0].weight)  # it was the other code path


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("QPROBE_HALFMV", "0")
    halfmv.kernels.cache_clear()
    try:
        assert halfmv.kernels() is None and "QPROBE_HALFMV" in halfmv.why_not
    finally:
        monkeypatch.delenv("QPROBE_HALFMV")
        halfmv.kernels.cache_clear()
    assert (halfmv.kernels() is None) == (kern is None)


def test_a_failed_build_falls_back(monkeypatch, tmp_path):
    """No usable compiler: kernels() says why and leaves no half-written library behind."""
    monkeypatch.setenv("QPROBE_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    halfmv.kernels.cache_clear()
    try:
        assert halfmv.kernels() is None and halfmv.why_not
        if platform.machine().lower() in ("x86_64", "amd64"):
            assert "could not build" in halfmv.why_not
        assert not list(tmp_path.rglob("*.so"))
    finally:
        halfmv.kernels.cache_clear()
