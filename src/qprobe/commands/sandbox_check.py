"""`qprobe sandbox-check`: report the isolation the sandbox gets on this machine, and prove it."""

from __future__ import annotations

import argparse
import json
import os
import secrets
from dataclasses import dataclass, field

from qprobe.commands.flags import add_flags, from_args

# (name, program, status it must get): each program passes only when the protection holds.
CHECKS = [
    ("no network (127.0.0.1 unreachable)",
     "import socket\ntry:\n    socket.create_connection(('127.0.0.1', 22), timeout=1)\n"
     "except OSError as e:\n    assert e.errno != 111, 'loopback reachable (connection refused)'\n"
     "else:\n    raise AssertionError('connected')\n", "passed"),
    ("environment scrubbed",
     "import os\nassert 'QPROBE_SANDBOX_CHECK' not in os.environ\n"
     "assert not any('{secret}' in open(f'/proc/{p}/environ', errors='replace').read()\n"
     "    for p in os.listdir('/proc') if p.isdigit() and os.access(f'/proc/{p}/environ', os.R_OK))\n",
     "passed"),
    ("own pid namespace (sees only itself)",
     "import os\nassert len([p for p in os.listdir('/proc') if p.isdigit()]) <= 3\n", "passed"),
    ("unprivileged uid", "import os\nassert os.getuid() != 0\n", "passed"),
    ("cannot write outside its work dir",
     "import os, sys\nfor d in ('/', '/etc', sys.prefix):\n    try:\n"
     "        open(os.path.join(d, '.qprobe-check'), 'w')\n    except OSError:\n        pass\n"
     "    else:\n        raise AssertionError('wrote into ' + d)\n", "passed"),
    ("early exit does not pass", "import os\nos._exit(0)\nassert False\n", "error"),
    ("timeout fires", "while True:\n    pass\n", "timeout"),
]  # fmt: skip


@dataclass
class SandboxCheckOptions:
    json: bool = field(default=False, metadata={"action": "store_true", "help": "print JSON"})
    timeout: float = field(default=1.0, metadata={"help": "per-program timeout here, seconds"})


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sandbox-check",
        help="show and test the code sandbox's isolation on this machine",
        description="Start the sandbox, print which isolation is in effect (namespaces, uid "
        "drop, private /proc and /tmp), and run small programs that pass only if each "
        "protection holds. Exit 0 when all hold, 1 otherwise.",
    )
    add_flags(p, SandboxCheckOptions)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qprobe.sandbox import Sandbox, SandboxConfig, isolation_ok

    o = from_args(SandboxCheckOptions, args)
    secret = secrets.token_hex(16)
    os.environ["QPROBE_SANDBOX_CHECK"] = secret  # must not be visible to programs
    try:
        with Sandbox(SandboxConfig(timeout=o.timeout, workers=2)) as sb:
            rep = sb.isolation()
            progs = [code.replace("{secret}", secret) for _, code, _ in CHECKS]
            verdicts = sb.run_all(progs)
    finally:
        del os.environ["QPROBE_SANDBOX_CHECK"]
    results = [
        {"check": name, "ok": v.status == want, "status": v.status, "detail": v.detail}
        for (name, _, want), v in zip(CHECKS, verdicts)
    ]
    ok = all(r["ok"] for r in results)
    if o.json:
        print(json.dumps({"isolation": rep, "strong": isolation_ok(rep), "checks": results,
                          "ok": ok}, indent=2))  # fmt: skip
        return 0 if ok else 1
    features = ["root", "userns", "netns", "pidns", "mountns", "procfs", "tmpfs", "uid_drop",
                "no_new_privs", "readonly_fs", "ipcns", "utsns"]  # fmt: skip
    print("isolation: " + ", ".join(f"{k} {'yes' if rep.get(k) else 'no'}" for k in features))
    if rep.get("hidden"):
        print(f"hidden from programs: {', '.join(rep['hidden'])}")
    for e in rep.get("errors", []):
        print(f"unavailable: {e}")
    print(f"strong isolation: {'yes' if isolation_ok(rep) else 'NO (rlimits and uid only)'}")
    for r in results:
        mark = "ok  " if r["ok"] else "FAIL"
        print(f"  {mark} {r['check']}" + ("" if r["ok"] else f" ({r['status']}: {r['detail']})"))
    return 0 if ok else 1
