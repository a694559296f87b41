"""Hostile programs through the sandbox: each checks the verdict, that the host is unharmed and
that nothing is left running (no process of the pool's program uids, no process with the case's
unique marker)."""

from __future__ import annotations

import os
import socket
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from qprobe.sandbox import Sandbox, SandboxConfig, isolation_ok

TIMEOUT = 1.0


@pytest.fixture(scope="module")
def sb():
    with Sandbox(SandboxConfig(timeout=TIMEOUT, memory_mb=512, workers=2)) as box:
        yield box


def _procs() -> list[tuple[int, str, set[int]]]:
    """(pid, cmdline+environ, uids) of every process on the machine (we are root)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            text = (d / "cmdline").read_bytes() + b"\0" + (d / "environ").read_bytes()
            uids = {
                int(x)
                for line in (d / "status").read_text().splitlines()
                if line.startswith("Uid:")
                for x in line.split()[1:]
            }
        except OSError:
            continue
        out.append((int(d.name), text.decode("utf-8", "replace"), uids))
    return out


def assert_nothing_left(sb: Sandbox, marker: str | None = None) -> None:
    uids = {w.uid for w in sb._workers} | {65534}
    for pid, text, puids in _procs():
        assert not (puids & uids), f"process {pid} of a program uid is still running: {text!r}"
        if marker:
            assert marker not in text, f"process {pid} with the case's marker is still running"


def run(sb: Sandbox, code: str, marker: str | None = None):
    v = sb.run(textwrap.dedent(code))
    assert_nothing_left(sb, marker)
    return v


def test_isolation_in_effect(sb):
    if os.geteuid() != 0:  # the test machines and CI run as root: there everything must be on
        pytest.skip("full isolation (namespaces, own /proc, tmpfs) needs root; not root here")
    rep = sb.isolation()
    assert isolation_ok(rep), rep
    assert rep["mountns"] and rep["procfs"] and rep["tmpfs"], rep


def test_pass_fail_error(sb):
    assert run(sb, "x = 2\nassert x * 2 == 4\n").status == "passed"
    v = run(sb, "assert 1 == 2, 'nope'\n")
    assert (v.status, v.detail) == ("failed", "AssertionError: nope")
    v = run(sb, "1 / 0\n")
    assert v.status == "error" and "ZeroDivisionError" in v.detail
    assert run(sb, "def f(:\n").status == "error"
    v = run(sb, "print('hello'); import sys; print('oops', file=sys.stderr)\n")
    assert v.passed and "hello" in v.output and "oops" in v.output


def test_infinite_loop(sb):
    v = run(sb, "while True:\n    pass\n")
    assert v.status == "timeout"


def test_long_sleep(sb):
    assert run(sb, "import time\ntime.sleep(1000)\n").status == "timeout"


def test_fork_bomb(sb):
    v = run(
        sb,
        """
        import os
        while True:
            try:
                os.fork()
            except OSError:
                pass
        """,
    )
    assert v.status in ("timeout", "error")


def test_memory_bomb(sb):
    v = run(sb, "x = bytearray(2**34)\n")  # 16 GiB at once: refused by RLIMIT_AS
    assert v.status == "error" and "MemoryError" in v.detail
    v = run(sb, "x = []\nwhile True:\n    x.append(bytearray(10**7))\n")  # creeping up to it
    assert v.status in ("error", "timeout")  # error (MemoryError) unless page faults are slow


def test_huge_stdout_is_capped(sb):
    v = run(sb, "import os\nchunk = b'x' * 10**6\nfor _ in range(100):\n    os.write(1, chunk)\n")
    assert v.status == "passed"
    assert v.output_bytes == 10**8
    assert len(v.output) <= sb.config.output_limit


def test_gigabyte_file_write(sb):
    v = run(
        sb,
        """
        with open('big.bin', 'wb') as f:
            for _ in range(1024):
                f.write(b'\\0' * 2**20)
        """,
    )
    assert v.status == "error" and "File too large" in v.detail
    assert not Path("big.bin").exists()


def test_files_outside_workdir(sb, tmp_path):
    victim_dir = Path(__file__).resolve().parent / f".victim-{uuid.uuid4().hex}"
    victim_dir.mkdir(mode=0o755)
    try:
        victim = victim_dir / "victim.txt"
        victim.write_text("precious")
        os.chmod(victim, 0o644)
        host_tmp_marker = f"/tmp/qprobe-escape-{uuid.uuid4().hex}"
        v = run(
            sb,
            f"""
            import os
            errors = 0
            open({host_tmp_marker!r}, 'w').write('escaped?')   # lands in the private /tmp
            for act in (lambda: open({str(victim)!r}, 'w').write('pwned'),
                        lambda: os.remove({str(victim)!r}),
                        lambda: open({str(victim_dir / 'new.txt')!r}, 'w').write('x'),
                        lambda: os.rmdir({str(victim_dir)!r})):
                try:
                    act()
                except OSError:
                    errors += 1
            assert errors == 4, errors
            """,
        )
        assert v.status == "passed", v
        assert victim.read_text() == "precious"
        assert sorted(p.name for p in victim_dir.iterdir()) == ["victim.txt"]
        assert not Path(host_tmp_marker).exists()
    finally:
        for p in victim_dir.iterdir():
            p.unlink()
        victim_dir.rmdir()


def test_environment_secrets_are_not_visible(monkeypatch):
    secret = f"sk-{uuid.uuid4().hex}"
    monkeypatch.setenv("QPROBE_TEST_API_KEY", secret)
    with Sandbox(SandboxConfig(timeout=TIMEOUT, workers=1)) as box:  # started with the secret set
        v = run(
            box,
            f"""
            import os
            print(dict(os.environ))
            for pid in ('self', '1', str(os.getppid()), {str(os.getpid())!r}):
                for f in ('environ', 'cmdline'):
                    try:
                        print(open('/proc/%s/%s' % (pid, f), 'rb').read())
                    except OSError as e:
                        print(e)
            """,
        )
    assert v.passed
    assert secret not in v.output and "QPROBE_TEST_API_KEY" not in v.output


def test_no_network_to_host_loopback(sb):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(0.2)
    port = srv.getsockname()[1]
    try:
        v = run(
            sb,
            f"""
            import socket
            s = socket.create_connection(('127.0.0.1', {port}), timeout=0.5)
            s.sendall(b'exfiltrate')
            """,
        )
        assert v.status == "error" and "OSError" in v.detail  # network is unreachable
        with pytest.raises(TimeoutError):
            srv.accept()
    finally:
        srv.close()


def test_killing_the_parent(sb):
    v = run(
        sb,
        f"""
        import os, signal
        for target in (os.getppid(), 1, {os.getpid()}, {sb._workers[0].proc.pid}, -1):
            try:
                os.kill(target, signal.SIGKILL)
            except OSError:
                pass
        """,
    )
    assert v.status in ("passed", "error")
    assert all(w.proc is None or w.proc.poll() is None for w in sb._workers)  # workers alive
    assert run(sb, "assert True\n").passed  # and still working


def test_detached_setsid_grandchild(sb):
    marker = f"qprobe-marker-{uuid.uuid4().hex}"
    v = run(
        sb,
        f"""
        import subprocess
        subprocess.Popen(['/bin/sh', '-c', 'sleep 1000; echo {marker}'], start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import os
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                import time
                time.sleep(1000)
            os._exit(0)
        """,
        marker=marker,
    )
    assert v.passed  # the program itself finished; its detached offspring were killed


def test_ignoring_sigterm(sb):
    v = run(
        sb,
        """
        import signal
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(s, signal.SIG_IGN)
        while True:
            pass
        """,
    )
    assert v.status == "timeout"


def test_thread_spinning_forever(sb):
    v = run(
        sb,
        """
        import threading
        def spin():
            while True:
                pass
        threading.Thread(target=spin).start()   # non-daemon
        assert 1 + 1 == 2
        """,
    )
    assert v.status == "passed"  # the tests finished; the spinning thread died with the process


def test_deep_recursion_and_segfault(sb):
    v = run(sb, "def f(n):\n    return f(n + 1)\nf(0)\n")
    assert v.status == "error" and "RecursionError" in v.detail
    # Recursion through C (str -> __str__) with the limit lifted overflows the C stack.
    deep = "import sys\nsys.setrecursionlimit(10**8)\nclass X:\n    def __str__(self):\n"
    v = run(sb, deep + "        return str(X())\nstr(X())\n")
    assert (v.status, v.detail) == ("error", "killed by signal SIGSEGV")
    v = run(sb, "import ctypes\nctypes.string_at(0)\n")
    assert (v.status, v.detail) == ("error", "killed by signal SIGSEGV")


EARLY_EXITS = {
    "os._exit": "import os\nos._exit(0)\n",
    "sys.exit": "import sys\nsys.exit(0)\n",
    "SystemExit": "raise SystemExit\n",
    "atexit": "import atexit, os\natexit.register(os._exit, 0)\nimport sys\nsys.exit(0)\n",
    "close stdout": "import os, sys\nsys.stdout.close()\nos.close(1)\nos.close(2)\n",
    "fake marker": "print('passed')\nprint('All tests passed')\nimport sys\nsys.stdout.flush()\n",
    "kill self": "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n",
    "spray fds": "import os\nfor fd in range(3, 256):\n"
    "    try:\n        os.write(fd, b'passed' * 8)\n    except OSError:\n        pass\n"
    "os._exit(0)\n",
    "exit in thread": "import threading, os\nt = threading.Thread(target=os._exit, args=(0,))\n"
    "t.start()\nt.join()\n",
}


@pytest.mark.parametrize("trick", sorted(EARLY_EXITS))
def test_early_exit_never_passes(sb, trick):
    # The trick runs before a failing test; only running the tests to the end may pass.
    v = run(sb, EARLY_EXITS[trick] + "assert False, 'the tests fail'\n")
    assert v.status != "passed", (trick, v)
    # Control: the same trick *after* tests that ran to the end is fine for those tests.
    assert run(sb, "assert True\n").passed


def test_worker_killed_is_a_sandbox_error_not_a_fail():
    with Sandbox(SandboxConfig(timeout=5, workers=1)) as box:
        box.isolation()
        worker = box._workers[0]
        import threading

        threading.Timer(0.5, lambda: os.kill(worker.proc.pid, 9)).start()
        v = box.run("import time\ntime.sleep(3)\n")
        assert v.status == "sandbox_error" and v.reward is None
        for _ in range(50):  # the program's init dies with the worker (PDEATHSIG), asynchronously
            try:
                assert_nothing_left(box)
                break
            except AssertionError:
                time.sleep(0.1)
        assert_nothing_left(box)
        assert box.run("assert True\n").passed  # a fresh worker took its place


def test_streaming_and_order(sb):
    progs = ["import time\ntime.sleep(0.6)\n", "assert True\n", "assert False\n"]
    seen = [i for i, _ in sb.map(progs)]
    assert sorted(seen) == [0, 1, 2] and seen[0] != 0  # yielded as they finish, not in order
    assert [v.status for v in sb.run_all(progs)] == ["passed", "passed", "failed"]


def test_no_isolation_mode_still_limits_and_reaps():
    with Sandbox(SandboxConfig(timeout=TIMEOUT, workers=1, isolation="none")) as box:
        assert not isolation_ok(box.isolation())
        assert box.run("assert 2 + 2 == 4\n").passed
        assert box.run("import os\nos._exit(0)\nassert False\n").status == "error"
        assert box.run("while True:\n    pass\n").status == "timeout"


def test_generated_code_never_runs_in_this_process(sb):
    run(sb, "import builtins\nbuiltins.QPROBE_PWNED = True\n")
    assert not hasattr(__import__("builtins"), "QPROBE_PWNED")
    assert "QPROBE_PWNED" not in sys.modules


def test_sysv_shared_memory_does_not_outlive_the_program(sb):
    shm = "import ctypes\nlibc = ctypes.CDLL(None)\n"
    key = 0x5150 + os.getpid() % 1000
    assert run(sb, shm + f"assert libc.shmget({key}, 4096, 0o1666) >= 0\n").passed  # IPC_CREAT
    for _ in range(3):  # whichever worker runs it, the segment is gone
        assert run(sb, shm + f"assert libc.shmget({key}, 4096, 0o666) == -1\n").passed


def test_config_validation_and_require_mode():
    from qprobe.errors import QProbeError

    for bad in ({"isolation": "max"}, {"timeout": 0}, {"memory_mb": 0}, {"workers": -1}):
        with pytest.raises(QProbeError, match="sandbox: "):
            SandboxConfig(**bad)
    if os.geteuid() == 0:
        with Sandbox(SandboxConfig(isolation="require", workers=1)) as box:
            assert box.run("assert True\n").passed
