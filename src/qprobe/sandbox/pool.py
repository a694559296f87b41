"""Host side of the sandbox: a pool of pre-started worker processes, one job at a time each.

Each worker (`_worker.py`) is a separate `python -I` process started with a scrubbed environment;
it enters the namespaces once and then forks one fresh, isolated child per program (see the
worker's docstring for the process tree). This module only talks to the workers over pipes: it
never imports, compiles or executes generated code itself.
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qprobe.errors import QProbeError

WORKER = Path(__file__).with_name("_worker.py")
STATUSES = ("passed", "failed", "timeout", "error", "sandbox_error")

# Imported once in each worker so that forked programs get them without paying for the import.
PRELOAD = [
    "math", "re", "collections", "itertools", "functools", "heapq", "bisect", "string",
    "typing", "random", "statistics", "fractions", "decimal", "datetime", "copy", "operator",
    "hashlib", "json", "cmath", "array", "dataclasses", "enum", "sys", "os", "time",
]  # fmt: skip


@dataclass
class SandboxConfig:
    """Limits for each program. Defaults follow the paper (3 s per program)."""

    timeout: float = field(default=3.0, metadata={"help": "wall-clock seconds per program"})
    memory_mb: int = field(default=2048, metadata={"help": "address-space limit (RLIMIT_AS)"})
    file_size_mb: int = field(default=16, metadata={"help": "largest file a program may write"})
    tmpfs_mb: int = field(default=64, metadata={"help": "size of the private /tmp work dir"})
    max_processes: int = field(default=64, metadata={"help": "RLIMIT_NPROC for the program's uid"})
    max_open_files: int = field(default=256, metadata={"help": "RLIMIT_NOFILE"})
    output_limit: int = field(
        default=16384, metadata={"help": "bytes of stdout+stderr kept (the rest is counted)"}
    )
    workers: int = field(
        default=0, metadata={"help": "worker processes; 0 = 2 x CPU cores (programs often wait)"}
    )
    isolation: str = field(
        default="strongest",
        metadata={"help": "'strongest' (use what the kernel allows), 'require' (refuse to run "
                  "without user/pid/net namespaces or root), or 'none' (rlimits only; tests)"},
    )  # fmt: skip

    def __post_init__(self) -> None:
        if self.isolation not in ("strongest", "require", "none"):
            raise QProbeError(
                f"sandbox: isolation must be strongest, require or none, not {self.isolation!r}"
            )
        if not self.timeout > 0:
            raise QProbeError(f"sandbox: timeout must be > 0 seconds, got {self.timeout}")
        for name in ("memory_mb", "file_size_mb", "tmpfs_mb", "max_processes", "max_open_files"):
            if getattr(self, name) < 1:
                raise QProbeError(f"sandbox: {name} must be >= 1, got {getattr(self, name)}")
        if self.max_open_files < 32:
            raise QProbeError("sandbox: max_open_files must be >= 32 (Python needs a few)")
        if self.workers < 0:
            raise QProbeError(f"sandbox: workers must be >= 0, got {self.workers}")


@dataclass
class Verdict:
    """What happened to one program. `passed` only when the tests provably ran to the end."""

    status: str  # passed | failed | timeout | error | sandbox_error
    detail: str = ""
    output: str = ""  # captured stdout+stderr, truncated to SandboxConfig.output_limit
    output_bytes: int = 0
    duration_s: float = 0.0

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    @property
    def reward(self) -> float | None:
        """1.0 passed, 0.0 any failure of the program, None when the sandbox itself failed."""
        if self.status == "sandbox_error":
            return None
        return 1.0 if self.passed else 0.0

    def marked(self, mark: str) -> Any:
        """The JSON value a program printed after `mark` on its last line starting with it,
        when it ran to the end (`passed`); None otherwise, or when that value does not parse.
        How the trusted suffixes of the verifier's and gsm8k-pal's programs report back."""
        if not self.passed:
            return None
        for line in reversed(self.output.splitlines()):
            if line.startswith(mark):
                try:
                    return json.loads(line[len(mark):])
                except ValueError:
                    return None
        return None

    def to_dict(self) -> dict:
        return asdict(self)


def _send(stream, msg: dict) -> None:
    data = json.dumps(msg).encode()
    stream.write(struct.pack(">I", len(data)) + data)
    stream.flush()


def _recv(stream) -> dict:
    head = stream.read(4)
    if len(head) < 4:
        raise EOFError
    (n,) = struct.unpack(">I", head)
    data = stream.read(n)
    if len(data) < n:
        raise EOFError
    return json.loads(data)


class _Worker:
    """One worker process and the host thread that feeds it."""

    def __init__(self, config: SandboxConfig, uid: int):
        self.config, self.uid = config, uid
        self.proc: subprocess.Popen | None = None
        self.report: dict = {}

    def start(self) -> None:
        cfg = {"isolation": self.config.isolation, "tmpfs_mb": self.config.tmpfs_mb,
               "preload": PRELOAD}  # fmt: skip
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-B", str(WORKER), json.dumps(cfg)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            env={"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"},  # no secrets
            cwd="/",
            close_fds=True,
        )
        try:
            self.report = _recv(self.proc.stdout)["hello"]
        except (EOFError, KeyError, ValueError) as e:
            self.stop()
            raise QProbeError(f"sandbox: worker failed to start: {self._stderr_tail()}") from e

    def _stderr_tail(self) -> str:
        try:
            self.stderr.seek(0)
            return self.stderr.read()[-500:].decode("utf-8", "replace").strip() or "no output"
        except (OSError, ValueError):
            return "no output"

    def run(self, job: dict) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        try:
            _send(self.proc.stdin, job)
            return _recv(self.proc.stdout)
        except (EOFError, OSError, ValueError):
            detail = f"sandbox worker died: {self._stderr_tail()}"
            self.stop()
            return {"status": "sandbox_error", "detail": detail}

    def stop(self) -> None:
        if self.proc is not None:
            for stream in (self.proc.stdin, self.proc.stdout):
                try:
                    stream.close()
                except OSError:
                    pass
            try:
                self.proc.wait(timeout=self.config.timeout + 5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


class Sandbox:
    """Runs untrusted programs, one fresh isolated process each, on a pool of workers.

    with Sandbox(SandboxConfig(timeout=3)) as sb:
        for i, verdict in sb.map(programs):   # streams (index, Verdict) as they finish
            ...
    """

    def __init__(self, config: SandboxConfig | None = None):
        self.config = config or SandboxConfig()
        n = self.config.workers or 2 * (os.cpu_count() or 1)
        # A random block of uids per pool: concurrent pools and programs never share a uid,
        # so RLIMIT_NPROC and signals cannot cross between them.
        base = 1_000_000 + secrets.randbelow(1_000_000) * 256
        self._workers = [_Worker(self.config, base + i) for i in range(n)]
        self._jobs: queue.Queue = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.RLock()
        self._started = False

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _ensure_started(self) -> None:
        with self._lock:
            if self._started:
                return
            # One long-lived thread per worker starts it and feeds it. Workers die with the
            # thread that started them (PR_SET_PDEATHSIG), so that thread must outlive the jobs.
            ready: queue.Queue = queue.Queue()
            self._threads = [
                threading.Thread(target=self._serve, args=(w, ready), daemon=True)
                for w in self._workers
            ]
            for t in self._threads:
                t.start()
            errors = [e for e in (ready.get() for _ in self._workers) if e is not None]
            self._started = True
            if errors:
                self.close()
                raise errors[0]
            rep = self._workers[0].report
            if self.config.isolation == "require" and not isolation_ok(rep):
                self.close()
                why = "; ".join(rep.get("errors", [])) or "need root or user namespaces"
                raise QProbeError(f"sandbox: strong isolation required but unavailable: {why}")

    def _serve(self, worker: _Worker, ready: queue.Queue) -> None:
        try:
            worker.start()
            ready.put(None)
        except Exception as e:
            ready.put(e)
            return
        c = self.config
        limits = {"timeout": c.timeout, "memory_mb": c.memory_mb, "file_size_mb": c.file_size_mb,
                  "tmpfs_mb": c.tmpfs_mb, "max_processes": c.max_processes,
                  "max_open_files": c.max_open_files, "output_limit": c.output_limit}  # fmt: skip
        while True:
            item = self._jobs.get()
            if item is None:
                worker.stop()
                return
            results, i, code = item
            try:
                res = worker.run({"id": i, "code": code, "uid": worker.uid, **limits})
            except Exception as e:  # a bug here must surface as a sandbox error, not a hang
                res = {"status": "sandbox_error", "detail": f"sandbox: {e!r}"}
            results.put((i, res))

    def isolation(self) -> dict:
        """What isolation the workers run with (namespaces, uid drop, ...)."""
        self._ensure_started()
        return dict(self._workers[0].report)

    def run(self, program: str) -> Verdict:
        return next(self.map([program]))[1]

    def run_all(self, programs: Iterable[str]) -> list[Verdict]:
        return [v for _, v in self.map(programs, ordered=True)]

    def map(self, programs: Iterable[str], ordered: bool = False) -> Iterator[tuple[int, Verdict]]:
        """Run every program; yield (index, Verdict) as each finishes (or in input order)."""
        self._ensure_started()
        results: queue.Queue = queue.Queue()
        n = 0
        for i, code in enumerate(programs):
            self._jobs.put((results, i, code))
            n += 1
        pending: dict[int, Verdict] = {}
        nxt = 0
        for _ in range(n):
            i, res = results.get()
            v = Verdict(
                status=res.get("status", "sandbox_error"),
                detail=res.get("detail", ""),
                output=res.get("output", ""),
                output_bytes=res.get("output_bytes", 0),
                duration_s=res.get("duration_s", 0.0),
            )
            if v.status not in STATUSES:
                v = Verdict("sandbox_error", f"unknown status {v.status!r}")
            if not ordered:
                yield i, v
                continue
            pending[i] = v
            while nxt in pending:
                yield nxt, pending.pop(nxt)
                nxt += 1

    def close(self) -> None:
        """Stop the workers (each finishes its current program first)."""
        with self._lock:
            if not self._started:
                return
            for _ in self._threads:
                self._jobs.put(None)
            for t in self._threads:
                t.join()
            self._threads = []
            self._started = False


def isolation_ok(rep: dict) -> bool:
    """True when programs get their own network, pid namespace and an unprivileged identity."""
    return bool(rep.get("netns") and rep.get("pidns") and rep.get("uid_drop"))
