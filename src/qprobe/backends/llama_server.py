"""llama.cpp's OpenAI-compatible server (`python -m llama_cpp.server`, from
llama-cpp-python[server]) as a child process on 127.0.0.1.

The API experiments serve a GGUF with it (experiments/gsm8k_pal_api.py) and the API backend's
tests run against it (tests/llama_server.py): one place starts it, waits until it answers and
stops it. Only loopback, a free port, and an API key when one is given.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from qprobe.errors import QProbeError

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(proc: subprocess.Popen, url: str, log_path: Path, timeout: float, what: str,
               headers: dict[str, str] | None = None) -> None:
    """Poll `url`/v1/models until it answers 200; raise (with the log's last line) if the
    process exits or `timeout` passes."""
    deadline = time.monotonic() + timeout
    req = urllib.request.Request(url + "/v1/models", headers=headers or {})
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise QProbeError(f"{what} exited with {proc.returncode} ({_last_line(log_path)}); "
                              f"log: {log_path}")
        try:
            with _NO_PROXY.open(req, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.25)
    raise QProbeError(f"{what} not ready after {timeout:.0f} s; log: {log_path}")


def _last_line(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "no log"
    return lines[-1][:300] if lines else "empty log"


def stop_process(proc: subprocess.Popen, log: Any, grace_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `grace_s`; close its log file."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=grace_s)
    log.close()


class LlamaCppServer:
    """`python -m llama_cpp.server` serving `models` (llama_cpp.server model settings, one dict
    per alias: model, model_alias, n_ctx, n_threads, logits_all, embedding, ...) on 127.0.0.1.

    Started at construction (ready when it returns), stopped by `stop()` or at the end of a
    `with` block; its config (removed at stop: it holds the key) and log go to `workdir`.
    api_key: required of every request (None: none)."""

    def __init__(self, models: list[dict[str, Any]], workdir: Path, api_key: str | None = None,
                 ready_timeout: float = 120.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        config: dict[str, Any] = {"host": "127.0.0.1", "port": self.port,
                                  "interrupt_requests": False, "models": models}
        if api_key:
            config["api_key"] = api_key
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self._config = workdir / "llama_server.json"  # holds the key: removed at stop
        self._config.touch(mode=0o600)
        self._config.write_text(json.dumps(config))
        self.log_path = workdir / "llama_server.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--config_file", str(self._config)],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            wait_ready(self.proc, self.url, self.log_path, ready_timeout, "llama_cpp.server",
                       {"Authorization": f"Bearer {api_key}"} if api_key else None)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        stop_process(self.proc, self._log, grace_s=20.0)
        self._config.unlink(missing_ok=True)

    def __enter__(self) -> LlamaCppServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
