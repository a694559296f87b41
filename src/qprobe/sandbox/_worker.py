"""The sandbox worker ("zygote"): the only process that ever runs generated code, in children.

Started by `qprobe.sandbox.pool` as `python -I _worker.py CONFIG_JSON` with a scrubbed
environment. It imports only the standard library (never qprobe, numpy or torch), so a forked
child starts with a small, secret-free address space. At start it enters new network, IPC and
UTS namespaces (plus a user namespace when not root; `_isolation.py`, the Linux side of the
isolation) and pre-imports common modules; then, per
program, it forks a supervisor that makes a fresh PID + mount namespace, mounts a fresh /proc and
a size-limited tmpfs work dir, and forks the program as an unprivileged uid under rlimits.

Process tree for one program (pid namespaces available):

    worker (root, netns)            reads jobs on stdin, answers on stdout, one job at a time
     └─ supervisor S                 timeout, output capture, verdict; kills P on timeout
         └─ init P (pid 1 of a new pid ns)   mounts /proc + tmpfs, reaps; when P exits the kernel
             └─ program C (uid U)            kills every process left in the namespace

The pass is unforgeable by ending early: S gives C a random nonce; C writes it to a private pipe
only after `exec` of the whole program (the tests) has returned. An early `os._exit(0)`,
`sys.exit(0)`, atexit hook, closed stdout or printed marker never produces the nonce.

Protocol with the host: 4-byte big-endian length + UTF-8 JSON, both directions. The first message
from the worker is {"hello": report} describing the isolation in effect.
"""

import builtins
import ctypes
import errno
import gc
import importlib.util
import json
import os
import random
import resource
import select
import shutil
import signal
import struct
import sys
import tempfile
import time
import traceback

SETUP_FAILED = 125  # exit code of P/C when the sandbox could not be set up (not the program)
_AssertionError = AssertionError  # captured before any program can rebind builtins

_real_exit = os._exit
_write = os.write


def _load_isolation():
    """`_isolation.py` beside this file, loaded by path (`python -I` puts no folder of ours on
    sys.path, and importing it through the qprobe package would import qprobe)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_isolation.py")
    spec = importlib.util.spec_from_file_location("_qprobe_sandbox_isolation", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


iso = _load_isolation()
CLONE_NEWIPC, CLONE_NEWNS, CLONE_NEWPID, CLONE_NEWUSER = (
    iso.CLONE_NEWIPC, iso.CLONE_NEWNS, iso.CLONE_NEWPID, iso.CLONE_NEWUSER)
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS, PR_SET_DUMPABLE = (
    iso.PR_SET_PDEATHSIG, iso.PR_SET_NO_NEW_PRIVS, iso.PR_SET_DUMPABLE)
libc, unshare, prctl, write_file = iso.libc, iso.unshare, iso.prctl, iso.write_file


# ---------------------------------------------------------------- framing


def read_exact(fd: int, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return buf


def recv(fd: int) -> dict:
    (n,) = struct.unpack(">I", read_exact(fd, 4))
    return json.loads(read_exact(fd, n))


def send(fd: int, msg: dict) -> None:
    data = json.dumps(msg).encode()
    data = struct.pack(">I", len(data)) + data
    while data:
        data = data[os.write(fd, data) :]


# ---------------------------------------- setup (once per worker; the namespaces: _isolation)


def preload(modules: list) -> None:
    """Import what generated code commonly imports, so each forked program gets it for free."""
    for name in modules:
        try:
            __import__(name)
        except Exception:
            pass


# ---------------------------------------------------------------- per program


def _limits(job: dict) -> None:
    cpu = int(job["timeout"]) + 1
    mem = int(job["memory_mb"]) << 20
    for res, soft, hard in (
        (resource.RLIMIT_CPU, cpu, cpu + 1),
        (resource.RLIMIT_AS, mem, mem),
        (resource.RLIMIT_NPROC, job["max_processes"], job["max_processes"]),
        (resource.RLIMIT_FSIZE, int(job["file_size_mb"]) << 20, int(job["file_size_mb"]) << 20),
        (resource.RLIMIT_NOFILE, job["max_open_files"], job["max_open_files"]),
        (resource.RLIMIT_CORE, 0, 0),
    ):
        resource.setrlimit(res, (soft, hard))


def _drop_privileges(rep: dict, uid: int) -> None:
    if os.geteuid() == 0 and not rep["userns"]:
        os.setgroups([])
        try:
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
        except OSError:  # uid outside this machine's range: fall back to nobody
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
    elif rep["userns"]:
        # A nested user namespace owns nothing, so the capabilities we hold in it are useless.
        unshare(CLONE_NEWUSER)
        write_file("/proc/self/setgroups", "deny")
        write_file("/proc/self/uid_map", "1000 0 1")
        write_file("/proc/self/gid_map", "1000 0 1")
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    prctl(PR_SET_DUMPABLE, 0)


def program_main(job: dict, rep: dict, out_w: int, res_w: int, start: bytes, nonce: bytes):
    """C: set up the process, run the program, and prove completion. Never returns."""
    try:
        os.setsid()
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out_w, 1)
        os.dup2(out_w, 2)
        fd = random.randrange(16, job["max_open_files"] - 1)  # the private completion pipe
        os.dup2(res_w, fd)
        os.closerange(3, fd)
        os.closerange(fd + 1, 1 << 20)
        if not rep["mountns"] or not rep["tmpfs"]:
            os.chdir(job["workdir"])
        else:
            os.chdir("/tmp")
        os.environ.clear()
        os.environ.update(
            {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": os.getcwd(), "LANG": "C.UTF-8"}
        )
        _limits(job)
        if rep["uid_drop"]:
            _drop_privileges(rep, job["uid"])
        code = job["code"]
        del job
    except BaseException as e:
        try:
            _write(res_w, json.dumps({"setup_error": repr(e)}).encode())
        finally:
            _real_exit(SETUP_FAILED)
    _run(code, fd, start, nonce)


def _run(code: str, fd: int, start: bytes, nonce: bytes):
    write, exit_ = _write, _real_exit
    write(fd, start)
    status = "error"
    try:
        compiled = compile(code, "<program>", "exec")
        del code
        exec(compiled, {"__name__": "__main__", "__builtins__": builtins})
    except _AssertionError as e:
        status, exc = "failed", e
    except BaseException as e:  # SystemExit and KeyboardInterrupt included: the tests did not finish
        exc = e
    else:
        write(fd, nonce)  # only reached when the whole program, tests included, has returned
        del nonce
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            exit_(0)
    del nonce
    try:
        line = traceback.format_exception_only(type(exc), exc)[-1].strip()
        write(fd, b"\n" + json.dumps({"status": status, "detail": line[:500]}).encode())
        traceback.print_exception(type(exc), exc, exc.__traceback__.tb_next, file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        exit_(1)


def init_main(job: dict, rep: dict, out_w: int, res_w: int, start: bytes, nonce: bytes):
    """P: pid 1 of the program's namespace (or the program itself without pid namespaces)."""
    try:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if rep["mountns"] and rep["pidns"] and rep["procfs"]:
            iso.mount_proc()
        if rep["mountns"] and rep["tmpfs"]:
            iso.mount_tmp(job, job["uid"], rep["userns"])
    except BaseException as e:
        _write(res_w, json.dumps({"setup_error": repr(e)}).encode())
        _real_exit(SETUP_FAILED)
    if not rep["pidns"]:
        program_main(job, rep, out_w, res_w, start, nonce)
    child = os.fork()
    if child == 0:
        program_main(job, rep, out_w, res_w, start, nonce)
    os.close(out_w)
    os.close(res_w)
    while True:  # as init we also reap orphans; leaving kills the rest of the namespace
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            _real_exit(SETUP_FAILED)
        if pid == child:
            if os.WIFSIGNALED(status):
                _real_exit(128 + os.WTERMSIG(status))
            _real_exit(os.WEXITSTATUS(status))


def spawn(flags: int) -> int:
    """fork(), but the child starts in new namespaces (`clone`), so the worker need not unshare.

    unshare(CLONE_NEWPID) works once per process; cloning with the flag gives every program a
    fresh pid namespace straight from the long-lived worker, saving a fork per program. The
    worker is single-threaded, so CPython's own before/after-fork hooks are all that is needed.
    """
    if not flags or not _SYS_CLONE:
        pid = os.fork()
        if pid == 0 and flags:
            unshare(flags)
        return pid
    api = ctypes.pythonapi
    api.PyOS_BeforeFork()
    pid = libc.syscall(_SYS_CLONE, ctypes.c_ulong(flags | signal.SIGCHLD), 0, 0, 0, 0)
    if pid == 0:
        api.PyOS_AfterFork_Child()
        return 0
    err = ctypes.get_errno()
    api.PyOS_AfterFork_Parent()
    if pid < 0:
        raise OSError(err, f"clone: {os.strerror(err)}")
    return pid


_SYS_CLONE = {"x86_64": 56, "aarch64": 220}.get(os.uname().machine)


class _Capture:
    """What a program sends back: its output (the first `limit` bytes kept, all counted) and
    its private result pipe (the first 64 kB)."""

    def __init__(self, out_fd: int, limit: int) -> None:
        self.out_fd, self.limit = out_fd, limit
        self.out, self.out_total, self.res = bytearray(), 0, bytearray()

    def add(self, fd: int, data: bytes) -> None:
        if fd == self.out_fd:
            self.out_total += len(data)
            if len(self.out) < self.limit:
                self.out += data[: self.limit - len(self.out)]
        elif len(self.res) < 1 << 16:
            self.res += data


def supervise(job: dict, rep: dict) -> dict:
    """Run one program under a deadline (in the worker); return its verdict as a dict."""
    start, nonce = os.urandom(16), os.urandom(16)
    t0 = time.monotonic()
    workdir = None
    flags = (CLONE_NEWPID if rep["pidns"] else 0) | (CLONE_NEWNS if rep["mountns"] else 0)
    flags |= CLONE_NEWIPC if rep["ipcns"] else 0  # SysV shm/semaphores die with the program
    if not (rep["mountns"] and rep["tmpfs"]):
        workdir = tempfile.mkdtemp(prefix="qprobe-sandbox-")
        if os.geteuid() == 0 and not rep["userns"]:
            os.chown(workdir, job["uid"], job["uid"])
    job["workdir"] = workdir
    out_r, out_w = os.pipe()
    res_r, res_w = os.pipe()
    gc.freeze()  # children then never touch (copy) the worker's objects during collections
    pid = spawn(flags)
    if pid == 0:
        os.close(out_r)
        os.close(res_r)
        try:
            init_main(job, rep, out_w, res_w, start, nonce)
        finally:
            _real_exit(SETUP_FAILED)
    os.close(out_w)
    os.close(res_w)
    cap = _Capture(out_r, int(job["output_limit"]))
    pid, status, timed_out, open_fds = _watch(pid, (out_r, res_r), t0 + float(job["timeout"]), cap)
    if timed_out or not rep["pidns"]:
        for kill in (lambda: os.kill(pid, signal.SIGKILL), lambda: os.killpg(pid, signal.SIGKILL)):
            try:
                if pid is not None:
                    kill()
            except OSError:
                pass
    if pid is not None:
        _, status = os.waitpid(pid, 0)
    if not rep["pidns"]:
        _kill_uid(rep, job["uid"])
    # Everything in the namespace is gone now; drain what is left in the pipes.
    for fd in open_fds:
        os.set_blocking(fd, False)
        for _ in range(64):
            try:
                data = os.read(fd, 1 << 16)
            except BlockingIOError:
                break
            if not data:
                break
            cap.add(fd, data)
    duration = time.monotonic() - t0
    for fd in (out_r, res_r):
        os.close(fd)
    if workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    verdict = _verdict(bytes(cap.res), start, nonce, status, timed_out, job)
    verdict.update(duration_s=round(duration, 4), output=cap.out.decode("utf-8", "replace"),
                   output_bytes=cap.out_total)  # fmt: skip
    return verdict


def _watch(pid: int, fds: tuple, deadline: float, cap: _Capture) -> tuple:
    """Read the program's pipes into `cap` until it exits or the deadline passes.

    Returns (pid, or None once reaped; wait status; timed out; the fds still open)."""
    timed_out, exited, status = False, False, 0
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    poller = select.poll()
    for fd in fds + ((pidfd,) if pidfd is not None else ()):
        poller.register(fd, select.POLLIN)
    open_fds = set(fds)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
            break
        timeout_ms = left * 1000 if pidfd is not None else min(left * 1000, 10)
        for fd, _ in poller.poll(timeout_ms):
            if fd == pidfd:
                exited = True
                continue
            data = os.read(fd, 1 << 16)
            if not data:
                poller.unregister(fd)
                open_fds.discard(fd)
            else:
                cap.add(fd, data)
        if pidfd is None:
            p, status = os.waitpid(pid, os.WNOHANG)
            exited = p == pid
            if exited:
                pid = None
        if exited:
            break
    if pidfd is not None:
        os.close(pidfd)
    return pid, status, timed_out, open_fds


def _kill_uid(rep: dict, uid: int) -> None:
    """Without pid namespaces: kill every process of the slot uid (detached grandchildren too)."""
    if os.geteuid() != 0 or rep["userns"]:
        return
    pid = os.fork()
    if pid == 0:
        try:
            os.setresuid(uid, uid, uid)
            os.kill(-1, signal.SIGKILL)
        finally:
            _real_exit(0)
    os.waitpid(pid, 0)


def _verdict(res: bytes, start: bytes, nonce: bytes, status: int, timed_out: bool, job) -> dict:
    if nonce in res:
        return {"status": "passed", "detail": ""}
    if start not in res:
        if timed_out:
            return {"status": "sandbox_error", "detail": "sandbox setup timed out"}
        detail = "sandbox setup failed"
        for line in res.splitlines():
            try:
                detail += ": " + json.loads(line)["setup_error"]
            except (ValueError, KeyError, TypeError):
                pass
        return {"status": "sandbox_error", "detail": detail}
    if timed_out:
        return {"status": "timeout", "detail": f"timed out after {job['timeout']} s"}
    reported = None
    for line in res.split(b"\n"):
        try:
            msg = json.loads(line)
            if isinstance(msg, dict) and msg.get("status") in ("failed", "error"):
                reported = msg
        except ValueError:
            pass
    code = os.waitstatus_to_exitcode(status) if status else 0
    if code > 128:
        code = -(code - 128)
    if code < 0:
        sig = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
        if -code == signal.SIGXCPU:
            return {"status": "timeout", "detail": "cpu time limit exceeded"}
        return {"status": "error", "detail": f"killed by signal {sig}"}
    if reported:
        return {"status": reported["status"], "detail": str(reported.get("detail", ""))}
    return {"status": "error", "detail": f"exited with code {code} before the tests finished"}


# ---------------------------------------------------------------- main loop


def main() -> None:
    cfg = json.loads(sys.argv[1])
    inp = os.dup(0)
    outp = os.dup(1)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)  # stray prints must never corrupt the protocol
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    rep = iso.enter_namespaces(cfg)
    preload(cfg.get("preload", []))
    send(outp, {"hello": rep})
    while True:
        try:
            job = recv(inp)
        except EOFError:
            break
        try:
            verdict = supervise(job, rep)
        except Exception as e:  # a failure of the sandbox, never of the program
            verdict = {"status": "sandbox_error", "detail": f"supervisor: {e!r}", "output": "",
                       "output_bytes": 0, "duration_s": 0.0}  # fmt: skip
        verdict["id"] = job.get("id")
        try:
            send(outp, verdict)
        except OSError as e:
            if e.errno == errno.EPIPE:
                break
            raise


if __name__ == "__main__":
    main()
