"""The sandbox as an ordinary (non-root) user: the user-namespace path.

CI and the dev machines run as root, which takes the setuid path; this test becomes an
unprivileged uid in a child process (after exposing the interpreter like the worker does, in
case it lives under /root) and checks that the sandbox still gets user/pid/net namespaces, that
the program cannot touch the user's own files, and that nothing is left running.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

import qprobe

SRC = str(Path(qprobe.__file__).resolve().parents[1])

CHILD = r"""
import json, os, sys
sys.path.insert(0, SRC)
from qprobe.sandbox import _isolation as w
w.unshare(w.CLONE_NEWNS)
w.mount("none", "/", None, w.MS_REC | w.MS_PRIVATE, None)
w.expose_python()
os.setgroups([])
os.setresgid(UID, UID, UID)
os.setresuid(UID, UID, UID)
os.environ["QPROBE_USERNS_SECRET"] = SECRET
from qprobe.sandbox import Sandbox, SandboxConfig
progs = [
    "assert 1 + 1 == 2\n",
    "import os\nos._exit(0)\nassert False\n",
    "import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=1)\n",
    "import os\nprint(dict(os.environ), os.getpid())\n",
    "import os\nerrs = 0\nfor f in (lambda: open(VICTIM, 'w'), lambda: os.remove(VICTIM)):\n"
    "    try:\n        f()\n    except OSError:\n        errs += 1\nassert errs == 2\n",
    "import subprocess\nsubprocess.Popen(['/bin/sh', '-c', 'sleep 1000; echo MARKER'], "
    "start_new_session=True)\n",
    "while True:\n    pass\n",
]
progs = [p.replace("VICTIM", repr(VICTIM)).replace("MARKER", MARKER) for p in progs]
with Sandbox(SandboxConfig(timeout=1, workers=2)) as sb:
    rep = sb.isolation()
    vs = sb.run_all(progs)
print(json.dumps({"uid": os.getuid(), "rep": rep, "verdicts": [v.to_dict() for v in vs]}))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="becoming another user needs root")
def test_sandbox_as_unprivileged_user(tmp_path):
    uid = 1_500_000_000 + secrets.randbelow(1_000_000)
    secret, marker = f"sk-{uuid.uuid4().hex}", f"qprobe-userns-{uuid.uuid4().hex}"
    home = Path(__file__).resolve().parent / f".userns-{uuid.uuid4().hex}"  # not under /tmp
    home.mkdir()
    try:
        victim = home / "mine.txt"
        victim.write_text("keep")
        os.chown(home, uid, uid)
        os.chown(victim, uid, uid)  # the user's own file: writable by the user, not by programs
        script = (
            f"SRC, UID, SECRET, MARKER, VICTIM = {SRC!r}, {uid}, {secret!r}, {marker!r}, "
            f"{str(victim)!r}\n" + CHILD
        )
        proc = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd="/"
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        assert victim.read_text() == "keep"
    finally:
        for p in home.iterdir():
            p.unlink()
        home.rmdir()
    assert out["uid"] == uid
    rep = out["rep"]
    assert not rep["root"] and rep["userns"] and rep["netns"] and rep["pidns"], rep
    assert rep["readonly_fs"] and rep["tmpfs"], rep
    statuses = [v["status"] for v in out["verdicts"]]
    assert statuses == ["passed", "error", "error", "passed", "passed", "passed", "timeout"], out
    assert secret not in out["verdicts"][3]["output"]
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                text = (d / "cmdline").read_bytes()
                owner = d.stat().st_uid
            except OSError:
                continue
            assert marker.encode() not in text, f"leftover process {d.name}"
            assert owner != uid or d.name == str(os.getpid()), f"leftover process {d.name}"
