"""The code sandbox: the only place generated code ever runs.

`Sandbox(SandboxConfig(...)).map(programs)` runs each program in a fresh, isolated process and
streams back a `Verdict` (passed / failed / timeout / error / sandbox_error). See docs/sandbox.md
for what the isolation does and does not protect against, and `qprobe sandbox-check` for what is
in effect on this machine.
"""

from qprobe.sandbox.pool import STATUSES, Sandbox, SandboxConfig, Verdict, isolation_ok

__all__ = ["STATUSES", "Sandbox", "SandboxConfig", "Verdict", "isolation_ok"]
