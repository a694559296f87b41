"""Linux isolation for the sandbox worker: namespaces, mounts, prctl, and the setup done once
per worker (`enter_namespaces`: which isolation this kernel allows, and entering it).

Used only by `_worker.py`, which loads this file by path (it runs as `python -I`, so no folder
of ours is on sys.path). Like the worker it imports only the standard library.
"""

import ctypes
import json
import os
import sys

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

libc = ctypes.CDLL(None, use_errno=True)
_real_exit = os._exit


def _check(ret: int, what: str) -> None:
    if ret != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def unshare(flags: int) -> None:
    _check(libc.unshare(ctypes.c_int(flags)), "unshare")


def mount(src: str, target: str, fstype, flags: int, data) -> None:
    fs, opts = fstype.encode() if fstype else None, data.encode() if data else None
    _check(libc.mount(src.encode(), target.encode(), fs, ctypes.c_ulong(flags), opts),
           f"mount {target}")  # fmt: skip


def prctl(option: int, arg: int) -> None:
    _check(libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0), "prctl")


def write_file(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def mount_proc() -> None:
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)


def mount_tmp(cfg: dict, uid: int, userns: bool) -> None:
    size = int(cfg.get("tmpfs_mb", 64))
    owner = ",mode=1777" if userns else f",uid={uid},gid={uid},mode=0700"
    mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"size={size}m{owner}")
    for other in ("/var/tmp", "/dev/shm", "/run/lock"):
        if os.path.isdir(other):
            try:
                mount("tmpfs", other, "tmpfs", MS_NOSUID | MS_NODEV, f"size={size}m,mode=1777")
            except OSError:
                pass


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
            write_file("/proc/self/setgroups", "deny")
            write_file("/proc/self/uid_map", f"0 {uid} 1")
            write_file("/proc/self/gid_map", f"0 {gid} 1")
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
    _probe_program_namespaces(cfg, rep)
    rep["uid_drop"] = True  # root: setuid to a per-slot uid; userns: a nested user namespace
    rep["no_new_privs"] = True
    return rep


def _probe_program_namespaces(cfg: dict, rep: dict) -> None:
    """Try the per-program namespaces (pid, mount, /proc, tmpfs) once, in a throwaway child,
    and record in `rep` which work."""
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
                for key, fn in (("procfs", mount_proc), ("tmpfs", lambda: mount_tmp(cfg, 1, rep["userns"]))):
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
