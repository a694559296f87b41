"""The sandbox worker ("zygote"): the only process that ever runs generated code, in children.

Started by `qprobe.sandbox.pool` as `python -I _worker.py CONFIG_JSON` with a scrubbed
environment. It imports only the standard library (never qprobe, numpy or torch), so a forked
child starts with a small, secret-free address space. At start it enters new network, IPC and
UTS namespaces (plus a user namespace when not root) and pre-imports common modules; then, per
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

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8
MS_RDONLY, MS_REMOUNT, MS_BIND = 1, 32, 4096
MS_REC, MS_PRIVATE = 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS, PR_SET_DUMPABLE = 1, 38, 4

SETUP_FAILED = 125  # exit code of P/C when the sandbox could not be set up (not the program)
_AssertionError = AssertionError  # captured before any program can rebind builtins

libc = ctypes.CDLL(None, use_errno=True)
_real_exit = os._exit
_write = os.write


def _check(ret: int, what: str) -> None:
    if ret != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def unshare(flags: int) -> None:
    _check(libc.unshare(ctypes.c_int(flags)), "unshare")


def mount(src: str, target: str, fstype, flags: int, data) -> None:
    _check(
        libc.mount(
            src.encode(),
            target.encode(),
            fstype.encode() if fstype else None,
            ctypes.c_ulong(flags),
            data.encode() if data else None,
        ),
        f"mount {target}",
    )


def prctl(option: int, arg: int) -> None:
    _check(libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0), "prctl")


def _write_file(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


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


# ---------------------------------------------------------------- setup (once per worker)


def enter_namespaces(cfg: dict) -> dict:
    """Enter the strongest namespaces this kernel allows; return what is in effect."""
    rep = {
        "root": os.geteuid() == 0,
        "userns": False,
        "netns": False,
        "ipcns": False,
        "utsns": False,
        "mountns": False,
        "pidns": False,
        "procfs": False,
        "tmpfs": False,
        "uid_drop": False,
        "no_new_privs": False,
        "readonly_fs": False,
        "errors": [],
    }
    if cfg.get("isolation") == "none":
        return rep
    if not rep["root"]:
        uid, gid = os.geteuid(), os.getegid()
        try:
            unshare(CLONE_NEWUSER)
            _write_file("/proc/self/setgroups", "deny")
            _write_file("/proc/self/uid_map", f"0 {uid} 1")
            _write_file("/proc/self/gid_map", f"0 {gid} 1")
            rep["userns"] = True
        except OSError as e:
            rep["errors"].append(f"user namespace: {e}")
            return rep
    for key, flag in (("netns", CLONE_NEWNET), ("ipcns", CLONE_NEWIPC), ("utsns", CLONE_NEWUTS)):
        try:
            unshare(flag)
            rep[key] = True
        except OSError as e:
            rep["errors"].append(f"{key}: {e}")
    try:
        unshare(CLONE_NEWNS)
        mount("none", "/", None, MS_REC | MS_PRIVATE, None)
        rep["mountns"] = True
    except OSError as e:
        rep["errors"].append(f"mount namespace: {e}")
    if rep["mountns"] and rep["root"]:
        try:
            rep["hidden"] = expose_python()
        except OSError as e:
            rep["errors"].append(f"exposing the interpreter: {e}")
    if rep["mountns"]:
        try:
            readonly_root()
            rep["readonly_fs"] = True
        except OSError as e:
            rep["errors"].append(f"read-only filesystem: {e}")
    # Probe the per-program namespaces once, in a throwaway child.
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(rfd)
        got = {}
        try:
            unshare(CLONE_NEWPID | (CLONE_NEWNS if rep["mountns"] else 0))
            got["pidns"] = True
            p = os.fork()
            if p == 0:
                res = {}
                for key, fn in (("procfs", _mount_proc), ("tmpfs", lambda: _mount_tmp(cfg, 1, rep["userns"]))):
                    try:
                        if rep["mountns"]:
                            fn()
                            res[key] = True
                    except OSError as e:
                        res[key + "_error"] = str(e)
                os.write(wfd, json.dumps(res).encode())
                _real_exit(0)
            os.waitpid(p, 0)
        except OSError as e:
            got["pidns_error"] = str(e)
        os.write(wfd, json.dumps(got).encode() + b"\n")
        _real_exit(0)
    os.close(wfd)
    raw = b""
    while chunk := os.read(rfd, 65536):
        raw += chunk
    os.close(rfd)
    os.waitpid(pid, 0)
    for part in raw.replace(b"}{", b"}\n{").splitlines():
        for k, v in json.loads(part).items():
            if k.endswith("_error"):
                rep["errors"].append(f"{k[:-6]}: {v}")
            else:
                rep[k] = v
    rep["uid_drop"] = True  # root: setuid to a per-slot uid; userns: a nested user namespace
    rep["no_new_privs"] = True
    return rep


def _others_can_enter(path: str) -> bool:
    return bool(os.stat(path).st_mode & 0o001)


def expose_python() -> list:
    """Make the interpreter readable by the unprivileged program uid, hiding what is around it.

    When Python lives in a private directory (e.g. /root/.pyenv with /root mode 0700), mount an
    empty read-only tmpfs over that directory and bind-mount only the interpreter's own folders
    back into it. Done once per worker; every program's mount namespace is a copy of this one.
    """
    needed = {os.path.realpath(p) for p in sys.path if p and os.path.isdir(p)}
    needed |= {os.path.realpath(p) for p in (sys.base_prefix, sys.base_exec_prefix)}
    needed.add(os.path.dirname(os.path.realpath(sys.executable)))
    hide: dict = {}
    for path in sorted(needed):
        parts = path.split("/")
        for i in range(2, len(parts) + 1):
            anc = "/".join(parts[:i])
            if not _others_can_enter(anc):
                hide.setdefault(anc, set()).add(path)
                break
    for top, paths in hide.items():
        # Keep only the outermost needed folders under this hidden one.
        keep = [p for p in sorted(paths) if not any(p.startswith(q + "/") for q in paths if q != p)]
        fds = [(p, os.open(p, os.O_PATH | os.O_DIRECTORY)) for p in keep]
        mount("tmpfs", top, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
        for p, fd in fds:
            os.makedirs(p, mode=0o755, exist_ok=True)
            for d in range(len(top.split("/")), len(p.split("/")) + 1):
                os.chmod("/".join(p.split("/")[:d]), 0o755)
            mount(f"/proc/self/fd/{fd}", p, None, MS_BIND | MS_REC, None)
            mount("none", p, None, MS_REMOUNT | MS_BIND | MS_RDONLY, None)
            os.close(fd)
        mount("none", top, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, None)
    return sorted(hide)


class _MountAttr(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in ("attr_set", "attr_clr", "propagation", "userns_fd")]


def readonly_root() -> None:
    """Make every mount read-only in this mount namespace (mount_setattr, Linux >= 5.12).

    Programs then write only to the fresh tmpfs mounted per program (/tmp, /dev/shm, ...). This
    matters most without root: there the program's uid is the user's own uid, so without it a
    program could modify the user's files.
    """
    attr = _MountAttr(attr_set=0x1)  # MOUNT_ATTR_RDONLY
    at_fdcwd, at_recursive, sys_mount_setattr = -100, 0x8000, 442
    ret = libc.syscall(
        sys_mount_setattr, at_fdcwd, b"/", at_recursive, ctypes.byref(attr), ctypes.sizeof(attr)
    )
    _check(ret, "mount_setattr /")


def preload(modules: list) -> None:
    """Import what generated code commonly imports, so each forked program gets it for free."""
    for name in modules:
        try:
            __import__(name)
        except Exception:
            pass


# ---------------------------------------------------------------- per program


def _mount_proc() -> None:
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)


def _mount_tmp(cfg: dict, uid: int, userns: bool) -> None:
    size = int(cfg.get("tmpfs_mb", 64))
    owner = ",mode=1777" if userns else f",uid={uid},gid={uid},mode=0700"
    mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"size={size}m{owner}")
    for other in ("/var/tmp", "/dev/shm", "/run/lock"):
        if os.path.isdir(other):
            try:
                mount("tmpfs", other, "tmpfs", MS_NOSUID | MS_NODEV, f"size={size}m,mode=1777")
            except OSError:
                pass


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
        _write_file("/proc/self/setgroups", "deny")
        _write_file("/proc/self/uid_map", "1000 0 1")
        _write_file("/proc/self/gid_map", "1000 0 1")
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
            _mount_proc()
        if rep["mountns"] and rep["tmpfs"]:
            _mount_tmp(job, job["uid"], rep["userns"])
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
    out, out_total, res = bytearray(), 0, bytearray()
    limit = int(job["output_limit"])
    timed_out, exited, status = False, False, 0
    deadline = t0 + float(job["timeout"])
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    poller = select.poll()
    for fd in (out_r, res_r) + ((pidfd,) if pidfd is not None else ()):
        poller.register(fd, select.POLLIN)
    open_fds = {out_r, res_r}
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
            elif fd == out_r:
                out_total += len(data)
                if len(out) < limit:
                    out += data[: limit - len(out)]
            elif len(res) < 1 << 16:
                res += data
        if pidfd is None:
            p, status = os.waitpid(pid, os.WNOHANG)
            exited = p == pid
            if exited:
                pid = None
        if exited:
            break
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
    for fd in list(open_fds):
        os.set_blocking(fd, False)
        for _ in range(64):
            try:
                data = os.read(fd, 1 << 16)
            except BlockingIOError:
                break
            if not data:
                break
            if fd == out_r:
                out_total += len(data)
                if len(out) < limit:
                    out += data[: limit - len(out)]
            elif len(res) < 1 << 16:
                res += data
    duration = time.monotonic() - t0
    for fd in (out_r, res_r, pidfd):
        if fd is not None:
            os.close(fd)
    if workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    verdict = _verdict(bytes(res), start, nonce, status, timed_out, job)
    verdict.update(
        duration_s=round(duration, 4),
        output=out.decode("utf-8", "replace"),
        output_bytes=out_total,
    )
    return verdict


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
    rep = enter_namespaces(cfg)
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
