"""The linear probe's training loop in C (linfit.c, next to this file), built on first use.

`library()` returns the compiled library, or None when it cannot be used here: no C compiler, a
CPU without AVX2/FMA/F16C (or not x86-64), `QPROBE_NATIVE=0` in the environment, or a library
whose interface differs from this file's mirror of it (checked at load: the ABI number, then the
size and every field's name and offset of each struct; a mismatch warns once and training runs
its torch step). The reason is in `why_not`. The library is compiled once per source version into
`$QPROBE_CACHE/kernels/` (about a second) and loaded with ctypes; a call releases the GIL.

`LinearFit` turns the batches of one training run (qprobe.train.data) into the flat arrays
linfit.c reads and runs an epoch of Adam steps per call. It trains the objectives whose registry
entry has a `native` code that linfit.c names the same; any other objective trains in torch.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import itertools
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qprobe.fileio import cache_root
from qprobe.train.objectives import Objective
from qprobe.train.threads import SHARDS

SOURCE = Path(__file__).with_name("linfit.c")
ABI = 1  # linfit.c's LINFIT_ABI that _Fit, _Part and the calls below are written for
BLOCK_BYTES = 256 << 10  # feature bytes of one block of the step (64 kB-1 MB ran alike)
ENABLED = True  # False: train with the torch step even where linfit.c can be used (tests, bench)
_P, _N = ctypes.c_void_p, ctypes.c_int64
why_not: str | None = None  # why library() returned None (for the trainer's log and the tests)


class _Fit(ctypes.Structure):
    """linfit.c's `Fit`, field for field."""

    _fields_ = [
        ("x", _P), ("half", _N), ("dim", _N), ("reward", _P), ("unit_start", _P),
        ("shard_units", _P), ("batch_const", _P), ("pair_start", _P), ("pair_rows", _P),
        ("objective", _N), ("shards", _N), ("threads", _N), ("block_rows", _N),
        ("max_unit_rows", _N), ("beta", ctypes.c_double),
        ("w", _P), ("bias", _P), ("m_w", _P), ("v_w", _P), ("m_b", _P), ("v_b", _P),
        ("lr", ctypes.c_double), ("beta1", ctypes.c_double), ("beta2", ctypes.c_double),
        ("eps", ctypes.c_double), ("weight_decay", ctypes.c_double),
        ("decoupled", _N), ("step", _N)]


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
        self.objectives = _objective_names(lib)  # linfit.c's objective codes -> names
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


def _mirror(cls: type[ctypes.Structure]) -> list[tuple[str, int]]:
    """A ctypes struct's size, then each field's name and offset (as qprobe_linfit_field)."""
    return [("sizeof", ctypes.sizeof(cls))] + [(name, getattr(cls, name).offset)
                                               for name, _ in cls._fields_]


def _c_struct(lib: ctypes.CDLL, which: int) -> list[tuple[str, int]]:
    """linfit.c's struct `which` (0: Fit, 1: Part): its size, then each field's name and offset."""
    field = lib.qprobe_linfit_field
    field.argtypes, field.restype = [_N, _N, ctypes.POINTER(_N)], ctypes.c_char_p
    out, offset = [], _N()
    while (name := field(which, len(out) - 1, ctypes.byref(offset))) is not None:
        out.append((name.decode(), offset.value))
    return out


def _objective_names(lib: ctypes.CDLL) -> dict[int, str]:
    """linfit.c's objective codes and the registry names it gives them."""
    name_of = lib.qprobe_linfit_objective
    name_of.argtypes, name_of.restype = [_N], ctypes.c_char_p
    out, code = {}, 0
    while (name := name_of(code)) is not None:
        out[code] = name.decode()
        code += 1
    return out


def interface_mismatch(lib: ctypes.CDLL, fit: type[ctypes.Structure],
                       part: type[ctypes.Structure]) -> str | None:
    """What differs between the loaded linfit.c and its mirror here (None: nothing): the ABI
    number, then the size and the fields' names and offsets of each struct."""
    try:
        abi = lib.qprobe_linfit_abi
    except AttributeError as e:
        return f"the library lacks {e}"
    abi.argtypes, abi.restype = [], _N
    if abi() != ABI:
        return f"linfit.c has ABI {abi()}, {__name__} expects {ABI}"
    for which, (c_name, cls) in enumerate([("Fit", fit), ("Part", part)]):
        diff = [(a, b) for a, b in itertools.zip_longest(_c_struct(lib, which), _mirror(cls))
                if a != b]
        if diff:
            return (f"linfit.c's {c_name} differs from its ctypes mirror: (field, offset) "
                    f"{diff[0][0]} in C, {diff[0][1]} in Python")
    return None


@functools.lru_cache(maxsize=1)
def library() -> Library | None:
    """The compiled library, or None (the reason is in `why_not`; a library that loads but does
    not match this file also warns, once)."""
    global why_not
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
    mismatch = interface_mismatch(lib, _Fit, _Part)
    if mismatch is not None:
        why_not = f"{lib_path.name} does not match its Python side: {mismatch}"
        warnings.warn(f"qprobe: {why_not}; training uses the torch step", RuntimeWarning,
                      stacklevel=2)
        return None
    if not lib.qprobe_linfit_supported():
        why_not = "the CPU lacks AVX2, FMA or F16C"
        return None
    why_not = None
    return Library(lib)


def for_setup(features: Any) -> Library | None:
    """The library for the setup passes over `features`, if it can be used and read them."""
    return library() if ENABLED and readable(features) else None


def for_objective(objective: Objective) -> Library | None:
    """The library for a linear probe's steps on `objective`: None where it cannot be used or
    has no C path for it (the objective then trains in torch)."""
    lib = library() if ENABLED and objective.native is not None else None
    if lib is not None and lib.objectives.get(objective.native) != objective.name:
        warnings.warn(f"qprobe: objective {objective.name!r} has native code {objective.native}, "
                      f"which linfit.c calls {lib.objectives.get(objective.native)!r}; training "
                      "uses the torch step", RuntimeWarning, stacklevel=2)
        return None
    return lib


class LinearFit:
    """One training run of a linear probe in C: the run's flat arrays and Adam's state.

    x: the laid-out training rows [L, D] (float16 or float32, contiguous); batches: the run's
    `Batch`es, which tile [0, L) in order, each a run of whole units (`units` rows each; None:
    one row each); layer: the probe's nn.Linear(D, 1), whose weight and bias are updated in place.
    """

    def __init__(self, lib: Library, cfg: Any, objective: Objective, x: torch.Tensor,
                 batches: list[Any], layer: torch.nn.Linear, threads: int):
        if not (x.is_contiguous() and x.dtype in (torch.float16, torch.float32)):
            raise ValueError(f"linfit: x must be contiguous float16/float32, got {x.dtype}")
        assert lib.objectives.get(objective.native) == objective.name, objective
        self.lib, self.x = lib, x  # x: kept alive, C reads it through a pointer
        sizes, shard_units, const, pairs, pair_counts = [], [], [], [], []
        row = unit = 0
        for b in batches:
            assert b.start == row, (b.start, row)  # the batches tile the layout in order
            starts = b.unit_starts()  # [u + 1] batch-relative
            units = np.diff(starts)
            shard_units.append([unit + j for j in b.shard_units(SHARDS)] + [unit + len(units)])
            const.append(float(objective.loss_offset(b)) if objective.loss_offset else 0.0)
            if objective.layout == "prompts":  # pairs -> (unit, rows relative to the unit)
                ch, rj = b.chosen.numpy(), b.rejected.numpy()
                u_of = np.searchsorted(starts, ch, side="right") - 1  # [P]
                if not (np.all(np.diff(u_of) >= 0)
                        and np.all(np.searchsorted(starts, rj, side="right") - 1 == u_of)):
                    raise AssertionError("pairs must come unit by unit, within their unit")
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
            "reward": self._rewards(objective.layout, batches, len(x)),
        }
        w, bias = layer.weight.data, layer.bias.data  # [1, D], [1]: updated in place
        assert w.is_contiguous() and w.dtype == bias.dtype == torch.float32
        self.moments = [torch.zeros_like(w), torch.zeros_like(w), torch.zeros_like(bias),
                        torch.zeros_like(bias)]
        a = self.arrays
        block_rows = max(8, BLOCK_BYTES // (x.shape[1] * x.element_size()))
        self.fit = _Fit(
            x=x.data_ptr(), half=int(x.dtype == torch.float16), dim=x.shape[1],
            reward=a["reward"].ctypes.data, unit_start=a["unit_start"].ctypes.data,
            shard_units=a["shard_units"].ctypes.data, batch_const=a["batch_const"].ctypes.data,
            pair_start=a["pair_start"].ctypes.data, pair_rows=a["pair_rows"].ctypes.data,
            objective=objective.native, shards=SHARDS, threads=threads,
            block_rows=block_rows, max_unit_rows=int(sizes_all.max(initial=1)),
            beta=cfg.beta, w=w.data_ptr(), bias=bias.data_ptr(),
            m_w=self.moments[0].data_ptr(), v_w=self.moments[1].data_ptr(),
            m_b=self.moments[2].data_ptr(), v_b=self.moments[3].data_ptr(),
            lr=cfg.lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=cfg.weight_decay,
            decoupled=int(cfg.optimizer == "adamw"), step=0)

    @staticmethod
    def _rewards(layout: str, batches: list[Any], rows: int) -> np.ndarray:
        """[L] float32 reward of each laid-out row (rows/groups layouts; zeros for the others)."""
        out = np.zeros(max(rows, 1), np.float32)
        for b in batches:
            if layout == "rows":
                out[b.start:b.end] = b.rewards.numpy()
            elif layout == "groups":  # b.rewards [G, m] padded; b.index [G, m] local rows
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

    def run(self, order: np.ndarray) -> float:
        """One step on each batch in `order`; returns the summed loss (the engines' interface)."""
        return float(self.steps(order).sum())

    def close(self) -> None:
        pass
