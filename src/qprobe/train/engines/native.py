"""The linear probe's training loop in C (linfit.c), built on first use, and its Python side.

`library()` returns the compiled library, or None when it cannot be used here: no C compiler, a
CPU without AVX2/FMA/F16C (or not x86-64), or `QPROBE_NATIVE=0` in the environment; the reason is
in `linfit.why_not`. The trainer then runs its torch step instead: the same maths, slower. The
library is compiled once per source version into `$QPROBE_CACHE/kernels/` (about a second) and
loaded with ctypes; a call releases the GIL.

`LinearFit` turns the batches of one training run (qprobe.train._layout) into the flat arrays
linfit.c reads and runs an epoch of Adam steps per call.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

SOURCE = Path(__file__).with_name("linfit.c")
_P, _N = ctypes.c_void_p, ctypes.c_int64
why_not: str | None = None  # why library() returned None (for the trainer's log and the tests)
OBJECTIVE_CODES = {"q": 0, "ce": 1, "pg": 2, "bt": 3, "dpo": 4}  # linfit.c's enum


class _Fit(ctypes.Structure):
    """linfit.c's `Fit`, field for field."""

    _fields_ = [(name, kind) for name, kind in [
        ("x", _P), ("half", _N), ("dim", _N), ("reward", _P), ("unit_start", _P),
        ("shard_units", _P), ("batch_const", _P), ("pair_start", _P), ("pair_rows", _P),
        ("objective", _N), ("shards", _N), ("threads", _N), ("block_rows", _N),
        ("max_unit_rows", _N), ("beta", ctypes.c_double),
        ("w", _P), ("bias", _P), ("m_w", _P), ("v_w", _P), ("m_b", _P), ("v_b", _P),
        ("lr", ctypes.c_double), ("beta1", ctypes.c_double), ("beta2", ctypes.c_double),
        ("eps", ctypes.c_double), ("weight_decay", ctypes.c_double),
        ("decoupled", _N), ("step", _N)]]


class _Part(ctypes.Structure):
    """linfit.c's `Part` (setup passes over the dataset's rows), field for field."""

    _fields_ = [("x", _P), ("in_half", _N), ("dim", _N), ("rows", _P), ("n", _N),
                ("shift", _P), ("sum", _P), ("sumsq", _P), ("mean", _P), ("inv_std", _P),
                ("out", _P), ("out_half", _N), ("bad", _N)]


def readable(x: Any) -> bool:
    """Whether linfit.c can read the array x directly: C-contiguous [N, D] float16/float32."""
    return (isinstance(x, np.ndarray) and x.ndim == 2 and x.flags.c_contiguous
            and x.dtype in (np.float16, np.float32))


class Library:
    """The compiled linfit.c: the two float16 products (for the tests) and the training steps."""

    def __init__(self, lib: ctypes.CDLL):
        self._dot, self._add, self.steps = lib.qprobe_dot_rows, lib.qprobe_add_rows, \
            lib.qprobe_linfit_steps
        self._dot.argtypes = [_P, _N, _N, _P, _P, _P]
        self._add.argtypes = [_P, _N, _N, _P, _P]
        self._dot.restype = self._add.restype = None
        self.steps.argtypes = [ctypes.POINTER(_Fit), _P, _N, _P]
        self._sums, self._standardise = lib.qprobe_column_sums, lib.qprobe_standardise
        self._sums.argtypes = self._standardise.argtypes = [ctypes.POINTER(_Part), _N]
        self.steps.restype = self._sums.restype = self._standardise.restype = ctypes.c_int

    def column_sums(self, x: np.ndarray, rows: np.ndarray, shift: np.ndarray, threads: int
                    ) -> tuple[np.ndarray, np.ndarray]:
        """Sums of (x[r] - shift) and of its square over rows r -> float64 [D] x2.
        x: [N, D] (see `readable`); rows: [n] int64; shift: [D] float32."""
        rows = np.ascontiguousarray(rows, np.int64)
        shift = np.ascontiguousarray(shift, np.float32)
        s1, s2 = np.zeros(x.shape[1]), np.zeros(x.shape[1])
        part = _Part(x=x.ctypes.data, in_half=int(x.dtype == np.float16), dim=x.shape[1],
                     rows=rows.ctypes.data, n=len(rows), shift=shift.ctypes.data,
                     sum=s1.ctypes.data, sumsq=s2.ctypes.data)
        if self._sums(ctypes.byref(part), threads) != 0:
            raise MemoryError("linfit: could not allocate the column sums' buffers")
        return s1, s2

    def standardise(self, x: np.ndarray, rows: np.ndarray, mean: np.ndarray,
                    inv_std: np.ndarray, out: torch.Tensor, threads: int) -> bool:
        """out[i] = (x[rows[i]] - mean) * inv_std (out: contiguous [n, D] float16/float32).
        Returns False if the rows hold a NaN or an infinity."""
        rows = np.ascontiguousarray(rows, np.int64)
        mean = np.ascontiguousarray(mean, np.float32)
        inv_std = np.ascontiguousarray(inv_std, np.float32)
        assert out.is_contiguous() and out.shape == (len(rows), x.shape[1])
        part = _Part(x=x.ctypes.data, in_half=int(x.dtype == np.float16), dim=x.shape[1],
                     rows=rows.ctypes.data, n=len(rows), mean=mean.ctypes.data,
                     inv_std=inv_std.ctypes.data, out=out.data_ptr(),
                     out_half=int(out.dtype == torch.float16))
        return self._standardise(ctypes.byref(part), threads) == 0

    def dot_rows(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor,
                 out: torch.Tensor) -> None:
        """out[i] = bias + x[i] . w; x [R, D] float16, w [D], bias [1], out [R] float32."""
        _check(x, w, out)
        self._dot(x.data_ptr(), x.shape[0], x.shape[1], w.data_ptr(), bias.data_ptr(),
                  out.data_ptr())

    def add_rows(self, x: torch.Tensor, g: torch.Tensor, acc: torch.Tensor) -> None:
        """acc += x^T g; x [R, D] float16, g [R], acc [D] float32."""
        _check(x, acc, g)
        self._add(x.data_ptr(), x.shape[0], x.shape[1], g.data_ptr(), acc.data_ptr())


def _check(x: torch.Tensor, vd: torch.Tensor, vr: torch.Tensor) -> None:
    if not (x.dtype == torch.float16 and x.dim() == 2 and x.is_contiguous()
            and vd.dtype == vr.dtype == torch.float32 and vd.is_contiguous()
            and vr.is_contiguous() and vd.numel() == x.shape[1] and vr.numel() == x.shape[0]):
        raise ValueError(f"linfit: bad arguments {x.dtype} {tuple(x.shape)}, "
                         f"{vd.dtype} {tuple(vd.shape)}, {vr.dtype} {tuple(vr.shape)}")


def _build(out: Path) -> None:
    """Compile linfit.c into the shared library `out` (atomically: a temp file, then rename)."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (cc/gcc) on PATH")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        run = subprocess.run([cc, "-O3", "-shared", "-fPIC", "-pthread", "-o", tmp, str(SOURCE),
                              "-lm"], capture_output=True, text=True, timeout=120)
        if run.returncode != 0:
            raise RuntimeError(f"{cc} failed: {run.stderr.strip().splitlines()[-1:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.lru_cache(maxsize=1)
def library() -> Library | None:
    """The compiled library, or None (the reason is in `linfit.why_not`)."""
    global why_not
    from qprobe.models import cache_root

    if os.environ.get("QPROBE_NATIVE", "1") == "0":
        why_not = "switched off by QPROBE_NATIVE=0"
        return None
    if platform.machine().lower() not in ("x86_64", "amd64"):
        why_not = f"needs an x86-64 CPU, this is {platform.machine()}"
        return None
    tag = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    lib_path = cache_root() / "kernels" / f"linfit-{tag}.so"
    try:
        if not lib_path.exists():
            _build(lib_path)
        lib = ctypes.CDLL(str(lib_path))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        why_not = f"could not build or load {lib_path.name}: {e}"
        return None
    if not lib.qprobe_linfit_supported():
        why_not = "the CPU lacks AVX2, FMA or F16C"
        return None
    why_not = None
    return Library(lib)


class LinearFit:
    """One training run of a linear probe in C: the run's flat arrays and Adam's state.

    x: the laid-out training rows [L, D] (float16 or float32, contiguous); batches: the run's
    `_Batch`es, which tile [0, L) in order, each a run of whole units (`units` rows each; None:
    one row each); layer: the probe's nn.Linear(D, 1), whose weight and bias are updated in place.
    """

    def __init__(self, lib: Library, cfg: Any, x: torch.Tensor, batches: list[Any],
                 layer: torch.nn.Linear, shards: int, threads: int, block_rows: int):
        if not (x.is_contiguous() and x.dtype in (torch.float16, torch.float32)):
            raise ValueError(f"linfit: x must be contiguous float16/float32, got {x.dtype}")
        self.lib, self.x = lib, x  # x: kept alive, C reads it through a pointer
        sizes, shard_units, const, pairs, pair_counts = [], [], [], [], []
        row = unit = 0
        for b in batches:
            assert b.start == row, (b.start, row)  # the batches tile the layout in order
            starts = b.unit_starts()  # [u + 1] batch-relative
            units = np.diff(starts)
            shard_units.append([unit + j for j in b.shard_units(shards)] + [unit + len(units)])
            const.append(float(b.baseline.sum()) if cfg.objective == "pg"
                         and b.baseline is not None else 0.0)
            if cfg.objective == "dpo":  # pairs -> (unit, rows relative to the unit)
                ch, rj = b.chosen.numpy(), b.rejected.numpy()
                u_of = np.searchsorted(starts, ch, side="right") - 1  # [P]
                if not (np.all(np.diff(u_of) >= 0)
                        and np.all(np.searchsorted(starts, rj, side="right") - 1 == u_of)):
                    raise AssertionError("dpo pairs must come unit by unit, within their unit")
                pairs.append(np.stack([ch - starts[u_of], rj - starts[u_of]], 1))
                pair_counts.append(np.bincount(u_of, minlength=len(units)))
            sizes.append(units)
            row, unit = b.end, unit + len(units)
        assert row == len(x), (row, len(x))
        sizes_all = np.concatenate(sizes)
        self.arrays = {  # kept alive: C reads them through pointers
            "unit_start": np.concatenate([[0], np.cumsum(sizes_all)]).astype(np.int64),
            "shard_units": np.asarray(shard_units, np.int64).reshape(-1),
            "batch_const": np.asarray(const, np.float64),
            "pair_start": np.concatenate([[0], np.cumsum(np.concatenate(pair_counts))])
            .astype(np.int64) if pairs else np.zeros(1, np.int64),
            "pair_rows": np.ascontiguousarray(np.concatenate(pairs), np.int64) if pairs
            else np.zeros(2, np.int64),
            "reward": self._rewards(cfg, batches, len(x)),
        }
        w, bias = layer.weight.data, layer.bias.data  # [1, D], [1]: updated in place
        assert w.is_contiguous() and w.dtype == bias.dtype == torch.float32
        self.moments = [torch.zeros_like(w), torch.zeros_like(w), torch.zeros_like(bias),
                        torch.zeros_like(bias)]
        a = self.arrays
        self.fit = _Fit(
            x=x.data_ptr(), half=int(x.dtype == torch.float16), dim=x.shape[1],
            reward=a["reward"].ctypes.data, unit_start=a["unit_start"].ctypes.data,
            shard_units=a["shard_units"].ctypes.data, batch_const=a["batch_const"].ctypes.data,
            pair_start=a["pair_start"].ctypes.data, pair_rows=a["pair_rows"].ctypes.data,
            objective=OBJECTIVE_CODES[cfg.objective], shards=shards, threads=threads,
            block_rows=max(1, block_rows), max_unit_rows=int(sizes_all.max(initial=1)),
            beta=cfg.beta, w=w.data_ptr(), bias=bias.data_ptr(),
            m_w=self.moments[0].data_ptr(), v_w=self.moments[1].data_ptr(),
            m_b=self.moments[2].data_ptr(), v_b=self.moments[3].data_ptr(),
            lr=cfg.lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=cfg.weight_decay,
            decoupled=int(cfg.optimizer == "adamw"), step=0)

    @staticmethod
    def _rewards(cfg: Any, batches: list[Any], rows: int) -> np.ndarray:
        """[L] float32 reward of each laid-out row (q/ce/pg; zeros for bt/dpo)."""
        out = np.zeros(max(rows, 1), np.float32)
        for b in batches:
            if cfg.objective in ("q", "ce"):
                out[b.start:b.end] = b.rewards.numpy()
            elif cfg.objective == "pg":  # b.rewards [G, m] padded; b.index [G, m] local rows
                idx = b.index.numpy()
                out[b.start + idx[idx >= 0]] = b.rewards.numpy()[idx >= 0]
        return out

    def steps(self, order: np.ndarray) -> np.ndarray:
        """Take one Adam step on each batch in `order`; returns each step's loss [len(order)]."""
        order = np.ascontiguousarray(order, dtype=np.int64)
        losses = np.empty(len(order), np.float64)
        with torch.no_grad():
            rc = self.lib.steps(ctypes.byref(self.fit), order.ctypes.data, len(order),
                                losses.ctypes.data)
        if rc != 0:
            raise MemoryError("linfit: could not allocate the training step's buffers")
        return losses
