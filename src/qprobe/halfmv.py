"""float16-row matrix-vector kernels for the probe trainer (halfmv.c), built on first use.

`kernels()` returns the two loops of halfmv.c, or None when they cannot be used here: no C
compiler, a CPU without AVX2/FMA/F16C (or not x86-64), or `QPROBE_HALFMV=0` in the environment.
The trainer then upcasts each block with torch instead: the same maths, slower. The library is
compiled once per source version into `$QPROBE_CACHE/kernels/` (about a second) and loaded with
ctypes; a ctypes call releases the GIL, so two training threads run the loops at the same time.
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

import torch

SOURCE = Path(__file__).with_name("halfmv.c")
_P, _N = ctypes.c_void_p, ctypes.c_int64
why_not: str | None = None  # why kernels() returned None (for the trainer's log and the tests)


class Kernels:
    """The compiled loops; arguments are contiguous tensors (float16 rows, float32 vectors)."""

    def __init__(self, lib: ctypes.CDLL):
        self._dot, self._add = lib.qprobe_dot_rows, lib.qprobe_add_rows
        self._dot.argtypes = [_P, _N, _N, _P, _P, _P]
        self._add.argtypes = [_P, _N, _N, _P, _P]
        self._dot.restype = self._add.restype = None

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
        raise ValueError(f"halfmv: bad arguments {x.dtype} {tuple(x.shape)}, "
                         f"{vd.dtype} {tuple(vd.shape)}, {vr.dtype} {tuple(vr.shape)}")


def _build(out: Path) -> None:
    """Compile halfmv.c into the shared library `out` (atomically: a temp file, then rename)."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (cc/gcc) on PATH")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        run = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", tmp, str(SOURCE)],
                             capture_output=True, text=True, timeout=120)
        if run.returncode != 0:
            raise RuntimeError(f"{cc} failed: {run.stderr.strip().splitlines()[-1:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.lru_cache(maxsize=1)
def kernels() -> Kernels | None:
    """The compiled kernels, or None (the reason is in `halfmv.why_not`)."""
    global why_not
    from qprobe.models import cache_root

    if os.environ.get("QPROBE_HALFMV", "1") == "0":
        why_not = "switched off by QPROBE_HALFMV=0"
        return None
    if platform.machine().lower() not in ("x86_64", "amd64"):
        why_not = f"needs an x86-64 CPU, this is {platform.machine()}"
        return None
    tag = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    lib_path = cache_root() / "kernels" / f"halfmv-{tag}.so"
    try:
        if not lib_path.exists():
            _build(lib_path)
        lib = ctypes.CDLL(str(lib_path))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        why_not = f"could not build or load {lib_path.name}: {e}"
        return None
    if not lib.qprobe_halfmv_supported():
        why_not = "the CPU lacks AVX2, FMA or F16C"
        return None
    why_not = None
    return Kernels(lib)
